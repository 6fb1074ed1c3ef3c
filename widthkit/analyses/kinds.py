"""The analyses users run — rays, lines, planes — as plain Python calls.

Each call takes models (checkpoint paths, :class:`~widthkit.inputs.checkpoints.Checkpoint` objects or
``nn.Module`` instances) and data (a dataset name, or your own tensors / DataLoaders), says which points it
wants, and leaves the rest to the skeleton in :mod:`widthkit.analyses.grid`. Keyword arguments are the fields
of the analysis' own config (:class:`RaysConfig`, :class:`LineConfig`, :class:`PlaneConfig`) and of
:class:`~widthkit.engine.config.EvalConfig` (``bn_mode``, ``device``, ``seed``, ...): the same names as the
command-line flags.

>>> res = widthkit.rays({"SGD": "sgd.pt", "SWA": "swa.pt"}, dirs=10)       # Izmailov et al. 2018, sec. 3.4
>>> res.widths("test_err=+5")["comparison"]["n_b_wider"]
>>> res.plot()
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..engine.config import EvalConfig
from ..engine.directions import line_basis, plane_basis, random_directions
from ..settings import split_kwargs
from .config import LineConfig, PlaneConfig, RaysConfig
from .grid import AfterFn, Grid, ProgressFn, eval_config, evaluate, prepare
from .result import Analysis

WEIGHT_SPACE = "weight-space L2"


def _split(cls, kwargs: dict, config: EvalConfig | None):
    own, rest = split_kwargs(cls, kwargs)
    return cls(**own), eval_config(config, rest)


def direction_units(norm: str, what: str = "directions") -> str:
    """What one unit along a direction of normalisation ``norm`` is."""
    return WEIGHT_SPACE if norm == "unit" else f"multiples of {norm}-normalised {what}"


def nice_ceil(x: float) -> float:
    """Round up to 1, 2 or 5 × 10^k (a readable axis limit)."""
    if x <= 0:
        return 1.0
    e = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10 ** e >= x * 0.999:
            return float(m * 10 ** e)
    return float(10 ** (e + 1))


def rays(models, data=None, *, config: EvalConfig | None = None, out=None, overwrite: bool = False,
         progress: ProgressFn | None = None, arch: str | None = None, which: str | None = None,
         after: AfterFn | None = None, **kwargs) -> Analysis | None:
    """Evaluate train loss and test error along random rays from every model, with the SAME directions.

    Args:
        models: checkpoint path(s), Checkpoint(s), nn.Module(s), or ``{label: item}``.
        data: dataset name, ``(train, test)`` data of your own, or None (the checkpoint's recorded dataset).
        config: an :class:`EvalConfig`; its fields may also be passed as keywords (``bn_mode="keep"``).
        out: the HDF5 file (None: a temporary file, removed with the result; ``.save(path)`` keeps it).
        overwrite: start afresh when ``out`` holds another run.
        progress: ``progress(done, total)`` after every chunk.
        arch, which: for bare state dicts / files holding both SGD and SWA weights (see ``load_checkpoint``).
        after: ``after(result)`` runs while the file is still locked (the commands write widths and figures).
        **kwargs: :class:`RaysConfig` fields (``dirs``, ``max_dist``, ``steps``, ``two_sided``, ``norm``,
            ``exclude``) and :class:`EvalConfig` fields.

    Returns:
        An :class:`Analysis` whose metrics are shaped (dirs, steps); the distances' units are stored with
        them (weight-space L2 for unit directions, multiples of the normalised directions otherwise).
    """
    spec, cfg = _split(RaysConfig, kwargs, config)
    setup = prepare(models, data, cfg, arch=arch, which=which, what="rays")
    evs = [setup.evaluator(i) for i in range(len(setup.subjects))]
    thetas = [ev.theta0 for ev in evs]
    if spec.max_dist is None:
        # unit directions: half the weight norm; weight-scaled directions (filter, layer, adaptive) are about as
        # long as θ itself, so one unit along them is already a large step
        half = 0.5 * float(torch.linalg.vector_norm(thetas[0].double()))
        spec = dataclasses.replace(spec, max_dist=nice_ceil(half) if spec.norm == "unit" else 1.0)
    # The same Gaussian draws (same seed) for every model. Unit directions are then literally the same vectors;
    # weight-scaled ones (filter, layer, adaptive) are scaled to each model's own weights, as Li et al. do, so
    # that a model with smaller weights is not perturbed relatively more (BatchNorm makes that matter).
    directions = [random_directions(evs[0].layout, thetas[0] if spec.norm == "unit" else th, spec.dirs,
                                    seed=setup.cfg.seed, norm=spec.norm, exclude=spec.exclude) for th in thetas]
    distances = np.linspace(-spec.max_dist if spec.two_sided else 0.0, spec.max_dist, spec.steps)
    subjects = setup.subjects
    own_dirs = {f"directions_{s.group}": (d.cpu().numpy(), ["direction", "theta"])
                for s, d in zip(subjects[1:], directions[1:])} if spec.norm != "unit" else {}
    shape = (spec.dirs, spec.steps)

    def coords_of(ids):
        i, j = np.unravel_index(ids, shape)
        c = np.zeros((len(ids), spec.dirs))
        c[np.arange(len(ids)), i] = distances[j]
        return c

    grid = Grid(
        "rays", shape,
        axes={"distances": (distances, ["step"], {"long_name": "distance from θ₀ along the ray",
                                                   "units": direction_units(spec.norm)}),
              "directions": (directions[0].cpu().numpy(), ["direction", "theta"]), **own_dirs},
        groups={s.group: s.attrs() for s in subjects},
        jobs=[(s.group, ev, th, d, coords_of) for s, ev, th, d in zip(subjects, evs, thetas, directions)],
        geometry={"rays": dataclasses.asdict(spec)},
    )

    def keep_models(result):
        # kept for bisection along the rays (Analysis.widths(refine=True)): label -> (evaluator, θ, directions)
        result.evaluators = {s.label: (ev, th, d) for s, ev, th, d in zip(subjects, evs, thetas, directions)}
        if after is not None:
            after(result)

    return evaluate(setup, grid, out=out, overwrite=overwrite, progress=progress, after=keep_models)


def line(models, data=None, *, config: EvalConfig | None = None, out=None, overwrite: bool = False,
         progress: ProgressFn | None = None, arch=None, which=None, after: AfterFn | None = None,
         **kwargs) -> Analysis | None:
    """Evaluate along the line through two models, beyond both ends (keywords: :class:`LineConfig` and
    :class:`EvalConfig` fields; the rest as for :func:`rays`).

    Returns an :class:`Analysis` with metrics shaped (steps,), axes ``t`` and ``distances`` (t·‖w₂ − w₁‖).
    """
    spec, cfg = _split(LineConfig, kwargs, config)
    setup = prepare(models, data, cfg, arch=arch, which=which, count=(2,), what="a line")
    ev = setup.evaluator(0)
    origin, basis, length = line_basis(ev.theta0, setup.theta(1))
    t = np.linspace(spec.t_min, spec.t_max, spec.steps)
    labels = [s.label for s in setup.subjects]
    grid = Grid(
        "line", (spec.steps,),
        axes={"t": (t, ["step"], {"long_name": f"t along the line ({labels[0]} at 0, {labels[1]} at 1)",
                                  "units": f"multiples of ‖{labels[1]} − {labels[0]}‖"}),
              "distances": (t * length, ["step"], {"long_name": f"distance from {labels[0]}", "units": WEIGHT_SPACE}),
              "basis": (basis.cpu().numpy(), ["vector", "theta"]),
              "points": (np.array([0.0, 1.0]), ["checkpoint"], {"long_name": "t of the checkpoints"})},
        groups={"line": {"label": " → ".join(labels), "checkpoints": [s.path or "" for s in setup.subjects],
                         "sha256": ",".join(s.sha256 or "" for s in setup.subjects)}},
        jobs=[("line", ev, origin, basis, lambda ids: t[ids][:, None])],
        geometry={"line": dataclasses.asdict(spec)},
        attrs={"point_labels": labels, "length": length},
    )
    return evaluate(setup, grid, out=out, overwrite=overwrite, progress=progress, after=after)


def plane(models, data=None, *, config: EvalConfig | None = None, out=None, overwrite: bool = False,
          progress: ProgressFn | None = None, arch=None, which=None, after: AfterFn | None = None,
          **kwargs) -> Analysis | None:
    """Evaluate a grid on a plane: through three models, or (``random=True``) a random plane around one
    (keywords: :class:`PlaneConfig` and :class:`EvalConfig` fields; the rest as for :func:`rays`).

    Through three models w₁, w₂, w₃: u = w₂ − w₁ and v = (w₃ − w₁) ⟂ u, orthonormal, origin w₁; the grid
    covers the three points with ``margin`` of the span on every side; coordinates in weight-space units.
    Random: two ``norm``-normalised random directions around one model, coordinates in [-span, span].
    Returns an :class:`Analysis` with metrics shaped (nx, ny), index ``[ix, iy]``.
    """
    spec, cfg = _split(PlaneConfig, kwargs, config)
    setup = prepare(models, data, cfg, arch=arch, which=which, count=(1,) if spec.random else (3,),
                    what="a random plane (--random)" if spec.random else "a plane through checkpoints (or --random with one)")
    ev = setup.evaluator(0)
    nx, ny = spec.resolution
    labels = [s.label for s in setup.subjects]
    if spec.random:
        origin = ev.theta0
        basis = random_directions(ev.layout, origin, 2, seed=setup.cfg.seed, norm=spec.norm, exclude=spec.exclude)
        points = np.zeros((1, 2))
        x = np.linspace(-spec.span, spec.span, nx)
        y = np.linspace(-spec.span, spec.span, ny)
        units = direction_units(spec.norm, "random directions")
        names = ("random direction 1", "random direction 2")
    else:
        origin, basis, pts = plane_basis(ev.theta0, setup.theta(1), setup.theta(2))
        points = pts.numpy()
        lo, hi = points.min(0), points.max(0)
        pad = spec.margin * (hi - lo)
        x = np.linspace(lo[0] - pad[0], hi[0] + pad[0], nx)
        y = np.linspace(lo[1] - pad[1], hi[1] + pad[1], ny)
        units = WEIGHT_SPACE
        names = (f"u: {labels[0]} → {labels[1]}", f"v: towards {labels[2]}, ⊥ u")

    def coords_of(ids):
        ix, iy = np.unravel_index(ids, (nx, ny))
        return np.stack([x[ix], y[iy]], axis=1)

    title = (f"Random plane around {labels[0]} ({spec.norm}-normalised directions)" if spec.random
             else "Plane through " + ", ".join(labels))
    grid = Grid(
        "plane", (nx, ny),
        axes={"x": (x, ["x"], {"long_name": names[0], "units": units}),
              "y": (y, ["y"], {"long_name": names[1], "units": units}),
              "basis": (basis.cpu().numpy(), ["vector", "theta"]),
              "points": (points, ["checkpoint", "xy"], {"long_name": "plane coordinates of the checkpoints",
                                                        "units": units})},
        groups={"plane": {"label": title, "checkpoints": [s.path or "" for s in setup.subjects],
                          "sha256": ",".join(s.sha256 or "" for s in setup.subjects)}},
        jobs=[("plane", ev, origin, basis, coords_of)],
        geometry={"plane": dataclasses.asdict(spec)},
        attrs={"point_labels": labels, "title": title},
    )
    return evaluate(setup, grid, out=out, overwrite=overwrite, progress=progress, after=after)
