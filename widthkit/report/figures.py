"""Figures of rays, lines and planes in weight space (Izmailov et al. 2018, "Averaging Weights Leads to Wider
Optima and Better Generalization", section 3.4, figures 1, 3 and 5), from numpy arrays.

The functions here (:func:`plot_rays`, :func:`plot_rays_panel`, :func:`plot_line`, :func:`plot_plane`,
:func:`plot_plane_surface`) take numpy arrays and an optional ``ax``. They create a figure only when no Axes
is given, never call ``plt.show()``, and return the Axes they drew on; closing the figure is the caller's
business. Figures of a stored analysis (labels and titles from the file, PNG/PDF/SVG output) are made by
:mod:`widthkit.report.render`.

Units: distances in whatever unit the caller's coordinates have (the default labels say weight-space L2,
the Euclidean norm of theta - theta_0 over the flat weight vector; pass ``xlabel=`` for other units, e.g.
multiples of filter-normalised directions); losses in nats (mean cross-entropy); errors in percent (0..100).
NaN means "not computed yet" and is simply not drawn. Nothing here computes a metric.

>>> import numpy as np
>>> d = np.linspace(0, 40, 21)
>>> curves = {"SWA": 5 + (d / 25) ** 2 * np.ones((3, 1)), "SGD": 5 + (d / 15) ** 2 * np.ones((3, 1))}
>>> ax = plot_rays(d, curves, metric="test_err")
>>> ax.get_ylabel()
'test error (%)'
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import textwrap
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors as mcolors
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

__all__ = [
    "METRIC_LABELS",
    "metric_label",
    "check_metric",
    "is_error",
    "describe",
    "wrap_text",
    "direction_noun",
    "checkpoint_colors",
    "contour_levels",
    "plot_rays",
    "plot_rays_panel",
    "plot_line",
    "plot_plane",
    "plot_plane_marks",
    "plot_plane_trajectory",
    "plot_plane_surface",
]

#: Axis label (with units) of every metric the store may hold.
METRIC_LABELS: dict[str, str] = {
    "train_loss": "train loss (nats)",
    "train_loss_l2": "train loss + ½·wd·‖θ‖² (nats)",
    "test_loss": "test loss (nats)",
    "train_err": "train error (%)",
    "test_err": "test error (%)",
}
PLANE_KINDS = ("contourf", "heatmap")
LEVEL_SCALES = ("log", "linear")

# Default axis labels, for coordinates in absolute weight-space distance.
RAYS_XLABEL = "distance in weight space (‖θ−θ₀‖₂)"
LINE_DISTANCE_LABEL = "distance along the line (weight-space units)"
PLANE_XLABEL = "distance along u (weight-space units)"
PLANE_YLABEL = "distance along v (weight-space units)"
SURFACE_XLABEL = "u (weight-space units)"
SURFACE_YLABEL = "v (weight-space units)"
SURFACE_LABEL_CHARS = 34  # 3D axis labels run diagonally: longer ones are wrapped to this many characters
PANEL_SIZE = (4.5, 3.5)  # inches per panel
PLANE_SIZE = (5.0, 4.2)  # 3D surface figures

# SWA blue, SGD green, as in the paper's figures.
_FIXED_COLORS = {"swa": mcolors.to_hex("tab:blue"), "sgd": mcolors.to_hex("tab:green")}
_TAB10 = [mcolors.to_hex(c) for c in plt.get_cmap("tab10").colors]
_POINT_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_MARK_MARKER = "*"  # checkpoints projected onto a plane (not on it): a star, unlike the plane's own points
_TRAJECTORY_COLOR = "tab:red"
# Line plot: colour by unit (matches its y axis), line style by split.
_LINE_STYLES = {
    "test_err": ("tab:red", "-"),
    "train_err": ("tab:red", "--"),
    "test_loss": ("0.15", "-"),
    "train_loss": ("0.15", "--"),
    "train_loss_l2": ("0.15", ":"),
}
_BN_TEXT = {
    "recompute": "BN statistics recomputed at each point",
    "keep": "BN statistics of the checkpoint",
    "batch": "BN in batch mode",
}


# --------------------------------------------------------------------------------------------- small helpers


_LOSS_UNITS: contextvars.ContextVar[str] = contextvars.ContextVar("widthkit_loss_units", default="nats")


@contextlib.contextmanager
def loss_units(units: str):
    """Label the losses of the figures drawn inside this block in ``units`` (default: nats, the cross-entropy's);
    the file-level helpers set it from the loss an analysis recorded (e.g. ``mse``)."""
    token = _LOSS_UNITS.set(units)
    try:
        yield
    finally:
        _LOSS_UNITS.reset(token)


def metric_label(metric: str) -> str:
    """Axis label with units for ``metric``, e.g. ``"test error (%)"`` for ``"test_err"``; other stored
    metrics (``test_top5_err`` -> ``"test top-5 error (%)"``) are labelled from their name. Losses are in
    nats unless drawn inside :func:`loss_units`.

    Raises:
        ValueError: not a metric name (the message lists the known ones).
    """
    check_metric(metric)
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric].replace("(nats)", f"({_LOSS_UNITS.get()})")
    split, _, rest = metric.partition("_")
    words = {"top5_err": "top-5 error"}.get(rest) or rest.replace("class_err_", "error on class ").replace("_", " ")
    return f"{split} {words}" + (" (%)" if is_error(metric) else "")


def _line_style(metric: str) -> tuple[str, str]:
    """(colour, line style) of a metric's curve: colour by unit (errors red, losses dark), style by split."""
    if metric in _LINE_STYLES:
        return _LINE_STYLES[metric]
    return ("tab:red" if is_error(metric) else "0.15", "-" if metric.startswith("test_") else "--")


def check_metric(metric) -> None:
    """Raise ValueError unless ``metric`` is one of :data:`METRIC_LABELS` or another ``train_``/``test_`` metric."""
    if metric not in METRIC_LABELS and not (isinstance(metric, str) and re.fullmatch(r"(train|test)_[a-z0-9_]+", metric)):
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRIC_LABELS)}, or another stored "
                         "train_/test_ metric (test_top5_err, ...)")


def is_error(metric: str) -> bool:
    """Whether ``metric`` is an error in percent (``*_err``, ``*_class_err_K``) rather than a loss."""
    return metric.endswith("_err") or "_class_err_" in metric


def _checkpoint_key(label) -> str:
    """First word of a label in lower case: "SWA (300 ep)" -> "swa"."""
    words = [w for w in re.split(r"[^0-9a-z]+", str(label).lower()) if w]
    return words[0] if words else ""


def checkpoint_colors(labels: Sequence[str], colors: Mapping[str, Any] | None = None) -> dict[str, str]:
    """A colour per checkpoint label: SWA blue, SGD green (by the label's first word, any case), the other
    labels the remaining tab10 colours in order (never blue or green). Entries of ``colors`` (label -> any
    matplotlib colour) win.

    >>> checkpoint_colors(["sgd", "SWA", "start"])
    {'sgd': '#2ca02c', 'SWA': '#1f77b4', 'start': '#ff7f0e'}
    """
    colors = dict(colors or {})
    chosen: dict[str, Any] = {}
    for label in labels:
        if label in colors:
            chosen[label] = colors[label]
        elif _checkpoint_key(label) in _FIXED_COLORS:
            chosen[label] = _FIXED_COLORS[_checkpoint_key(label)]
    # blue and green stay reserved for SWA and SGD even when absent: readers of the paper expect them there
    used = {mcolors.to_hex(c) for c in chosen.values()} | set(_FIXED_COLORS.values())
    free = [c for c in _TAB10 if c not in used] or _TAB10
    others = iter(free * (len(labels) // len(free) + 1))
    return {label: chosen[label] if label in chosen else next(others) for label in labels}


def _new_axes(figsize=PANEL_SIZE) -> Axes:
    _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _vector(name: str, values, min_size: int = 1) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < min_size:
        raise ValueError(f"{name} must be a 1-D array with at least {min_size} entries, got shape {v.shape}")
    return v


def _coordinates(name: str, values) -> np.ndarray:
    v = _vector(name, values, min_size=2)
    if not (np.isfinite(v).all() and (np.diff(v) > 0).all()):
        raise ValueError(f"{name} must be finite and strictly increasing (grid coordinates), got {v}")
    return v


def _interp_finite(t: np.ndarray, v: np.ndarray, at: float) -> float:
    """Linear interpolation of ``v(t)`` at ``at`` over the computed (finite) points; NaN outside them."""
    ok = np.isfinite(t) & np.isfinite(v)
    if ok.sum() == 0 or not (t[ok].min() <= at <= t[ok].max()):
        return float("nan")
    order = np.argsort(t[ok])
    return float(np.interp(at, t[ok][order], v[ok][order]))


def wrap_text(text: str, max_chars: int) -> str:
    r"""``text`` with its lines broken to at most ``max_chars`` characters where possible: a long line is
    broken before its last parenthesis (the units of an axis label) or after a comma when both halves then
    fit, else at spaces (words are never split).

    >>> wrap_text("distance from θ₀ along the ray (multiples of filter-normalised directions)", 45)
    'distance from θ₀ along the ray\n(multiples of filter-normalised directions)'
    """
    out = []
    for line in text.split("\n"):
        if len(line) <= max_chars:
            out.append(line)
            continue
        paren, comma = line.rfind(" ("), line.rfind(", ")
        halves = [(line[:paren], line[paren + 1:])] if paren > 0 else []
        halves += [(line[:comma + 1], line[comma + 2:])] if comma > 0 else []
        fits = [h for h in halves if max(map(len, h)) <= max_chars]
        out.extend(fits[0] if fits else textwrap.wrap(line, max_chars, break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def _estimated_length(text) -> float:
    """Rough length in inches of the longest line of a matplotlib Text (about half an em per character)."""
    longest = max(len(s) for s in text.get_text().split("\n"))
    return longest * text.get_fontsize() * 0.5 / 72.0


def _fit_texts(ax: Axes, title: bool = True, rounds: int = 3) -> None:
    """Wrap the x label, y label (and title) of ``ax`` that, once laid out, are longer than the side of the
    Axes they run along, so that long stored labels ("<name> (<units>)") neither overlap their neighbours
    nor leave the figure. Wrapping can shrink the Axes, so this is repeated (at most ``rounds`` layouts)
    until everything fits. A figure is laid out (drawn without rendering) only when a text may not fit."""
    if getattr(ax, "name", None) == "3d":
        return
    items = [(ax.xaxis.label, 0), (ax.yaxis.label, 1)] + ([(ax.title, 0)] if title else [])
    size = ax.get_position().size * ax.figure.get_size_inches()  # (width, height) in inches before layout
    suspects = [(t, dim, t.get_text()) for t, dim in items
                if t.get_text() and _estimated_length(t) > 0.8 * size[dim]]
    for _ in range(rounds if suspects else 0):
        ax.figure.draw_without_rendering()
        renderer = ax.figure.canvas.get_renderer()
        box = ax.get_window_extent(renderer)
        wrapped = False
        for text, dim, original in suspects:
            extent = text.get_window_extent(renderer)
            need, have = (extent.width, box.width) if dim == 0 else (extent.height, box.height)
            longest = max(len(s) for s in text.get_text().split("\n"))
            if need > have > 0 and longest > 12:
                # wrapped afresh from the original text, so that a second round leaves no short orphan lines
                text.set_text(wrap_text(original, max(12, int(0.95 * longest * have / need))))
                wrapped = True
        if not wrapped:
            return


def _outlined(color="white", width=2.5):
    return [patheffects.withStroke(linewidth=width, foreground=color)]


def direction_noun(norm: str | None = None, plural: bool = True) -> str:
    """How directions of normalisation ``norm`` are called in captions: "filter-normalised directions",
    "unit directions" (uniform on the sphere), or plain "directions" when ``norm`` is None."""
    noun = "directions" if plural else "direction"
    if not norm:
        return noun
    return f"unit {noun}" if norm == "unit" else f"{norm}-normalised {noun}"


def describe(n_directions=None, norm=None, bn_mode=None) -> str:
    """Caption fragments joined by commas, each only when given: the directions (count and normalisation)
    and the BN mode, e.g. ``describe(10, "filter", "recompute")`` ->
    "10 random filter-normalised directions, BN statistics recomputed at each point".

    Args:
        n_directions: how many random directions (an int, or a text such as "3/4"); None leaves it out.
        norm: direction normalisation ("unit", "filter", "layer", ...); None leaves it out.
        bn_mode: "recompute", "keep" or "batch" (other values are named as they are); None leaves it out.
    """
    parts = []
    if n_directions is not None:
        parts.append(f"{n_directions} random " + direction_noun(norm, plural=str(n_directions) != "1"))
    elif norm:
        parts.append(direction_noun(norm))
    if bn_mode:
        parts.append(_BN_TEXT.get(str(bn_mode), f"BN mode {bn_mode}"))
    return ", ".join(parts)


_LEGEND_LOCS = ("upper right", "upper left", "lower right", "lower left", "center right", "center left",
                "upper center", "lower center", "center")


def _display_points(axes) -> tuple[np.ndarray, np.ndarray]:
    """Display coordinates of what is drawn on ``axes`` and a weight per point: line paths sampled every
    few pixels (weight 1), markers and scatter points (weight 8)."""
    pts, weights = [np.zeros((0, 2))], [np.zeros(0)]
    for a in axes:
        for line in a.get_lines():
            xy = line.get_transform().transform(np.asarray(line.get_xydata(), dtype=np.float64))
            if line.get_marker() not in (None, "None", "none", ""):
                ok = np.isfinite(xy).all(axis=1)
                pts.append(xy[ok])
                weights.append(np.full(ok.sum(), 8.0))
            if line.get_linestyle() in ("None", "none", "", " "):
                continue
            p0, p1 = xy[:-1], xy[1:]
            ok = np.isfinite(p0).all(axis=1) & np.isfinite(p1).all(axis=1)  # NaN breaks the line
            for a0, a1 in zip(p0[ok], p1[ok]):
                n = int(np.clip(np.ceil(np.hypot(*(a1 - a0)) / 4.0), 1, 400))
                f = np.linspace(0.0, 1.0, n + 1)[:, None]
                pts.append(a0 + f * (a1 - a0))
                weights.append(np.ones(n + 1))
        for coll in a.collections:
            offsets = np.asarray(coll.get_offsets(), dtype=np.float64)
            if offsets.size and coll.get_offset_transform() is not None:
                xy = coll.get_offset_transform().transform(offsets)
                ok = np.isfinite(xy).all(axis=1)
                pts.append(xy[ok])
                weights.append(np.full(ok.sum(), 8.0))
    return np.concatenate(pts), np.concatenate(weights)


def _place_legend(legend, axes) -> None:
    """Put ``legend`` where it hides the least of every Axes in ``axes`` and none of their texts.

    Matplotlib's loc="best" only sees the legend's own Axes, so on twin axes it happily covers the other
    curve, and it ignores text labels.
    """
    fig = legend.figure
    fig.draw_without_rendering()  # run the layout so that positions are final
    renderer = fig.canvas.get_renderer()
    xy, weight = _display_points(axes)
    texts = [t.get_window_extent(renderer) for a in axes for t in a.texts if t.get_visible() and t.get_text()]
    best, best_cost = None, np.inf
    for loc in _LEGEND_LOCS:
        legend.set_loc(loc)
        box = legend.get_window_extent(renderer)
        inside = (xy[:, 0] >= box.x0) & (xy[:, 0] <= box.x1) & (xy[:, 1] >= box.y0) & (xy[:, 1] <= box.y1)
        cost = weight[inside].sum() + 1000.0 * sum(box.overlaps(t) for t in texts)
        if cost < best_cost:
            best, best_cost = loc, cost
    legend.set_loc(best)


def _add_legend(axes, handles, own_figure: bool, rows: int = 1) -> None:
    """The legend of ``handles``: under the plot, hiding nothing, when the function made the figure;
    otherwise inside ``axes[-1]`` (the topmost), where it hides least of ``axes``."""
    if not handles:
        return
    labels = [h.get_label() for h in handles]
    if own_figure:
        axes[0].figure.legend(handles, labels, loc="outside lower center", ncols=-(-len(handles) // rows),
                              fontsize="small", frameon=False, handlelength=1.5)
    else:
        box = axes[-1].legend(handles, labels, fontsize="small", frameon=True, framealpha=0.85, edgecolor="none",
                              handlelength=1.5)
        _place_legend(box, axes)


# --------------------------------------------------------------------------------------------- rays


def _check_curves(curves: Mapping[str, Any], n_steps: int, name: str = "curves") -> dict[str, np.ndarray]:
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError(f"{name} must be a non-empty dict {{label: (N, S) array}}, e.g. {{'SWA': ..., 'SGD': ...}}")
    out = {}
    for label, c in curves.items():
        a = np.asarray(c, dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != n_steps or a.shape[0] == 0:
            raise ValueError(
                f"{name}[{label!r}] has shape {a.shape}, expected (N, S={n_steps}): one row per direction, one "
                "column per distance; wrap a single ray as values[None, :]"
            )
        out[label] = a
    return out


def _per_label(name: str, value, labels: Sequence[str]) -> dict:
    """A dict keyed by curve labels, refusing keys that name no curve."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict {{label: ...}} keyed like curves, got {type(value).__name__}")
    unknown = [k for k in value if k not in labels]
    if unknown:
        raise ValueError(f"{name} has labels {unknown} that match no curve; curve labels: {list(labels)}")
    return dict(value)


def _threshold_levels(threshold_level, curves: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """label -> (N,) level per ray (a scalar broadcast to every ray and every label)."""
    if threshold_level is None:
        return {}
    if not isinstance(threshold_level, Mapping):
        threshold_level = {label: threshold_level for label in curves}
    levels = {}
    for label, lv in _per_label("threshold_level", threshold_level, list(curves)).items():
        n = curves[label].shape[0]
        a = np.asarray(lv, dtype=np.float64)
        if a.ndim == 0:
            a = np.full(n, float(a))
        if a.shape != (n,):
            raise ValueError(
                f"threshold_level[{label!r}] has shape {a.shape}; give one level or one per direction ({n},)"
            )
        levels[label] = a
    return levels


def _draw_threshold(ax: Axes, label: str, level: np.ndarray, color, shared: bool, metric: str) -> None:
    """A dashed line at the level, labelled on the plot (not in the legend: it belongs to this panel)."""
    finite = level[np.isfinite(level)]
    # A relative threshold gives each ray its own level: then only the width markers show it.
    if finite.size == 0 or not np.allclose(finite, finite[0], rtol=1e-12, atol=0):
        return
    unit = "%" if is_error(metric) else " nats"
    text = f"threshold {finite[0]:.3g}{unit}" if shared else f"{label} threshold {finite[0]:.3g}{unit}"
    color = "0.3" if shared else color
    gid = "threshold" if shared else f"threshold:{label}"
    ax.axhline(finite[0], color=color, ls="--", lw=1.0, label="_nolegend_", zorder=2.5, gid=gid)
    ax.annotate(text, xy=(1.0, finite[0]), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                textcoords="offset points", ha="right", va="bottom", fontsize="x-small", color=color,
                path_effects=_outlined(), zorder=6, gid=gid)


def _draw_widths(ax, label, d, rays, widths, level, color) -> None:
    w = np.asarray(widths, dtype=np.float64)
    if w.shape != (rays.shape[0],):
        raise ValueError(f"widths[{label!r}] has shape {w.shape}, expected one width per direction ({rays.shape[0]},)")
    crossed = np.flatnonzero(np.isfinite(w))  # inf: never crossed within the grid; NaN: unknown
    if crossed.size == 0:
        return
    ys = []
    for i in crossed:
        y = level[i] if level is not None and np.isfinite(level[i]) else _interp_finite(d, rays[i], w[i])
        ys.append(y)
    text = f"{label} width, mean {w[crossed].mean():.3g}"
    text += "" if crossed.size == w.size else f" ({crossed.size}/{w.size} crossed)"
    ax.scatter(w[crossed], ys, s=32, facecolors="white", edgecolors=color, linewidths=1.4, zorder=4,
               label=text, gid=f"widths:{label}")


def plot_rays(
    distances,
    curves: Mapping[str, Any],
    ax: Axes | None = None,
    metric: str = "test_err",
    widths: Mapping[str, Any] | None = None,
    threshold_level=None,
    colors: Mapping[str, Any] | None = None,
    title: str | None = None,
    legend: bool = True,
    xlabel: str = RAYS_XLABEL,
    ylabel: str | None = None,
) -> Axes:
    """Metric along random rays from each checkpoint (paper fig. 3): one thin, semi-transparent line per
    direction and a bold mean curve per checkpoint.

    Args:
        distances: (S,) distances from the checkpoint along each ray, in the unit ``xlabel`` names.
        curves: label -> (N, S) metric values, row n along direction n; NaN (not computed) is not drawn.
            The mean curve is NaN at a distance where any ray is NaN (a mean over fewer rays would be biased).
        ax: Axes to draw on; when None, a new 4.5 in wide figure with the legend under the plot.
        metric: which metric the values are (one of :data:`METRIC_LABELS`); sets the y label and its units.
        widths: optional label -> (N,) width per direction (units of ``distances``; +inf = never crossed, NaN =
            unknown, both not drawn), marked with open circles at the threshold level (or on the ray).
        threshold_level: optional level in the metric's units, one for all checkpoints or label -> level,
            drawn as a dashed line labelled on the plot (gid ``"threshold"`` or ``"threshold:<label>"``);
            a level may be (N,) per direction (relative thresholds), then only the width markers show it.
        colors: label -> colour overrides (default SWA blue, SGD green, others tab10).
        title: optional Axes title.
        legend: whether to draw the legend (the mean curves and widths): under the plot in a new figure,
            inside a given Axes where it hides least.
        xlabel: x label with units (default: absolute weight-space distance).
        ylabel: y label; None gives the metric's label with its units (:func:`metric_label`).

    Returns:
        The Axes. Thin lines have gid ``"ray:<label>:<n>"``, mean curves ``"mean:<label>"``.
    """
    check_metric(metric)
    d = _vector("distances", distances)
    curves = _check_curves(curves, d.size)
    labels = list(curves)
    widths = _per_label("widths", widths, labels)
    levels = _threshold_levels(threshold_level, curves)
    palette = checkpoint_colors(labels, colors)
    own_figure = ax is None
    ax = ax if ax is not None else _new_axes((PANEL_SIZE[0], PANEL_SIZE[1] + 0.4))

    for label, rays in curves.items():
        for n, ray in enumerate(rays):
            (line,) = ax.plot(d, ray, color=palette[label], lw=0.7, alpha=0.35, label="_nolegend_", zorder=2)
            line.set_gid(f"ray:{label}:{n}")
    for label, rays in curves.items():
        (line,) = ax.plot(d, rays.mean(axis=0), color=palette[label], lw=2.2, label=label, zorder=3)
        line.set_gid(f"mean:{label}")
    shared = threshold_level is not None and not isinstance(threshold_level, Mapping)
    for label, level in (list(levels.items())[:1] if shared else levels.items()):
        _draw_threshold(ax, label, level, palette[label], shared, metric)
    for label, w in widths.items():
        _draw_widths(ax, label, d, curves[label], w, levels.get(label), palette[label])

    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric_label(metric) if ylabel is None else ylabel)
    if d.size > 1:
        ax.set_xlim(d.min(), d.max())
    if title:
        ax.set_title(title)
    if legend:
        handles = ax.get_legend_handles_labels()[0]
        # one row per checkpoint (its mean curve, then its widths), or all curves in one row
        _add_legend([ax], handles, own_figure, rows=len(labels) if len(handles) > len(labels) else 1)
    _fit_texts(ax)
    return ax


def plot_rays_panel(
    distances,
    curves_by_metric: Mapping[str, Mapping[str, Any]],
    widths_by_metric: Mapping[str, Mapping[str, Any]] | None = None,
    threshold_by_metric: Mapping[str, Any] | None = None,
    colors: Mapping[str, Any] | None = None,
    bn_mode: str | None = None,
    norm: str | None = None,
    title: str | None = None,
    axes: Sequence[Axes] | None = None,
    xlabel: str = RAYS_XLABEL,
) -> np.ndarray:
    """The SWA paper's rays figure: one :func:`plot_rays` panel per metric, side by side (e.g. test error and
    train loss), caption as the figure's suptitle. The legend goes under the panels in a new figure, into the
    first panel when ``axes`` are given.

    Args:
        distances: (S,) distances along the rays, in the unit ``xlabel`` names.
        curves_by_metric: metric -> {label -> (N, S)}, in panel order.
        widths_by_metric: optional metric -> {label -> (N,) widths}; drawn on that metric's panel.
        threshold_by_metric: optional metric -> level (float, or {label -> level}, see :func:`plot_rays`).
        colors: label -> colour overrides, shared by all panels.
        bn_mode, norm: the analysis' BN mode and direction normalisation, for the caption.
        title: caption; None builds it with :func:`describe` ("<N> random <norm>-normalised directions,
            <BN mode>"); "" for none.
        axes: one Axes per metric; a new (4.5 * panels) x 3.5 in figure when None.
        xlabel: x label of every panel, with units (default: absolute weight-space distance).

    Returns:
        1-D numpy array of the panels' Axes.
    """
    if not isinstance(curves_by_metric, Mapping) or not curves_by_metric:
        raise ValueError("curves_by_metric must be a non-empty dict {metric: {label: (N, S) array}}")
    metrics = list(curves_by_metric)
    for m in metrics:
        check_metric(m)
    for name, extra in (("widths_by_metric", widths_by_metric), ("threshold_by_metric", threshold_by_metric)):
        unknown = [m for m in (extra or {}) if m not in metrics]
        if unknown:
            raise ValueError(f"{name} has metrics {unknown} without a panel; panels: {metrics}")
    own_figure = axes is None
    if own_figure:
        _, grid = plt.subplots(1, len(metrics), figsize=(PANEL_SIZE[0] * len(metrics), PANEL_SIZE[1] + 0.6),
                               layout="constrained", squeeze=False)
        axes = grid[0]
    else:
        axes = np.ravel(np.asarray(axes, dtype=object))
        if axes.size != len(metrics):
            raise ValueError(f"got {axes.size} axes for {len(metrics)} metrics {metrics}; pass one Axes per metric")
    labels = list(dict.fromkeys(label for m in metrics for label in curves_by_metric[m]))
    palette = checkpoint_colors(labels, colors)
    for i, (ax, m) in enumerate(zip(axes, metrics)):
        plot_rays(distances, curves_by_metric[m], ax=ax, metric=m, widths=(widths_by_metric or {}).get(m),
                  threshold_level=(threshold_by_metric or {}).get(m), colors=palette,
                  legend=i == 0 and not own_figure, xlabel=xlabel)
    if own_figure:  # one legend for all panels, under them
        entries = {}
        for ax in axes:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                entries.setdefault(text, handle)
        _add_legend(list(axes), list(entries.values()), True,
                    rows=len(labels) if len(entries) > len(labels) else 1)
    if title is None:
        counts = sorted({np.shape(c)[0] for m in metrics for c in curves_by_metric[m].values()})
        n = counts[0] if len(counts) == 1 else "/".join(map(str, counts))
        title = describe(n, norm, bn_mode)
    if title:
        axes[0].figure.suptitle(title, fontsize="medium")
    for ax in axes:  # the legend and caption took room from the panels: do their labels still fit?
        _fit_texts(ax)
    return np.asarray(list(axes), dtype=object)


# --------------------------------------------------------------------------------------------- line


def _line_axes(ax, has_err: bool, has_loss: bool):
    """(ax_err, ax_loss, host): a twin pair when both units are drawn on one given/new Axes."""
    if ax is not None and not isinstance(ax, Axes):
        pair = list(ax)
        if len(pair) != 2 or not all(isinstance(a, Axes) for a in pair):
            raise ValueError("ax must be None, one Axes (twin y axes are added) or two Axes (ax_error, ax_loss)")
        return pair[0], pair[1], pair[0] if has_err else pair[1]
    host = ax if ax is not None else _new_axes()
    if has_err and has_loss:
        return host, host.twinx(), host
    return (host, None, host) if has_err else (None, host, host)


def _add_distance_axis(host: Axes, t: np.ndarray, distances, label: str) -> None:
    """Top x axis labelled ``label`` showing ``distances``, when they are an affine function of t (else nothing)."""
    dist = _vector("distances", distances)
    if dist.shape != t.shape:
        raise ValueError(f"distances has shape {dist.shape}, expected {t.shape} like t")
    ok = np.isfinite(t) & np.isfinite(dist)
    if ok.sum() < 2:
        return
    a, b = np.polyfit(t[ok], dist[ok], 1)
    scale = max(np.abs(dist[ok]).max(), 1e-300)
    if a == 0 or not np.allclose(a * t[ok] + b, dist[ok], rtol=0, atol=1e-6 * scale):
        return
    top = host.secondary_xaxis("top", functions=(lambda x: a * x + b, lambda y: (y - b) / a))
    top.set_xlabel(label)


def plot_line(
    t,
    values: Mapping[str, Any],
    points: Mapping[str, float] | None = None,
    ax=None,
    xlabel: str | None = None,
    distances=None,
    colors: Mapping[str, Any] | None = None,
    title: str | None = None,
    legend: bool = True,
    distance_label: str = LINE_DISTANCE_LABEL,
):
    """Metrics along the line through two checkpoints (paper fig. 5): errors (%) on the left y axis, losses
    (nats) on the right one, checkpoints marked on every curve (circle for the first, square for the second,
    in the checkpoint's colour) and labelled at the top; the legend lists the curves.

    Args:
        t: (S,) line coordinate of each point.
        values: metric -> (S,) values, e.g. ``{"test_err": ..., "train_loss": ...}``; NaN is not drawn.
            Test metrics are solid, train metrics dashed (dotted for ``train_loss_l2``).
        points: label -> t of each checkpoint, e.g. ``{"SWA": 0, "SGD": 1}``.
        ax: None (new figure, legend under the plot), one Axes (a twin is added when both units are drawn)
            or two Axes ``(ax_error, ax_loss)``; given Axes get the legend inside, where it hides least.
        xlabel: x label; None gives "t along the line (SWA at t=0, SGD at t=1)".
        distances: optional (S,) weight-space distance of each point; when it is affine in t a top axis
            shows it, labelled ``distance_label``.
        colors: checkpoint label -> marker colour overrides (default SWA blue, SGD green).
        title, legend: optional title; whether to draw the legend.
        distance_label: label with units of the top distance axis.

    Returns:
        ``(ax_error, ax_loss)``; an entry is None when no metric of that unit was drawn and no Axes given.
        Curves have gid ``"metric:<name>"``, checkpoint markers ``"marker:<label>:<metric>"``.
    """
    t = _vector("t", t)
    if not isinstance(values, Mapping) or not values:
        raise ValueError("values must be a non-empty dict {metric: (S,) array}, e.g. {'test_err': ..., 'train_loss': ...}")
    curves = {}
    for m, v in values.items():
        check_metric(m)
        v = np.asarray(v, dtype=np.float64)
        if v.shape != t.shape:
            raise ValueError(f"values[{m!r}] has shape {v.shape}, expected {t.shape} like t")
        curves[m] = v
    points = dict(points or {})
    for label, tp in points.items():
        if not np.isfinite(tp):
            raise ValueError(f"points[{label!r}] = {tp!r}; each checkpoint needs a finite t")
    errs = [m for m in curves if is_error(m)]
    losses = [m for m in curves if not is_error(m)]
    ax_err, ax_loss, host = _line_axes(ax, bool(errs), bool(losses))

    handles = []
    for m, v in curves.items():
        color, style = _line_style(m)
        (line,) = (ax_err if is_error(m) else ax_loss).plot(t, v, color=color, ls=style, lw=1.8,
                                                            label=metric_label(m))
        line.set_gid(f"metric:{m}")
        handles.append(line)
    for target, ms, generic in ((ax_err, errs, "error (%)"), (ax_loss, losses, f"loss ({_LOSS_UNITS.get()})")):
        if target is not None and ms:
            target.set_ylabel(metric_label(ms[0]) if len(ms) == 1 else generic)
            if errs and losses:  # twin axes: colour each y axis like its curves
                target.yaxis.label.set_color(_line_style(ms[0])[0])
                target.tick_params(axis="y", colors=_line_style(ms[0])[0])

    palette = checkpoint_colors(list(points), colors)
    for k, (label, tp) in enumerate(points.items()):
        marker = _POINT_MARKERS[k % len(_POINT_MARKERS)]
        host.axvline(tp, color=palette[label], ls=":", lw=1.0, zorder=1).set_gid(f"point:{label}")
        for m, v in curves.items():
            y = _interp_finite(t, v, tp)
            if np.isfinite(y):
                (mk,) = (ax_err if is_error(m) else ax_loss).plot(
                    [tp], [y], marker=marker, ms=7, ls="none", color=palette[label], mec="black", mew=0.8,
                    zorder=5, label="_nolegend_")
                mk.set_gid(f"marker:{label}:{m}")
        # labelled on the plot, in its colour, above the markers: the legend lists only the curves
        host.annotate(label, xy=(tp, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
                      textcoords="offset points", ha="left", va="top", color=palette[label],
                      fontweight="bold", path_effects=_outlined(), gid=f"label:{label}")

    if xlabel is None:
        where = ", ".join(f"{label} at t={tp:g}" for label, tp in points.items())
        xlabel = f"t along the line ({where})" if where else "t along the line"
    host.set_xlabel(xlabel)
    host.xaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))  # no colliding "−0.25"s
    if t.size > 1 and np.isfinite(t).all():
        host.set_xlim(t.min(), t.max())
    if distances is not None:
        _add_distance_axis(host, t, distances, distance_label)
    if title:
        host.set_title(title)
    if legend:
        drawn = [a for a in (ax_err, ax_loss) if a is not None]
        if (ax is None or isinstance(ax, Axes)) and len(drawn) == 2:
            drawn = [host, ax_loss]  # the twin is drawn above its host: a legend there stays visible
        _add_legend(drawn, handles, ax is None)
    _fit_texts(host)
    if ax_err is not None and ax_loss is not None and ax_loss is not host:
        _fit_texts(ax_loss, title=False)
    return ax_err, ax_loss


# --------------------------------------------------------------------------------------------- plane


def contour_levels(Z, levels="log", n_levels: int = 20, decades: float = 3.0):
    """Contour boundaries and colour normalisation for a plane of metric values.

    ``"log"`` follows the SWA authors' plots (contours of log(Z - min Z + small)): the boundaries are
    ``zmin`` and ``zmin + (zmax - zmin) * g`` with ``g`` geometric from ``10**-decades`` to 1, so the bands are
    narrow near the minimum (where the optima sit) and wide far from it; the colour norm is
    log(Z - zmin + (zmax - zmin) * 10**-decades), so each band takes an equal share of the colour map.
    ``"linear"`` spaces ``n_levels`` boundaries evenly; an increasing array is used as given.

    Args:
        Z: array of metric values (any shape); NaN/inf entries are ignored.
        levels: "log", "linear" or an increasing 1-D array of boundaries.
        n_levels: number of boundaries (>= 2) for "log"/"linear".
        decades: for "log": how far below (zmax - zmin) the first band above the minimum ends, in decades.

    Returns:
        ``(boundaries (L,), norm)``: ``boundaries[0] == zmin`` and ``boundaries[-1] == zmax`` for the
        computed kinds; ``norm`` a :class:`matplotlib.colors.Normalize`. A constant Z gets one band around it.

    >>> b, _ = contour_levels(np.array([1.0, 2.0, 11.0]), n_levels=4, decades=2)
    >>> [round(float(x), 6) for x in b]
    [1.0, 1.1, 2.0, 11.0]
    """
    z = np.asarray(Z, dtype=np.float64)
    z = z[np.isfinite(z)]
    if z.size == 0:
        raise ValueError("Z has no finite value (nothing computed yet?); nothing to draw")
    if not isinstance(levels, str):
        bounds = _vector("levels", levels, min_size=2)
        if not (np.isfinite(bounds).all() and (np.diff(bounds) > 0).all()):
            raise ValueError(f"levels must be finite and strictly increasing, got {bounds}")
        return bounds, mcolors.Normalize(bounds[0], bounds[-1])
    if levels not in LEVEL_SCALES:
        raise ValueError(f"unknown levels {levels!r}; valid: {', '.join(LEVEL_SCALES)} or an array of boundaries")
    if isinstance(n_levels, bool) or not isinstance(n_levels, (int, np.integer)) or n_levels < 2:
        raise ValueError(f"n_levels must be an integer >= 2 (number of contour boundaries), got {n_levels!r}")
    if not (np.isfinite(decades) and decades > 0):
        raise ValueError(f"decades must be a positive number, got {decades!r}")
    zmin, zmax = float(z.min()), float(z.max())
    span = zmax - zmin
    if span <= 1e-12 * max(1.0, abs(zmin)):
        half = max(abs(zmin) * 1e-3, 1e-9)
        return np.array([zmin - half, zmin + half]), mcolors.Normalize(zmin - half, zmin + half)
    if levels == "linear":
        bounds = np.linspace(zmin, zmax, n_levels)
        norm = mcolors.Normalize(zmin, zmax)
    else:
        eps = span * 10.0 ** (-float(decades))
        bounds = np.concatenate([[zmin], zmin + span * np.geomspace(10.0 ** (-float(decades)), 1.0, n_levels - 1)])

        def forward(v):
            return np.log(np.maximum(np.asarray(v, dtype=np.float64) - zmin, 0.0) + eps)

        def inverse(v):
            return np.exp(v) - eps + zmin

        norm = mcolors.FuncNorm((forward, inverse), vmin=zmin, vmax=zmax)
    bounds[-1] = zmax  # the largest cell must fall inside the last band despite rounding
    return np.unique(bounds), norm


#: A plane drawn to scale (equal aspect) unless one side is more than this many times the other: a PCA plane
#: whose first direction explains most of the variance would otherwise be a thin strip.
MAX_PLANE_ASPECT = 2.5


def _to_scale(x: np.ndarray, y: np.ndarray) -> bool:
    aspect = (y[-1] - y[0]) / (x[-1] - x[0])
    return 1 / MAX_PLANE_ASPECT <= aspect <= MAX_PLANE_ASPECT


def _plane_figsize(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """A figure whose plot area has the plane's aspect, so the colour bar is as tall as the plot (3:4 when the
    plane is not drawn to scale)."""
    aspect = (y[-1] - y[0]) / (x[-1] - x[0]) if _to_scale(x, y) else 0.75
    if aspect <= 1.3:  # a flat plane gets a wider figure, so that its height still holds the y label
        w = min(6.0, max(3.4, 2.2 / aspect))
        w, h = w, w * aspect
    else:
        w, h = 4.4 / aspect, 4.4
    return (max(w, 1.6) + 1.7, max(h, 1.6) + 1.4)


def _colorbar(fig, mappable, ax, metric: str, bounds: np.ndarray, **kw):
    """Colour bar labelled with the metric and its units, ticks at (at most 8 of) the contour boundaries."""
    cb = fig.colorbar(mappable, ax=ax, label=metric_label(metric), **kw)
    cb.set_ticks(bounds[np.unique(np.round(np.linspace(0, bounds.size - 1, min(bounds.size, 8))).astype(int))])
    ticks = np.asarray(cb.get_ticks(), dtype=np.float64)
    digits = next((d for d in range(3, 9) if len({f"{t:.{d}g}" for t in ticks}) == len(ticks)), 9)
    cb.ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:.{digits}g}"))
    cb.ax.yaxis.set_minor_locator(plt.NullLocator())
    return cb


def _check_plane(x, y, Z, points, labels):
    x = _coordinates("x", x)
    y = _coordinates("y", y)
    Z = np.asarray(Z, dtype=np.float64)
    if Z.shape != (x.size, y.size):
        hint = " (it looks transposed: planes are indexed Z[ix, iy]; pass Z.T)" if Z.shape == (y.size, x.size) else ""
        raise ValueError(f"Z has shape {Z.shape}, expected (len(x), len(y)) = ({x.size}, {y.size}){hint}")
    if points is None:
        return x, y, Z, np.zeros((0, 2)), []
    P, labels = _labelled_coordinates(points, labels, "point", "K")
    return x, y, Z, P, labels


def _labelled_coordinates(coords, labels, what: str, count: str) -> tuple[np.ndarray, list[str]]:
    """(``count``, 2) plane coordinates and one label each (``"<what> k"`` when none are given), checked."""
    P = np.asarray(coords, dtype=np.float64)
    if P.ndim != 2 or P.shape[1] != 2:
        raise ValueError(f"{what}s must be ({count}, 2) plane coordinates, got shape {P.shape}")
    labels = [f"{what} {k}" for k in range(len(P))] if labels is None else [str(s) for s in labels]
    if len(labels) != len(P):
        raise ValueError(f"got {len(labels)} labels for {len(P)} {what}s; pass one label per {what}")
    return P, labels


def _mark_points(ax: Axes, P: np.ndarray, labels, colors, x: np.ndarray, y: np.ndarray) -> None:
    """Markers at the checkpoints, labels up-right of them, or inwards for points near the top/right edge."""
    palette = checkpoint_colors(labels, colors)
    for k, ((px, py), label) in enumerate(zip(P, labels)):
        ax.plot([px], [py], marker=_POINT_MARKERS[k % len(_POINT_MARKERS)], ms=8, ls="none", color=palette[label],
                mec="white", mew=1.2, zorder=5, clip_on=False, label="_nolegend_")[0].set_gid(f"point:{label}")
        right = px > x[0] + 0.8 * (x[-1] - x[0])
        top = py > y[0] + 0.85 * (y[-1] - y[0])
        ax.annotate(label, xy=(px, py), xytext=(-6 if right else 6, -6 if top else 6), textcoords="offset points",
                    ha="right" if right else "left", va="top" if top else "bottom", fontsize="small",
                    fontweight="bold", color="black", path_effects=_outlined(), zorder=6, gid=f"point-label:{label}")


def _check_marks(coords, labels, distances=None) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    P, labels = _labelled_coordinates(coords, labels, "mark", "M")
    if distances is not None:
        distances = np.ravel(np.asarray(distances, dtype=np.float64))
        if distances.size != len(P):
            raise ValueError(f"got {distances.size} distances for {len(P)} marks; pass one per mark")
    return P, labels, distances


def _check_trajectory(coords) -> np.ndarray:
    T = np.asarray(coords, dtype=np.float64)
    if T.ndim != 2 or T.shape[1] != 2 or len(T) < 1:
        raise ValueError(f"trajectory must be (T, 2) plane coordinates with T >= 1, got shape {T.shape}")
    return T


def mark_text(label: str, distance: float | None) -> str:
    """The text beside a marked checkpoint: its label and, when known, how far it lies off the plane."""
    if distance is None or not np.isfinite(distance):
        return label
    return f"{label}\n{distance:.2g} off the plane"


def plot_plane_marks(ax: Axes, coords, labels: Sequence[str] | None = None, distances=None,
                     colors: Mapping[str, Any] | None = None) -> Axes:
    """Checkpoints marked at their projections onto a plane (Izmailov et al. 2018, Figure 1 middle: SWA
    projected onto the plane of three SGD iterates): a star each, with its label and, given ``distances``, its
    distance from the plane. Marks outside the Axes' limits are clipped (their coordinates are in the file).

    Args:
        ax: the plane's Axes (e.g. from :func:`plot_plane`).
        coords: (M, 2) plane coordinates of the projections.
        labels: (M,) names; distances: optional (M,) ‖w − proj(w)‖₂ (weight-space units).
        colors: label -> colour overrides (default: SWA blue, SGD green, others tab10).

    Returns:
        ``ax``; each star has gid ``"mark:<label>"``.
    """
    P, labels, distances = _check_marks(coords, labels, distances)
    palette = checkpoint_colors(labels, colors)
    x0, x1 = sorted(ax.get_xlim())
    y0, y1 = sorted(ax.get_ylim())
    texts = []
    for k, ((px, py), label) in enumerate(zip(P, labels)):
        inside = x0 <= px <= x1 and y0 <= py <= y1
        ax.plot([px], [py], marker=_MARK_MARKER, ms=13, ls="none", color=palette[label], mec="white", mew=1.2,
                zorder=7, clip_on=not inside, label="_nolegend_")[0].set_gid(f"mark:{label}")
        if inside:
            texts.append(ax.annotate(mark_text(label, None if distances is None else distances[k]), xy=(px, py),
                                     xytext=(8, -8), textcoords="offset points", ha="left", va="top",
                                     fontsize="small", fontweight="bold", color="black", path_effects=_outlined(),
                                     zorder=8, gid=f"mark-label:{label}"))
    # the plane's own point labels move too: a mark next to a point would otherwise hide its label
    _place_labels(ax, [t for t in ax.texts if (t.get_gid() or "").startswith(("point-label:", "mark-label:"))])
    return ax


# Where a label may go (offset in points, alignment), in order of preference: beside the marker diagonally,
# then a line further up or down.
_LABEL_SPOTS = tuple((dx, dy * far, "left" if dx > 0 else "right", "bottom" if dy > 0 else "top")
                     for far in (1, 3) for dx, dy in ((8, -8), (8, 8), (-8, -8), (-8, 8)))


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _place_labels(ax: Axes, texts, passes: int = 3) -> None:
    """Move each annotation in ``texts`` to the spot of :data:`_LABEL_SPOTS` where it covers least: of the
    other texts of ``ax`` (by area), of the markers drawn (a marker weighs as much as a whole label), and of the
    space outside the Axes (ten times as much: a label sticking out would squeeze the plot). Repeated over all
    of them (``passes`` times, until none moves), so that an early label can make way for a later one."""
    if not texts:
        return
    fig = ax.figure
    fig.draw_without_rendering()  # the final layout: positions in pixels are meaningful from here on
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    fixed = [t.get_window_extent(renderer) for t in ax.texts if t.get_visible() and t.get_text() and t not in texts]
    markers = [xy for line in ax.get_lines() if line.get_marker() not in (None, "None", "none", "")
               for xy in line.get_transform().transform(np.asarray(line.get_xydata(), dtype=np.float64))
               if np.isfinite(xy).all()]

    def put(text, spot):
        dx, dy, ha, va = spot
        text.set_position((dx, dy))
        text.set_horizontalalignment(ha)
        text.set_verticalalignment(va)
        return text.get_window_extent(renderer).padded(3)  # labels that merely touch read as one

    boxes = {id(t): t.get_window_extent(renderer).padded(3) for t in texts}
    for _ in range(passes):
        moved = False
        for text in texts:
            others = fixed + [b for k, b in boxes.items() if k != id(text)]
            current = (*text.get_position(), text.get_horizontalalignment(), text.get_verticalalignment())
            best, best_cost = None, np.inf
            for i, spot in enumerate(_LABEL_SPOTS):
                box = put(text, spot)
                area = max(box.width * box.height, 1.0)
                cost = sum(_overlap(box, b) for b in others) / area
                cost += sum(1.0 for x, y in markers if box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1)
                cost += 10.0 * (1.0 - _overlap(box, frame) / area) + 0.01 * i  # ties: the nearer, earlier spot
                if cost < best_cost - 1e-9:
                    best, best_cost = spot, cost
            boxes[id(text)] = put(text, best)
            moved = moved or tuple(best) != tuple(current)
        if not moved:
            break


def plot_plane_trajectory(ax: Axes, coords, label: str | None = "trajectory", color=_TRAJECTORY_COLOR) -> Axes:
    """Iterates' projections onto a plane joined in order (Li et al. 2018, section 7): a line with a dot per
    iterate, a ring at the first and an arrow into the last; clipped to the Axes.

    Args:
        ax: the plane's Axes; coords: (T, 2) plane coordinates in the iterates' order.
        label: legend text (None: no legend entry); color: any matplotlib colour.

    Returns:
        ``ax``; the path has gid ``"trajectory"``.
    """
    T = _check_trajectory(coords)
    line = ax.plot(T[:, 0], T[:, 1], "-o", color=color, lw=1.4, ms=3.5, mec="white", mew=0.5, zorder=6,
                   path_effects=_outlined(width=2.8), label=label if label else "_nolegend_")[0]
    line.set_gid("trajectory")
    ax.plot(T[:1, 0], T[:1, 1], "o", ms=8, mfc="none", mec=color, mew=1.5, zorder=6, label="_nolegend_")
    if len(T) >= 2:
        ax.annotate("", xy=tuple(T[-1]), xytext=tuple(T[-2]), zorder=6,
                    arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.4, "shrinkA": 0, "shrinkB": 0})
    return ax


def plot_plane(
    x,
    y,
    Z,
    points=None,
    labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    metric: str = "test_err",
    levels="log",
    n_levels: int = 20,
    kind: str = "contourf",
    decades: float = 3.0,
    cmap="viridis",
    colorbar: bool = True,
    colors: Mapping[str, Any] | None = None,
    xlabel: str = PLANE_XLABEL,
    ylabel: str = PLANE_YLABEL,
    title: str | None = None,
    marks=None,
    mark_labels: Sequence[str] | None = None,
    mark_distances=None,
    trajectory=None,
    trajectory_label: str | None = "trajectory",
) -> Axes:
    """A metric on the plane through three checkpoints (paper fig. 1): filled contours (or a heatmap) with
    levels spaced on a log scale above the minimum (see :func:`contour_levels`), a colour bar with the metric
    and its units, the defining points marked and labelled, NaN cells left blank, equal aspect (unless one side
    is over :data:`MAX_PLANE_ASPECT` times the other: then "axes not to scale" is written on it); optionally
    further checkpoints at their projections (:func:`plot_plane_marks`) and a trajectory of iterates
    (:func:`plot_plane_trajectory`, with a legend entry).

    Args:
        x: (X,) increasing coordinates along u (weight-space units unless ``xlabel`` says otherwise).
        y: (Y,) increasing coordinates along v (weight-space units unless ``ylabel`` says otherwise).
        Z: (X, Y) metric values indexed ``Z[ix, iy]`` = value at (x[ix], y[iy]) (the store's layout).
        points: optional (K, 2) plane coordinates of the checkpoints; labels: (K,) their names.
        ax: Axes to draw on; when None a new figure about 5 in wide whose plot area has the plane's aspect.
        metric: which metric Z holds (sets the colour-bar label).
        levels, n_levels, decades: see :func:`contour_levels`.
        kind: "contourf" (filled contours) or "heatmap" (one cell per grid point, continuous colours).
        cmap, colorbar, colors: colour map; whether to add a colour bar; checkpoint colour overrides.
        xlabel, ylabel, title: axis labels with units (defaults: distances along u and v in weight-space
            units); optional title.
        marks, mark_labels, mark_distances: (M, 2) projections of further checkpoints, their names and
            distances from the plane (see :func:`plot_plane_marks`).
        trajectory, trajectory_label: (T, 2) projections of iterates in order, and their legend text.

    Returns:
        The Axes (the colour bar is a separate Axes of the same figure). The filled contour set or mesh has
        gid ``"plane:<kind>"``; marks ``"mark:<label>"``, the trajectory ``"trajectory"``.
    """
    check_metric(metric)
    if kind not in PLANE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(PLANE_KINDS)}")
    x, y, Z, P, labels = _check_plane(x, y, Z, points, labels)
    if marks is not None:
        _check_marks(marks, mark_labels, mark_distances)
    if trajectory is not None:
        _check_trajectory(trajectory)
    bounds, norm = contour_levels(Z, levels, n_levels, decades)
    own_figure = ax is None
    ax = ax if ax is not None else _new_axes(_plane_figsize(x, y))
    Zyx = np.ma.masked_invalid(Z.T)  # matplotlib wants rows = y, columns = x
    if kind == "contourf":
        mappable = ax.contourf(x, y, Zyx, levels=bounds, norm=norm, cmap=cmap)
    else:
        mappable = ax.pcolormesh(x, y, Zyx, norm=norm, cmap=cmap, shading="nearest")
    mappable.set_gid(f"plane:{kind}")
    if colorbar:
        # uniform spacing: every contour band gets the same height, i.e. a log scale above the minimum
        _colorbar(ax.figure, mappable, ax, metric, bounds, **({"spacing": "uniform"} if kind == "contourf" else {}))
    limits = ax.get_xlim(), ax.get_ylim()  # the grid's: marks and trajectory outside it are clipped
    _mark_points(ax, P, labels, colors, x, y)
    if trajectory is not None:
        plot_plane_trajectory(ax, trajectory, label=trajectory_label)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if _to_scale(x, y):
        ax.set_aspect("equal")
    else:  # say so where the reader looks: a unit along x is not a unit along y
        ax.text(0.99, 0.01, "axes not to scale", transform=ax.transAxes, ha="right", va="bottom", fontsize="x-small",
                color="black", path_effects=_outlined(), zorder=8, gid="not-to-scale")
    if title:
        ax.set_title(title)
    _fit_texts(ax)
    if trajectory is not None and trajectory_label:
        # under the plot when the figure is ours (a legend inside a small plane would squeeze it), else inside
        _add_legend([ax], [h for h in ax.get_lines() if h.get_gid() == "trajectory"], own_figure=own_figure)
    if marks is not None:  # last: their labels go where they hide least of everything else
        plot_plane_marks(ax, marks, mark_labels, mark_distances, colors)
    return ax


def _bilinear(x, y, Z, px, py) -> float:
    """Z interpolated at (px, py) inside the grid (edges clamped); NaN if a neighbouring cell is NaN."""
    i = int(np.clip(np.searchsorted(x, px) - 1, 0, x.size - 2))
    j = int(np.clip(np.searchsorted(y, py) - 1, 0, y.size - 2))
    fx = float(np.clip((px - x[i]) / (x[i + 1] - x[i]), 0, 1))
    fy = float(np.clip((py - y[j]) / (y[j + 1] - y[j]), 0, 1))
    return float((1 - fx) * (1 - fy) * Z[i, j] + fx * (1 - fy) * Z[i + 1, j]
                 + (1 - fx) * fy * Z[i, j + 1] + fx * fy * Z[i + 1, j + 1])


def plot_plane_surface(
    x,
    y,
    Z,
    points=None,
    labels: Sequence[str] | None = None,
    ax=None,
    metric: str = "train_loss",
    levels="log",
    decades: float = 3.0,
    cmap="viridis",
    colorbar: bool = True,
    colors: Mapping[str, Any] | None = None,
    title: str | None = None,
    xlabel: str = SURFACE_XLABEL,
    ylabel: str = SURFACE_YLABEL,
    marks=None,
    mark_labels: Sequence[str] | None = None,
    mark_distances=None,
    trajectory=None,
    trajectory_label: str | None = "trajectory",
):
    """The plane's metric as a 3D surface, coloured like :func:`plot_plane` (log scale above the minimum);
    checkpoints, marks and the trajectory drawn on the surface (where it is computed and they lie inside the
    grid). Same arguments as :func:`plot_plane`; ``ax`` must be a 3D Axes (``fig.add_subplot(projection="3d")``)
    or None. NaN cells leave holes. Returns the 3D Axes.
    """
    check_metric(metric)
    x, y, Z, P, labels = _check_plane(x, y, Z, points, labels)
    M, mark_labels, mark_distances = _check_marks(marks, mark_labels, mark_distances) if marks is not None \
        else (np.zeros((0, 2)), [], None)
    T = _check_trajectory(trajectory) if trajectory is not None else None
    if ax is None:
        fig = plt.figure(figsize=PLANE_SIZE, layout="constrained")
        ax = fig.add_subplot(projection="3d")
    elif getattr(ax, "name", None) != "3d":
        raise ValueError("ax must be a 3D Axes: create it with fig.add_subplot(projection='3d')")
    bounds, norm = contour_levels(Z, levels, decades=decades)
    ax.computed_zorder = False  # mplot3d sorts by depth otherwise and hides the markers behind the surface
    X, Y = np.meshgrid(x, y)  # (Y, X), like Z.T
    surface = ax.plot_surface(X, Y, Z.T, cmap=cmap, norm=norm, rstride=1, cstride=1, linewidth=0,
                              antialiased=False)
    surface.set_gid("plane:surface")
    palette = checkpoint_colors(labels, colors)
    for k, ((px, py), label) in enumerate(zip(P, labels)):
        pz = _bilinear(x, y, Z, px, py)
        if np.isfinite(pz):
            ax.scatter([px], [py], [pz], marker=_POINT_MARKERS[k % len(_POINT_MARKERS)], s=40, color=palette[label],
                       edgecolors="white", depthshade=False, zorder=5)
            ax.text(px, py, pz, f" {label}", fontsize="small", fontweight="bold", path_effects=_outlined())
    inside = lambda px, py: x[0] <= px <= x[-1] and y[0] <= py <= y[-1]  # noqa: E731
    mark_palette = checkpoint_colors(mark_labels, colors)
    for k, ((px, py), label) in enumerate(zip(M, mark_labels)):
        pz = _bilinear(x, y, Z, px, py) if inside(px, py) else np.nan
        if np.isfinite(pz):
            ax.scatter([px], [py], [pz], marker=_MARK_MARKER, s=110, color=mark_palette[label], edgecolors="white",
                       depthshade=False, zorder=7).set_gid(f"mark:{label}")
            text = mark_text(label, None if mark_distances is None else mark_distances[k])
            ax.text(px, py, pz, f" {text}", fontsize="small", fontweight="bold", path_effects=_outlined())
    if T is not None:
        keep = np.array([inside(px, py) for px, py in T])
        tz = np.array([_bilinear(x, y, Z, px, py) if ok else np.nan for (px, py), ok in zip(T, keep)])
        line = ax.plot(T[:, 0], T[:, 1], tz, "-o", color=_TRAJECTORY_COLOR, lw=1.4, ms=3, zorder=6,
                       label=trajectory_label or "_nolegend_")[0]
        line.set_gid("trajectory")
    xlabel, ylabel = wrap_text(xlabel, SURFACE_LABEL_CHARS), wrap_text(ylabel, SURFACE_LABEL_CHARS)
    # each extra line of a label moves it off the ticks, and the colour bar off the y label
    ax.set_xlabel(xlabel, labelpad=4 + 12 * xlabel.count("\n"))
    ax.set_ylabel(ylabel, labelpad=4 + 12 * ylabel.count("\n"))
    ax.set_zlabel(metric_label(metric))
    if colorbar:
        _colorbar(ax.figure, surface, ax, metric, bounds, shrink=0.7, pad=0.1 + 0.1 * ylabel.count("\n"))
    if title:
        ax.set_title(title)
    return ax
