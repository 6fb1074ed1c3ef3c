"""CPU threads chosen by measurement, and the allocator tuning entry points apply."""

from __future__ import annotations

import math
import time
from typing import Callable

import torch


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
    ``repeats`` times each, and the faster count (the best of its timings) is kept. ``measure`` must be short and
    must not grow with the data (a few forward batches, :meth:`widthkit.engine.evaluator.Evaluator.probe_forward`;
    a few SGD steps): it runs ``2 · repeats`` times before the first point (whole points over MNIST-size data
    took 16 minutes on a busy 2-core machine).

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


