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
import os

import numpy as np
import torch

from ..engine.config import EvalConfig
from ..runtime import RuntimeConfig
from ..engine.directions import line_basis, pca_basis, plane_basis, project, random_directions
from ..settings import split_kwargs
from .config import LineConfig, PlaneConfig, RaysConfig, parse_dirs_from
from .grid import AfterFn, Grid, ProgressFn, Setup, configs_of, evaluate, prepare
from .result import Analysis
from .subjects import Source, Weights, expand_sources, hessian_directions, load_weights

WEIGHT_SPACE = "weight-space L2"


def _split(cls, kwargs: dict, config: EvalConfig | None, runtime: RuntimeConfig | None):
    own, rest = split_kwargs(cls, kwargs)
    return (cls(**own), *configs_of(config, runtime, rest))


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


def rays(models, data=None, *, config: EvalConfig | None = None, runtime: RuntimeConfig | None = None,
         out=None, overwrite: bool = False,
         progress: ProgressFn | None = None, arch: str | None = None, which: str | None = None,
         after: AfterFn | None = None, **kwargs) -> Analysis | None:
    """Evaluate train loss and test error along random rays from every model, with the SAME directions.

    Args:
        models: checkpoint path(s), Checkpoint(s), nn.Module(s), or ``{label: item}``.
        data: dataset name, ``(train, test)`` data of your own, or None (the checkpoint's recorded dataset).
        config: an :class:`EvalConfig`; its fields may also be passed as keywords (``bn_mode="keep"``).
        runtime: a :class:`~widthkit.runtime.RuntimeConfig` (device, precision, threads, batch size, levers);
            its fields may also be passed as keywords (``device="cpu"``).
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
    spec, cfg, rt = _split(RaysConfig, kwargs, config, runtime)
    setup = prepare(models, data, cfg, rt, arch=arch, which=which, what="rays")
    evs = [setup.evaluator(i) for i in range(len(setup.subjects))]
    thetas = [ev.theta0 for ev in evs]
    if spec.max_dist is None:
        # unit directions: half the weight norm; weight-scaled directions (filter, layer, adaptive) are about as
        # long as θ itself, so one unit along them is already a large step
        half = 0.5 * float(torch.linalg.vector_norm(thetas[0].double()))
        spec = dataclasses.replace(spec, max_dist=nice_ceil(half) if spec.norm == "unit" else 1.0)
    subjects = setup.subjects
    source = parse_dirs_from(spec.dirs_from)
    extra_axes, extra_attrs = {}, {}
    if source is None:
        # The same Gaussian draws (same seed) for every model. Unit directions are then literally the same
        # vectors; weight-scaled ones (filter, layer, adaptive) are scaled to each model's own weights, as Li et
        # al. do, so that a model with smaller weights is not perturbed relatively more (BatchNorm makes that
        # matter).
        directions = [random_directions(evs[0].layout, thetas[0] if spec.norm == "unit" else th, spec.dirs,
                                        seed=setup.cfg.seed, norm=spec.norm, exclude=spec.exclude) for th in thetas]
    else:
        directions, extra_axes, extra_attrs = _directions_from(source, spec.dirs, setup, arch, which)
    distances = np.linspace(-spec.max_dist if spec.two_sided else 0.0, spec.max_dist, spec.steps)
    per_model = spec.norm != "unit" or (source is not None and source[0] == "hessian")
    own_dirs = {f"directions_{s.group}": (d.cpu().numpy(), ["direction", "theta"])
                for s, d in zip(subjects[1:], directions[1:])} if per_model else {}
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
              "directions": (directions[0].cpu().numpy(), ["direction", "theta"]), **own_dirs, **extra_axes},
        groups={s.group: s.attrs() for s in subjects},
        jobs=[(s.group, ev, th, d, coords_of) for s, ev, th, d in zip(subjects, evs, thetas, directions)],
        geometry={"rays": dataclasses.asdict(spec)},
        attrs=extra_attrs,
    )

    def keep_models(result):
        # kept for bisection along the rays (Analysis.widths(refine=True)): label -> (evaluator, θ, directions)
        result.evaluators = {s.label: (ev, th, d) for s, ev, th, d in zip(subjects, evs, thetas, directions)}
        if after is not None:
            after(result)

    return evaluate(setup, grid, out=out, overwrite=overwrite, progress=progress, after=keep_models)


def _directions_from(source: tuple[str, tuple[str, ...]], k: int, setup: Setup, arch, which):
    """Directions of ``rays --dirs-from`` (see :func:`~widthkit.analyses.config.parse_dirs_from`): one (k, D)
    tensor per model on the device, the root datasets that describe them, and the root attributes.

    ``pca``: the top ``k`` principal directions of the iterates about their mean (the same vectors for every
    model), stored with their variances and explained-variance ratios. ``hessian``: each model's own top ``k``
    eigenvectors from the curvature file (stored per model, with their eigenvalues when the file has them).
    """
    kind, items = source
    ev = setup.evaluator(0)
    subjects = setup.subjects
    if kind == "pca":
        what = "--dirs-from pca"
        it = load_weights(expand_sources(items, what), subjects[0], ev.layout, what=what, label_by="stem",
                          arch=arch)
        if k > len(it) - 1:
            raise ValueError(f"{what}: {len(it)} iterates span at most {len(it) - 1} principal direction(s) about "
                             f"their mean, fewer than the {k} asked for: pass --dirs {max(len(it) - 1, 1)} or more "
                             "iterates")
        _, basis, var, ratio = pca_basis(it.thetas, "mean", k=k)
        basis = basis.to(setup.device)
        axes = {"direction_variance": (var.numpy(), ["direction"], {
                    "long_name": "variance of the iterates along each principal direction", "units": WEIGHT_SPACE + "²"}),
                "direction_explained_ratio": (ratio.numpy(), ["direction"], {
                    "long_name": "share of the iterates' total variance along each direction", "units": "1"})}
        return [basis] * len(subjects), axes, {"directions_source": {"kind": "pca", "center": "mean", **it.record()}}
    dirs, values = hessian_directions(items[0], subjects, ev.layout, k)
    axes = {}
    for i, (s, v) in enumerate(zip(subjects, values)):
        if v is not None:
            axes["direction_eigenvalue" + ("" if i == 0 else f"_{s.group}")] = (v, ["direction"], {
                "long_name": f"Hessian eigenvalue of {s.label} along each direction", "units": "nats per unit²"})
    return ([d.to(setup.device) for d in dirs], axes,
            {"directions_source": {"kind": "hessian", "file": str(items[0]), "models": [s.label for s in subjects]}})


def line(models, data=None, *, config: EvalConfig | None = None, runtime: RuntimeConfig | None = None,
         out=None, overwrite: bool = False,
         progress: ProgressFn | None = None, arch=None, which=None, after: AfterFn | None = None,
         **kwargs) -> Analysis | None:
    """Evaluate along the line through two models, beyond both ends (keywords: :class:`LineConfig` and
    :class:`EvalConfig` fields; the rest as for :func:`rays`).

    Returns an :class:`Analysis` with metrics shaped (steps,), axes ``t`` and ``distances`` (t·‖w₂ − w₁‖).
    """
    spec, cfg, rt = _split(LineConfig, kwargs, config, runtime)
    setup = prepare(models, data, cfg, rt, arch=arch, which=which, count=(2,), what="a line")
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


def plane(models=None, data=None, *, config: EvalConfig | None = None, runtime: RuntimeConfig | None = None,
         out=None, overwrite: bool = False,
          progress: ProgressFn | None = None, arch=None, which=None, after: AfterFn | None = None,
          **kwargs) -> Analysis | None:
    """Evaluate a grid on a plane: through three models, a random plane around one, or the plane of the top two
    principal directions of iterates; further checkpoints marked at their projections, iterates drawn as a
    trajectory (keywords: :class:`PlaneConfig` and :class:`EvalConfig` fields; the rest as for :func:`rays`).

    * Through three models w₁, w₂, w₃ (Izmailov et al. 2018, Figure 1): u = w₂ − w₁ and v = (w₃ − w₁) ⟂ u,
      orthonormal, origin w₁; coordinates in weight-space units.
    * ``random=True`` (Li et al. 2018): two ``norm``-normalised random directions around one model, coordinates
      in [-span, span] multiples of the directions.
    * ``pca=[iterates]``: origin the iterates' mean (or ``pca_center``: a label of ``models`` / ``mark``, or a
      checkpoint path), directions their top two principal directions (Li et al. 2018, section 7), coordinates
      in weight-space units, explained variance stored; ``models`` (any number, also none) are then marked at
      their projections, and the first one (else the first iterate) supplies the architecture and, with
      ``bn_mode="keep"``, the BN statistics.
    * ``mark={label: model}`` (or a list of ``LABEL=PATH`` / paths / modules): each marked at its least-squares
      projection onto the plane, with its distance ‖w − proj(w)‖₂ from the plane (weight-space units).
    * ``trajectory=[iterates]``: their projections, in the given order, drawn as a path.

    Iterates may be paths, globs, folders (their checkpoints recorded as iterates), Checkpoints or nn.Modules.
    Through three models and on a PCA plane the grid covers the defining points, the marks and the trajectory
    (and the PCA iterates) with ``margin`` of their span on every side.

    Returns an :class:`Analysis` with metrics shaped (nx, ny), index ``[ix, iy]``; its :meth:`Analysis.projections`
    gives the marks, the trajectory and the explained variance.

    >>> res = widthkit.plane(iterates[:3], mark={"SWA": "swa.pt"})       # the paper's Figure 1, middle
    >>> res = widthkit.plane(["swa.pt"], pca=iterates, trajectory=iterates)
    """
    sources = {name: expand_sources(_labelled(kwargs.pop(name, None)) if name == "mark" else kwargs.pop(name, None),
                                    f"--{name}") for name in ("mark", "pca", "trajectory")}
    recorded = {name: tuple(_recorded(src) for src in srcs) for name, srcs in sources.items()}
    spec, cfg, rt = _split(PlaneConfig, {**kwargs, **recorded}, config, runtime)
    has_models = not (models is None or (isinstance(models, (list, tuple, dict)) and not models))
    if spec.pca:
        first = sources["pca"][0]
        setup = prepare(models if has_models else {_source_label(first): first.item}, data, cfg, rt, arch=arch,
                        which=which)
    else:
        setup = prepare(models if has_models else [], data, cfg, rt, arch=arch, which=which,
                        count=(1,) if spec.random else (3,),
                        what="a random plane (--random)" if spec.random
                        else "a plane through checkpoints (or --random with one, or --pca ITERATES)")
    ev = setup.evaluator(0)
    nx, ny = spec.resolution
    labels = [s.label for s in setup.subjects]
    cache: dict = {}

    def load(name: str, label_by: str) -> Weights | None:
        if not sources[name]:
            return None
        return load_weights(sources[name], setup.subjects[0], ev.layout, what=f"--{name}", arch=arch,
                            label_by=label_by, cache=cache)

    marks = load("mark", "role")
    trajectory = load("trajectory", "stem")
    axes, attrs, cover = {}, {}, []
    if spec.pca:
        iterates = load("pca", "stem")
        given = Weights(labels, torch.stack([setup.theta(i).cpu() for i in range(len(labels))]),
                        [s.path or "" for s in setup.subjects], [s.sha256 or "" for s in setup.subjects]) \
            if has_models else None
        center_label, center = _pca_center(spec.pca_center, given, marks, setup, arch, cache)
        if len(iterates) < (3 if center is None else 2):
            raise ValueError(f"--pca: {len(iterates)} iterate(s) do not span a plane "
                             f"{'about their mean: pass at least 3' if center is None else 'about a centre: pass at least 2'}")
        origin, basis, variances, ratio = pca_basis(iterates.thetas, "mean" if center is None else center, k=2)
        # the models of a PCA plane are marked like --mark checkpoints, except the centre (the plane's point)
        marks = _join(given, marks)
        if marks is not None and center is not None:
            keep = [i for i, label in enumerate(marks.labels) if label != center_label]
            marks = Weights([marks.labels[i] for i in keep], marks.thetas[keep], [marks.paths[i] for i in keep],
                            [marks.sha256[i] for i in keep]) if keep else None
        cover.append(project(iterates.thetas, origin, basis)[0].numpy())
        points, point_labels = np.zeros((1, 2)), [center_label]
        r = ratio.numpy()
        units = WEIGHT_SPACE
        names = tuple(f"PC{i + 1} ({r[i]:.1%} of the variance)" for i in range(2))
        title = (f"PCA plane of {len(iterates)} iterates (centre: {center_label}), explained variance "
                 f"PC1 {r[0]:.1%}, PC2 {r[1]:.1%}")
        axes.update(pca_variances=(variances.numpy(), ["pc"], {
                        "long_name": "variance of the iterates along PC1 and PC2", "units": WEIGHT_SPACE + "²"}),
                    pca_explained_ratio=(r, ["pc"], {
                        "long_name": "share of the iterates' total variance along PC1 and PC2", "units": "1"}))
        attrs["pca"] = {"center": center_label, "n_iterates": len(iterates), **iterates.record()}
        origin, basis = origin.to(setup.device), basis.to(setup.device)
    elif spec.random:
        origin = ev.theta0
        basis = random_directions(ev.layout, origin, 2, seed=setup.cfg.seed, norm=spec.norm, exclude=spec.exclude)
        points, point_labels = np.zeros((1, 2)), labels
        units = direction_units(spec.norm, "random directions")
        names = ("random direction 1", "random direction 2")
        title = f"Random plane around {labels[0]} ({spec.norm}-normalised directions)"
    else:
        origin, basis, pts = plane_basis(ev.theta0, setup.theta(1), setup.theta(2))
        points, point_labels = pts.numpy(), labels
        units = WEIGHT_SPACE
        names = (f"u: {labels[0]} → {labels[1]}", f"v: towards {labels[2]}, ⊥ u")
        title = "Plane through " + ", ".join(labels)
    for name, w in (("marks", marks), ("trajectory", trajectory)):
        if w is None:
            continue
        coords, dist = (a.numpy() for a in project(w.thetas, origin, basis))
        what = "marked checkpoints" if name == "marks" else "trajectory iterates (in order)"
        stem = name.rstrip("s")
        axes[name] = (coords, [stem, "xy"], {"long_name": f"plane coordinates of the projections of the {what}",
                                              "units": units})
        axes[f"{stem}_distances"] = (dist, [stem], {"long_name": f"distance of the {what} from the plane, "
                                                                 "‖w − proj(w)‖₂", "units": WEIGHT_SPACE})
        attrs[f"{stem}_labels"] = w.labels
        attrs[f"{stem}_source"] = w.record()
        cover.append(coords)
    if spec.random:
        x = np.linspace(-spec.span, spec.span, nx)
        y = np.linspace(-spec.span, spec.span, ny)
    else:
        everything = np.concatenate([points, *cover])
        lo, hi = everything.min(0), everything.max(0)
        pad = spec.margin * (hi - lo)
        x = np.linspace(lo[0] - pad[0], hi[0] + pad[0], nx)
        y = np.linspace(lo[1] - pad[1], hi[1] + pad[1], ny)

    def coords_of(ids):
        ix, iy = np.unravel_index(ids, (nx, ny))
        return np.stack([x[ix], y[iy]], axis=1)

    grid = Grid(
        "plane", (nx, ny),
        axes={"x": (x, ["x"], {"long_name": names[0], "units": units}),
              "y": (y, ["y"], {"long_name": names[1], "units": units}),
              "basis": (basis.cpu().numpy(), ["vector", "theta"]),
              "points": (points, ["checkpoint", "xy"], {"long_name": "plane coordinates of the checkpoints",
                                                        "units": units}),
              **axes},
        groups={"plane": {"label": title, "checkpoints": [s.path or "" for s in setup.subjects] if has_models else [],
                          "sha256": ",".join(s.sha256 or "" for s in setup.subjects) if has_models else ""}},
        jobs=[("plane", ev, origin, basis, coords_of)],
        geometry={"plane": dataclasses.asdict(spec)},
        attrs={"point_labels": point_labels, "title": title, **attrs},
    )
    return evaluate(setup, grid, out=out, overwrite=overwrite, progress=progress, after=after)


def _labelled(marks):
    """``--mark`` entries as ``(label or None, item)`` pairs: ``LABEL=PATH`` names one, unless the whole text is a
    file; a ``{label: item}`` dict as it is."""
    if marks is None or isinstance(marks, dict):
        return marks
    if isinstance(marks, (str, os.PathLike)) or not isinstance(marks, (list, tuple)):
        marks = [marks]
    pairs = []
    for m in marks:
        if isinstance(m, str) and "=" in m and not os.path.exists(m):
            label, _, path = m.partition("=")
            pairs.append((label or None, path))
        else:
            pairs.append(m if isinstance(m, tuple) else (None, m))
    return pairs


def _source_label(src: Source) -> str:
    return src.label or (os.path.splitext(os.path.basename(str(src.item)))[0]
                         if isinstance(src.item, (str, os.PathLike)) else "model")


def _recorded(src: Source) -> str:
    """How the file's config records one mark / iterate: ``LABEL=PATH``, ``PATH``, or ``LABEL=<Module>``."""
    if isinstance(src.item, (str, os.PathLike)):
        return f"{src.label}={src.item}" if src.label else str(src.item)
    return f"{src.label or 'model'}=<{type(src.item).__name__}>"


def _join(a: Weights | None, b: Weights | None) -> Weights | None:
    if a is None or not len(a):
        return b
    if b is None:
        return a
    return Weights(a.labels + b.labels, torch.cat([a.thetas, b.thetas]), a.paths + b.paths, a.sha256 + b.sha256)


def _pca_center(spec: str, given: Weights | None, marks: Weights | None, setup: Setup, arch, cache: dict):
    """``(label, θ (D,) or None for the mean)`` of a PCA plane's centre: ``"mean"``, the label of a model or a
    mark (any case), or a checkpoint path."""
    if spec == "mean":
        return "iterate mean", None
    for w in (given, marks):
        if w is None:
            continue
        for label, theta in zip(w.labels, w.thetas):
            if label.lower() == spec.lower():
                return label, theta
    if not os.path.exists(spec.partition("#")[0]):
        known = [lab for w in (given, marks) if w is not None for lab in w.labels]
        raise ValueError(f"--pca-center {spec!r} is neither 'mean', a checkpoint label ({', '.join(known) or 'none given'}) "
                         "nor an existing file")
    w = load_weights([Source(spec)], setup.subjects[0], setup.evaluator(0).layout, what="--pca-center", arch=arch,
                     cache=cache)
    return w.labels[0], w.thetas[0]
