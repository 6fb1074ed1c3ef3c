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

        Returns ``{"threshold", "refined", "tol", "summaries": {label: summary}, "per_direction": {label:
        widths (N,)}, "crossed": {label: (N,) bool}, "levels": {label: (N,)}, "comparison": {...} (two
        models), "table": str}``. Rays that never cross are ``inf`` and print as "> max distance".
        """
        from ..report.width import compare, format_table, parse_threshold, refine_widths, summarize, width_at

        if self.kind != "rays":
            raise ValueError(f"widths are measured along rays; this is a {self.kind!r} analysis")
        th = parse_threshold(threshold)
        distances = self.data["axes"]["distances"]
        if distances[0] != 0:
            raise ValueError("widths need one-sided rays (distance from 0 outwards); this run used --two-sided")
        if refine and not self.evaluators:
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
        store.update_attrs(self.path, {"widths": marks, "width_report": list(reports)})
        self.data = store.read(self.path)

    def plot(self, ax=None, metric: str | None = None):
        """Draw this analysis on ``ax`` (a new figure when None) with the labels and units its file records;
        returns the Axes. See :func:`widthkit.report.render.draw`."""
        from ..report.render import draw

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


def load(path) -> Analysis:
    """Open an analysis file written by widthkit (any kind)."""
    return Analysis(path)
