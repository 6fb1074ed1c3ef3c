"""Where and how computations run: the runtime config, devices, precision, threads, torchrun, provenance.

The bottom layer of widthkit: shared by the evaluator, the curvature code and the trainer; holds no model or
data state. :class:`RuntimeConfig` is the one home of the device, precision, thread count, forward batch size
and speed levers; :mod:`.device`, :mod:`.precision`, :mod:`.threads` and :mod:`.distributed` are their only
resolvers.

Reproducibility, stated as it is: results are bit-identical for the same device, the same number of intra-op
threads (``torch.get_num_threads()``) and the same precision policy; :func:`provenance` records all three in
every file and checkpoint widthkit writes. Different thread counts sum in a different order, so the last
bits of a loss (and, over a training run, the weights) differ.
"""

from __future__ import annotations

import platform

import torch

from .._version import __version__
from . import distributed
from .config import RUNTIME_FIELDS, RuntimeConfig, parse_auto_bool, parse_auto_int
from .device import (DEFAULT_BATCH_SIZE, canonical, default_batch_size, free_memory, memory_budget, parse_bytes,
                     resolve_device, same_device)
from .precision import PRECISIONS, autocast, normalize_precision, precision_policy, precision_record, tf32_state
from .threads import choose_threads, tune_allocator

__all__ = [
    "RuntimeConfig", "RUNTIME_FIELDS", "parse_auto_bool", "parse_auto_int", "DEFAULT_BATCH_SIZE", "canonical",
    "default_batch_size", "free_memory", "memory_budget", "parse_bytes", "resolve_device", "same_device",
    "PRECISIONS", "autocast", "normalize_precision", "precision_policy", "precision_record", "tf32_state",
    "choose_threads", "tune_allocator", "random_subset", "provenance", "start",
]


def start(runtime: RuntimeConfig) -> torch.device:
    """Resolve ``runtime``'s device once, at the edge of a run, and under torchrun join the process group
    with the backend that device needs (:func:`widthkit.runtime.distributed.init`). Returns the device."""
    device = runtime.resolved_device()
    distributed.init(device)
    return device


def random_subset(n: int, k: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of a fixed random subset of ``k`` of ``n`` items (CPU generator: the same on any
    device), or None when ``k`` is None or covers everything."""
    if k is None or k >= n:
        return None
    if k < 1:
        raise ValueError(f"a subset needs at least one example, got {k}")
    return torch.randperm(n, generator=torch.Generator(device="cpu").manual_seed(int(seed)))[:k].sort().values



def provenance(device: torch.device | str | None = None, precision: str | bool = "fp32") -> dict:
    """What a result's last bits depend on: device, intra-op threads, precision policy, library versions.

    ``precision``: the policy the computation ran under (:func:`precision_policy`), recorded as its effect on
    ``device`` (:func:`precision_record`: TF32 flags only on CUDA, where they mean something).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return {
        "widthkit_version": __version__,
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda or "",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "threads": int(torch.get_num_threads()),
        **precision_record(precision, dev),
    }
