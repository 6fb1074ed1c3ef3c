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


PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def normalize_precision(precision) -> str:
    """A precision policy name (``"fp32"``, ``"tf32"``, ``"bf16"``) from a name or from the old boolean ``amp``
    flag (True -> ``"bf16"``, False -> ``"fp32"``); anything else is a ``ValueError``."""
    if isinstance(precision, bool):
        return "bf16" if precision else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision=False, cache_enabled: bool | None = None):
    """bf16 autocast for forward passes when ``precision`` is ``"bf16"`` (or True, the old ``amp`` flag), on
    CUDA or CPU; otherwise nothing. Weights stay float32: autocast casts per op, the parameters are untouched."""
    if normalize_precision(precision) == "bf16":
        kw = {} if cache_enabled is None else {"cache_enabled": cache_enabled}
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, **kw)
    return contextlib.nullcontext()


def check_amp(device: torch.device, amp: bool) -> None:
    """``ValueError`` when the trainer's bf16 autocast (``amp``) is asked for off CUDA (its CPU path is float32
    only; the evaluator's ``precision="bf16"`` runs on CPU too)."""
    if amp and torch.device(device).type != "cuda":
        raise ValueError("amp (bf16 autocast) is only supported on CUDA devices; drop --amp (amp=False) on CPU")


# -- the precision policy: TF32 on or off explicitly, never by accident ---------------------------------------
# torch >= 2.9 sets TF32 per backend and operation (``torch.backends.cuda.matmul.fp32_precision = "tf32" |
# "ieee"``); the older flags (``allow_tf32``, ``set_float32_matmul_precision``) still work but reading them
# raises once the new API has been used in the process. So the policy reads and writes the new API where it
# exists and puts back exactly the values it found (after which the old flags read as before).

def _fp32_leaves(device_type: str) -> dict:
    """{name: backend object with ``fp32_precision``} that decide float32 math on this device type, or {}
    on a torch without the per-backend API."""
    b = torch.backends
    try:
        leaves = ({"matmul": b.cuda.matmul, "conv": b.cudnn.conv} if device_type == "cuda"
                  else {"matmul": b.mkldnn.matmul, "conv": b.mkldnn.conv})
        for leaf in leaves.values():
            leaf.fp32_precision  # noqa: B018 - probe: AttributeError on torch < 2.9
        return leaves
    except AttributeError:
        return {}


def _resolved(value: str, parents) -> str:
    """A per-backend ``fp32_precision`` with ``"none"`` resolved through its parents (then "ieee")."""
    for parent in parents:
        if value != "none":
            break
        value = parent.fp32_precision
    return "ieee" if value == "none" else value


def tf32_state() -> dict:
    """Whether float32 CUDA matmuls and cuDNN convolutions may use TF32 right now, read without touching the
    flags (and without the error torch raises when old and new flag APIs have been mixed)."""
    b = torch.backends
    leaves = _fp32_leaves("cuda")
    if leaves:
        return {"matmul": _resolved(leaves["matmul"].fp32_precision, [b]) == "tf32",
                "conv": _resolved(leaves["conv"].fp32_precision, [b.cudnn, b]) == "tf32"}
    return {"matmul": bool(b.cuda.matmul.allow_tf32), "conv": bool(b.cudnn.allow_tf32)}


@contextlib.contextmanager
def precision_policy(precision, device):
    """Apply a precision policy's math flags for the duration of the block and restore them on exit.

    On CUDA, ``"tf32"`` allows TF32 for float32 matmuls and cuDNN convolutions, ``"fp32"`` and ``"bf16"``
    forbid it (bf16's forward passes run under :func:`autocast`; whatever autocast leaves in float32 is then
    computed in full float32). On CPU every policy pins oneDNN's float32 matmuls and convolutions to IEEE
    float32 (a process-wide ``set_float32_matmul_precision("medium")`` would otherwise make them bf16), and
    ``"tf32"`` has no effect: CPUs here compute it as ``"fp32"``. Only the flags of ``device``'s type are
    touched, so a CPU run never changes the CUDA flags.
    """
    dev = torch.device(device)
    precision = normalize_precision(precision)
    mode = "tf32" if precision == "tf32" and dev.type == "cuda" else "ieee"
    leaves = _fp32_leaves(dev.type)
    if leaves:
        saved = {name: leaf.fp32_precision for name, leaf in leaves.items()}
        try:
            for leaf in leaves.values():
                leaf.fp32_precision = mode
            yield
        finally:
            for name, leaf in leaves.items():
                leaf.fp32_precision = saved[name]
        return
    # torch < 2.9: the old flags
    b = torch.backends
    if dev.type == "cuda":
        saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
        try:
            b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = mode == "tf32"
            yield
        finally:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved
    else:
        saved_fmp = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("highest")
            yield
        finally:
            torch.set_float32_matmul_precision(saved_fmp)


def precision_record(precision, device) -> dict:
    """What :func:`precision_policy` makes of ``precision`` on ``device``, as recorded in provenance."""
    dev = torch.device(device)
    precision = normalize_precision(precision)
    rec = {"precision": precision, "autocast": "bfloat16" if precision == "bf16" else None}
    if dev.type == "cuda":
        rec.update(tf32_matmul=precision == "tf32", tf32_conv=precision == "tf32")
        rec["precision_effect"] = {
            "fp32": "float32 throughout: TF32 off for matmuls and cuDNN convolutions",
            "tf32": "TF32 tensor cores for float32 matmuls and cuDNN convolutions (inputs rounded to 10 mantissa "
                    "bits, float32 accumulation)",
            "bf16": "bf16 autocast for forward passes; weights and perturbations float32, sums float64; TF32 off",
        }[precision]
    else:
        rec["precision_effect"] = {
            "fp32": "float32 throughout (oneDNN float32 math pinned to IEEE)",
            "tf32": "no effect on CPU: computed as fp32 (float32 throughout)",
            "bf16": "bf16 autocast (CPU) for forward passes; weights and perturbations float32, sums float64",
        }[precision]
    return rec


def random_subset(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a fixed random subset of ``k`` of ``n`` items (CPU generator: the same on any
    device), or None when ``k`` is None or covers everything."""
    if k is None or k >= n:
        return None
    if k < 1:
        raise ValueError(f"a subset needs at least one example, got {k}")
    return torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(int(seed)))[:k].sort().values


def provenance(device: torch.device | str | None = None, amp: bool = False, *, precision: str | None = None) -> dict:
    """What a result's last bits depend on: device, intra-op threads, precision policy, library versions.

    ``precision``: the policy the computation ran under (:func:`precision_policy`); recorded as its effect on
    ``device`` (:func:`precision_record`: TF32 flags only on CUDA, where they mean something). Callers that
    apply no policy pass the old ``amp`` flag instead; then the TF32 flags are recorded as found (on CUDA).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = {
        "widthkit_version": __version__,
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda or "",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "threads": int(torch.get_num_threads()),
    }
    if precision is not None:
        out.update(precision_record(precision, dev))
    else:
        out["precision"] = normalize_precision(bool(amp))
        if dev.type == "cuda":
            flags = tf32_state()
            out.update(tf32_matmul=flags["matmul"], tf32_conv=flags["conv"])
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
