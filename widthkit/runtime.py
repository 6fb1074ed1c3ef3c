"""Where and how computations run: device, precision, threads, fixed random subsets, provenance.

Shared by the evaluator, the curvature code and the trainer; holds no model or data state.

Reproducibility, stated as it is: results are bit-identical for the same device, the same number of intra-op
threads (``torch.get_num_threads()``) and the same precision policy; :func:`provenance` records all three in
every file and checkpoint widthkit writes. Different thread counts sum in a different order, so the last
bits of a loss (and, over a training run, the weights) differ.
"""

from __future__ import annotations

import contextlib
import math
import platform
import time
from typing import Callable

import torch

from ._version import __version__

# One batch-size policy for every forward pass widthkit makes (evaluation, BN recomputation, the trainer's
# evaluations). On CPU, glibc hands large activation buffers back to the OS after every op and page-faults
# them in again; batches of 64 stay under that threshold and were at or near the best for ResNet-20/56 and
# VGG16 on 2 cores (benchmarks/RESULTS.md: 1.3-2.1x faster than 256). On a GPU, big batches keep it busy.
DEFAULT_BATCH_SIZE = {"cpu": 64, "cuda": 4096}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; a CUDA device asked for without CUDA is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} but CUDA is not available here; use device 'cpu' or 'auto'")
    return dev


def default_batch_size(device: torch.device) -> int:
    """Forward-pass batch size when none is given (see :data:`DEFAULT_BATCH_SIZE`)."""
    return DEFAULT_BATCH_SIZE.get(torch.device(device).type, DEFAULT_BATCH_SIZE["cuda"])


def autocast(device: torch.device, amp: bool):
    """bf16 autocast for forward passes when ``amp`` (callers check it is CUDA), else nothing."""
    if amp:
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_amp(device: torch.device, amp: bool) -> None:
    """``ValueError`` when bf16 autocast is asked for off CUDA (the CPU path is float32 only)."""
    if amp and torch.device(device).type != "cuda":
        raise ValueError("amp (bf16 autocast) is only supported on CUDA devices; drop --amp (amp=False) on CPU")


def random_subset(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a fixed random subset of ``k`` of ``n`` items (CPU generator: the same on any
    device), or None when ``k`` is None or covers everything."""
    if k is None or k >= n:
        return None
    if k < 1:
        raise ValueError(f"a subset needs at least one example, got {k}")
    return torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(int(seed)))[:k].sort().values


def provenance(device: torch.device | str | None = None, amp: bool = False) -> dict:
    """What a result's last bits depend on: device, intra-op threads, precision policy, library versions."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = {
        "widthkit_version": __version__,
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda or "",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "threads": int(torch.get_num_threads()),
        "precision": "bf16-autocast" if amp else "fp32",
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
    }
    return out


def tune_allocator() -> bool:
    """Keep glibc from returning large activation buffers to the OS after every op (and faulting them back in).

    A process-wide setting, so only entry points (the commands, the benchmarks) call it, never the library.
    Measured on 2 CPU cores: ResNet-56 evaluation at batch 64 went from 134 to 213-249 images/s
    (benchmarks/RESULTS.md). ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set by the user take
    precedence. Returns False where glibc's ``mallopt`` is not available.
    """
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # buffers below 32 MiB (glibc's maximum) come from the heap; keep up to 1 GiB of freed heap
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def choose_threads(measure: Callable[[], object], requested: int | None = None, recorded: int | None = None,
                   repeats: int = 2) -> dict:
    """Set this process's intra-op thread count for the work ``measure()`` stands for; returns how it chose.

    PyTorch's default (one thread per core) is the fastest on an idle CPU, but when other programs share the
    cores its threads wait on each other and small models run several times slower (PERF-NOTES.md: digits
    rays 22.6 s with 2 threads beside a busy process, 8.8 s with one). So, unless ``requested`` fixes the
    count: a file being resumed keeps the ``recorded`` count (its results stay bit-identical to an
    uninterrupted run), otherwise ``measure()`` is timed at the default count and at one thread, alternately,
    ``repeats`` times each, and the faster count (the best of its timings) is kept.

    Returns ``{"threads": n, "chosen_by": "flag" | "resumed file" | "timing" | "single thread",
    "seconds": {count: best seconds}}`` (recorded in every file's provenance).
    """
    if requested is not None:
        torch.set_num_threads(int(requested))
        return {"threads": int(requested), "chosen_by": "flag", "seconds": {}}
    if recorded is not None:
        torch.set_num_threads(int(recorded))
        return {"threads": int(recorded), "chosen_by": "resumed file", "seconds": {}}
    default = torch.get_num_threads()
    if default == 1:
        return {"threads": 1, "chosen_by": "single thread", "seconds": {}}
    seconds = {default: math.inf, 1: math.inf}
    for _ in range(repeats):
        for n in (default, 1):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            measure()
            seconds[n] = min(seconds[n], time.perf_counter() - t0)
    best = default if seconds[default] <= seconds[1] else 1
    torch.set_num_threads(best)
    return {"threads": best, "chosen_by": "timing", "seconds": seconds}


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value, what: str = "size") -> int:
    """``"8GB"``, ``"500MB"``, ``"1.5GiB"``, ``"4096"`` or an int -> bytes (decimal units, binary with ``i``)."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size such as 8GB, 500MB or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        import re

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
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_budget(device: torch.device | str, max_memory=None) -> int:
    """The bytes one split may keep resident on ``device``: ``max_memory`` when given, else half the free memory."""
    if max_memory is not None:
        return parse_bytes(max_memory, "max_memory")
    return free_memory(device) // 2
