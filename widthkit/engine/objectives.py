"""What is measured at a point: cross-entropy sums and error counts over a split, and the metric names.

The evaluator and the trainer both measure a model through :func:`split_sums`, so "test error" means the same
thing in a training log and in an analysis file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import autocast

SPLITS: tuple[str, ...] = ("train", "test")
BASE_METRICS: tuple[str, ...] = ("train_loss", "train_err", "test_loss", "test_err")
L2_METRIC = "train_loss_l2"  # train cross-entropy + ½·wd·‖θ‖², the regularised objective the SWA paper plots


def split_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, out: torch.Tensor,
               amp: bool = False) -> None:
    """Add the cross-entropy sum and the error count of ``model`` over ``(x, y)`` to ``out`` (2,) float64.

    Batches of ``batch_size``; everything stays on the device (no host synchronisation). The model is
    called as it is (its train/eval mode is the caller's business).
    """
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with autocast(x.device, amp):
            logits = model(xb)
        logits = logits.float()
        out[0] += F.cross_entropy(logits, yb, reduction="sum").double()
        out[1] += (logits.argmax(dim=1) != yb).sum().double()


def metric_names(splits=SPLITS, weight_decay: float = 0.0) -> list[str]:
    """The metrics evaluated for ``splits``: loss and error per split, and the L2 objective when wd > 0."""
    names = [m for m in BASE_METRICS if m.split("_")[0] in splits]
    if weight_decay > 0 and "train" in splits:
        names.append(L2_METRIC)
    return names
