"""Figures and tables of curvature and sharpness files: the spectral density of several checkpoints on one
axes, and the side-by-side numbers (terminal text and Markdown for the pipeline's report).

* :func:`plot_spectral_density` / :func:`plot_log_spectral_density`: arrays in, ``ax=None``, Axes out.
* :func:`spectrum_figure` (open figure) / :func:`write_spectrum_figure` (files) of a curvature file.
* :func:`curvature_table`, :func:`sharpness_table`, :func:`curvature_markdown`: the numbers of a file.

Units: eigenvalues of the Hessian of the mean training loss (nats per unit² of weight space); densities per
unit eigenvalue (linear panel) or per decade of |λ| (log panel), integrating to the fraction of the spectrum
they show.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .curvature_store import completeness, read_curvature
from .figures import checkpoint_colors
from .render import check_formats, save_figure

__all__ = ["curvature_markdown", "curvature_table", "plot_log_spectral_density", "plot_spectral_density",
           "sharpness_table", "spectrum_figure", "write_spectrum_figure"]

DENSITY_XLABEL = "eigenvalue λ of the Hessian of the train loss"
DENSITY_YLABEL = "spectral density (per unit λ)"
LOG_XLABEL = "log₁₀ |λ|"
LOG_YLABEL = "density (per decade of |λ|)"
def _new_axes() -> Axes:
    _, ax = plt.subplots(figsize=(5.0, 3.6), layout="constrained")
    return ax


def plot_spectral_density(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], ax: Axes | None = None, *,
                          log: bool = True, floor: float = 1e-8, colors: Mapping[str, str] | None = None,
                          xlabel: str = DENSITY_XLABEL, title: str | None = None) -> Axes:
    """Smoothed spectral densities of several checkpoints on one axes.

    Args:
        curves: ``{label: (grid (G,), density (G,))}`` (e.g. from :func:`widthkit.engine.curvature.spectral_density`).
        ax: where to draw (default: a new figure).
        log: logarithmic density axis (the bulk near 0 and the outliers are then both visible, as in Ghorbani
            et al. 2019); values below ``floor`` × the largest are clipped there.
        colors: label -> colour (default: SWA blue, SGD green, others tab10).

    Returns:
        The Axes.
    """
    ax = ax or _new_axes()
    palette = checkpoint_colors(list(curves), colors)
    top = max((float(np.nanmax(d)) for _, d in curves.values() if np.isfinite(d).any()), default=1.0)
    for label, (grid, density) in curves.items():
        d = np.asarray(density, dtype=float)
        ax.plot(grid, np.maximum(d, floor * top) if log else d, color=palette[label], label=label, lw=1.4)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(DENSITY_YLABEL)
    if title:
        ax.set_title(title, fontsize="medium")
    if curves:
        ax.legend(frameon=False)
    return ax


def plot_log_spectral_density(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                              ax: Axes | None = None, *, excluded: Mapping[str, float] | None = None,
                              floor: float = 1e-6, colors: Mapping[str, str] | None = None,
                              title: str | None = None) -> Axes:
    """Densities over log₁₀|λ| on a log density axis: positive eigenvalues solid, negative ones dashed
    (``{label: (grid, positive, negative)}``, e.g. from :func:`widthkit.engine.curvature.log_spectral_density`).
    ``excluded``: ``{label: mass near λ = 0}``, shown in the legend. Returns the Axes."""
    ax = ax or _new_axes()
    palette = checkpoint_colors(list(curves), colors)
    top = max((float(np.nanmax(np.concatenate([p, n]))) for _, p, n in curves.values()), default=1.0)
    for label, (grid, pos, neg) in curves.items():
        near0 = f" ({100 * excluded[label]:.1f}% at λ≈0)" if excluded and label in excluded else ""
        ax.plot(grid, np.maximum(pos, floor * top), color=palette[label], label=f"{label}, λ > 0{near0}", lw=1.4)
        if np.nanmax(np.asarray(neg, dtype=float), initial=0.0) > floor * top:
            ax.plot(grid, np.maximum(neg, floor * top), color=palette[label], ls="--", label=f"{label}, λ < 0", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel(LOG_XLABEL)
    ax.set_ylabel(LOG_YLABEL)
    if title:
        ax.set_title(title, fontsize="medium")
    if curves:
        ax.legend(frameon=False, fontsize="small")
    return ax


# --------------------------------------------------------------------------------------------- files


def _as_data(data) -> dict:
    return read_curvature(data, load_vectors=False) if isinstance(data, (str, Path)) else data


def _label(data: Mapping, group: str) -> str:
    return str(data["models"][group]["attrs"].get("label") or group)


def _describe(data: Mapping) -> str:
    op = data["attrs"].get("operator") or {}
    cfg = data["config"].get("curvature", {})
    bn = {"keep": "BN statistics of the checkpoint", "recompute": "BN statistics recomputed at θ₀"}.get(
        op.get("bn_mode"), "")
    l2 = f", + ½·{op.get('weight_decay_term')}·‖θ‖²" if op.get("weight_decay_term") else ""
    probes = f"{cfg.get('slq_probes')} SLQ probes × {cfg.get('slq_steps')} steps" if cfg else ""
    return ", ".join(x for x in (f"train loss on {op.get('n_examples', '?')} examples{l2}", bn, probes) if x)


def spectrum_figure(data) -> Figure:
    """The spectral density figure of a curvature file (or its dict): linear λ with a log density axis, and
    log₁₀|λ|; every checkpoint on the same axes. The caller closes it."""
    data = _as_data(data)
    if data["kind"] != "curvature":
        raise ValueError(f"{data.get('path', 'this file')} holds a {data['kind']} result; the spectral density is in "
                         "a curvature file")
    lin, logs, near0 = {}, {}, {}
    for group, m in data["models"].items():
        v = m["values"]
        if m["done"].get("slq") and "density" in v:
            lin[_label(data, group)] = (v["density_grid"], v["density"])
            logs[_label(data, group)] = (v["log_density_grid"], v["log_density_positive"], v["log_density_negative"])
            near0[_label(data, group)] = float(v["log_density_excluded"])
    if not lin:
        raise ValueError(f"{data.get('path', 'the file')} has no finished spectral density (slq_probes 0, or the run "
                         "was interrupted: run the same command again to finish it)")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10.0, 3.8), layout="constrained")
    plot_spectral_density(lin, a)
    plot_log_spectral_density(logs, b, excluded=near0)
    fig.suptitle("Hessian spectral density: " + _describe(data), fontsize="medium")
    done, total = completeness(data)
    if done < total:
        fig.text(0.01, 0.995, f"PARTIAL: {done} of {total} estimators finished; resume with the same command",
                 ha="left", va="top", color="tab:red", fontsize="small", gid="partial")
    return fig


def write_spectrum_figure(data, out_stem, formats: Sequence[str] = ("png", "pdf")) -> list[str]:
    """Write :func:`spectrum_figure` to ``<out_stem>.<fmt>`` for each format; returns the paths (figure closed)."""
    formats = check_formats(formats)
    fig = spectrum_figure(data)
    try:
        return save_figure(fig, out_stem, formats)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------- tables


def _fmt(x, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return format(x, spec)


def _scalar(v: Mapping, name: str):
    x = v.get(name)
    return None if x is None else float(np.asarray(x).reshape(-1)[0]) if np.size(x) else None


def _pm(value, stderr, spec: str = ".4g") -> str:
    """``value ± stderr`` (the standard error to 2 significant digits); the value alone when no error is known
    (a file written before errors were stored)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if stderr is None or (isinstance(stderr, float) and math.isnan(stderr)):
        return _fmt(value, spec)
    return f"{_fmt(value, spec)} ± {_fmt(stderr, '.2g')}"


def _at(v: Mapping, name: str, j: int):
    return float(np.atleast_1d(v[name])[j]) if name in v else None


def _count(n, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s") if n is not None else f"? {what}s"


def _residual(v: Mapping) -> str:
    """The largest residual of the top pairs: measured, or (a file from before they were measured) Lanczos'
    estimate, marked as such."""
    for name, mark in (("eigen_residuals", ""), ("eigen_residuals_lanczos", " (Lanczos estimate)")):
        r = np.atleast_1d(v.get(name, []))
        if r.size and not np.isnan(r).all():
            return _fmt(float(np.nanmax(r)), ".2g") + mark
    return "—"


def curvature_rows(data) -> tuple[list[str], list[list[str]]]:
    """(model labels, rows ``[quantity, value per model...]``) of a curvature file."""
    data = _as_data(data)
    groups = list(data["models"])
    labels = [_label(data, g) for g in groups]
    vals = [data["models"][g]["values"] for g in groups]
    k = max((len(np.atleast_1d(v.get("eigenvalues", []))) for v in vals), default=0)
    rows = [["train loss (nats)"] + [_fmt(_scalar(v, "loss")) for v in vals],
            ["train error (%)"] + [_fmt(None if _scalar(v, "train_error") is None else 100 * _scalar(v, "train_error"), ".2f")
                                   for v in vals],
            ["‖∇L‖"] + [_fmt(_scalar(v, "grad_norm")) for v in vals]]
    for i in range(k):
        rows.append([f"λ_{i + 1}" + (" (λ_max)" if i == 0 else "")]
                    + [_fmt(float(v["eigenvalues"][i]) if "eigenvalues" in v else None) for v in vals])
    rows.append(["λ_min"] + [_fmt(_scalar(v, "lambda_min")) for v in vals])
    if any("eigen_residuals" in v or "eigen_residuals_lanczos" in v for v in vals):
        rows.append([f"largest ‖Hy − λy‖ of λ_1..λ_{k}"] + [_residual(v) for v in vals])
    cfg = data["config"].get("curvature", {})
    probes = _count(cfg.get("slq_probes"), "probe")
    if any("trace" in v for v in vals):
        rows.append([f"trace (Hutch++, {_count(cfg.get('trace_hvps'), 'product')})"] + [
            _pm(_scalar(v, "trace"), _scalar(v, "trace_stderr")) if "trace" in v else "—" for v in vals])
    if any("slq_trace" in v for v in vals):
        rows.append([f"trace (D × density mean, {probes})"] + [
            _pm(_scalar(v, "slq_trace"), _scalar(v, "slq_trace_stderr")) if "slq_trace" in v else "—" for v in vals])
    alphas = data["axes"].get("eff_dim_alpha")
    if alphas is not None and any("effective_dimension" in v for v in vals):
        for j, a in enumerate(np.atleast_1d(alphas)):
            rows.append([f"effective dim. (α={a:g}, {probes})"] + [
                _pm(_at(v, "effective_dimension", j), _at(v, "effective_dimension_stderr", j))
                if "effective_dimension" in v else "—" for v in vals])
    rows.append(["Lanczos steps"] + [
        f"{_fmt(_scalar(v, 'lanczos_iterations'), '.0f')}"
        + ("" if _scalar(v, "lanczos_converged") in (None, 1.0) else " (not converged)") for v in vals])
    rows.append(["H·v products, seconds"] + [
        f"{int(np.nansum(v['hvps']))}, {np.nansum(v['seconds']):.1f} s" if "hvps" in v else "—" for v in vals])
    return labels, rows


def sharpness_rows(data) -> tuple[list[str], list[list[str]]]:
    """(model labels, rows) of a sharpness file: one row per measure and radius."""
    from ..engine.sharpness import AVERAGE, KIND_TEXT, PAC_BAYES, RADII, radius_field

    data = _as_data(data)
    groups = list(data["models"])
    labels = [_label(data, g) for g in groups]
    vals = [data["models"][g]["values"] for g in groups]
    cfg = data["config"].get("sharpness", {})
    kinds = cfg.get("kinds", [])
    radii = {name: data["axes"][name] for name in RADII if name in data["axes"]}
    rows = [["train loss (nats)"] + [_fmt(_scalar(v, "loss")) for v in vals],
            ["train error (%)"] + [_fmt(None if _scalar(v, "train_error") is None else 100 * _scalar(v, "train_error"),
                                        ".2f") for v in vals]]
    for kind in kinds:
        if kind in PAC_BAYES:
            def pac(v):
                text = f"{_fmt(_scalar(v, kind))} (σ' = {_fmt(_scalar(v, kind + '_sigma'), '.3g')}"
                err, se = _scalar(v, kind + "_error"), _scalar(v, kind + "_error_stderr")
                if err is not None and not math.isnan(err):
                    text += f"; error there {_pm(100 * err, None if se is None else 100 * se, '.3g')} %"
                return text + ")"

            rows.append([f"{KIND_TEXT[kind]} ({_count(cfg.get('pac_samples'), 'draw')})"] + [pac(v) for v in vals])
            continue
        name = radius_field(kind)
        symbol = "ε" if kind == "keskar" else "ρ"
        draws = f" ({_count(cfg.get('samples'), 'draw')})" if kind in AVERAGE else ""
        for j, r in enumerate(np.atleast_1d(radii[name])):
            rows.append([f"{KIND_TEXT[kind]}, {symbol}={r:g}{draws}"]
                        + [_pm(_at(v, kind, j), _at(v, f"{kind}_stderr", j)) for v in vals])
    return labels, rows


def _text_table(labels: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[0]) for r in rows + [[""]])] + [max([len(lab)] + [len(r[i + 1]) for r in rows])
                                                        for i, lab in enumerate(labels)]
    lines = ["  ".join([" " * widths[0]] + [lab.rjust(w) for lab, w in zip(labels, widths[1:])])]
    for r in rows:
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
    return "\n".join(lines)


def curvature_table(data) -> str:
    """The side-by-side terminal table of a curvature or sharpness file (or its dict)."""
    data = _as_data(data)
    labels, rows = curvature_rows(data) if data["kind"] == "curvature" else sharpness_rows(data)
    done, total = completeness(data)
    head = f"Hessian of the {_describe(data)}" if data["kind"] == "curvature" else "Sharpness of the train loss"
    partial = f"\n(partial: {done} of {total} estimators finished; run the same command again to finish)" \
        if done < total else ""
    return head + "\n" + _text_table(labels, rows) + partial + "".join(f"\n{line}" for line in _notes(data))


def _notes(data: Mapping) -> list[str]:
    return [f"{_label(data, g)}: {note}" for g, m in data["models"].items() for note in m.get("notes") or []]


def sharpness_table(data) -> str:
    """Same as :func:`curvature_table` (named for readers of sharpness files)."""
    return curvature_table(data)


def curvature_markdown(path) -> str:
    """A Markdown section for the pipeline's report: the side-by-side table of a curvature (or sharpness) file,
    with what the numbers are measured on."""
    data = _as_data(path)
    labels, rows = curvature_rows(data) if data["kind"] == "curvature" else sharpness_rows(data)
    title = "Hessian spectrum and trace" if data["kind"] == "curvature" else "Sharpness"
    prov = data["attrs"].get("provenance") or {}
    lines = [f"## {title}", ""]
    if data["kind"] == "curvature":
        lines += [f"Hessian of the {_describe(data)}; top eigenvalues by Lanczos, trace by Hutch++ and from the "
                  "SLQ density, effective dimension Σ λ/(λ+α) from the SLQ density; ± one standard error over the "
                  "random probes (their number beside each row).", ""]
    else:
        lines += ["Rise of the train loss under weight perturbations (c = 1 plain, c = |θ| adaptive); average-case "
                  "± one Monte-Carlo standard error over the draws; worst-case values are the largest rise an ascent "
                  "found (a lower bound, no spread); PAC-Bayes flatness 1/σ'² (σ': the weight noise that raises the "
                  "train error by the set amount, measured over the draws; a larger 1/σ'² is a sharper minimum).",
                  ""]
    lines += ["| quantity | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    done, total = completeness(data)
    if done < total:
        lines += ["", f"Partial: {done} of {total} estimators finished."]
    lines += [""] + _notes(data) if _notes(data) else []
    lines += ["", f"Computed on {prov.get('device', '?')} with {prov.get('threads', '?')} threads, torch "
              f"{prov.get('torch_version', '?')}; file `{Path(data['path']).name}`.", ""]
    return "\n".join(lines)
