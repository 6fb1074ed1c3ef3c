"""The result of an analysis, backed by its HDF5 file: metrics as arrays, widths, figures."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np

from ..report import store


class Analysis:
    """The result of an analysis, backed by its HDF5 file.

    Attributes: ``kind`` (``"rays"``, ``"line"``, ``"plane"``), ``path``, ``data`` (everything in the file as
    numpy arrays, see :func:`widthkit.store.read`), ``config``.
    """

    def __init__(self, path, data: dict | None = None, tmpdir: str | None = None):
        self.path = Path(path)
        self.data = data if data is not None else store.read(self.path)
        self.evaluators: dict = {}  # set by rays() in the process that computed it (for refine=True)
        self.reports: list[dict] = []  # width reports a command computed (widthkit.report.summary)
        self.figures: list[str] = []  # figure files a command wrote
        self._warned_partial = False
        if tmpdir is not None:  # a result computed without out=: its file goes when the result does
            weakref.finalize(self, shutil.rmtree, tmpdir, True)

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

        Non-finite values: a computed point where the metric (or, for an error, the same split's loss) is NaN or
        +-inf counts as crossed; the grid width is then the last finite distance below the level, and bisection
        counts non-finite evaluations as crossed (see :mod:`widthkit.report.width`).

        Partial files (a killed run): only *complete* rays, every step computed, are used; the others have
        width NaN. The paired comparison uses the directions complete for both models.

        Returns ``{"threshold", "refined", "tol", "n_directions", "summaries": {label: summary},
        "per_direction": {label: widths (N,)}, "crossed": {label: (N,) bool}, "levels": {label: (N,)},
        "complete": {label: number of complete rays}, "computed": {label: computed points}, "nonfinite":
        {label: computed points counted as crossed because non-finite}, "evaluations": {label: int} (refine),
        "comparison": {...} (two models), "table": str}``. Rays that never cross are ``inf`` and print as
        "> max distance"; a model with no complete ray gets a summary with ``n == 0`` and the row
        "no complete ray".

        Raises:
            ValueError: not a one-sided rays analysis, ``refine`` without evaluators, or no ray of any model
                complete yet (run the same command again to resume the file).
        """
        from ..report.width import compare, parse_threshold

        th = parse_threshold(threshold)
        distances = self._ray_distances(refine)
        tol = float(tol) if tol else float(distances[1] - distances[0]) / 100
        per_model = {label: self._model_widths(m, label, th, distances, refine, tol)
                     for label, m in self._labelled_models().items()}
        self._require_a_complete_ray(per_model, distances.size)
        max_d = float(distances[-1])
        out = {"threshold": str(th), "refined": bool(refine), "tol": tol if refine else None,
               "n_directions": len(next(iter(per_model.values()))["widths"]), "summaries": {},
               "per_direction": {}, "crossed": {}, "levels": {}, "complete": {}, "computed": {}, "nonfinite": {},
               "evaluations": {}}
        for label, r in per_model.items():
            self._add_model_report(out, label, r, max_d)
        labels = list(per_model)
        if len(labels) == 2:
            a, b = per_model[labels[0]], per_model[labels[1]]
            ok = a["complete"] & b["complete"]
            out["comparison"] = compare(a["widths"][ok], a["crossed"][ok], b["widths"][ok], b["crossed"][ok],
                                        names=tuple(labels), max_distance=max_d)
        out["table"] = self._width_table(out, per_model, th, distances)
        return out

    def _ray_distances(self, refine: bool) -> np.ndarray:
        """(S,) the distance grid of a one-sided rays analysis, after checking widths can be measured on it."""
        if self.kind != "rays":
            raise ValueError(f"widths are measured along rays; this is a {self.kind!r} analysis")
        distances = np.asarray(self.data["axes"]["distances"], dtype=np.float64)
        if distances[0] != 0:
            raise ValueError("widths need one-sided rays (distance from 0 outwards); this run used --two-sided")
        if refine and not self.evaluators:
            raise ValueError("refining widths needs the models: run the rays analysis with refine (--refine)")
        return distances

    def _labelled_models(self) -> dict:
        """label (the group's ``label`` attribute, else its name) -> model dict, in file order."""
        return {m["attrs"].get("label", g): m for g, m in self.models.items()}

    def _model_widths(self, m: dict, label: str, th, distances: np.ndarray, refine: bool, tol: float) -> dict:
        """One model's widths at threshold ``th``, kept for its complete rays (every step computed).

        Returns ``{"widths" (N,) weight-space units, NaN on incomplete rays; "crossed" (N,) bool; "complete"
        (N,) bool; "level" (N,) metric units; "nonfinite", "nonfinite_start", "widths_at_nonfinite" (grid widths
        ending at a broken point), "computed", "evaluations": int}``.
        """
        from ..report.width import nonfinite_points, refine_widths, width_at

        done = np.asarray(m["done"], dtype=bool)
        gw = width_at(th, distances, m["metrics"], done=done)
        complete = done.all(axis=1)  # never depends on where a ray crosses: no bias toward narrow rays
        widths, n_evals = np.where(complete, gw.widths, np.nan), 0
        if refine:
            brackets = np.where(complete[:, None], gw.bracket, np.nan)
            widths, evals = refine_widths(self._bisection_metric(label, th.metric), brackets, gw.level, tol=tol)
            n_evals = int(np.sum(evals))
        broken = nonfinite_points(th.metric, m["metrics"], done)
        at_broken = 0 if refine else int(np.sum(gw.at_nonfinite & complete))
        return {"widths": widths, "crossed": gw.crossed & complete, "complete": complete, "level": gw.level,
                "nonfinite": int(broken.sum()), "nonfinite_start": int(broken[:, 0].sum()),
                "widths_at_nonfinite": at_broken, "computed": int(done.sum()), "evaluations": n_evals}

    def _bisection_metric(self, label: str, metric: str):
        """``f_batch(rays (K,), distances (K,)) -> (K,)`` for :func:`refine_widths`: ``metric`` evaluated along
        the model's rays, +inf where the model is broken (see :func:`widthkit.report.width.nonfinite_points`)."""
        from ..report.width import nonfinite_points

        ev, theta, dirs = self.evaluators[label]

        def f_batch(rays, dists):
            coords = np.zeros((len(rays), len(dirs)))
            coords[np.arange(len(rays)), rays] = dists
            res = ev.evaluate(theta, dirs, coords)
            return np.where(nonfinite_points(metric, res), np.inf, res[metric])

        return f_batch

    def _require_a_complete_ray(self, per_model: dict, n_steps: int) -> None:
        """ValueError unless at least one model has a complete ray (the report would be empty)."""
        if any(r["complete"].any() for r in per_model.values()):
            return
        done = sum(int(m["done"].sum()) for m in self.models.values())
        total = sum(int(np.size(m["done"])) for m in self.models.values())
        raise ValueError(
            f"no ray of {self.path} is complete yet ({done} of {total} points computed; a width needs all "
            f"{n_steps} steps of a direction), so the run that wrote it was interrupted: run the same command again "
            "to resume it, then measure the widths"
        )

    @staticmethod
    def _add_model_report(out: dict, label: str, r: dict, max_d: float) -> None:
        """Put one model's widths, summary (over its complete rays) and counts into the report ``out``."""
        from ..report.width import summarize

        ok = r["complete"]
        out["summaries"][label] = summarize(r["widths"][ok], r["crossed"][ok], max_d)
        out["per_direction"][label] = r["widths"]
        out["crossed"][label] = r["crossed"]
        out["levels"][label] = r["level"]
        out["complete"][label] = int(ok.sum())
        out["computed"][label] = r["computed"]
        out["nonfinite"][label] = r["nonfinite"]
        if out["refined"]:
            out["evaluations"][label] = r["evaluations"]

    @staticmethod
    def _width_table(out: dict, per_model: dict, th, distances: np.ndarray) -> str:
        """The printed width table: title, one row per model, the comparison, then the notes on partial files
        and non-finite points."""
        from ..report.width import format_table, nonfinite_line, partial_line

        n = out["n_directions"]
        notes = [partial_line(label, out["complete"][label], n) for label in per_model
                 if out["complete"][label] < n]
        if notes and "comparison" in out and 0 < out["comparison"]["n"] < n:
            notes.append(f"the comparison uses the {out['comparison']['n']} directions complete for both")
        notes += [nonfinite_line(label, th.metric, r["nonfinite"], r["computed"], n_at_start=r["nonfinite_start"],
                                 n_grid_widths=r["widths_at_nonfinite"])
                  for label, r in per_model.items() if r["nonfinite"]]
        how = f"bisection, tol {out['tol']:.3g}" if out["refined"] else "grid, linear interpolation"
        title = f"width at {th} ({how}), {len(distances)} steps to {float(distances[-1]):.4g}, {n} directions"
        return format_table(out["summaries"], out.get("comparison"), title=title, notes=notes)

    def asymmetry(self, threshold: str = "test_err=+5") -> dict:
        """Two-sided rays: per model, the width on each side of θ₀ and ``(w₊ − w₋)/(w₊ + w₋)`` per direction
        (see :func:`widthkit.width.asymmetry`). Returns ``{label: report}`` plus a printable ``"table"``."""
        from ..report.width import asymmetry

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

    def projections(self) -> dict:
        """What a plane records besides its grid: the marked checkpoints, the trajectory and the PCA variance.

        Returns ``{"units": coordinate units, "marks": [{"label", "x", "y", "distance"}], "trajectory":
        [{"label", "x", "y", "distance"}] (in order), "pca": {"center", "n_iterates", "explained_ratio" [2],
        "variances" [2]} or None, "table": printable text}``; distances from the plane are ‖w − proj(w)‖₂ in
        weight-space units, coordinates in the plane's units.

        Raises:
            ValueError: not a plane analysis.
        """
        if self.kind != "plane":
            raise ValueError(f"projections belong to planes; this is a {self.kind!r} analysis")
        axes, attrs = self.data["axes"], self.data["attrs"]
        units = (self.data.get("axis_attrs", {}).get("x") or {}).get("units", "")
        out: dict = {"units": units, "marks": [], "trajectory": [], "pca": None}
        for key, stem in (("marks", "mark"), ("trajectory", "trajectory")):
            if key in axes:
                out[key] = [{"label": str(label), "x": float(c[0]), "y": float(c[1]), "distance": float(d)}
                            for label, c, d in zip(attrs[f"{stem}_labels"], np.asarray(axes[key]).reshape(-1, 2),
                                                   np.ravel(axes[f"{stem}_distances"]))]
        if "pca_explained_ratio" in axes:
            pca = attrs.get("pca") or {}
            out["pca"] = {"center": pca.get("center"), "n_iterates": pca.get("n_iterates"),
                          "explained_ratio": np.ravel(axes["pca_explained_ratio"]).tolist(),
                          "variances": np.ravel(axes["pca_variances"]).tolist()}
        out["table"] = _projection_table(out)
        return out

    def default_thresholds(self) -> list[str]:
        """The paper's two width questions: test error 5 points above the start, and train loss (with the L2
        term when the weight decay is known) 0.5 nats above it. Without an error metric (a regression loss in
        units of its own): where the train and test losses double."""
        stored = next(iter(self.models.values()))["metrics"]
        train_loss = "train_loss_l2" if "train_loss_l2" in stored else "train_loss"
        if "test_err" in stored:
            return ["test_err=+5", f"{train_loss}=+0.5"]
        return [f"{m}=x2" for m in (train_loss, "test_loss") if m in stored]

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
        store.update_attrs(self.path, {"widths": marks, "width_report": list(reports)})
        self.data = store.read(self.path)

    def plot(self, ax=None, metric: str | None = None):
        """Draw this analysis on ``ax`` (a new figure when None) with the labels and units its file records;
        returns the Axes. See :func:`widthkit.report.render.draw`. A partial file (a killed run) is marked
        PARTIAL on the figure, and warned about once per result."""
        import warnings

        from ..report.render import draw, partial_note

        note = partial_note(self.data, self.path)
        if note and not self._warned_partial:
            self._warned_partial = True
            warnings.warn(note, UserWarning, stacklevel=2)
        return draw(self.data, metric=metric, ax=ax)

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


def _projection_table(p: dict) -> str:
    """The printed summary of :meth:`Analysis.projections`."""
    rows = []
    if p["pca"]:
        r, v = p["pca"]["explained_ratio"], p["pca"]["variances"]
        rows.append(f"PCA plane of {p['pca']['n_iterates']} iterates, centre {p['pca']['center']}: explained variance "
                    f"PC1 {r[0]:.1%}, PC2 {r[1]:.1%} (variances {v[0]:.4g}, {v[1]:.4g})")
    if p["marks"]:
        width = max(8, *(len(m["label"]) for m in p["marks"]))
        rows.append(f"marked checkpoints: projection onto the plane ({p['units']}) and distance from it (weight-space L2)")
        rows.append(f"{'label':<{width}}  {'x':>10}  {'y':>10}  {'distance':>10}")
        rows += [f"{m['label']:<{width}}  {m['x']:>10.4g}  {m['y']:>10.4g}  {m['distance']:>10.4g}" for m in p["marks"]]
    if p["trajectory"]:
        d = np.array([t["distance"] for t in p["trajectory"]])
        rows.append(f"trajectory: {len(d)} iterates from {p['trajectory'][0]['label']} to {p['trajectory'][-1]['label']}, "
                    f"distance from the plane {d.min():.4g} to {d.max():.4g} (median {np.median(d):.4g})")
    return "\n".join(rows)


def load(path) -> Analysis:
    """Open an analysis file written by widthkit (any kind)."""
    return Analysis(path)
