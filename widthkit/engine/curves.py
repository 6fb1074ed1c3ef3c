"""Curves between two solutions in weight space (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs", https://arxiv.org/abs/1802.10026, section 3).

A curve with k bends is φ(t) = Σᵢ cᵢ(t)·pᵢ, t ∈ [0, 1], through control points p₀ = w₁ (fixed), p₁ … p_k (the
bends, trained) and p_{k+1} = w₂ (fixed):

- ``bezier``: cᵢ(t) = C(n, i)·tⁱ·(1 − t)ⁿ⁻ⁱ with n = k + 1 (Bernstein polynomials); with one bend,
  φ(t) = (1 − t)²·w₁ + 2t(1 − t)·θ + t²·w₂, the paper's eq. for the quadratic Bezier curve;
- ``polychain``: the polygonal chain w₁ → p₁ → … → w₂, each segment run in 1/(k + 1) of t, cᵢ(t) =
  max(0, 1 − |(k + 1)·t − i|).

The coefficients sum to one, so φ(t) = w₁ + Σ_{i≥1} cᵢ(t)·(pᵢ − w₁): a point of the curve is the evaluator's
origin w₁ plus coordinates cᵢ(t) along the basis pᵢ − w₁ (:func:`curve_basis`, :func:`curve_coordinates`), and the
batched evaluator, BatchNorm recomputation included, evaluates a curve exactly as it evaluates a line.

Training (:class:`CurveModel`): the endpoints stay fixed; each forward pass draws t ~ U(0, 1) (once per batch)
and runs the network at φ(t), so SGD on the bends minimises the expected loss over the curve, with the L2 term
½·wd·‖φ(t)‖² on the sampled weights as in the authors' code.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .space import ThetaLayout

CurveKind = Literal["bezier", "polychain"]
CURVE_KINDS: tuple[str, ...] = ("bezier", "polychain")


def check_curve(kind: str, bends: int) -> None:
    """``ValueError`` for an unknown kind or a bend count below one (a curve with no bend is the line)."""
    if kind not in CURVE_KINDS:
        raise ValueError(f"unknown curve kind {kind!r}; valid choices: {', '.join(CURVE_KINDS)}")
    if isinstance(bends, bool) or not isinstance(bends, int) or bends < 1:
        raise ValueError(f"--bends must be an integer >= 1 (a curve with no bend is the straight line, which the "
                         f"curve's evaluation draws beside it anyway), got {bends!r}")


def _t(t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    if t.dim() > 1:
        raise ValueError(f"t must be a number or a (T,) vector, got shape {tuple(t.shape)}")
    if bool(((t < 0) | (t > 1)).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError("t must lie in [0, 1] (0: the first endpoint, 1: the second)")
    return t


def bezier_coefficients(t, bends: int) -> torch.Tensor:
    """Bernstein coefficients of the k + 2 control points at ``t`` (a number or (T,)): (T, k + 2) float64
    (a number gives (k + 2,))."""
    check_curve("bezier", bends)
    tt = _t(t)
    n = bends + 1
    i = torch.arange(n + 1, dtype=torch.float64)
    binom = torch.tensor([math.comb(n, int(j)) for j in i], dtype=torch.float64)
    x = tt.reshape(-1, 1)
    c = binom * x ** i * (1 - x) ** (n - i)
    return c.reshape(*tt.shape, n + 1)


def polychain_coefficients(t, bends: int) -> torch.Tensor:
    """Coefficients of the k + 2 nodes of the polygonal chain at ``t``: hat functions max(0, 1 − |(k+1)·t − i|),
    (T, k + 2) float64 (a number gives (k + 2,))."""
    check_curve("polychain", bends)
    tt = _t(t)
    n = bends + 1
    c = torch.clamp(1.0 - (tt.reshape(-1, 1) * n - torch.arange(n + 1, dtype=torch.float64)).abs(), min=0.0)
    return c.reshape(*tt.shape, n + 1)


COEFFICIENTS = {"bezier": bezier_coefficients, "polychain": polychain_coefficients}


def coefficients(kind: str, t, bends: int) -> torch.Tensor:
    """:func:`bezier_coefficients` or :func:`polychain_coefficients` by name."""
    check_curve(kind, bends)
    return COEFFICIENTS[kind](t, bends)


def initial_bends(start: torch.Tensor, end: torch.Tensor, bends: int) -> torch.Tensor:
    """The bends before training: evenly spaced on the segment, pᵢ = w₁ + i/(k + 1)·(w₂ − w₁), (k, D) (as the
    authors initialise them). A Bezier curve with these bends is the straight line itself."""
    check_curve("bezier", bends)
    s = torch.arange(1, bends + 1, dtype=torch.float64, device=start.device)[:, None] / (bends + 1)
    return (start.double() + s * (end.double() - start.double())).to(start.dtype)


def curve_basis(start: torch.Tensor, bends: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(origin (D,), basis (k + 1, D))``: origin w₁, rows p₁ − w₁, …, p_k − w₁, w₂ − w₁ (float32), in which
    the curve's point at t has the coordinates :func:`curve_coordinates` (t)."""
    if bends.dim() != 2 or bends.shape[1] != start.numel() or start.shape != end.shape:
        raise ValueError(f"bends must be (k, D) with D = {start.numel()}, got {tuple(bends.shape)}")
    points = torch.cat([bends.float(), end.float()[None]])
    return start.float().clone(), points - start.float()[None]


def curve_coordinates(kind: str, t, bends: int) -> np.ndarray:
    """(T, k + 1) float64 coordinates of the curve's points at ``t`` along :func:`curve_basis`: the coefficients
    of p₁ … p_{k+1}."""
    return coefficients(kind, np.atleast_1d(np.asarray(t, dtype=np.float64)), bends)[:, 1:].numpy()


def curve_points(kind: str, t, points: torch.Tensor) -> torch.Tensor:
    """(T, D) points of the curve through the control points ``points`` (k + 2, D) at ``t`` (T,), in float64."""
    c = coefficients(kind, np.atleast_1d(np.asarray(t, dtype=np.float64)), points.shape[0] - 2)
    return c.to(points.device) @ points.double()


def barrier(values) -> float:
    """The barrier along a path: the largest value minus the mean of the two endpoints' (the first and the last
    of ``values`` (T,), t = 0 and 1); NaN when a value is missing."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise ValueError(f"a barrier needs the values along the path (T >= 2,), got shape {v.shape}")
    if not np.isfinite(v).all():
        return math.nan
    return float(v.max() - 0.5 * (v[0] + v[-1]))


class CurveModel(nn.Module):
    """A network whose weights are the point φ(t) of a curve; the bends (k, D) are its only trainable parameters.

    Args:
        model: the architecture (copied; its BatchNorm buffers serve the forward passes in train mode).
        start, end: (D,) θ of the fixed endpoints, in ``ThetaLayout.from_model(model)`` order.
        bends: the number of bends k (initialised on the segment, :func:`initial_bends`).
        kind: ``"bezier"`` or ``"polychain"``.
        weight_decay: wd of the L2 term ½·wd·‖φ(t)‖² (:meth:`penalty`).
        generator: CPU generator drawing t ~ U(0, 1) for every forward pass without ``t``.

    The caller's model is never modified. ``forward(x, t=None)`` returns the network's output at φ(t).
    """

    def __init__(self, model: nn.Module, start: torch.Tensor, end: torch.Tensor, bends: int = 1,
                 kind: str = "bezier", weight_decay: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        check_curve(kind, bends)
        self.net = copy.deepcopy(model)
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.layout = ThetaLayout.from_model(self.net)
        self.layout.check(start)
        self.layout.check(end)
        device = next(self.net.parameters()).device
        self.register_buffer("start", start.detach().to(device, torch.float32).clone())
        self.register_buffer("end", end.detach().to(device, torch.float32).clone())
        self.bends = nn.Parameter(initial_bends(self.start, self.end, bends))
        self.kind = kind
        self.weight_decay = float(weight_decay)
        self.generator = generator if generator is not None else torch.Generator()
        self._theta: torch.Tensor | None = None  # φ(t) of the last forward pass

    def points(self) -> torch.Tensor:
        """(k + 2, D) control points: the start, the bends, the end."""
        return torch.cat([self.start[None], self.bends, self.end[None]])

    def theta(self, t: float) -> torch.Tensor:
        """φ(t) (D,), differentiable in the bends."""
        c = coefficients(self.kind, float(t), self.bends.shape[0]).to(device=self.start.device, dtype=torch.float32)
        return c @ self.points()

    def forward(self, x, t: float | None = None):
        if t is None:
            t = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        self._theta = self.theta(t)
        return functional_call(self.net, self.layout.unflatten(self._theta), (x,))

    def penalty(self) -> torch.Tensor:
        """½·wd·‖φ(t)‖² at the t of the last forward pass (the L2 term of the curve's training loss)."""
        if self._theta is None:
            raise ValueError("penalty() needs a forward pass first")
        return 0.5 * self.weight_decay * self._theta.square().sum()
