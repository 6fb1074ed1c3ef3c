"""Directions in weight space: random rays, the line through two solutions, planes through three, the
principal directions of iterates (:func:`pca_basis`) and projections onto a plane (:func:`project`).

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


# --------------------------------------------------------------------------------------------- iterates

# Columns of θ handled at a time in float64 (8 MiB per row): keeps PCA of many iterates of a large model
# within a small multiple of the float32 iterates themselves.
_PCA_CHUNK = 1 << 20


def _as_rows(points: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(points):
        raise ValueError(f"{name} must be a tensor (n, D) of flat weight vectors, got {type(points).__name__}")
    if points.dim() == 1:
        points = points.unsqueeze(0)
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"{name} must be (n, D) flat weight vectors with n >= 1, got shape {tuple(points.shape)}")
    if not bool(torch.isfinite(points).all()):
        raise ValueError(f"{name} hold NaN or infinite weights: a diverged run cannot span a plane")
    return points


def pca_basis(
    thetas: torch.Tensor, center: str | torch.Tensor = "mean", k: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top ``k`` principal directions of weight vectors (Li et al. 2018, section 7: optimisation trajectories;
    Maddox et al. 2019, SWAG: the directions SGD iterates explore around the SWA solution).

    The rows of ``X = thetas − center`` are decomposed as ``X = U·diag(s)·Vᵀ`` (float64, through the n × n
    Gram matrix ``X·Xᵀ`` accumulated over column chunks, so memory stays ~ the float32 iterates); direction
    ``i`` is row ``i`` of ``Vᵀ``, unit-norm, orthogonal to the others.

    Args:
        thetas: (n, D) flat weight vectors (iterates), any float dtype, on any device.
        center: ``"mean"`` (their mean, the usual PCA) or a (D,) weight vector (e.g. the SWA solution).
        k: how many directions.

    Returns:
        ``(origin (D,) float32, basis (k, D) float32, variances (k,) float64, explained_ratio (k,) float64)``
        on ``thetas``' device (the last two on the CPU). ``variances[i] = s_i² / (n − 1)`` about the mean (numpy
        and scikit-learn's ``explained_variance_``), ``s_i² / n`` about a given centre (the mean squared distance
        along the direction); ``explained_ratio[i] = s_i² / ‖X‖²_F``. The sign of each direction makes the
        last iterate lie ahead of the first along it (``⟨θ_n − θ_1, v_i⟩ >= 0``), else its largest entry positive.

    Raises:
        ValueError: fewer than ``k`` directions with non-zero spread (e.g. ``n <= k`` iterates about their
            mean), non-finite weights, or a centre of another size.

    >>> origin, basis, var, ratio = pca_basis(torch.stack(iterates), "mean", k=2)
    >>> ratio    # share of the iterates' spread each direction explains
    """
    X0 = _as_rows(thetas, "the iterates")
    n, D = X0.shape
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of principal directions) must be an integer >= 1, got {k!r}")
    if isinstance(center, str):
        if center != "mean":
            raise ValueError(f"center must be 'mean' or a (D,) weight vector, got {center!r}")
        origin = X0.double().mean(0) if D <= _PCA_CHUNK else torch.cat(
            [X0[:, j:j + _PCA_CHUNK].double().mean(0) for j in range(0, D, _PCA_CHUNK)])
        about = f"their mean ({n} iterates span at most {n - 1} directions about it)"
    else:
        origin = _as_rows(center, "the centre")[0].to(X0.device, torch.float64)
        if origin.shape[0] != D:
            raise ValueError(f"the centre has {origin.shape[0]} weights but the iterates have {D}")
        about = f"the given centre ({n} iterates span at most {n} directions about it)"
    chunks = [slice(j, min(j + _PCA_CHUNK, D)) for j in range(0, D, _PCA_CHUNK)]
    gram = torch.zeros(n, n, dtype=torch.float64, device=X0.device)
    for c in chunks:
        Xc = X0[:, c].double() - origin[c]
        gram += Xc @ Xc.T
    total = float(torch.trace(gram))
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    rank_tol = 1e-10 * max(total, 0.0)
    usable = int((evals > rank_tol).sum()) if total > 0 else 0
    if usable < k:
        raise ValueError(f"need {k} principal direction(s), but the iterates centred on {about} spread along only "
                         f"{usable}; pass more (or more distinct) iterates, or ask for fewer directions")
    s = evals.sqrt()
    basis = torch.empty(k, D, dtype=torch.float64, device=X0.device)
    for c in chunks:
        Xc = X0[:, c].double() - origin[c]
        basis[:, c] = (evecs.T @ Xc) / s[:, None]
    for i in range(k):  # one Gram–Schmidt pass: orthonormal to rounding whatever the conditioning of the Gram matrix
        for j in range(i):
            basis[i] -= torch.dot(basis[i], basis[j]) * basis[j]
        basis[i] /= torch.linalg.vector_norm(basis[i])
        ahead = float(torch.dot(X0[-1].double() - X0[0].double(), basis[i]))
        if ahead < 0 or (ahead == 0 and float(basis[i][basis[i].abs().argmax()]) < 0):
            basis[i].neg_()
    denom = (n - 1) if isinstance(center, str) else n
    variances = (evals / max(denom, 1)).cpu()
    ratio = (evals / total).cpu()
    return origin.float(), basis.float(), variances, ratio


def project(
    points: torch.Tensor, origin: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares projection of weight vectors onto the affine subspace ``origin + span(basis)``.

    The basis need not be orthonormal (a random plane of filter-normalised directions is not): the
    coordinates ``c`` minimise ‖(p − origin) − cᵀ·basis‖₂ (normal equations in float64), so they are in the
    units of the basis vectors (weight-space distance for an orthonormal basis, multiples of the directions
    otherwise), and the residual is an absolute weight-space distance.

    Args:
        points: (m, D) or (D,) flat weight vectors (e.g. a checkpoint to mark on a plane, SGD iterates).
        origin: (D,) the plane's origin; basis: (k, D) its spanning vectors (linearly independent).

    Returns:
        ``(coords (m, k), residual_norms (m,))``, float64 on the CPU: the in-plane coordinates of each point's
        projection and its distance ‖p − proj(p)‖₂ from the plane.

    >>> coords, dist = project(theta_swa, origin, basis)    # where SWA lies over the plane, how far above it
    """
    P = _as_rows(points, "the points")
    if basis.dim() != 2 or basis.shape[1] != P.shape[1] or origin.shape != (P.shape[1],):
        raise ValueError(f"points (m, {P.shape[1]}) need an origin ({P.shape[1]},) and a basis (k, {P.shape[1]}); "
                         f"got {tuple(origin.shape)} and {tuple(basis.shape)}")
    B = basis.detach().to("cpu", torch.float64)
    o = origin.detach().to("cpu", torch.float64)
    gram = B @ B.T
    if float(torch.linalg.matrix_rank(gram)) < B.shape[0]:
        raise ValueError("the basis vectors are linearly dependent: they do not span a plane to project onto")
    coords = torch.empty(P.shape[0], B.shape[0], dtype=torch.float64)
    residual = torch.empty(P.shape[0], dtype=torch.float64)
    for i in range(P.shape[0]):  # one point at a time: a float64 copy of θ each, not of all of them
        d = P[i].detach().to("cpu", torch.float64) - o
        c = torch.linalg.solve(gram, B @ d)
        coords[i] = c
        residual[i] = torch.linalg.vector_norm(d - c @ B)
    return coords, residual
