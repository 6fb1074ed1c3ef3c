"""Ensembles: the averaged predictive distribution of several models, and what it says about them.

An ensemble predicts with the mean of its members' softmax outputs, p̄(y|x) = (1/M) Σᵢ softmax(fᵢ(x))_y
(Snapshot Ensembles, Huang et al. 2017; Fast Geometric Ensembling, Garipov et al. 2018,
https://arxiv.org/abs/1802.10026). Its cost at test time is M forward passes per prediction; the SWA paper's
claim (Izmailov et al. 2018, on SWA's connection to ensembling) is that one model at the average of the same weights, SWA, comes close
to it at the cost of one.

Everything here is a small function over tensors (no files, no printing): log-probabilities are accumulated in
float64 with ``logaddexp``, so a member whose softmax underflows for the true class does not turn the ensemble's
NLL infinite, and the average of M members equals ``mean(softmax)`` to float64 rounding.

>>> acc = EnsembleAccumulator(labels)              # labels (N,) int64
>>> for logits in member_logits:                    # (N, C) each
...     member, ensemble = acc.add(logits)          # (nll, err %) of the member and of the first k together
>>> acc.probabilities()                             # (N, C) float64: the ensemble's prediction
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Refuse outputs an ensemble cannot average: anything but (N, classes) scores for N integer labels."""
    if not torch.is_tensor(logits) or logits.dim() != 2:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"an ensemble averages class probabilities: each member's outputs must be (N, classes), "
                         f"got {shape}; pass forward= to adapt the model's output")
    if labels.dim() != 1 or labels.is_floating_point() or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"an ensemble scores integer class labels (N,) = ({logits.shape[0]},), got labels "
                         f"{tuple(labels.shape)} {labels.dtype}")


def nll_and_error(log_probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean negative log-likelihood in nats, top-1 error in %) of log-probabilities (N, C) for labels (N,)."""
    nll = -log_probs.gather(1, labels[:, None]).double().mean()
    err = (log_probs.argmax(dim=1) != labels).double().mean() * 100.0
    return float(nll), float(err)


def disagreement(predictions: torch.Tensor) -> np.ndarray:
    """(M, M) pairwise disagreement in %: the share of examples on which members i and j predict different
    classes (top-1), from their predictions (M, N) int."""
    p = predictions.to(torch.int64)
    return ((p[:, None, :] != p[None, :, :]).double().mean(dim=2) * 100.0).cpu().numpy()


class EnsembleAccumulator:
    """The running ensemble of members added one at a time, on the labels' device.

    Args:
        labels: (N,) int64 class labels of the examples every member predicts, in the same order.
    """

    def __init__(self, labels: torch.Tensor):
        self.labels = labels.to(torch.int64)
        self.log_sum: torch.Tensor | None = None  # log Σᵢ softmaxᵢ, (N, C) float64
        self.members = 0
        self.predictions: list[torch.Tensor] = []  # (N,) int64 per member

    def add(self, logits: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
        """Add one member's outputs (N, C); returns its own (nll, err %) and the ensemble's of all members so far."""
        check_logits(logits, self.labels)
        if self.log_sum is not None and logits.shape != self.log_sum.shape:
            raise ValueError(f"members predict differently shaped outputs: {tuple(logits.shape)} after "
                             f"{tuple(self.log_sum.shape)}")
        log_p = F.log_softmax(logits.to(device=self.labels.device, dtype=torch.float64), dim=1)
        self.log_sum = log_p if self.log_sum is None else torch.logaddexp(self.log_sum, log_p)
        self.members += 1
        self.predictions.append(log_p.argmax(dim=1))
        return nll_and_error(log_p, self.labels), nll_and_error(self.log_probabilities(), self.labels)

    def log_probabilities(self) -> torch.Tensor:
        """(N, C) float64 log of the ensemble's averaged softmax."""
        if self.log_sum is None:
            raise ValueError("the ensemble has no member yet")
        return self.log_sum - math.log(self.members)

    def probabilities(self) -> torch.Tensor:
        """(N, C) float64: the mean of the members' softmax outputs."""
        return self.log_probabilities().exp()

    def disagreement(self) -> np.ndarray:
        """(M, M) pairwise disagreement of the members added, in % of the examples (see :func:`disagreement`)."""
        return disagreement(torch.stack(self.predictions))
