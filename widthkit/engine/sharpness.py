"""Sharpness of a minimum: how much the training loss rises under perturbations of the weights.

All measures perturb θ by δ = c ⊙ ε, where c scales each weight: ``c = 1`` (plain) or ``c = |θ|`` (adaptive,
Kwon et al. 2021; Andriushchenko et al. 2023). An adaptive measure does not change under a reparametrisation
that rescales weights and leaves the function as it is (Dinh et al. 2017: a BN layer's scale and shift times a,
the next layer's weights times 1/a), because δ rescales with θ; a plain one does.

* average-case: S_avg(ρ) = E_ε[L(θ + c⊙ε)] − L(θ), ε ~ N(0, ρ²I), a Monte-Carlo mean over ``samples`` draws
  (the same draws for every ρ), with its standard error over the draws;
* worst-case: S_p(ρ) = max_{‖ε‖_p ≤ ρ} L(θ + c⊙ε) − L(θ), p = 2 or ∞, by projected gradient ascent in ε
  (normalised gradient steps for p = 2, sign steps for p = ∞, of ``step_size``·ρ), warm-started at the best
  point of the previous (smaller) ρ, the reflection of the best point tried too, the largest loss seen kept:
  the value never decreases with ρ;
* Keskar et al. 2017's ε-sharpness: 100·(max L(θ + δ) − L(θ)) / (1 + L(θ)) over |δᵢ| ≤ ε(|θᵢ| + 1), the ℓ∞
  case with c = |θ| + 1;
* PAC-Bayes flatness (Jiang et al. 2020, "Fantastic generalization measures"): 1/σ'², with σ' the largest σ
  such that the expected train error under u ~ N(0, σ²I) rises by at most ``pac_error_rise`` (0.1 = 10 points),
  found by bisection on log σ (the same draws at every σ); magnitude-aware: uᵢ ~ N(0, σ²θᵢ² + ε²).

Losses are those of a :class:`~widthkit.engine.curvature.HessianOperator` (the fixed training subset, BN
statistics fixed at θ₀, optional L2 term), so curvature and sharpness measure the same function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..settings import check_choice, check_int, check_number, option
from .curvature import STREAM_SHARPNESS, HessianOperator, generator, standard_error

AVERAGE = ("avg", "avg_adaptive")
WORST = ("worst_l2", "worst_l2_adaptive", "worst_linf", "worst_linf_adaptive", "keskar")
PAC_BAYES = ("pac_bayes", "pac_bayes_mag")
KINDS: tuple[str, ...] = AVERAGE + WORST + PAC_BAYES
# the config field (and file dataset) holding each measure's radii
RADII = {"rho_avg": AVERAGE, "rho_l2": ("worst_l2", "worst_l2_adaptive"),
         "rho_linf": ("worst_linf", "worst_linf_adaptive"), "keskar_eps": ("keskar",)}
KIND_TEXT = {
    "avg": "average-case, c = 1",
    "avg_adaptive": "average-case, c = |θ|",
    "worst_l2": "worst-case ℓ2, c = 1",
    "worst_l2_adaptive": "worst-case ℓ2, c = |θ|",
    "worst_linf": "worst-case ℓ∞, c = 1",
    "worst_linf_adaptive": "worst-case ℓ∞, c = |θ|",
    "keskar": "Keskar ε-sharpness (%)",
    "pac_bayes": "PAC-Bayes flatness 1/σ'²",
    "pac_bayes_mag": "PAC-Bayes magnitude-aware 1/σ'²",
}


def _tuple(values, name: str) -> tuple[float, ...]:
    values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
    out = []
    for v in values:
        check_number(name, v, minimum=0, optional=False)
        out.append(float(v))
    if not out:
        raise ValueError(f"{name} needs at least one radius")
    if any(b < a for a, b in zip(out, out[1:])):
        raise ValueError(f"{name} must be increasing (each worst-case ascent starts from the previous radius' "
                         f"best point), got {out}")
    return tuple(out)


@dataclass
class SharpnessConfig:
    """Which sharpness measures, at which radii, with how much work."""

    kinds: tuple[str, ...] = option(KINDS, "measures: " + ", ".join(KINDS), nargs="+", metavar="KIND")
    rho_avg: tuple[float, ...] = option((0.005, 0.01, 0.02, 0.05), "average-case radii ρ (per-weight standard "
                                        "deviation of ε)", nargs="+", type=float, metavar="RHO")
    rho_l2: tuple[float, ...] = option((0.05, 0.1, 0.2, 0.5), "worst-case ℓ2 radii ρ (‖ε‖₂ ≤ ρ)", nargs="+",
                                       type=float, metavar="RHO")
    rho_linf: tuple[float, ...] = option((0.0005, 0.001, 0.002, 0.005), "worst-case ℓ∞ radii ρ (|εᵢ| ≤ ρ)",
                                         nargs="+", type=float, metavar="RHO")
    keskar_eps: tuple[float, ...] = option((0.0005, 0.001), "Keskar's ε (|δᵢ| ≤ ε(|θᵢ| + 1))", nargs="+",
                                           type=float, metavar="EPS")
    # 64 draws: the Monte-Carlo standard error on the digits checkpoints is 7-26 % of the value (16: 15-52 %)
    samples: int = option(64, "Monte-Carlo draws of the average-case measures (the tables show ± their standard "
                              "error)")
    ascent_steps: int = option(20, "projected gradient ascent steps of a worst-case measure, per radius")
    step_size: float = option(0.5, "ascent step, as a fraction of the radius")
    pac_error_rise: float = option(0.1, "PAC-Bayes: the rise of the expected train error (a fraction: 0.1 = 10 "
                                        "points) that fixes σ'")
    pac_samples: int = option(8, "PAC-Bayes: Monte-Carlo draws of the expected error at each σ")
    pac_tol: float = option(0.01, "PAC-Bayes: bisection stops when σ_hi/σ_lo ≤ 1 + tol")
    pac_mag_eps: float = option(1e-3, "PAC-Bayes magnitude-aware: the ε of uᵢ ~ N(0, σ²θᵢ² + ε²)")

    def __post_init__(self):
        kinds = tuple(self.kinds) if isinstance(self.kinds, (tuple, list)) else (self.kinds,)
        for k in kinds:
            check_choice("sharpness kind", k, KINDS)
        if not kinds:
            raise ValueError(f"kinds needs at least one measure of {', '.join(KINDS)}")
        self.kinds = tuple(k for k in KINDS if k in kinds)  # canonical order, no repeats
        for name in ("rho_avg", "rho_l2", "rho_linf", "keskar_eps"):
            setattr(self, name, _tuple(getattr(self, name), name))
        for name in ("samples", "ascent_steps", "pac_samples"):
            check_int(name, getattr(self, name), optional=False)
        check_number("step_size", self.step_size, positive=True, optional=False)
        check_number("pac_tol", self.pac_tol, positive=True, optional=False)
        check_number("pac_mag_eps", self.pac_mag_eps, minimum=0, optional=False)
        check_number("pac_error_rise", self.pac_error_rise, positive=True, optional=False)
        if self.pac_error_rise >= 1:
            raise ValueError(f"pac_error_rise is a fraction of examples (0.1 = 10 points), got {self.pac_error_rise}")

    def radii(self, kind: str) -> tuple[float, ...]:
        """The radii of a measure (PAC-Bayes: none, one value)."""
        name = radius_field(kind)
        return getattr(self, name) if name else ()


def radius_field(kind: str) -> str | None:
    """The name of the radii of a measure (``rho_l2`` for ``worst_l2``; None for PAC-Bayes)."""
    return next((name for name, users in RADII.items() if kind in users), None)


def scale_of(kind: str, theta: torch.Tensor) -> torch.Tensor:
    """c of a measure: 1, |θ| (adaptive) or |θ| + 1 (Keskar), float64."""
    t = theta.double()
    if kind == "keskar":
        return t.abs() + 1
    if kind.endswith("adaptive"):
        return t.abs()
    return torch.ones_like(t)


def average_sharpness(op: HessianOperator, c: torch.Tensor, rhos, *, samples: int = 64, seed: int = 0,
                      theta: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """E_ε[L(θ + c⊙ε)] − L(θ), ε ~ N(0, ρ²I), for each ρ (the same ``samples`` draws of ε/ρ for every ρ).

    Returns (values (R,), their Monte-Carlo standard errors (R,): the sample std of the ``samples`` rises
    L(θ + c⊙ε) − L(θ) over √samples; 0 at ρ = 0, inf with one draw)."""
    theta = (op.theta0 if theta is None else theta).double()
    base, _ = op.loss_and_error(theta)
    out, se = np.zeros(len(rhos)), np.zeros(len(rhos))
    for i, rho in enumerate(rhos):
        if rho == 0:
            continue
        gen = generator(seed, STREAM_SHARPNESS)
        rises = []
        for _ in range(samples):
            z = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.device)
            rises.append(op.loss_and_error(theta + rho * c * z)[0] - base)
        out[i], se[i] = float(np.mean(rises)), standard_error(rises)
    return out, se


def worst_sharpness(op: HessianOperator, c: torch.Tensor, rhos, p: float, *, steps: int = 20,
                    step_size: float = 0.5, theta: torch.Tensor | None = None,
                    on_step: Callable[[], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """max_{‖ε‖_p ≤ ρ} L(θ + c⊙ε) − L(θ) by projected gradient ascent in ε, for each (increasing) ρ.

    p = 2: ε ← Π(ε + η·ρ·g/‖g‖₂); p = ∞: ε ← clip(ε + η·ρ·sign g, −ρ, ρ); g = c ⊙ ∇L(θ + c⊙ε), η = ``step_size``.
    The ascent at each radius starts from the best point found at the previous one (feasible in the larger
    ball), and the reflection −ε of the best point is tried at its end (near a minimum ±ε differ only in the
    cubic term, and an ascent cannot cross from one to the other); the value is the largest loss seen, so it
    never decreases with ρ. Returns (values, the ‖ε‖_p of the
    maximisers).
    """
    check_choice("p", p, (2, math.inf))
    theta = (op.theta0 if theta is None else theta).double()
    base, _ = op.loss_and_error(theta)
    best_eps = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
    best = base
    values, norms = np.zeros(len(rhos)), np.zeros(len(rhos))
    for i, rho in enumerate(rhos):
        if rho > 0:
            eps = best_eps.clone()
            for step in range(steps + 1):
                loss, grad = op.loss_and_grad(theta + c * eps)
                if on_step is not None:
                    on_step()
                if loss > best:
                    best, best_eps = loss, eps.clone()
                if step == steps:
                    break
                g = c * grad
                if p == 2:
                    gn = float(torch.linalg.vector_norm(g))
                    if gn == 0:
                        break
                    eps = eps + step_size * rho * g / gn
                    n = float(torch.linalg.vector_norm(eps))
                    if n > rho:
                        eps = eps * (rho / n)
                else:
                    eps = (eps + step_size * rho * torch.sign(g)).clamp(-rho, rho)
            # ±ε are both local maxima near a minimum (same quadratic term, cubic terms of opposite sign) and an
            # ascent cannot cross from one to the other: try the reflection of the best point as well
            loss = op.loss_and_error(theta - c * best_eps)[0]
            if loss > best:
                best, best_eps = loss, -best_eps
        values[i] = best - base
        norms[i] = float(torch.linalg.vector_norm(best_eps, ord=p))
    return values, norms


def pac_bayes_sigma(op: HessianOperator, *, magnitude: bool = False, error_rise: float = 0.1, samples: int = 8,
                    tol: float = 0.01, mag_eps: float = 1e-3, seed: int = 0, theta: torch.Tensor | None = None,
                    max_doublings: int = 60) -> dict:
    """σ' = the largest σ with E_u[err(θ + u)] ≤ err(θ) + ``error_rise``, by bisection on log σ.

    u = σ·z (plain) or z ⊙ √(σ²θ² + ε²) (magnitude-aware), with the same ``samples`` standard-normal draws z at
    every σ (the expectation is then a fixed function of σ). Errors are fractions of the examples.

    Returns ``{"sigma", "sigma_hi" (the smallest σ seen above the target: σ_hi/σ' ≤ 1 + tol), "flatness" (1/σ'²,
    inf when even σ → 0 exceeds the rise), "base_error", "target", "evaluations", "error" (the Monte-Carlo
    E_u[err] at σ'), "error_stderr" (its standard error over the draws: how well the draws pin the level that
    fixes σ')}``.
    """
    theta = (op.theta0 if theta is None else theta).double()
    _, base = op.loss_and_error(theta)
    target = base + error_rise
    gen = generator(seed, STREAM_SHARPNESS, 1 + int(magnitude))
    zs = [torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.device) for _ in range(samples)]
    count = [0]
    seen: dict[float, tuple[float, float]] = {0.0: (base, 0.0)} if not magnitude else {}

    def expected_error(sigma: float) -> float:
        count[0] += 1
        std = torch.sqrt(sigma ** 2 * theta.square() + mag_eps ** 2) if magnitude else None
        errs = [op.loss_and_error(theta + (z * std if magnitude else sigma * z))[1] for z in zs]
        seen[sigma] = (float(np.mean(errs)), standard_error(errs))
        return seen[sigma][0]

    def result(sigma: float, **extra) -> dict:
        error, error_se = seen.get(sigma, (math.nan, math.nan))
        return {"sigma": sigma, **extra, "flatness": 1 / sigma ** 2 if sigma > 0 else math.inf, "base_error": base,
                "target": target, "evaluations": count[0], "error": error, "error_stderr": error_se}

    if magnitude and expected_error(0.0) > target:  # the ε floor alone raises the error too much
        return result(0.0)
    lo, hi = 0.0, 1.0
    for _ in range(max_doublings):  # a σ that does raise the error enough
        if expected_error(hi) > target:
            break
        lo, hi = hi, hi * 2
    else:
        return result(hi, note="the error never rose enough")
    if lo == 0.0:  # a σ that does not
        lo = hi / 2
        while expected_error(lo) > target:
            hi, lo = lo, lo / 2
            if lo < 1e-12:
                return result(0.0)
    while hi / lo > 1 + tol:
        mid = math.sqrt(lo * hi)
        if expected_error(mid) > target:
            hi = mid
        else:
            lo = mid
    return result(lo, sigma_hi=hi)


def sharpness_of(kind: str, op: HessianOperator, cfg: SharpnessConfig, *, seed: int = 0,
                 theta: torch.Tensor | None = None, on_step: Callable[[], None] | None = None) -> dict:
    """One measure at θ₀ (or ``theta``): ``{"rho": radii, "values": (R,)}`` (+ ``"stderr"`` (R,) and ``"samples"``
    for average-case, ``"eps_norms"`` for worst-case, whose values are lower bounds found by ascent, not
    estimates with a spread; PAC-Bayes: ``{"sigma", "flatness", "error", "error_stderr", ...}``)."""
    check_choice("sharpness kind", kind, KINDS)
    theta = op.theta0 if theta is None else theta
    if kind in PAC_BAYES:
        return pac_bayes_sigma(op, magnitude=kind == "pac_bayes_mag", error_rise=cfg.pac_error_rise,
                               samples=cfg.pac_samples, tol=cfg.pac_tol, mag_eps=cfg.pac_mag_eps, seed=seed,
                               theta=theta)
    rhos = cfg.radii(kind)
    c = scale_of(kind, theta)
    if kind in AVERAGE:
        values, stderr = average_sharpness(op, c, rhos, samples=cfg.samples, seed=seed, theta=theta)
        return {"rho": np.array(rhos), "values": values, "stderr": stderr, "samples": cfg.samples}
    p = 2 if kind.startswith("worst_l2") else math.inf
    values, norms = worst_sharpness(op, c, rhos, p, steps=cfg.ascent_steps, step_size=cfg.step_size, theta=theta,
                                    on_step=on_step)
    if kind == "keskar":
        base, _ = op.loss_and_error(theta)
        values = 100.0 * values / (1.0 + base)
    return {"rho": np.array(rhos), "values": values, "eps_norms": norms}
