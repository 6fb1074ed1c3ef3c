"""Directions in weight space: random rays, the line through two solutions, planes through three.

A random direction is reproducible from ``(seed, norm, exclude, θ layout)`` on any device: the Gaussian
draw always happens on the CPU with a seeded ``torch.Generator`` and only then moves to the target device.
Direction ``i`` of ``n`` is the same whatever ``n`` is (the draws are sequential).

Normalisations (``norm``):

- ``"unit"``: ‖d‖₂ = 1 over θ — the random rays of Izmailov et al. 2018, section 3.4; distances along a
  ray are then absolute weight-space distances.
- ``"filter"``: each filter (slice along dim 0 of a ≥2-D weight) scaled to the norm of the matching filter
  of θ (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets"); 1-D tensors that are not
  excluded are scaled as one filter each.
- ``"layer"``: each parameter tensor scaled to the norm of the matching tensor of θ.
- ``"adaptive"``: d ⊙ |θ| (elementwise scaling by the weight magnitude).
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch

from .space import ThetaLayout

Norm = Literal["unit", "filter", "layer", "adaptive"]
NORMS: tuple[str, ...] = ("unit", "filter", "layer", "adaptive")
EXCLUDABLE: tuple[str, ...] = ("bias", "norm")

_EPS = 1e-12


def validate_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"unknown direction normalisation {norm!r}; valid choices: {', '.join(NORMS)}")
    return norm


def validate_exclude(exclude: Iterable[str] | str | None) -> tuple[str, ...]:
    """Normalise an exclusion spec: ``None``/``()``, ``"biasbn"`` (Li et al.'s name), or kinds."""
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        if exclude.strip().lower() in ("", "none"):
            return ()
        exclude = ("bias", "norm") if exclude in ("biasbn", "bias,norm", "norm,bias") else tuple(
            s for s in exclude.split(",") if s
        )
    out = tuple(sorted(set(exclude)))
    bad = [k for k in out if k not in EXCLUDABLE]
    if bad:
        raise ValueError(
            f"cannot exclude {bad}: valid kinds to leave out of a direction are {', '.join(EXCLUDABLE)} "
            "(or 'biasbn' for both, 'none' for neither)"
        )
    return out


def normalize_direction(
    direction: torch.Tensor, theta: torch.Tensor, layout: ThetaLayout, norm: Norm = "unit",
    exclude: Iterable[str] = (),
) -> torch.Tensor:
    """Return a normalised copy of ``direction`` (D,) relative to θ (D,); excluded kinds are zeroed."""
    norm = validate_norm(norm)
    exclude = validate_exclude(exclude)
    layout.check(direction)
    layout.check(theta)
    d = direction.detach().to(torch.float32).clone()
    theta = theta.detach().to(device=d.device, dtype=torch.float32)
    if exclude:
        d[layout.mask(exclude, device=d.device)] = 0
    if norm == "unit":
        n = torch.linalg.vector_norm(d.double())
        if n == 0:
            raise ValueError("the direction is zero on every entry of θ that was not excluded")
        return (d.double() / n).float()
    if norm == "adaptive":
        return d * theta.abs()
    for e in layout:
        if e.kind in exclude:
            continue
        de, we = d[e.slice], theta[e.slice]
        if norm == "filter" and len(e.shape) >= 2:
            rows_d = de.view(e.shape[0], -1)
            rows_w = we.view(e.shape[0], -1)
            scale = rows_w.norm(dim=1, keepdim=True) / (rows_d.norm(dim=1, keepdim=True) + _EPS)
            rows_d.mul_(scale)
        else:  # "layer", and "filter" on 1-D tensors: the whole tensor is one filter
            de.mul_(we.norm() / (de.norm() + _EPS))
    return d


def random_directions(
    layout: ThetaLayout, theta: torch.Tensor, n: int, seed: int = 0, norm: Norm = "unit",
    exclude: Iterable[str] | str | None = (),
) -> torch.Tensor:
    """``n`` random directions (n, D) float32 on θ's device.

    Each is a standard Gaussian draw over θ (isotropic, so ``unit`` directions are uniform on the unit
    sphere), excluded kinds zeroed, then normalised by ``norm``.

    >>> dirs = random_directions(layout, theta, n=10, seed=0)   # the SWA paper's 10 rays
    >>> torch.linalg.vector_norm(dirs, dim=1)                   # all 1
    """
    if n < 1:
        raise ValueError(f"need at least one direction, got n={n}")
    norm = validate_norm(norm)
    exclude = validate_exclude(exclude)
    layout.check(theta)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = torch.empty(n, layout.size, dtype=torch.float32, device=theta.device)
    theta_cpu = theta.detach().float().cpu()
    for i in range(n):
        raw = torch.randn(layout.size, generator=gen, dtype=torch.float32)
        out[i] = normalize_direction(raw, theta_cpu, layout, norm, exclude).to(theta.device)
    return out


def line_basis(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The line θ(t) = w1 + t·(w2 − w1): returns ``(origin (D,), basis (1, D), ‖w2 − w1‖)``.

    Coordinates along this basis are the fraction ``t`` of the way from w1 (t = 0) to w2 (t = 1).
    """
    if w1.shape != w2.shape:
        raise ValueError(f"the two weight vectors differ in size: {tuple(w1.shape)} vs {tuple(w2.shape)}")
    delta = (w2.float() - w1.float())
    length = float(torch.linalg.vector_norm(delta.double()))
    if length == 0:
        raise ValueError("the two checkpoints have identical weights: there is no line between them")
    return w1.float().clone(), delta.unsqueeze(0), length


def plane_basis(
    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal basis of the plane through three weight vectors (Izmailov et al. 2018, Figure 1).

    u = w2 − w1, v = (w3 − w1) minus its projection on u, both normalised to ‖·‖₂ = 1, origin w1.

    Returns ``(origin (D,), basis (2, D), coords (3, 2))`` where ``coords[k]`` are the plane coordinates of
    w1, w2, w3 in weight-space units: w1 → (0, 0), w2 → (‖w2 − w1‖, 0), w3 → (⟨w3 − w1, û⟩, ‖v‖).
    """
    if not (w1.shape == w2.shape == w3.shape):
        raise ValueError("the three weight vectors differ in size; were they made by the same architecture?")
    a = (w2.double() - w1.double())
    b = (w3.double() - w1.double())
    nu = torch.linalg.vector_norm(a)
    if nu == 0:
        raise ValueError("the first two checkpoints have identical weights: they do not span a plane")
    u = a / nu
    bx = torch.dot(b, u)
    v = b - bx * u
    nv = torch.linalg.vector_norm(v)
    if nv <= 1e-6 * max(float(nu), float(torch.linalg.vector_norm(b))):
        raise ValueError("the three checkpoints lie on one line: they do not span a plane")
    v = v / nv
    basis = torch.stack([u, v]).float()
    coords = torch.tensor([[0.0, 0.0], [float(nu), 0.0], [float(bx), float(nv)]], dtype=torch.float64)
    return w1.float().clone(), basis, coords
