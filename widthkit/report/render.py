"""Figures of stored analyses: the dict :func:`widthkit.report.store.read` returns (or the path of its file)
drawn with the array-level functions of :mod:`widthkit.report.figures`.

* :func:`draw` draws one metric of an analysis on one Axes and returns it (the caller owns the figure).
* :func:`figures_of` builds the figures :func:`plot_analysis` writes and returns them open, with the file
  suffix of each (the caller closes them).
* :func:`plot_analysis` / :func:`plot_file` write PNG/PDF/SVG files and close every figure they open.

Axis labels come from the units stored with each coordinate dataset (``data["axis_attrs"][name]``:
``{"long_name", "units"}`` -> ``"<long_name> (<units>)"``), so a ray whose distances are multiples of
filter-normalised directions is never labelled as an absolute weight-space distance. A dict without
``axis_attrs`` (built by hand, or read from an older file) gets the array-level defaults. Titles name the
checkpoints, the directions' normalisation and the BN mode from ``data["config"]``; a plane's title is the
one stored in ``data["attrs"]["title"]`` when there is one.

>>> data = store.read("rays.h5")                                   # doctest: +SKIP
>>> ax = draw(data, metric="test_err")                             # doctest: +SKIP
>>> plot_file("rays.h5", formats=("png",))                         # doctest: +SKIP
['rays.png']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..fileio import atomic_write
from . import store
from .figures import (
    LINE_DISTANCE_LABEL,
    METRIC_LABELS,
    PLANE_XLABEL,
    PLANE_YLABEL,
    RAYS_XLABEL,
    SURFACE_XLABEL,
    SURFACE_YLABEL,
    check_metric,
    is_error,
    loss_units,
    describe,
    plot_line,
    plot_plane,
    plot_plane_surface,
    plot_rays,
    plot_rays_panel,
)

__all__ = ["FORMATS", "KINDS", "PLANE_FIGURES", "axis_label", "draw", "figures_of", "plot_analysis", "plot_file"]

#: Figure file formats :func:`plot_analysis` writes.
FORMATS = ("png", "pdf", "svg")
#: Analysis kinds a stored file may hold.
KINDS = ("rays", "line", "plane")
#: How planes are drawn: filled log-spaced contours, a heatmap, or a 3D surface.
PLANE_FIGURES = ("contour", "heatmap", "surface")
PNG_DPI = 150
# PDF fonts embedded as TrueType (editable text, accepted by publishers) rather than Type 3.
_SAVE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42}
# The metric draw() shows when none is named, in order of preference.
_DRAW_PREFERENCE = {
    "rays": ("test_err", "train_err", "test_loss", "train_loss_l2", "train_loss"),
    "plane": ("train_loss", "train_loss_l2", "test_loss", "test_err", "train_err"),
}


# --------------------------------------------------------------------------------------------- reading the dict


def _as_data(data) -> Mapping:
    """The analysis dict: ``data`` itself, or :func:`store.read` of it when it is a path."""
    if isinstance(data, (str, os.PathLike)):
        return store.read(data)
    return data


def _check_data(data) -> str:
    """The analysis kind, after checking ``data`` has what every figure needs."""
    if not isinstance(data, Mapping):
        raise ValueError(
            f"data must be the dict widthkit.report.store.read(path) returns (or a path), got {type(data).__name__}")
    missing = [k for k in ("kind", "axes", "models") if k not in data]
    if missing:
        raise ValueError(f"analysis dict lacks {missing}; pass the dict widthkit.report.store.read(path) returns")
    if data["kind"] not in KINDS:
        raise ValueError(f"unknown analysis kind {data['kind']!r}; valid: {', '.join(KINDS)}")
    if not data["models"]:
        raise ValueError("analysis dict has no models (no evaluated checkpoint groups); nothing to plot")
    return data["kind"]


def check_formats(formats) -> tuple[str, ...]:
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ValueError(f"unknown figure format(s) {bad}; valid: {', '.join(FORMATS)}")
    if not formats:
        raise ValueError(f"formats is empty; name at least one of {', '.join(FORMATS)}")
    return tuple(dict.fromkeys(formats))


def _check_plane_kind(plane_kind: str) -> None:
    if plane_kind not in PLANE_FIGURES:
        raise ValueError(f"unknown plane figure {plane_kind!r}; valid: {', '.join(PLANE_FIGURES)}")


def _find(config: Mapping, key: str):
    """First non-dict value of ``key`` anywhere in a nested config, depth first; None when absent."""
    if key in config and not isinstance(config[key], Mapping):
        return config[key]
    for value in config.values():
        if isinstance(value, Mapping):
            found = _find(value, key)
            if found is not None:
                return found
    return None


def _setting(data: Mapping, section: str, key: str):
    """``config[section][key]`` (e.g. ``config["eval"]["bn_mode"]``), else ``key`` anywhere in the config
    (hand-built dicts may keep it flat); None when absent."""
    config = data.get("config") or {}
    if not isinstance(config, Mapping):
        raise ValueError(f"data['config'] must be a dict (widthkit.report.store.read decodes it), "
                         f"got {type(config).__name__}")
    part = config.get(section)
    if isinstance(part, Mapping) and key in part:
        return part[key]
    return _find(config, key)


def axis_label(data: Mapping, name: str, default: str | None = None) -> str | None:
    """Label of the coordinate dataset ``name`` from its stored attributes: ``"<long_name> (<units>)"``,
    or the long name alone when no units are stored; ``default`` when nothing is stored.

    >>> axis_label({"axis_attrs": {"t": {"long_name": "t along the line", "units": "multiples of ‖B − A‖"}}}, "t")
    't along the line (multiples of ‖B − A‖)'
    """
    attrs = (data.get("axis_attrs") or {}).get(name) or {}
    long_name, units = attrs.get("long_name"), attrs.get("units")
    if not long_name:
        return default
    return f"{long_name} ({units})" if units else str(long_name)


def _axis(data: Mapping, name: str) -> np.ndarray:
    if name not in data["axes"]:
        raise ValueError(f"{data['kind']} analysis lacks axes[{name!r}]; axes present: {sorted(data['axes'])}")
    return np.asarray(data["axes"][name])


def _metric_values(model: Mapping, metric: str) -> np.ndarray:
    """The metric (grid-shaped, float64) with NaN wherever the done mask says "not computed"."""
    values = np.asarray(model["metrics"][metric], dtype=np.float64)
    done = model.get("done")
    if done is not None and np.shape(done) == values.shape:
        values = np.where(np.asarray(done, dtype=bool), values, np.nan)
    return values


def _available(models: Mapping) -> list[str]:
    """Metrics every model holds, in :data:`METRIC_LABELS` order."""
    sets = [set(m["metrics"]) for m in models.values()]
    others = sorted(set.intersection(*sets) - set(METRIC_LABELS)) if sets else []
    return [m for m in METRIC_LABELS if all(m in s for s in sets)] + others


def _metrics_to_plot(models: Mapping, metric) -> list[str]:
    """Requested metrics, or the paper's pair: test error and train loss (+ L2 term when stored)."""
    available = _available(models)
    if metric is None:
        err = next((m for m in ("test_err", "train_err") if m in available), None)
        err = err or next((m for m in available if is_error(m)), None)  # e.g. only test_top5_err stored
        loss = next((m for m in ("train_loss_l2", "train_loss", "test_loss") if m in available), None)
        loss = loss or next((m for m in available if not is_error(m)), None)  # e.g. only a custom metric
        chosen = [m for m in (err, loss) if m]
        if not chosen:
            raise ValueError(f"the analysis holds no plottable metric; known metrics: {', '.join(METRIC_LABELS)}")
        return chosen
    requested = [metric] if isinstance(metric, str) else list(metric)
    for m in requested:
        check_metric(m)
    absent = [m for m in requested if m not in available]
    if absent or not requested:
        raise ValueError(f"metric(s) {absent or requested} not in this analysis; available: {', '.join(available)}")
    return list(dict.fromkeys(requested))


def _one_metric(models: Mapping, metric, kind: str) -> str:
    """The single metric :func:`draw` shows: ``metric`` (checked), else the first stored of the kind's
    preference (rays: test error; planes: train loss)."""
    if metric is not None:
        if not isinstance(metric, str):
            raise ValueError(f"draw shows one metric; got {metric!r}, pass one of {', '.join(METRIC_LABELS)}")
        return _metrics_to_plot(models, metric)[0]
    available = _available(models)
    found = next((m for m in _DRAW_PREFERENCE[kind] if m in available), None)
    if found is None:
        raise ValueError(f"the analysis holds no plottable metric; known metrics: {', '.join(METRIC_LABELS)}")
    return found


def _model_labels(models: Mapping) -> dict[str, str]:
    """Group name -> display label (attrs["label"], else the name), made unique."""
    out: dict[str, str] = {}
    for name, model in models.items():
        label = str(model.get("attrs", {}).get("label") or name)
        out[name] = f"{label} ({name})" if label in out.values() else label
    return out


def _single_model(data: Mapping, name: str) -> Mapping:
    models = data["models"]
    if name in models:
        return models[name]
    if len(models) == 1:
        return next(iter(models.values()))
    raise ValueError(f"{data['kind']} analysis should hold one group {name!r}; groups: {sorted(models)}")


def _point_labels(data: Mapping, k: int) -> list[str]:
    """The (k,) checkpoint names of a line or plane (already decoded by store.read), or "point <i>"."""
    labels = data["axes"].get("point_labels", data.get("attrs", {}).get("point_labels"))
    if labels is None:
        return [f"point {i}" for i in range(k)]
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise ValueError(f"point_labels must be a list of {k} names (widthkit.report.store.read decodes it), "
                         f"got {labels!r}")
    labels = [str(s) for s in labels]
    if len(labels) != k:
        raise ValueError(f"analysis has {k} points but {len(labels)} point_labels {labels}")
    return labels


def _bn_text(data: Mapping) -> str:
    """"BN statistics recomputed at each point" etc. from config["eval"]["bn_mode"]; "" when not recorded."""
    return describe(bn_mode=_setting(data, "eval", "bn_mode"))


# --------------------------------------------------------------------------------------------- rays


def _match_label(key: str, names_to_labels: Mapping[str, str]) -> str:
    for name, label in names_to_labels.items():
        if key == label or key == name:
            return label
    for name, label in names_to_labels.items():
        if str(key).lower() in (label.lower(), name.lower()):
            return label
    raise ValueError(f"widths entry {key!r} matches no model; models: {dict(names_to_labels)}")


def _rays_widths(data: Mapping, labels: Mapping[str, str], metrics: Sequence[str]):
    """data["widths"] -> (widths_by_metric, threshold_by_metric) for the panels shown."""
    widths_by_metric: dict[str, dict] = {}
    threshold_by_metric: dict[str, dict] = {}
    for key, entry in (data.get("widths") or {}).items():
        metric = entry.get("metric")
        if metric not in metrics or "widths" not in entry:
            continue  # widths of a metric without a panel cannot be placed honestly
        label = _match_label(key, labels)
        widths_by_metric.setdefault(metric, {})[label] = np.asarray(entry["widths"], dtype=np.float64)
        if entry.get("level") is not None:
            threshold_by_metric.setdefault(metric, {})[label] = np.asarray(entry["level"], dtype=np.float64)
    for metric, levels in threshold_by_metric.items():
        flat = np.concatenate([np.ravel(v) for v in levels.values()])
        flat = flat[np.isfinite(flat)]
        if len(levels) == len(labels) and flat.size and np.allclose(flat, flat[0], rtol=1e-12, atol=0):
            threshold_by_metric[metric] = float(flat[0])  # one shared level: one dashed line
    return widths_by_metric, threshold_by_metric


def _rays_inputs(data: Mapping, metrics: Sequence[str]) -> dict[str, Any]:
    """What a rays figure shows: ``distances`` (S,), ``curves`` metric -> {label -> (N, S)}, ``widths`` and
    ``thresholds`` per metric, the x label from the stored units, and the caption in two parts: ``head``
    ("Rays from SGD and SWA") and ``detail`` (direction count and normalisation, BN mode)."""
    labels = _model_labels(data["models"])
    curves = {m: {labels[name]: _metric_values(model, m) for name, model in data["models"].items()}
              for m in metrics}
    widths, thresholds = _rays_widths(data, labels, metrics)
    n_dirs = data["axes"].get("directions_shape", next(iter(curves[metrics[0]].values())).shape)[0]
    detail = _directions_text(data, int(n_dirs)) or describe(int(n_dirs), _setting(data, "rays", "norm"),
                                                             _setting(data, "eval", "bn_mode"))
    return {"distances": _axis(data, "distances"), "curves": curves, "widths": widths, "thresholds": thresholds,
            "xlabel": axis_label(data, "distances", RAYS_XLABEL),
            "head": "Rays from " + " and ".join(labels.values()), "detail": detail}


def _directions_text(data: Mapping, n_dirs: int) -> str:
    """The caption's directions and BN mode when the rays did not follow random directions (``--dirs-from``):
    "3 principal directions of 20 iterates" or "each model's top 3 Hessian eigenvectors"; "" otherwise."""
    source = (data.get("attrs") or {}).get("directions_source")
    if not isinstance(source, Mapping):
        return ""
    if source.get("kind") == "pca":
        what = f"{n_dirs} principal direction{'s' if n_dirs != 1 else ''} of {len(source.get('labels') or [])} iterates"
    else:
        what = f"each model's top {n_dirs} Hessian eigenvector{'s' if n_dirs != 1 else ''}"
    bn = _bn_text(data)
    return f"{what}, {bn}" if bn else what


def _rays_figures(data: Mapping, metric, plane_kind: str) -> list[tuple[str, Figure]]:
    """One figure, a panel per metric side by side (see :func:`plot_analysis`)."""
    r = _rays_inputs(data, _metrics_to_plot(data["models"], metric))
    caption = f"{r['head']}: {r['detail']}" if r["detail"] else r["head"]
    axes = plot_rays_panel(r["distances"], r["curves"], r["widths"], r["thresholds"], title=caption,
                           xlabel=r["xlabel"])
    return [("", axes[0].figure)]


def _draw_rays(data: Mapping, metric, ax) -> Axes:
    m = _one_metric(data["models"], metric, "rays")
    r = _rays_inputs(data, [m])
    title = f"{r['head']}\n{r['detail']}" if r["detail"] else r["head"]
    return plot_rays(r["distances"], r["curves"][m], ax=ax, metric=m, widths=r["widths"].get(m),
                     threshold_level=r["thresholds"].get(m), title=title, xlabel=r["xlabel"])


# --------------------------------------------------------------------------------------------- line


def _draw_line(data: Mapping, metric, ax) -> Axes:
    """:func:`plot_line` of the line's metrics (the paper's pair when ``metric`` is None) on ``ax``; returns
    the error Axes, or the loss Axes when no error is drawn."""
    t = _axis(data, "t")
    model = _single_model(data, "line")
    metrics = _metrics_to_plot({"line": model}, metric)
    tp = np.ravel(_axis(data, "points")).astype(np.float64)
    points = dict(zip(_point_labels(data, tp.size), tp))
    title = "Line through " + " and ".join(points) if points else "Line in weight space"
    bn = _bn_text(data)
    ax_err, ax_loss = plot_line(t, {m: _metric_values(model, m) for m in metrics}, points, ax=ax,
                                xlabel=axis_label(data, "t"), distances=data["axes"].get("distances"),
                                title=f"{title}, {bn}" if bn else title,
                                distance_label=axis_label(data, "distances", LINE_DISTANCE_LABEL))
    return ax_err if ax_err is not None else ax_loss


def _line_figures(data: Mapping, metric, plane_kind: str) -> list[tuple[str, Figure]]:
    """One figure, errors and losses on twin y axes."""
    return [("", _draw_line(data, metric, None).figure)]


# --------------------------------------------------------------------------------------------- plane


def _plane_inputs(data: Mapping) -> dict[str, Any]:
    """What every plane figure shares: ``x`` (X,), ``y`` (Y,), the ``model``, checkpoint ``points`` (K, 2)
    and ``labels`` (K,), axis labels from the stored units, and the title (the stored one, else "Plane
    through <checkpoints>"), with the BN mode on a second line."""
    P = np.asarray(data["axes"].get("points", np.zeros((0, 2))), dtype=np.float64).reshape(-1, 2)
    labels = _point_labels(data, len(P))
    title = data.get("attrs", {}).get("title")
    if not title:
        title = "Plane through " + ", ".join(labels) if labels else "Plane in weight space"
    bn = _bn_text(data)
    return {"x": _axis(data, "x"), "y": _axis(data, "y"), "model": _single_model(data, "plane"), "points": P,
            "labels": labels, "title": f"{title}\n{bn}" if bn else str(title),
            "xlabel": axis_label(data, "x"), "ylabel": axis_label(data, "y"), "overlays": _plane_overlays(data)}


def _plane_overlays(data: Mapping) -> dict[str, Any]:
    """Keywords of :func:`plot_plane` for what a plane file holds besides its checkpoints: ``marks`` (M, 2) with
    ``mark_labels`` and ``mark_distances`` (distance from the plane), the ``trajectory`` (T, 2) with its legend
    text (first → last iterate). Empty for a file without them."""
    axes, attrs = data["axes"], data.get("attrs", {})
    out: dict[str, Any] = {}
    if "marks" in axes:
        M = np.asarray(axes["marks"], dtype=np.float64).reshape(-1, 2)
        labels = attrs.get("mark_labels") or [f"mark {k}" for k in range(len(M))]
        out.update(marks=M, mark_labels=[str(s) for s in labels], mark_distances=axes.get("mark_distances"))
    if "trajectory" in axes:
        T = np.asarray(axes["trajectory"], dtype=np.float64).reshape(-1, 2)
        labels = attrs.get("trajectory_labels") or []
        ends = f"{labels[0]} → {labels[-1]}, " if len(labels) >= 2 else ""
        out.update(trajectory=T, trajectory_label=f"trajectory ({ends}{len(T)} iterates)")
    return out


def _plot_plane_metric(p: Mapping[str, Any], metric: str, ax, plane_kind: str) -> Axes:
    """One metric of the plane ``p`` (from :func:`_plane_inputs`) as ``plane_kind`` (see :data:`PLANE_FIGURES`;
    a 3D ``ax`` always gets the surface)."""
    Z = _metric_values(p["model"], metric)
    if plane_kind == "surface" or getattr(ax, "name", None) == "3d":
        return plot_plane_surface(p["x"], p["y"], Z, p["points"], p["labels"], ax=ax, metric=metric,
                                  title=p["title"], xlabel=p["xlabel"] or SURFACE_XLABEL,
                                  ylabel=p["ylabel"] or SURFACE_YLABEL, **p["overlays"])
    kind = "contourf" if plane_kind == "contour" else "heatmap"
    return plot_plane(p["x"], p["y"], Z, p["points"], p["labels"], ax=ax, metric=metric, title=p["title"],
                      kind=kind, xlabel=p["xlabel"] or PLANE_XLABEL, ylabel=p["ylabel"] or PLANE_YLABEL,
                      **p["overlays"])


def _plane_figures(data: Mapping, metric, plane_kind: str) -> list[tuple[str, Figure]]:
    """One figure per metric, suffixed ``_<metric>`` (``_<metric>_<plane_kind>`` unless contours)."""
    p = _plane_inputs(data)
    figures = []
    for m in _metrics_to_plot({"plane": p["model"]}, metric):
        ax = _plot_plane_metric(p, m, None, plane_kind)
        figures.append((f"_{m}" if plane_kind == "contour" else f"_{m}_{plane_kind}", ax.figure))
    return figures


def _draw_plane(data: Mapping, metric, ax) -> Axes:
    p = _plane_inputs(data)
    return _plot_plane_metric(p, _one_metric({"plane": p["model"]}, metric, "plane"), ax, "contour")


# --------------------------------------------------------------------------------------------- public

_BUILDERS = {"rays": _rays_figures, "line": _line_figures, "plane": _plane_figures}
_DRAWERS = {"rays": _draw_rays, "line": _draw_line, "plane": _draw_plane}


def draw(data, metric: str | None = None, ax: Axes | None = None) -> Axes:
    """Draw one analysis on one Axes, labelled with the units its file records.

    * rays: :func:`~widthkit.report.figures.plot_rays` of one metric (default ``test_err``), every direction
      and the mean per checkpoint, stored widths marked.
    * line: :func:`~widthkit.report.figures.plot_line` of ``metric`` (default: test error and train loss on
      twin y axes).
    * plane: :func:`~widthkit.report.figures.plot_plane` contours of one metric (default ``train_loss``);
      a 3D ``ax`` gets the surface instead.

    Args:
        data: the dict :func:`widthkit.report.store.read` returns, or the path of an analysis file.
        metric: one metric name (see :data:`~widthkit.report.figures.METRIC_LABELS`), or None for the default.
        ax: Axes to draw on; None makes a new figure, which the caller closes.

    Returns:
        The Axes drawn on (for a line: the error Axes, or the loss Axes when no error is drawn).
    """
    data = _as_data(data)
    kind = _check_data(data)
    with loss_units(units_of_loss(data)):
        ax = _DRAWERS[kind](data, metric, ax)
    mark_partial(ax.figure, data)
    return ax


def mark_partial(fig: Figure, data) -> bool:
    """Write PARTIAL on ``fig`` when ``data`` is a killed (or still running) analysis' file: the figure itself
    says so, not only the terminal. Returns whether it did."""
    done, total = store.completeness(data)
    if done >= total or any(t.get_gid() == "partial" for t in fig.texts):
        return done < total
    fig.text(0.01, 0.995, f"PARTIAL: {done} of {total} points computed; resume with the same command",
             ha="left", va="top", color="tab:red", fontsize="small", gid="partial")
    return True


def partial_note(data, name) -> str | None:
    """The warning for a partial analysis file ``name`` (None when it is complete), as the plot command prints
    it and :meth:`widthkit.analyses.result.Analysis.plot` warns."""
    done, total = store.completeness(data)
    if done >= total:
        return None
    return (f"{name} is partial: {done} of {total} points computed (a killed or running analysis); the figures show "
            "what is there. Run the command that made it again to finish it")


def units_of_loss(data) -> str:
    """The units of an analysis' losses: nats for the cross-entropy (and files from before losses were
    recorded), else the loss's recorded name (``mse``, ``module:function``)."""
    config = data.get("config")
    evaluation = config.get("eval") if isinstance(config, Mapping) else None  # a malformed one: checked later
    loss = (evaluation.get("loss") if isinstance(evaluation, Mapping) else None) or "cross_entropy"
    return "nats" if loss == "cross_entropy" else str(loss)


def figures_of(data, metric=None, plane_kind: str = "contour") -> list[tuple[str, Figure]]:
    """The figures :func:`plot_analysis` would write, open and unsaved: ``[(file suffix, Figure), ...]``.
    The caller closes them; on error every figure opened here is closed before raising.

    Args:
        data: the dict :func:`widthkit.report.store.read` returns, or the path of an analysis file.
        metric, plane_kind: as for :func:`plot_analysis`.
    """
    data = _as_data(data)
    kind = _check_data(data)
    _check_plane_kind(plane_kind)
    before = set(plt.get_fignums())
    try:
        with loss_units(units_of_loss(data)):
            figures = _BUILDERS[kind](data, metric, plane_kind)
        for _, fig in figures:
            mark_partial(fig, data)
        return figures
    except BaseException:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
        raise


def plot_analysis(data, out_stem, formats: Sequence[str] = ("png", "pdf"), metric=None,
                  plane_kind: str = "contour") -> list[str]:
    """Write the figures of one analysis.

    * rays: one figure, test error and train loss panels side by side (``train_loss_l2`` when stored,
      else ``train_loss``), widths from ``data["widths"]`` marked on their metric's panel;
      written to ``<out_stem>.<fmt>``.
    * line: one figure, test error and train loss on twin y axes; ``<out_stem>.<fmt>``.
    * plane: one contour figure per metric; ``<out_stem>_<metric>.<fmt>``.

    Axis labels carry the stored units (see :func:`axis_label`); titles the checkpoints, the direction count,
    normalisation and BN mode from the stored config, or a plane's stored title.

    Args:
        data: analysis dict from :func:`widthkit.report.store.read` (``kind``, ``config``, ``axes``,
            ``axis_attrs``, ``models``, optional ``widths``), or the path of an analysis file.
        out_stem: path prefix of the files (parent folders are created).
        formats: any of :data:`FORMATS`; PNG at 150 dpi, all with a tight bounding box.
        metric: None (the defaults above), a metric name or a list of them.
        plane_kind: planes as ``"contour"`` (log-spaced filled contours), ``"heatmap"`` or ``"surface"`` (3D);
            the last two are written to ``<out_stem>_<metric>_<kind>.<fmt>``.

    Returns:
        The paths written, as strings. Every figure opened here is closed, also on error.
    """
    formats = check_formats(formats)
    out_stem = Path(out_stem)
    before = set(plt.get_fignums())
    try:
        figures = figures_of(data, metric, plane_kind)
        paths = [p for suffix, fig in figures for p in save_figure(fig, out_stem, formats, suffix)]
    finally:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
    return paths


def save_figure(fig, out_stem, formats: Sequence[str], suffix: str = "") -> list[str]:
    """Write ``fig`` as ``<out_stem><suffix>.<fmt>`` for each format (PNG at the report's dpi, PDF fonts embedded
    as TrueType), each through a temporary file, so a full disk leaves no empty or half figure behind. The one
    place figure files are written; the figure is left open (the caller closes it). Returns the paths."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with plt.rc_context(_SAVE_RC):
        for fmt in formats:
            path = out_stem.with_name(f"{out_stem.name}{suffix}.{fmt}")
            atomic_write(path, lambda f, fmt=fmt: fig.savefig(f, format=fmt, dpi=PNG_DPI, bbox_inches="tight"))
            paths.append(str(path))
    return paths


def plot_file(path, out_dir=None, formats: Sequence[str] = ("png", "pdf"), metric=None,
              plane_kind: str = "contour") -> list[str]:
    """Read an analysis HDF5 file and write its figures as ``<out_dir>/<file stem>[_<metric>].<fmt>``
    (``out_dir`` defaults to the file's folder). See :func:`plot_analysis`. Returns the paths written."""
    path = Path(path)
    out_dir = path.parent if out_dir is None else Path(out_dir)
    return plot_analysis(store.read(path), out_dir / path.stem, formats=formats, metric=metric,
                         plane_kind=plane_kind)
