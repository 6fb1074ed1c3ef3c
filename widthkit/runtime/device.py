"""Devices, resolved once and compared by what they are; memory budgets; the batch-size policy.

``torch.device("cuda") != torch.device("cuda:0")`` although both name the same GPU, so a device is resolved
to its indexed form (``cuda`` -> ``cuda:<current>``, ``cpu:0`` -> ``cpu``) at the edge, by
:func:`resolve_device`, and everything below compares resolved devices (:func:`same_device`). Under torchrun,
``auto``/``cuda`` mean this rank's local GPU.
"""

from __future__ import annotations

import os
import re

import torch

# One batch-size policy for every forward pass widthkit makes (evaluation, BN recomputation, the trainer's
# evaluations). On CPU, glibc hands large activation buffers back to the OS after every op and page-faults
# them in again; batches of 64 stay under that threshold and were at or near the best for ResNet-20/56 and
# VGG16 on 2 cores (benchmarks/RESULTS.md: 1.3-2.1x faster than 256). On a GPU, big batches keep it busy.
DEFAULT_BATCH_SIZE = {"cpu": 64, "cuda": 4096}


def _torchrun_local_rank() -> int | None:
    """This process's LOCAL_RANK when launched by torchrun with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return int(os.environ.get("LOCAL_RANK", "0"))
    return None


def canonical(device: str | torch.device) -> torch.device:
    """A device in its one spelling: ``cuda`` -> ``cuda:<current device>``, ``cpu:0`` -> ``cpu``.

    Does not check availability (see :func:`resolve_device`); used to compare devices by what they are.
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", index)
    if dev.type == "cpu":
        return torch.device("cpu")
    return dev


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Whether ``a`` and ``b`` are the same device (``cuda`` and ``cuda:0`` are, when 0 is current)."""
    return canonical(a) == canonical(b)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The concrete device a run uses, resolved once at the edge.

    ``"auto"``/None -> this rank's GPU (torchrun's LOCAL_RANK), else the current GPU, else CPU; ``"cuda"`` ->
    ``cuda:<index>`` likewise; ``"cpu"`` -> CPU even where a GPU exists. A CUDA device asked for without
    CUDA, or an index past the last GPU, is a ``ValueError`` that says what to use instead.
    """
    local = _torchrun_local_rank()
    if device in (None, "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device 'cpu' or 'auto'")
        if dev.index is None:
            dev = torch.device("cuda", local if local is not None else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(device)!r} but this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
        return dev
    if dev.type != "cpu":
        raise ValueError(f"unsupported device {str(device)!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def default_batch_size(device: torch.device) -> int:
    """Forward-pass batch size when none is given (see :data:`DEFAULT_BATCH_SIZE`)."""
    return DEFAULT_BATCH_SIZE.get(torch.device(device).type, DEFAULT_BATCH_SIZE["cuda"])


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value, what: str = "size") -> int:
    """``"8GB"``, ``"500MB"``, ``"1.5GiB"``, ``"4096"`` or an int -> bytes (decimal units, binary with ``i``)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size such as 8GB, 500MB or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what} must be a size such as 8GB, 500MB, 2GiB or a number of bytes, got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return size


def free_memory(device: torch.device | str) -> int:
    """Bytes free for data on ``device``: the CUDA device's free memory, or the host's available memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(canonical(dev))
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_budget(device: torch.device | str, max_memory=None) -> int:
    """The bytes one split may keep resident on ``device``: ``max_memory`` when given, else half the free memory."""
    if max_memory is not None:
        return parse_bytes(max_memory, "max_memory")
    return free_memory(device) // 2
