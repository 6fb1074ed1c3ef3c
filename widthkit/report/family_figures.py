"""Figures of SWA's family: ensembles (error as members are added, disagreement between them) and curves
between two solutions (metrics along t beside the straight line; the plane through the endpoints and the bend
with the curve drawn, Garipov et al. 2018, Figure 1 / the dnn-mode-connectivity plane plots).

Array-level functions take arrays and ``ax=None`` and return the Axes; ``*_figure`` functions build a whole
figure from a stored file's dict (:func:`widthkit.report.store.read`); :func:`write_figure` saves and closes one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .figures import PANEL_SIZE, checkpoint_colors, is_error, metric_label, plot_plane
from .render import check_formats, save_figure

ENSEMBLE_COLOR = "tab:purple"
MEMBER_COLOR = "0.45"
PATH_STYLES = {"line": ("tab:gray", "--"), "curve": ("tab:red", "-")}


def _new_axes(ax: Axes | None, size=PANEL_SIZE) -> Axes:
    if ax is not None:
        return ax
    return plt.figure(figsize=size, layout="constrained").add_subplot()


def write_figure(fig: Figure, out_stem, formats: Sequence[str] = ("png", "pdf")) -> list[str]:
    """Save ``fig`` as ``<out_stem>.<fmt>`` for each format (PNG at the report's dpi, PDF fonts embedded as
    TrueType) and close it; returns the paths."""
    formats = check_formats(formats)
    try:
        return save_figure(fig, out_stem, formats)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------- ensembles


def plot_ensemble(members, ensemble, member_values=None, compare: Mapping[str, float] | None = None,
                  ax: Axes | None = None, metric: str = "test_err", title: str | None = None) -> Axes:
    """A metric of the ensemble of the first k members against k (Garipov et al. 2018, Figure 4), each member
    alone as a dot at its position, and single models (SWA, SGD) as horizontal lines.

    Args:
        members: (M,) the ensemble sizes 1..M.
        ensemble: (M,) the metric of the ensemble of the first k members.
        member_values: optional (M,) the metric of member k alone.
        compare: ``{label: value}`` of single models (one forward pass per prediction).
        ax: Axes to draw on (None: a new figure). metric: ``test_err`` (%) or ``test_loss`` (nats); title.

    Returns:
        The Axes; the ensemble's curve has gid ``"ensemble"``, the members' dots ``"members"``, each single
        model's line ``"compare:<label>"``.
    """
    k = np.asarray(members, dtype=np.float64)
    e = np.asarray(ensemble, dtype=np.float64)
    if k.ndim != 1 or e.shape != k.shape:
        raise ValueError(f"members and ensemble must be two (M,) arrays, got {k.shape} and {e.shape}")
    ax = _new_axes(ax)
    (line,) = ax.plot(k, e, color=ENSEMBLE_COLOR, marker="o", ms=3.5, lw=1.8, label="ensemble of the first k")
    line.set_gid("ensemble")
    if member_values is not None:
        v = np.asarray(member_values, dtype=np.float64)
        if v.shape != k.shape:
            raise ValueError(f"member_values must be (M,) = {k.shape}, got {v.shape}")
        dots = ax.scatter(k, v, s=12, color=MEMBER_COLOR, zorder=3, label="member k alone")
        dots.set_gid("members")
    colors = checkpoint_colors(list(compare or {}))
    for label, value in (compare or {}).items():
        h = ax.axhline(float(value), color=colors[label], ls="--", lw=1.4, label=f"{label} (1 forward pass)")
        h.set_gid(f"compare:{label}")
    ax.set_xlabel("members in the ensemble (forward passes per prediction)")
    ax.set_ylabel(metric_label(metric))
    if len(k) and k.max() <= 20:
        ax.set_xticks(k)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title, fontsize="medium")
    return ax


def plot_disagreement(matrix, labels: Sequence[str] | None = None, ax: Axes | None = None) -> Axes:
    """The (M, M) pairwise top-1 disagreement of the members in % of the test examples, as a heatmap with a
    colour bar; returns the Axes (the image has gid ``"disagreement"``)."""
    d = np.asarray(matrix, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"the disagreement must be a square (M, M) matrix, got {d.shape}")
    ax = _new_axes(ax)
    im = ax.imshow(d, cmap="magma", origin="upper", vmin=0)
    im.set_gid("disagreement")
    ax.figure.colorbar(im, ax=ax, label="disagreement (% of test examples)")
    n = len(d)
    ticks = np.arange(n) if n <= 12 else np.linspace(0, n - 1, 6).round().astype(int)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    if labels is not None and n <= 12:
        ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize="x-small")
        ax.set_yticklabels([labels[i] for i in ticks], fontsize="x-small")
    else:
        ax.set_xticklabels(ticks + 1)
        ax.set_yticklabels(ticks + 1)
    ax.set_xlabel("member")
    ax.set_ylabel("member")
    return ax


def ensemble_figure(data: Mapping) -> Figure:
    """The figure of an ensemble file (the dict :func:`widthkit.report.store.read` returns): test error and test
    NLL as members are added (members alone as dots, the compared single models as lines), and the members'
    pairwise disagreement."""
    attrs = data["attrs"]
    k = np.asarray(data["axes"]["ensemble_size"], dtype=np.float64)
    members, together = data["models"]["members"]["metrics"], data["models"]["ensemble"]["metrics"]
    compare = attrs.get("compare") or {}
    fig, axes = plt.subplots(1, 3, figsize=(3 * PANEL_SIZE[0], PANEL_SIZE[1]), layout="constrained")
    for ax, metric in zip(axes[:2], ("test_err", "test_loss")):
        plot_ensemble(k, together[metric], members[metric], {lab: v[metric] for lab, v in compare.items()},
                      ax=ax, metric=metric)
    if "disagreement" in attrs:
        plot_disagreement(attrs["disagreement"], attrs.get("member_labels"), ax=axes[2])
    else:
        axes[2].set_axis_off()
    bn = ((data.get("config") or {}).get("eval") or {}).get("bn_mode")
    fig.suptitle(f"Ensemble of {len(k)} members (averaged softmax)" + (f", BN {bn}" if bn else ""), fontsize="medium")
    return fig


# --------------------------------------------------------------------------------------------- curves


def plot_paths(t, values: Mapping[str, object], ax: Axes | None = None, metric: str = "train_loss",
               labels: Mapping[str, str] | None = None, title: str | None = None) -> Axes:
    """One metric along t on several paths between the same two endpoints (the straight line and a trained
    curve, Garipov et al. 2018, Figure 2), each path's barrier (max − mean of the endpoints) in its legend entry.

    Args:
        t: (T,) in [0, 1]; values: ``{path: (T,)}`` (``"line"`` dashed grey, ``"curve"`` red, others tab10).
        ax: Axes (None: a new figure); metric: what the values are (the y label, errors in %, losses in nats);
        labels: legend names per path; title: optional.

    Returns:
        The Axes; each path's curve has gid ``"path:<name>"``.
    """
    from ..engine.curves import barrier

    t = np.asarray(t, dtype=np.float64)
    ax = _new_axes(ax)
    for i, (name, v) in enumerate(values.items()):
        v = np.asarray(v, dtype=np.float64)
        if v.shape != t.shape:
            raise ValueError(f"values[{name!r}] has shape {v.shape}, expected {t.shape} like t")
        color, style = PATH_STYLES.get(name, (f"C{i + 2}", "-"))
        b = barrier(v)
        unit = " points" if is_error(metric) else ""
        (line,) = ax.plot(t, v, color=color, ls=style, lw=1.8,
                          label=f"{(labels or {}).get(name, name)}: barrier {b:.3g}{unit}")
        line.set_gid(f"path:{name}")
    ax.set_xlabel("t (0: first endpoint, 1: second)")
    ax.set_ylabel(metric_label(metric))
    ax.set_xlim(0, 1)
    ax.legend(fontsize="small", loc="best")
    if title:
        ax.set_title(title, fontsize="medium")
    return ax


def curve_figure(data: Mapping) -> Figure:
    """The figure of a curve's evaluation file (a line file with the groups ``line`` and ``curve``): train loss
    and test error along t on both paths."""
    t = data["axes"]["t"]
    info = data["attrs"]["curve"]
    fig, axes = plt.subplots(1, 2, figsize=(2 * PANEL_SIZE[0], PANEL_SIZE[1]), layout="constrained")
    names = {"line": "straight line", "curve": info["label"]}
    for ax, metric in zip(axes, ("train_loss", "test_err")):
        plot_paths(t, {p: data["models"][p]["metrics"][metric] for p in ("line", "curve")}, ax=ax, metric=metric,
                   labels=names)
    a, b = info["endpoints"]
    bn = ((data.get("config") or {}).get("eval") or {}).get("bn_mode")
    fig.suptitle(f"{info['label']} between {a} and {b} vs the straight line" + (f", BN {bn}" if bn else ""),
                 fontsize="medium")
    return fig


def plot_curve_plane(data: Mapping, metric: str = "train_loss", ax: Axes | None = None) -> Axes:
    """The plane through a curve's endpoints and its bend (the dict of its ``-plane.h5`` file): ``metric`` as
    log-spaced filled contours (:func:`~widthkit.report.figures.plot_plane`), the endpoints and the bend
    marked, the curve's points drawn as a path (t = 0 → 1) and the straight line between the endpoints
    dashed; returns the Axes (the straight line has gid ``"straight-line"``)."""
    axes, attrs = data["axes"], data["attrs"]
    metrics = data["models"]["plane"]["metrics"]
    if metric not in metrics:
        raise ValueError(f"the plane holds {sorted(metrics)}, not {metric!r}")
    info = attrs.get("curve") or {}
    labels = [str(s) for s in attrs.get("point_labels") or []]
    P = np.asarray(axes["points"], dtype=np.float64).reshape(-1, 2)
    bn = ((data.get("config") or {}).get("eval") or {}).get("bn_mode")
    title = str(attrs.get("title") or "") + (f"\nBN {bn}" if bn else "")
    xa, ya = data.get("axis_attrs", {}).get("x", {}), data.get("axis_attrs", {}).get("y", {})
    ax = plot_plane(axes["x"], axes["y"], metrics[metric], P, labels, ax=ax, metric=metric, title=title,
                    xlabel=f"{xa.get('long_name', 'u')} ({xa.get('units', '')})",
                    ylabel=f"{ya.get('long_name', 'v')} ({ya.get('units', '')})",
                    trajectory=np.asarray(axes["curve"], dtype=np.float64), trajectory_label=info.get("label", "curve"))
    (seg,) = ax.plot(P[:2, 0], P[:2, 1], color="white", ls="--", lw=1.3, label="straight line")
    seg.set_gid("straight-line")
    return ax


def curve_plane_figure(data: Mapping, metric: str = "train_loss") -> Figure:
    """:func:`plot_curve_plane` on a figure of its own."""
    return plot_curve_plane(data, metric).figure
