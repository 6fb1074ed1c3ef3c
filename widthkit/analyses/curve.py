"""A curve between two solutions, trained and evaluated beside the straight line (Garipov et al. 2018,
"Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs", https://arxiv.org/abs/1802.10026; the anchor
implementation is the authors' dnn-mode-connectivity).

>>> res = widthkit.curve({"A": "seed0/sgd.pt", "B": "seed1/sgd.pt"}, bends=1, kind="bezier", out="curve.h5")
>>> print(res.table())                  # loss barrier of the curve vs the straight line
>>> res.plot(); res.plot_plane()         # metrics along t; the plane through A, B and the bend

1. The bends are trained as the authors do (:mod:`widthkit.training.curve`): endpoints fixed, one t ~ U(0, 1) per
   batch, the loss at φ(t) (+ ½·wd·‖φ(t)‖²), the paper's SGD schedule.
2. The curve and the straight line are evaluated at ``points`` values of t in [0, 1] (61 by default) by the
   batched evaluator, BatchNorm statistics recomputed at every point (a curve's point has none of its own), into
   one file of kind ``line`` (:mod:`widthkit.report.store`): the group ``line`` is the straight line, read by any
   line reader as before; the group ``curve`` holds the curve at the same t, its control points (minus w₁) are
   the dataset ``basis_curve``, the root attribute ``curve`` says what it is and ``barriers`` holds each path's
   barrier (max − mean of the endpoints) of every metric.
3. The plane through the endpoints and the (middle) bend (``<stem>-plane.h5``, kind ``plane``) with the curve's
   points projected onto it (``curve`` (T, 2)): the figure of the authors' plane plots.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engine.batchnorm import bn_modules
from ..engine.config import EvalConfig
from ..engine.curves import CurveKind, CurveModel, barrier, check_curve, curve_basis, curve_coordinates, \
    curve_points
from ..engine.directions import line_basis, plane_basis, project
from ..fileio import WriterLock, check_writable
from ..report import store
from ..settings import check_int, option, split_kwargs
from ..training.curve import CurveTraining, train_curve
from ..training.trainer import TrainData
from ..runtime import RuntimeConfig
from .grid import AfterFn, Grid, ProgressFn, configs_of, evaluate, prepare
from .kinds import WEIGHT_SPACE
from .result import Analysis
from .subjects import resolve_data

PATHS = ("line", "curve")
# the authors' curve learning rates are 0.3 of the endpoints' (VGG16: 0.015 after 0.05; PreResNet164 and
# WideResNet28x10: 0.03 after 0.1; dnn-mode-connectivity README)
LR_FRACTION = 0.3
FALLBACK = {"epochs": 20, "lr": 0.03, "batch_size": 128, "augment": False}  # endpoints recording no training config
PLANE_MARGIN = 0.2


@dataclass
class CurveConfig:
    """The curve between two checkpoints: its form, its training, where it is evaluated (each field a flag)."""

    kind: CurveKind = option("bezier", "the curve: bezier (a Bezier curve with the bends as control points) or "
                                       "polychain (the polygonal chain through them)")
    bends: int = option(1, "bends (trained control points) between the endpoints, >= 1")
    epochs: int | None = option(None, "epochs of curve training (default: the endpoints' recorded budget, else 20)")
    lr: float | None = option(None, "initial learning rate of curve training, constant for half of the epochs, "
                                    "then linear to lr/100 at nine tenths of them (default: 0.3 x the endpoints' "
                                    "recorded lr, the authors' ratio; else 0.03)")
    momentum: float = option(0.9, "SGD momentum of curve training")
    batch_size: int | None = option(None, "images per step of curve training (default: the endpoints' recorded "
                                          "batch size, else 128)")
    augment: bool | None = option(None, "random crop and flip in curve training (default: as the endpoints were "
                                        "trained)")
    points: int = option(61, "values of t in [0, 1] at which the curve and the straight line are evaluated")
    plane: int = option(21, "grid points per side of the plane through the endpoints and the bend (0: no plane)")

    def __post_init__(self):
        check_curve(self.kind, self.bends)
        check_int("epochs", self.epochs)
        check_int("batch_size", self.batch_size)
        check_int("points", self.points, minimum=3, optional=False)
        check_int("plane", self.plane, minimum=0, optional=False)
        if self.plane == 1:
            raise ValueError("plane must be 0 (no plane) or >= 2 grid points per side, got 1")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")


class CurveResult(Analysis):
    """A trained curve's evaluation (a ``line`` file holding the groups ``line`` and ``curve``), its plane
    (``.plane``, an :class:`Analysis` or None) and its checkpoint (``.checkpoint``, the ``.curve.pt`` path)."""

    def __init__(self, path, data: dict | None = None, tmpdir: str | None = None):
        super().__init__(path, data)
        if self.kind != "line" or "curve" not in self.data["attrs"]:
            raise ValueError(f"{self.path} holds no curve (a {self.kind!r} analysis without a 'curve' attribute)")
        info = self.data["attrs"]["curve"]
        plane = self.path.with_name(info.get("plane_file") or "")
        self.plane = Analysis(plane) if info.get("plane_file") and plane.exists() else None
        self.checkpoint = self.path.with_name(info["checkpoint_file"])
        if tmpdir is not None:
            weakref.finalize(self, shutil.rmtree, tmpdir, True)

    @property
    def info(self) -> dict:
        """What the curve is: kind, bends, training settings, endpoints."""
        return self.data["attrs"]["curve"]

    def barriers(self) -> dict:
        """``{"line": {metric: barrier}, "curve": {...}}``: the largest value along each path minus the mean of
        its endpoints' (losses in nats, errors in points of %)."""
        return {p: {m: barrier(v) for m, v in self.models[p]["metrics"].items()} for p in PATHS}

    def table(self) -> str:
        """The barrier of each path on train loss (with the L2 term when stored), test loss and test error, and
        each path's largest and smallest value."""
        b = self.barriers()
        metrics = [m for m in ("train_loss", "train_loss_l2", "test_loss", "test_err", "train_err")
                   if m in self.models["line"]["metrics"]]
        info = self.info
        title = (f"{info['label']} between {info['endpoints'][0]} and {info['endpoints'][1]}, "
                 f"{len(self.data['axes']['t'])} points in t, BN {self.config['eval'].get('bn_mode')}")
        lines = [title, f"{'metric':<14} {'path':<6} {'at t=0':>9} {'at t=1':>9} {'max':>9} {'barrier':>9}"]
        for m in metrics:
            for p in PATHS:
                v = self.models[p]["metrics"][m]
                lines.append(f"{m:<14} {p:<6} {v[0]:>9.4f} {v[-1]:>9.4f} {np.nanmax(v):>9.4f} {b[p][m]:>9.4f}")
        if not self.complete():
            lines.append("PARTIAL: the run that wrote this file was interrupted; run the same command again")
        return "\n".join(lines)

    def plot(self, ax=None, metric: str | None = None):
        """``metric`` (default: train loss) along t on the curve and on the straight line, each path's barrier
        written in the legend; returns the Axes."""
        from ..report.family_figures import plot_paths

        metric = metric or "train_loss"
        if metric not in self.models["curve"]["metrics"]:
            raise ValueError(f"the curve file holds {sorted(self.models['curve']['metrics'])}, not {metric!r}")
        return plot_paths(self.data["axes"]["t"], {p: self.models[p]["metrics"][metric] for p in PATHS}, ax=ax,
                          metric=metric, labels={"line": "straight line", "curve": self.info["label"]})

    def plot_plane(self, ax=None, metric: str = "train_loss"):
        """The plane through the endpoints and the bend, ``metric`` in contours, the curve and the straight line
        drawn (the authors' plane figure); returns the Axes."""
        from ..report.family_figures import plot_curve_plane

        if self.plane is None:
            raise ValueError("this curve was evaluated without its plane (plane=0); run it with plane=21")
        return plot_curve_plane(self.plane.data, metric=metric, ax=ax)

    def save(self, path) -> Path:
        """Copy the curve's files (the evaluation, the plane, the ``.curve.pt``) beside ``path``."""
        path = Path(path)
        target = super().save(path)
        if self.plane is not None:
            self.plane.save(path.with_name(self.info["plane_file"]))
        if self.checkpoint.exists():
            dest = path.with_name(self.info["checkpoint_file"])
            if dest.resolve() != self.checkpoint.resolve():
                shutil.copyfile(self.checkpoint, dest)
        return target


def load_curve(path) -> CurveResult:
    """Open a curve's evaluation file written by :func:`curve` (with its plane when beside it)."""
    return CurveResult(path)


def files_of(out) -> dict[str, Path]:
    """The files of the curve whose evaluation is ``out`` (``X.h5``): ``plane`` (``X-plane.h5``) and
    ``checkpoint`` (``X.curve.pt``)."""
    out = Path(out)
    return {"evaluation": out, "plane": out.with_name(f"{out.stem}-plane.h5"),
            "checkpoint": out.with_name(f"{out.stem}.curve.pt")}


def curve(models, data=None, *, config: EvalConfig | None = None, runtime: RuntimeConfig | None = None, out=None,
          overwrite: bool = False,
          progress: ProgressFn | None = None, arch=None, which=None, after: AfterFn | None = None,
          train_progress: bool = False, **kwargs) -> CurveResult | None:
    """Train a curve between two models (the endpoints, fixed) and evaluate it beside the straight line.

    Args:
        models: the two endpoints: paths, Checkpoints or nn.Modules (``{label: item}`` names them).
        data: dataset name or ``(train, test)`` data of your own (None: the checkpoints' recorded dataset); the
            curve trains on the whole training split (``train_subset`` only thins the evaluation).
        config, **kwargs: :class:`CurveConfig` fields (``kind``, ``bends``, ``epochs``, ``lr``, ``points``,
            ``plane``, ...) and :class:`EvalConfig` fields (``bn_mode`` recompute or batch; ``weight_decay``
            (default: the recorded one) is also the curve's L2 term; ``seed`` seeds its shuffling and its t).
        out: the evaluation file ``X.h5`` (``X-plane.h5`` and ``X.curve.pt`` beside it); None: temporary files
            removed with the result. Re-running the same call resumes the training after its last finished epoch
            and the evaluations where they stopped; ``overwrite`` starts afresh.
        progress: ``progress(done, total)`` while points are evaluated; ``train_progress``: a bar per epoch.
        after: ``after(result)`` with the writer locks of the files held.

    Returns:
        A :class:`CurveResult` (None on torchrun ranks that do not write).

    Raises:
        ValueError: not exactly two models, endpoints of different architectures or identical weights, zero
            bends, ``bn_mode='keep'`` on a network with BatchNorm: before anything is trained or written.

    ``runtime`` (or its fields as keywords: ``device``, ``precision``, ...) is where and how the curve trains and
    is evaluated, as for every analysis.
    """
    own, rest = split_kwargs(CurveConfig, kwargs)
    spec, (cfg, rt) = CurveConfig(**own), configs_of(config, runtime, rest)
    setup = prepare(models, data, cfg, rt, arch=arch, which=which, count=(2,), what="a curve")
    ev = setup.evaluator(0)
    if cfg.bn_mode == "keep" and bn_modules(ev.model):
        raise ValueError("a curve's points have no BatchNorm statistics of their own: use bn_mode recompute (the "
                         "default, as Garipov et al.) or batch, not keep")
    start, end = ev.theta0, setup.theta(1)
    line_basis(start, end)  # identical endpoints: no line, no curve
    labels = [s.label for s in setup.subjects]
    settings = _settings(spec, setup)
    tmpdir = tempfile.mkdtemp(prefix="widthkit-") if out is None else None
    files = files_of(out if out is not None else Path(tmpdir) / "curve.h5")
    try:
        check_writable(files["evaluation"].parent)
        train_data = _train_data(data, setup)
        model = CurveModel(setup.subjects[0].model, start.cpu(), end.cpu(), spec.bends, spec.kind,
                           settings.weight_decay).to(setup.device)
        identity = {"endpoints": [{"label": s.label, "checkpoint": s.path, "sha256": s.sha256}
                                  for s in setup.subjects],
                    "theta_size": ev.layout.size, "data": setup.data_desc.get("name"),
                    "n_train": len(train_data.y_train)}
        with WriterLock(files["evaluation"]), WriterLock(files["plane"]):
            log = train_curve(model, train_data, settings, files["checkpoint"], identity=identity,
                              overwrite=overwrite, progress=train_progress)
            bends = model.bends.detach().to(setup.device)
            info = {"kind": spec.kind, "bends": spec.bends, "label": _label(spec), "endpoints": labels,
                    "training": settings.to_dict(), "checkpoint_file": files["checkpoint"].name,
                    "sha256": _sha256(files["checkpoint"]), "final_train_loss": log[-1]["train_loss"] if log else None,
                    "plane_file": files["plane"].name if spec.plane else None}
            line_res = _evaluate_paths(setup, spec, start, bends, end, labels, info, files["evaluation"], overwrite,
                                       progress)
            if line_res is None:  # a torchrun rank that does not write
                return None
            if spec.plane:
                _evaluate_plane(setup, spec, start, bends, end, labels, info, files["plane"], overwrite, progress)
            result = CurveResult(files["evaluation"], tmpdir=tmpdir)
            if "barriers" not in result.data["attrs"]:  # once, when the evaluation is first complete
                store.update_attrs(files["evaluation"], {"barriers": result.barriers()})
                result.data = store.read(files["evaluation"])
            result.log = log
            if after is not None:
                after(result)
            return result
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def _label(spec: CurveConfig) -> str:
    return f"{'Bezier curve' if spec.kind == 'bezier' else 'polygonal chain'} ({spec.bends} bend{'s' if spec.bends > 1 else ''})"


def _sha256(path: Path) -> str:
    from ..inputs.checkpoints import file_sha256

    return file_sha256(path)


def _settings(spec: CurveConfig, setup) -> CurveTraining:
    """The curve's training settings: the config's, else what the endpoints' training recorded (the first
    endpoint's), else :data:`FALLBACK`."""
    recorded = setup.subjects[0].meta.get("config") or {}
    recorded = recorded if isinstance(recorded, dict) else {}

    def pick(name, value, derived=None):
        if value is not None:
            return value
        if derived is not None:
            return derived
        return recorded.get(name, FALLBACK[name]) if recorded.get(name) is not None else FALLBACK[name]

    lr = spec.lr if spec.lr is not None else (LR_FRACTION * float(recorded["lr"]) if recorded.get("lr") else FALLBACK["lr"])
    return CurveTraining(kind=spec.kind, bends=spec.bends, epochs=int(pick("epochs", spec.epochs)), lr=float(lr),
                         momentum=float(spec.momentum), weight_decay=float(setup.cfg.weight_decay or 0.0),
                         batch_size=int(pick("batch_size", spec.batch_size)), augment=bool(pick("augment", spec.augment)),
                         seed=int(setup.cfg.seed), pad=int(recorded.get("pad", 4)), flip=bool(recorded.get("flip", True)),
                         precision=setup.runtime.precision)


def _train_data(data, setup) -> TrainData:
    """The whole training split, prepared as the model takes it, on the device."""
    train = setup.train
    if setup.cfg.train_subset is not None:  # the evaluation's subset only thins the metrics: train on all of it
        train, _, _ = resolve_data(data, setup.subjects, setup.cfg.replace(train_subset=None, test_subset=None,
                                                                           bn_subset=None), setup.device)
    x = train.inputs(len(train))
    fill = tuple(-m / s for m, s in zip(train.mean, train.std)) if train.mean is not None else 0.0
    return TrainData(x_train=x, y_train=train.y, x_test=None, y_test=None,
                     num_classes=int(train.y.max()) + 1, fill=fill)


def _evaluate_paths(setup, spec: CurveConfig, start, bends, end, labels, info, out: Path, overwrite, progress):
    """The straight line and the curve at the same t in one ``line`` file."""
    ev = setup.evaluator(0)
    t = np.linspace(0.0, 1.0, spec.points)
    origin, line_dir, length = line_basis(start, end)
    c_origin, c_basis = curve_basis(start, bends, end)
    coords = curve_coordinates(spec.kind, t, spec.bends)
    pts = curve_points(spec.kind, t, torch.cat([start[None], bends, end[None]]).cpu())
    arc = np.concatenate([[0.0], np.cumsum(torch.linalg.vector_norm(pts[1:] - pts[:-1], dim=1).numpy())])
    grid = Grid(
        "line", (spec.points,),
        axes={"t": (t, ["step"], {"long_name": f"t along the paths ({labels[0]} at 0, {labels[1]} at 1)",
                                  "units": "fraction of the path"}),
              "distances": (t * length, ["step"], {"long_name": f"distance from {labels[0]} along the straight line",
                                                   "units": WEIGHT_SPACE}),
              "curve_distances": (arc, ["step"], {"long_name": f"length of the curve from {labels[0]}",
                                                  "units": WEIGHT_SPACE}),
              "basis": (line_dir.cpu().numpy(), ["vector", "theta"]),
              "basis_curve": (c_basis.cpu().numpy(), ["control_point", "theta"],
                              {"long_name": "the curve's control points minus the first endpoint: the bends, then "
                                            "the second endpoint", "units": WEIGHT_SPACE}),
              "points": (np.array([0.0, 1.0]), ["checkpoint"], {"long_name": "t of the checkpoints"})},
        groups={"line": {"label": "straight line", "checkpoints": [s.path or "" for s in setup.subjects],
                         "sha256": ",".join(s.sha256 or "" for s in setup.subjects)},
                "curve": {"label": info["label"], "checkpoint": info["checkpoint_file"], "sha256": info["sha256"]}},
        jobs=[("line", ev, origin, line_dir, lambda ids: t[ids][:, None]),
              ("curve", ev, c_origin, c_basis, lambda ids: coords[ids])],
        geometry={"line": {"t_min": 0.0, "t_max": 1.0, "steps": spec.points},
                  "curve": {**dataclasses.asdict(spec), "training": info["training"], "sha256": info["sha256"]}},
        attrs={"point_labels": labels, "length": length, "curve": info},
    )
    return evaluate(setup, grid, out=out, overwrite=overwrite, progress=progress)


def _evaluate_plane(setup, spec: CurveConfig, start, bends, end, labels, info, out: Path, overwrite, progress):
    """The plane through the endpoints and the middle bend, the curve's points projected onto it."""
    ev = setup.evaluator(0)
    middle = (spec.bends - 1) // 2
    origin, basis, pts = plane_basis(start, end, bends[middle])
    t = np.linspace(0.0, 1.0, spec.points)
    path = curve_points(spec.kind, t, torch.cat([start[None], bends, end[None]]).cpu())
    coords, dist = project(path, origin.cpu(), basis.cpu())
    coords, dist = coords.numpy(), dist.numpy()
    cover = np.concatenate([pts.numpy(), coords])
    lo, hi = cover.min(0), cover.max(0)
    pad = PLANE_MARGIN * (hi - lo)
    x = np.linspace(lo[0] - pad[0], hi[0] + pad[0], spec.plane)
    y = np.linspace(lo[1] - pad[1], hi[1] + pad[1], spec.plane)
    bend = "bend" if spec.bends == 1 else f"bend {middle + 1} of {spec.bends}"

    def coords_of(ids):
        ix, iy = np.unravel_index(ids, (spec.plane, spec.plane))
        return np.stack([x[ix], y[iy]], axis=1)

    title = f"Plane through {labels[0]}, {labels[1]} and the {bend} of the {info['label']}"
    grid = Grid(
        "plane", (spec.plane, spec.plane),
        axes={"x": (x, ["x"], {"long_name": f"u: {labels[0]} → {labels[1]}", "units": WEIGHT_SPACE}),
              "y": (y, ["y"], {"long_name": f"v: towards the {bend}, ⊥ u", "units": WEIGHT_SPACE}),
              "basis": (basis.cpu().numpy(), ["vector", "theta"]),
              "points": (pts.numpy(), ["checkpoint", "xy"], {"long_name": "plane coordinates of the endpoints and "
                                                                          "the bend", "units": WEIGHT_SPACE}),
              "curve": (coords, ["t", "xy"], {"long_name": f"plane coordinates of the {info['label']} at t",
                                              "units": WEIGHT_SPACE}),
              "curve_t": (t, ["t"], {"long_name": "t of the curve's points", "units": "fraction of the path"}),
              "curve_plane_distances": (dist, ["t"], {"long_name": "distance of the curve's points from the plane",
                                                      "units": WEIGHT_SPACE})},
        groups={"plane": {"label": title, "checkpoints": [s.path or "" for s in setup.subjects],
                          "sha256": ",".join(s.sha256 or "" for s in setup.subjects)}},
        jobs=[("plane", ev, origin.to(setup.device), basis.to(setup.device), coords_of)],
        geometry={"plane": {"resolution": [spec.plane, spec.plane], "margin": PLANE_MARGIN, "through": "curve"},
                  "curve": {"kind": spec.kind, "bends": spec.bends, "sha256": info["sha256"]}},
        attrs={"point_labels": [labels[0], labels[1], bend], "title": title, "curve": info},
    )
    return evaluate(setup, grid, out=out, overwrite=overwrite, progress=progress)
