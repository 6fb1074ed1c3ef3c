"""The analyses users run — rays, lines, planes — as plain Python calls.

Each call takes models (checkpoint paths, :class:`~widthkit.checkpoints.Checkpoint` objects or
``nn.Module`` instances), data (a dataset name, or your own tensors / DataLoaders), evaluates every point of
its grid into a resumable HDF5 file, and returns an :class:`Analysis` with ``.widths()``, ``.plot()`` and
``.save()``. The command-line tools (``python -m widthkit.rays`` etc.) are thin wrappers over these.

>>> res = widthkit.rays({"SGD": "sgd.pt", "SWA": "swa.pt"}, dirs=10)       # Izmailov et al. 2018, sec. 3.4
>>> res.widths("test_err=+5")["comparison"]["n_b_wider"]
>>> res.plot()
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import store as _store
from .directions import (
    line_basis, plane_basis, random_directions, validate_exclude, validate_norm,
)
from .evaluator import BN_MODES, EvalConfig, EvalSet, Evaluator, random_subset, resolve_device

ProgressFn = Callable[[int, int], None]  # (points done, points in total)


# -- what is analysed -------------------------------------------------------------------------------

@dataclass
class Subject:
    """One model to evaluate: a label for figures, a group name in the HDF5 file, provenance."""

    label: str
    model: nn.Module
    path: str | None = None
    sha256: str | None = None
    role: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return re.sub(r"[^a-z0-9_]+", "_", self.label.lower()).strip("_") or "model"

    def attrs(self) -> dict:
        return {"label": self.label, "checkpoint": self.path or "", "sha256": self.sha256 or "",
                "role": self.role or "", "arch": self.meta.get("arch") or ""}


def _label_from(path: str | None, role: str | None, index: int) -> str:
    if role in ("sgd", "swa"):
        return role.upper()
    if role:
        return role
    if path:
        return Path(path).stem
    return f"model{index}"


def as_subjects(models, arch: str | None = None, which: str | None = None) -> list[Subject]:
    """Normalise what a user passes as models into labelled :class:`Subject` s.

    Accepts a single item or a list of items, or a ``{label: item}`` dict, where an item is a checkpoint
    path, a :class:`~widthkit.checkpoints.Checkpoint`, or an ``nn.Module``.
    """
    from .checkpoints import Checkpoint, load_checkpoint

    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, (list, tuple)):
        items = [(None, m) for m in models]
    else:
        items = [(None, models)]
    if not items:
        raise ValueError("no models given: pass at least one checkpoint or nn.Module")
    subjects = []
    for i, (label, item) in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            # "file.pt#swa" / "file.pt#sgd" pick one model of a file holding both (the SWA authors' layout),
            # so both can be analysed side by side: --ckpt ckpt.pt#sgd --ckpt ckpt.pt#swa
            path, _, pick = str(item).rpartition("#") if str(item).endswith(("#swa", "#sgd")) else (str(item), "", None)
            item = load_checkpoint(path, arch=arch, which=pick or which)
        if isinstance(item, Checkpoint):
            meta = dict(item.meta)
            role = meta.get("role") or (meta.get("which") if meta.get("which") in ("sgd", "swa") else None)
            subjects.append(Subject(label or _label_from(item.path, role, i), item.model,
                                    str(item.path) if item.path else None, item.sha256, role, meta))
        elif isinstance(item, nn.Module):
            subjects.append(Subject(label or f"model{i}", item))
        else:
            raise TypeError(f"cannot analyse a {type(item).__name__}: pass a checkpoint path, a Checkpoint or an nn.Module")
    labels = [s.label for s in subjects]
    groups = [s.group for s in subjects]
    if len(set(groups)) != len(groups):
        # the same role twice (e.g. two SGD seeds): fall back to file names, then to indices
        for i, s in enumerate(subjects):
            if groups.count(s.group) > 1:
                s.label = f"{s.label} ({Path(s.path).stem})" if s.path else f"{s.label} #{i}"
        groups = [s.group for s in subjects]
        if len(set(groups)) != len(groups):
            raise ValueError(f"models need distinct labels, got {labels}; name them: --ckpt LABEL=PATH on the "
                             "command line, a dict {label: model} in Python")
    _check_same_architecture(subjects)
    return subjects


def _check_same_architecture(subjects: Sequence[Subject]) -> None:
    ref = subjects[0]
    ref_shapes = {n: tuple(p.shape) for n, p in ref.model.named_parameters()}
    for s in subjects[1:]:
        shapes = {n: tuple(p.shape) for n, p in s.model.named_parameters()}
        if shapes == ref_shapes:
            continue
        only_a = sorted(set(ref_shapes) - set(shapes))[:3]
        only_b = sorted(set(shapes) - set(ref_shapes))[:3]
        differ = [f"{n}: {ref_shapes[n]} vs {shapes[n]}" for n in ref_shapes if n in shapes and shapes[n] != ref_shapes[n]][:3]
        raise ValueError(
            f"{s.label} ({s.path or 'module'}) does not share the architecture of {ref.label} "
            f"({ref.path or 'module'}): "
            + "; ".join(x for x in (f"only in {ref.label}: {only_a}" if only_a else "",
                                    f"only in {s.label}: {only_b}" if only_b else "",
                                    f"shapes differ: {differ}" if differ else "") if x)
            + ". Every model of one analysis must be the same architecture (same parameter names and shapes)."
        )


# -- data -------------------------------------------------------------------------------------------

@dataclass
class DataSpec:
    """Which data an analysis evaluates on (recorded in the file's config)."""

    name: str | None = None  # dataset name (None: the one recorded in the first checkpoint)
    root: str | None = None
    train_subset: int | None = None  # evaluate train metrics on a fixed random subset of this size
    test_subset: int | None = None


def _resolve_data(data, subjects: Sequence[Subject], spec: DataSpec, device, seed: int):
    """Returns (train EvalSet, test EvalSet, description dict)."""
    from .data import load_dataset

    if data is None or isinstance(data, str):
        name = data or spec.name
        if name is None:
            recorded = {s.meta.get("dataset") for s in subjects if s.meta.get("dataset")}
            if len(recorded) > 1:
                raise ValueError(f"the checkpoints were trained on different datasets {sorted(recorded)}; pass --data")
            if not recorded:
                raise ValueError(
                    "the checkpoint does not record its dataset; pass --data (e.g. --data digits, --data cifar10 "
                    "--data-root DIR, --data imagefolder:PATH)"
                )
            name = recorded.pop()
        train = EvalSet.from_dataset(load_dataset(name, root=spec.root, split="train"), device)
        test = EvalSet.from_dataset(load_dataset(name, root=spec.root, split="test"), device)
        desc = {"name": name, "root": str(spec.root) if spec.root else None}
    else:
        if isinstance(data, Mapping):
            train_src, test_src = data.get("train"), data.get("test")
        elif isinstance(data, (tuple, list)) and len(data) == 2 and not torch.is_tensor(data[0]):
            train_src, test_src = data
        else:
            raise TypeError("data must be a dataset name, {'train': ..., 'test': ...}, or a (train, test) pair")
        if train_src is None or test_src is None:
            raise ValueError("both a train and a test split are needed")
        train = EvalSet.from_any(train_src, device)
        test = EvalSet.from_any(test_src, device)
        desc = {"name": "user-data", "root": None, "n_train": len(train), "n_test": len(test),
                "train_checksum": _checksum(train), "test_checksum": _checksum(test)}
    train = _subset(train, spec.train_subset, seed)
    test = _subset(test, spec.test_subset, seed + 1)
    desc.update(train_subset=spec.train_subset, test_subset=spec.test_subset, n_train=len(train), n_test=len(test))
    return train, test, desc


def _checksum(es: EvalSet) -> float:
    # cheap fingerprint of user-given tensors, so a resume against different data is refused
    return float(es.x.double().sum()) + 1e-3 * float(es.y.double().sum())


def _subset(es: EvalSet, k: int | None, seed: int) -> EvalSet:
    idx = random_subset(len(es), k, seed)
    if idx is None:
        return es
    idx = idx.to(es.device)
    return EvalSet(es.x.index_select(0, idx), es.y.index_select(0, idx))


# -- shared settings --------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    """Settings every analysis shares (one definition; the CLIs build their flags from it)."""

    bn: str = "recompute"  # BatchNorm statistics at each point: keep | recompute | batch
    bn_subset: int | None = None  # training images for recomputing BN (None: all)
    batch_size: int | None = None  # evaluation batch (None: 64 on CPU, 4096 on CUDA)
    weight_decay: float | None = None  # for train_loss_l2; None: the checkpoint's recorded weight decay, else 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bf16 autocast (CUDA only)
    seed: int = 0  # directions and subsets
    points_in_flight: int = 1  # points per forward pass (vmap over stacked weights; BN keep only)

    def __post_init__(self):
        if self.bn not in BN_MODES:
            raise ValueError(f"unknown BN mode {self.bn!r}; valid choices: {', '.join(BN_MODES)}")


def _recorded_weight_decay(subjects: Sequence[Subject]) -> float:
    wds = set()
    for s in subjects:
        cfg = s.meta.get("config") or {}
        wd = cfg.get("weight_decay", cfg.get("wd")) if isinstance(cfg, Mapping) else None
        if wd is not None:
            wds.add(float(wd))
    return wds.pop() if len(wds) == 1 else 0.0


def _make_evaluator(model, train, test, settings: EvalSettings, subjects, device, chunk_size):
    wd = settings.weight_decay if settings.weight_decay is not None else _recorded_weight_decay(subjects)
    cfg = EvalConfig(bn_mode=settings.bn, bn_subset=settings.bn_subset, batch_size=settings.batch_size,
                     weight_decay=wd, amp=settings.amp, seed=settings.seed, chunk_size=chunk_size,
                     points_in_flight=settings.points_in_flight)
    return Evaluator(model, train=train, test=test, config=cfg, device=device)


def _base_config(kind: str, settings: EvalSettings, ev: Evaluator, data_desc: dict, subjects, extra: dict) -> dict:
    ecfg = ev.config.to_dict()
    for how in ("chunk_size", "points_in_flight"):  # how results are batched, not what they are
        ecfg.pop(how)
    ecfg["batch_size"] = ev.batch_size if ev.config.bn_mode == "batch" else None  # matters only in batch mode
    ecfg["bn_batch_size"] = ev.bn_batch_size if ev.config.bn_mode == "recompute" else None
    return {
        "kind": kind,
        **extra,
        "eval": ecfg,
        "data": data_desc,
        "models": [{"label": s.label, "checkpoint": s.path, "sha256": s.sha256} for s in subjects],
        "theta_size": ev.layout.size,
    }


# -- the run loop -----------------------------------------------------------------------------------

def _run_grid(af: _store.AnalysisFile, jobs: Sequence[tuple], progress: ProgressFn | None) -> None:
    """Evaluate every pending point of every group.

    ``jobs``: (group, evaluator, origin (D,), basis (k,D), coords_of(flat_ids) -> (P,k)). Under torchrun the
    points are shared out between ranks (see :mod:`widthkit.distributed`).
    """
    from . import distributed

    total = af.n_points
    done = af.n_done() if distributed.is_writer() else 0
    if progress and distributed.is_writer():
        progress(done, total)
    for group, ev, origin, basis, coords_of in jobs:
        pending = af.pending(group) if distributed.is_writer() else None
        pending = distributed.broadcast_object(pending)
        if len(pending) == 0:
            continue

        def on_results(ids, values, group=group):
            nonlocal done
            af.write(group, ids, values)
            done += len(ids)
            if progress:
                progress(done, total)

        distributed.evaluate_shared(ev, origin, basis, coords_of, pending, on_results)


# -- results ----------------------------------------------------------------------------------------

class Analysis:
    """The result of an analysis, backed by its HDF5 file.

    Attributes: ``kind`` (``"rays"``, ``"line"``, ``"plane"``), ``path``, ``data`` (everything in the file as
    numpy arrays, see :func:`widthkit.store.read`), ``config``.
    """

    def __init__(self, path, data: dict | None = None, _tmpdir: str | None = None):
        self.path = Path(path)
        self.data = data if data is not None else _store.read(self.path)
        self._tmpdir = _tmpdir

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def models(self) -> dict:
        return self.data["models"]

    def metric(self, name: str, group: str | None = None) -> np.ndarray:
        """A metric grid; ``group`` defaults to the only (or first) model group."""
        group = group or next(iter(self.models))
        return self.models[group]["metrics"][name]

    def complete(self) -> bool:
        return all(m["done"].all() for m in self.models.values())

    def widths(self, threshold: str = "test_err=+5", refine: bool = False, tol: float | None = None) -> dict:
        """Width along each ray: the distance where ``threshold`` is first crossed (rays analyses only).

        On the grid the crossing is interpolated linearly between the two grid points around it; with
        ``refine=True`` (only on a result computed in this process, which still holds its evaluators) it is
        found by bisection along each ray to ``tol`` (default: 1/100 of a grid step), a few extra evaluations
        per ray.

        Returns ``{"threshold", "refined", "tol", "summaries": {label: summary}, "per_direction": {label:
        widths (N,)}, "crossed": {label: (N,) bool}, "levels": {label: (N,)}, "comparison": {...} (two
        models), "table": str}``. Rays that never cross are ``inf`` and print as "> max distance".
        """
        from .width import compare, format_table, parse_threshold, refine_widths, summarize, width_at

        if self.kind != "rays":
            raise ValueError(f"widths are measured along rays; this is a {self.kind!r} analysis")
        th = parse_threshold(threshold)
        distances = self.data["axes"]["distances"]
        if distances[0] != 0:
            raise ValueError("widths need one-sided rays (distance from 0 outwards); this run used --two-sided")
        if refine and not getattr(self, "evaluators", None):
            raise ValueError("refining widths needs the models: run the rays analysis with refine (--refine)")
        max_d = float(distances[-1])
        tol = float(tol) if tol else float(distances[1] - distances[0]) / 100
        out = {"threshold": str(th), "refined": bool(refine), "tol": tol if refine else None, "summaries": {},
               "per_direction": {}, "crossed": {}, "levels": {}, "evaluations": {}}
        grids = {}
        for group, m in self.models.items():
            label = m["attrs"].get("label", group)
            gw = width_at(th, distances, m["metrics"])
            widths = gw.widths
            if refine:
                ev, theta, dirs = self.evaluators[label]

                def f_batch(rays, dists, ev=ev, theta=theta, dirs=dirs):
                    coords = np.zeros((len(rays), len(dirs)))
                    coords[np.arange(len(rays)), rays] = dists
                    return ev.evaluate(theta, dirs, coords)[th.metric]

                widths, n_evals = refine_widths(f_batch, gw.bracket, gw.level, tol=tol)
                out["evaluations"][label] = int(np.sum(n_evals))
            grids[label] = (widths, gw.crossed, gw.complete)
            ok = gw.complete
            out["summaries"][label] = summarize(widths[ok], gw.crossed[ok], max_d) if ok.any() else None
            out["per_direction"][label] = widths
            out["crossed"][label] = gw.crossed
            out["levels"][label] = gw.level
        labels = list(grids)
        if len(labels) == 2:
            (wa, ca, oka), (wb, cb, okb) = grids[labels[0]], grids[labels[1]]
            ok = oka & okb
            out["comparison"] = compare(wa[ok], ca[ok], wb[ok], cb[ok], names=tuple(labels), max_distance=max_d)
        how = f"bisection, tol {tol:.3g}" if refine else "grid, linear interpolation"
        out["table"] = format_table({k: v for k, v in out["summaries"].items() if v is not None},
                                    out.get("comparison"), title=f"width at {th} ({how}), {len(distances)} steps "
                                    f"to {max_d:.4g}, {len(next(iter(grids.values()))[0])} directions")
        return out

    def asymmetry(self, threshold: str = "test_err=+5") -> dict:
        """Two-sided rays: per model, the width on each side of θ₀ and ``(w₊ − w₋)/(w₊ + w₋)`` per direction
        (see :func:`widthkit.width.asymmetry`). Returns ``{label: report}`` plus a printable ``"table"``."""
        from .width import asymmetry

        if self.kind != "rays":
            raise ValueError(f"asymmetry is measured along rays; this is a {self.kind!r} analysis")
        out = {m["attrs"].get("label", g): asymmetry(threshold, self.data["axes"]["distances"], m["metrics"])
               for g, m in self.models.items()}
        rows = [f"asymmetry at {threshold}: (w+ - w-)/(w+ + w-) per direction, 0 = symmetric"]
        for label, r in out.items():
            med = r["median_abs_asymmetry"]
            rows.append(f"{label:<10} median |asymmetry| {'n/a' if med is None else f'{med:.3g}'}  "
                        f"(defined on {r['n_defined']}/{len(r['plus'])} directions)")
        return {**out, "table": "\n".join(rows)}

    def default_thresholds(self) -> list[str]:
        """The paper's two width questions: test error 5 points above the start, and train loss (with the L2
        term when the weight decay is known) 0.5 nats above it."""
        has_l2 = "train_loss_l2" in next(iter(self.models.values()))["metrics"]
        return ["test_err=+5", "train_loss_l2=+0.5" if has_l2 else "train_loss=+0.5"]

    def record_widths(self, reports: Sequence[dict]) -> None:
        """Store width reports in the file (root attributes ``widths`` — the first threshold, drawn on the
        figures — and ``width_report``, all of them) and in ``self.data``."""
        if not reports:
            return
        first = reports[0]
        metric = first["threshold"].split("=")[0]
        marks = {label: {"metric": metric, "level": np.asarray(first["levels"][label]).tolist(),
                         "widths": np.asarray(w).tolist(), "threshold": first["threshold"]}
                 for label, w in first["per_direction"].items()}
        _store.update_attrs(self.path, {"widths": marks, "width_report": list(reports)})
        self.data = _store.read(self.path)

    def plot(self, ax=None, metric: str | None = None):
        """Draw this analysis on ``ax`` (a new figure when None); returns the Axes."""
        from . import plots

        d = self.data
        if self.kind == "rays":
            metric = metric or "test_err"
            curves = {m["attrs"].get("label", g): m["metrics"][metric] for g, m in d["models"].items()}
            return plots.plot_rays(d["axes"]["distances"], curves, ax=ax, metric=metric)
        if self.kind == "line":
            m = next(iter(d["models"].values()))
            metric = metric or "test_err"
            points = dict(zip(d["axes"].get("point_labels", ["A", "B"]), d["axes"]["points"]))
            ax_err, ax_loss = plots.plot_line(d["axes"]["t"], {metric: m["metrics"][metric]}, points, ax=ax,
                                              distances=d["axes"].get("distances"))
            return ax_err if ax_err is not None else ax_loss
        m = next(iter(d["models"].values()))
        metric = metric or "train_loss"
        return plots.plot_plane(d["axes"]["x"], d["axes"]["y"], m["metrics"][metric], d["axes"]["points"],
                                d["axes"].get("point_labels", []), ax=ax, metric=metric)

    def save(self, path) -> Path:
        """Copy the analysis file to ``path`` (an .h5 file); returns the new path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.resolve() != self.path.resolve():
            shutil.copyfile(self.path, path)
        return path

    def __repr__(self) -> str:
        shapes = {g: next(iter(m["metrics"].values())).shape for g, m in self.models.items()}
        return f"Analysis(kind={self.kind!r}, path='{self.path}', grids={shapes}, complete={self.complete()})"


def load(path) -> Analysis:
    """Open an analysis file written by widthkit (any kind)."""
    return Analysis(path)


def _out_path(out, default_name: str) -> tuple[Path, str | None]:
    if out is not None:
        return Path(out), None
    tmp = tempfile.mkdtemp(prefix="widthkit-")
    return Path(tmp) / default_name, tmp


def _finish(af: _store.AnalysisFile, tmp: str | None) -> Analysis | None:
    from . import distributed

    af.close()
    if not distributed.is_writer():
        return None
    return Analysis(af.path, _tmpdir=tmp)


# -- rays -------------------------------------------------------------------------------------------

@dataclass
class RaysSpec:
    """Rays from each model along the same random directions (Izmailov et al. 2018, section 3.4)."""

    dirs: int = 10  # number of random directions
    max_dist: float | None = None  # furthest distance (None: ‖θ‖/2 of the first model for unit directions, else 1)
    steps: int = 31  # grid points along each ray, distance 0 included
    two_sided: bool = False  # rays from -max_dist to +max_dist
    norm: str = "unit"  # unit | filter | layer | adaptive (unit: uniform on the sphere, absolute distances)
    exclude: tuple[str, ...] = ()  # leave "bias" and/or "norm" parameters out of the directions

    def __post_init__(self):
        validate_norm(self.norm)
        self.exclude = validate_exclude(self.exclude)
        if self.dirs < 1:
            raise ValueError(f"--dirs must be at least 1, got {self.dirs}")
        if self.steps < 2:
            raise ValueError(f"--steps must be at least 2, got {self.steps}")
        if self.max_dist is not None and not (self.max_dist > 0 and math.isfinite(self.max_dist)):
            raise ValueError(f"--max-dist must be a positive number, got {self.max_dist}")


def _nice(x: float) -> float:
    """Round up to 1, 2 or 5 × 10^k (a readable axis limit)."""
    if x <= 0:
        return 1.0
    e = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        if m * 10 ** e >= x * 0.999:
            return float(m * 10 ** e)
    return float(10 ** (e + 1))


def rays(models, data=None, *, dirs: int = 10, max_dist: float | None = None, steps: int = 31,
         two_sided: bool = False, norm: str = "unit", exclude=(), settings: EvalSettings | None = None,
         data_spec: DataSpec | None = None, out=None, overwrite: bool = False, progress: ProgressFn | None = None,
         chunk_size: int = 4, arch: str | None = None, which: str | None = None, **eval_kw) -> Analysis:
    """Evaluate train loss and test error along random rays from every model, with the SAME directions.

    Args:
        models: checkpoint path(s), Checkpoint(s), nn.Module(s), or ``{label: item}``.
        data: dataset name, ``(train, test)`` data of your own, or None (the checkpoint's recorded dataset).
        dirs, max_dist, steps, two_sided, norm, exclude: see :class:`RaysSpec`.
        settings: :class:`EvalSettings` (BN mode, device, seed, ...); keyword arguments of it may also be
            passed directly (``bn="keep"``, ``device="cuda"``).
        out: the HDF5 file (None: a temporary file; use ``.save(path)`` to keep it).
        overwrite: start afresh when ``out`` holds another run.
        progress: ``progress(done, total)`` after every chunk.

    Returns:
        An :class:`Analysis` whose metrics are shaped (dirs, steps), distances in weight-space units.
    """
    settings = settings or EvalSettings(**eval_kw)
    spec = RaysSpec(dirs, max_dist, steps, two_sided, norm, exclude)
    subjects = as_subjects(models, arch=arch, which=which)
    device = resolve_device(settings.device)
    train, test, data_desc = _resolve_data(data, subjects, data_spec or DataSpec(), device, settings.seed)
    evs = [_make_evaluator(s.model, train, test, settings, subjects, device, chunk_size) for s in subjects]
    layout = evs[0].layout
    thetas = [ev.theta0 for ev in evs]
    if spec.max_dist is None:
        # unit directions: half the weight norm; weight-scaled directions (filter, layer, adaptive) are about as
        # long as θ itself, so one unit along them is already a large step
        spec.max_dist = _nice(0.5 * float(torch.linalg.vector_norm(thetas[0].double()))) if spec.norm == "unit" else 1.0
    # The same Gaussian draws (same seed) for every model. Unit directions are then literally the same vectors;
    # weight-scaled ones (filter, layer, adaptive) are scaled to each model's own weights, as Li et al. do, so
    # that a model with smaller weights is not perturbed relatively more (BatchNorm makes that matter).
    directions = [random_directions(layout, thetas[0] if spec.norm == "unit" else th, spec.dirs,
                                    seed=settings.seed, norm=spec.norm, exclude=spec.exclude) for th in thetas]
    lo = -spec.max_dist if spec.two_sided else 0.0
    distances = np.linspace(lo, spec.max_dist, spec.steps)
    config = _base_config("rays", settings, evs[0], data_desc, subjects, {"rays": dataclasses.asdict(spec)})
    path, tmp = _out_path(out, "rays.h5")
    af = _open(path, "rays", config, {
        "distances": (distances, ["step"]),
        "directions": (directions[0].cpu().numpy(), ["direction", "theta"]),
        **({f"directions_{s.group}": (d.cpu().numpy(), ["direction", "theta"]) for s, d in zip(subjects[1:], directions[1:])}
           if spec.norm != "unit" else {}),
    }, {s.group: s.attrs() for s in subjects}, (spec.dirs, spec.steps), evs[0].config.metrics(),
        {"theta_layout": layout.describe(), "units": {"distances": "weight-space L2 (unit directions)"
                                                      if spec.norm == "unit" else f"multiples of {spec.norm}-normalised directions"}},
        overwrite)

    def coords_of(ids):
        i, j = np.unravel_index(ids, (spec.dirs, spec.steps))
        c = np.zeros((len(ids), spec.dirs))
        c[np.arange(len(ids)), i] = distances[j]
        return c

    try:
        _run_grid(af, [(s.group, ev, th, d, coords_of) for s, ev, th, d in zip(subjects, evs, thetas, directions)],
                  progress)
    except BaseException:
        af.close()
        raise
    result = _finish(af, tmp)
    if result is not None:
        # kept for bisection along the rays (Analysis.widths(refine=True)): label -> (evaluator, θ, directions)
        result.evaluators = {s.label: (ev, th, d) for s, ev, th, d in zip(subjects, evs, thetas, directions)}
    return result


def _open(path, kind, config, axes, groups, shape, metrics, attrs, overwrite):
    from . import distributed

    if distributed.is_writer():
        af = _store.open_analysis(path, kind, config, axes, groups, shape, metrics, attrs=attrs, overwrite=overwrite)
    else:
        af = _store.AnalysisFile(Path(path), _store._Lock(Path(path)), list(groups), list(metrics), shape)
    distributed.barrier()
    return af


# -- line -------------------------------------------------------------------------------------------

@dataclass
class LineSpec:
    """Points on the line θ(t) = w₁ + t·(w₂ − w₁) through two models (the paper's SGD–SWA figure)."""

    t_min: float = -1.0  # in units of the distance between the two models (t = 0: first, t = 1: second)
    t_max: float = 2.0
    steps: int = 61

    def __post_init__(self):
        if not self.t_max > self.t_min:
            raise ValueError(f"need t_max > t_min, got [{self.t_min}, {self.t_max}]")
        if self.steps < 2:
            raise ValueError(f"--steps must be at least 2, got {self.steps}")


def line(models, data=None, *, t_min: float = -1.0, t_max: float = 2.0, steps: int = 61,
         settings: EvalSettings | None = None, data_spec: DataSpec | None = None, out=None, overwrite=False,
         progress: ProgressFn | None = None, chunk_size: int = 4, arch=None, which=None, **eval_kw) -> Analysis:
    """Evaluate along the line through two models, beyond both ends.

    Returns an :class:`Analysis` with metrics shaped (steps,), axes ``t`` and ``distances`` (t·‖w₂ − w₁‖).
    """
    settings = settings or EvalSettings(**eval_kw)
    spec = LineSpec(t_min, t_max, steps)
    subjects = as_subjects(models, arch=arch, which=which)
    if len(subjects) != 2:
        raise ValueError(f"a line needs exactly two checkpoints, got {len(subjects)}")
    device = resolve_device(settings.device)
    train, test, data_desc = _resolve_data(data, subjects, data_spec or DataSpec(), device, settings.seed)
    ev = _make_evaluator(subjects[0].model, train, test, settings, subjects, device, chunk_size)
    w1 = ev.theta0
    w2 = ev.layout.flatten(subjects[1].model).to(device)
    origin, basis, length = line_basis(w1, w2)
    t = np.linspace(spec.t_min, spec.t_max, spec.steps)
    config = _base_config("line", settings, ev, data_desc, subjects, {"line": dataclasses.asdict(spec)})
    path, tmp = _out_path(out, "line.h5")
    labels = [s.label for s in subjects]
    af = _open(path, "line", config, {
        "t": (t, ["step"]), "distances": (t * length, ["step"]), "basis": (basis.cpu().numpy(), ["vector", "theta"]),
        "points": (np.array([0.0, 1.0]), ["checkpoint"]),
    }, {"line": {"label": " → ".join(labels), "checkpoints": [s.path or "" for s in subjects],
                 "sha256": ",".join(s.sha256 or "" for s in subjects)}},
        (spec.steps,), ev.config.metrics(), {"point_labels": labels, "length": length}, overwrite)
    try:
        _run_grid(af, [("line", ev, origin, basis, lambda ids: t[ids][:, None])], progress)
    except BaseException:
        af.close()
        raise
    return _finish(af, tmp)


# -- plane ------------------------------------------------------------------------------------------

@dataclass
class PlaneSpec:
    """A grid on a plane: through three models (Izmailov et al. 2018, Figure 1) or random around one."""

    resolution: tuple[int, int] = (21, 21)  # grid points along x and y
    margin: float = 0.2  # through three models: extend the grid this fraction beyond the three points
    random: bool = False  # random plane around one model (two filter-normalised directions, Li et al. 2018)
    span: float = 1.0  # random plane: coordinates in [-span, span] (multiples of the directions)
    norm: str = "filter"  # random plane: direction normalisation
    exclude: tuple[str, ...] = ("bias", "norm")  # random plane: kinds left out of the directions

    def __post_init__(self):
        self.resolution = tuple(int(r) for r in self.resolution)
        if len(self.resolution) != 2 or min(self.resolution) < 2:
            raise ValueError(f"--resolution needs two numbers >= 2 (e.g. 21 21), got {self.resolution}")
        if self.margin < 0:
            raise ValueError(f"--margin must be >= 0, got {self.margin}")
        if self.span <= 0:
            raise ValueError(f"--span must be > 0, got {self.span}")
        validate_norm(self.norm)
        self.exclude = validate_exclude(self.exclude)


def plane(models, data=None, *, resolution=(21, 21), margin: float = 0.2, random: bool = False, span: float = 1.0,
          norm: str = "filter", exclude=("bias", "norm"), settings: EvalSettings | None = None,
          data_spec: DataSpec | None = None, out=None, overwrite=False, progress: ProgressFn | None = None,
          chunk_size: int = 4, arch=None, which=None, **eval_kw) -> Analysis:
    """Evaluate a grid on a plane: through three models, or (``random=True``) a random plane around one.

    Through three models w₁, w₂, w₃: u = w₂ − w₁ and v = (w₃ − w₁) ⟂ u, orthonormal, origin w₁; the grid
    covers the three points with ``margin`` of the span on every side; coordinates in weight-space units.
    Returns an :class:`Analysis` with metrics shaped (nx, ny), index ``[ix, iy]``.
    """
    settings = settings or EvalSettings(**eval_kw)
    spec = PlaneSpec(tuple(resolution), margin, random, span, norm, exclude)
    subjects = as_subjects(models, arch=arch, which=which)
    want = 1 if spec.random else 3
    if len(subjects) != want:
        raise ValueError(
            f"a {'random plane needs exactly one checkpoint' if spec.random else 'plane through checkpoints needs exactly three'}"
            f", got {len(subjects)}" + ("" if spec.random else " (or pass --random with one checkpoint)")
        )
    device = resolve_device(settings.device)
    train, test, data_desc = _resolve_data(data, subjects, data_spec or DataSpec(), device, settings.seed)
    ev = _make_evaluator(subjects[0].model, train, test, settings, subjects, device, chunk_size)
    nx, ny = spec.resolution
    if spec.random:
        origin = ev.theta0
        basis = random_directions(ev.layout, origin, 2, seed=settings.seed, norm=spec.norm, exclude=spec.exclude)
        points = np.zeros((1, 2))
        x = np.linspace(-spec.span, spec.span, nx)
        y = np.linspace(-spec.span, spec.span, ny)
        units = f"multiples of {spec.norm}-normalised random directions"
    else:
        ws = [ev.theta0] + [ev.layout.flatten(s.model).to(device) for s in subjects[1:]]
        origin, basis, pts = plane_basis(*ws)
        points = pts.numpy()
        lo, hi = points.min(0), points.max(0)
        pad = spec.margin * (hi - lo)
        x = np.linspace(lo[0] - pad[0], hi[0] + pad[0], nx)
        y = np.linspace(lo[1] - pad[1], hi[1] + pad[1], ny)
        units = "weight-space L2 (orthonormal basis)"
    config = _base_config("plane", settings, ev, data_desc, subjects, {"plane": dataclasses.asdict(spec)})
    path, tmp = _out_path(out, "plane.h5")
    af = _open(path, "plane", config, {
        "x": (x, ["x"]), "y": (y, ["y"]), "basis": (basis.cpu().numpy(), ["vector", "theta"]),
        "points": (points, ["checkpoint", "xy"]),
    }, {"plane": {"label": "plane", "checkpoints": [s.path or "" for s in subjects],
                  "sha256": ",".join(s.sha256 or "" for s in subjects)}},
        (nx, ny), ev.config.metrics(), {"point_labels": [s.label for s in subjects], "units": units}, overwrite)

    def coords_of(ids):
        ix, iy = np.unravel_index(ids, (nx, ny))
        return np.stack([x[ix], y[iy]], axis=1)

    try:
        _run_grid(af, [("plane", ev, origin, basis, coords_of)], progress)
    except BaseException:
        af.close()
        raise
    return _finish(af, tmp)
