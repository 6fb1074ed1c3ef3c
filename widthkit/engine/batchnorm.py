"""BatchNorm statistics: which modules hold them, and recomputing them at a point in weight space.

The one recomputation the evaluator (at every point, ``bn_mode="recompute"``) and the curvature operator (once
at θ₀) share: reset the running statistics, then one pass over the inputs with only the BatchNorm layers in
train mode (dropout stays off, so the pass is deterministic), averaged over batches with equal weights as
``torch.optim.swa_utils.update_bn`` does.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

BatchNorm = nn.modules.batchnorm._BatchNorm


def bn_modules(model: nn.Module) -> list[BatchNorm]:
    """The BatchNorm layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, BatchNorm)]


@torch.no_grad()
def recompute_bn_statistics(model: nn.Module, inputs: Iterable[torch.Tensor],
                            forward: Callable[[torch.Tensor], object] | None = None,
                            bns: Sequence[BatchNorm] | None = None) -> None:
    """Reset the BatchNorm statistics of ``model`` (a private copy) and recompute them from ``inputs`` (batches).

    The momentum of batch i is 1/(i+1): the cumulative average of ``momentum=None`` (update_bn's), computed
    without reading the batch count back from the device, so the pass can be captured in a CUDA graph.
    ``forward(x)`` runs the model (default ``model(x)``: pass one to add autocast or a forward adapter);
    ``bns``: the model's BatchNorm layers when the caller already holds them. Modes and momenta are restored.
    """
    bns = bn_modules(model) if bns is None else bns
    if not bns:
        return
    forward = forward or model
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.train()
    try:
        for i, x in enumerate(inputs):
            for m in bns:
                m.momentum = 1.0 / (i + 1)
            forward(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
            m.eval()
