"""What a finished analysis turns into besides its grid: width tables (terminal + JSON), figures, the
pipeline's one-page Markdown report (called while the analysis file is still locked by its writer); and the
multi-seed summary of the pipeline: the paper's table (mean ± std over seeds), widths per seed and pooled,
paired tests across seeds and across directions."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import stats

from ..fileio import atomic_write, write_json

Log = Callable[[str], None]


@dataclass
class FigureOptions:
    """Where and how the figures of an analysis are written (``folder=None``: no figures)."""

    folder: Path | None = Path("figures")
    formats: tuple[str, ...] = ("png", "pdf")

    def __post_init__(self):
        from .render import check_formats

        self.formats = check_formats(self.formats)  # a bad --format is refused before any point is computed


def rays_widths(res, threshold: Sequence[str] = (), refine: bool = True, tol: float | None = None,
                reuse: bool = True) -> list[dict]:
    """Width reports of a one-sided rays analysis at each threshold (default: :meth:`Analysis.default_thresholds`),
    stored in its file. With ``reuse``, reports the file already holds for the same thresholds and refinement
    are returned as they are (a re-run of a finished command does not recompute them)."""
    specs = list(threshold) or res.default_thresholds()
    stored = res.data["attrs"].get("width_report") or []
    if reuse and [r.get("threshold") for r in stored] == specs and all(r.get("refined") == refine for r in stored):
        return stored
    reports = [res.widths(s, refine=refine, tol=tol) for s in specs]
    res.record_widths(reports)
    return reports


def rays_asymmetry(res, threshold: Sequence[str] = ()) -> list[dict]:
    """Per-side widths and asymmetry of a two-sided rays analysis at each threshold."""
    return [res.asymmetry(s) for s in list(threshold) or res.default_thresholds()]


def write_tables(res, reports: Sequence[dict], log: Log, suffix: str = ".widths.json") -> Path:
    """Print each report's table and write the reports (without the tables) as JSON beside the HDF5 file."""
    for r in reports:
        log("")
        log(r["table"])
    json_path = res.path.with_suffix(suffix)
    write_json(json_path, [{k: v for k, v in r.items() if k != "table"} for r in reports])
    log(f"\n{suffix.strip('.').split('.')[0]}: {json_path}")
    return json_path


def write_figures(res, options: FigureOptions, log: Log) -> list[str]:
    """Render the analysis' figures into ``options.folder`` (nothing when it is None)."""
    from .render import plot_file

    if options.folder is None:
        return []
    files = plot_file(res.path, out_dir=options.folder, formats=options.formats)
    for f in files:
        log(f"figure: {f}")
    return files


def finish_rays(widths, figures: FigureOptions, log: Log, two_sided: bool = False, reuse: bool = True):
    """The ``after`` step of a rays command: widths (or asymmetry) reported and stored, figures drawn."""
    def after(res):
        if two_sided:
            write_tables(res, rays_asymmetry(res, widths.threshold), log, ".asymmetry.json")
        else:
            res.reports = rays_widths(res, widths.threshold, widths.refine, widths.tol, reuse=reuse)
            write_tables(res, res.reports, log)
        res.figures = write_figures(res, figures, log)
    return after


def finish_figures(figures: FigureOptions, log: Log):
    """The ``after`` step of a line or plane command: figures drawn."""
    def after(res):
        res.figures = write_figures(res, figures, log)
    return after


def finish_ensemble(figures: FigureOptions, log: Log):
    """The ``after`` step of the ensemble command: the table printed, the figure drawn."""
    def after(res):
        from .family_figures import ensemble_figure, write_figure

        log("")
        log(res.table())
        res.figures = [] if figures.folder is None else write_figure(
            ensemble_figure(res.data), figures.folder / res.path.stem, figures.formats)
        for f in res.figures:
            log(f"figure: {f}")
    return after


def finish_curve(figures: FigureOptions, log: Log):
    """The ``after`` step of the curve command: the barrier table printed, the figures drawn (metrics along t
    on both paths; the plane through the endpoints and the bend with the curve)."""
    def after(res):
        from .family_figures import curve_figure, curve_plane_figure, write_figure

        log("")
        log(res.table())
        res.figures = []
        if figures.folder is not None:
            res.figures += write_figure(curve_figure(res.data), figures.folder / res.path.stem, figures.formats)
            if res.plane is not None:
                res.figures += write_figure(curve_plane_figure(res.plane.data), figures.folder / res.plane.path.stem,
                                            figures.formats)
        for f in res.figures:
            log(f"figure: {f}")
    return after


def family_numbers(ens, snapshots_by_budget: dict) -> dict:
    """SWA vs FGE at the same budget from an ensemble result whose single models are ``SGD`` and ``SWA <B>B``:
    ``{"sgd": {"acc", "nll", "passes"}, "budgets": {B: {"swa": {...}, "fge": {...}}}}`` (accuracy in %, NLL in
    nats, forward passes per prediction); FGE at budget B is the ensemble of the snapshots the SWA average at B
    holds (``snapshots_by_budget``)."""
    n = ens.numbers()

    def cell(values: dict, passes: int) -> dict:
        return {"acc": 100.0 - values["test_err"], "nll": values["test_loss"], "passes": passes}

    out = {"sgd": cell(n["compare"]["SGD"], 1) if "SGD" in n["compare"] else None, "budgets": {}}
    m = len(n["members"])
    for b, k in sorted(snapshots_by_budget.items()):
        swa = n["compare"].get(f"SWA {b:g}B")
        if swa is None or not 1 <= k <= m:
            continue
        fge = {key: float(n["by_size"][key][k - 1]) for key in ("test_loss", "test_err")}
        out["budgets"][float(b)] = {"swa": cell(swa, 1), "fge": cell(fge, int(k))}
    return out


def _family_lines(fam: dict, ens) -> list[str]:
    """One seed's SWA-vs-FGE table (Markdown)."""
    lines = ["| model | budget | test accuracy (%) | test NLL (nats) | forward passes per prediction |",
             "|---|---|---|---|---|"]
    if fam["sgd"]:
        lines.append(f"| SGD | 1 | {fam['sgd']['acc']:.2f} | {fam['sgd']['nll']:.4f} | 1 |")
    for b, row in fam["budgets"].items():
        for name, key in (("SWA", "swa"), ("FGE (ensemble of the same snapshots)", "fge")):
            c = row[key]
            lines.append(f"| {name} | {b:g} | {c['acc']:.2f} | {c['nll']:.4f} | {c['passes']} |")
    d = ens.numbers()["disagreement"]
    off = d[~np.eye(len(d), dtype=bool)]
    if off.size:
        lines += ["", f"The snapshots disagree on {off.mean():.2f}% of the test examples on average (pairs "
                      f"{off.min():.2f}% to {off.max():.2f}%)."]
    return lines


def _accuracy(rays_res, group: str, checkpoint) -> list[str]:
    """Test accuracy (%), test loss and train loss of a checkpoint, as cells: distance 0 of its rays (the
    checkpoint evaluated by widthkit) when the rays ran, else the final metrics its trainer recorded."""
    if rays_res is not None:
        group = rays_res.models[group]["metrics"]
        err, tl, trl = (float(group[k][0, 0]) for k in ("test_err", "test_loss", "train_loss"))
    else:
        from ..inputs.checkpoints import load_checkpoint

        recorded = load_checkpoint(checkpoint).meta.get("metrics") or {}
        final = recorded.get("final", recorded) if isinstance(recorded, dict) else {}
        err, tl, trl = (final.get(k) for k in ("test_err", "test_loss", "train_loss"))
    return ["n/a" if v is None else format(v, f) for v, f in ((None if err is None else 100 - err, ".2f"),
                                                              (tl, ".4f"), (trl, ".4f"))]


def write_report(path: Path, run: str, cfg, paths: dict, results: dict, timings: dict, total: float) -> Path:
    """The pipeline's one-page Markdown summary: SGD/SWA accuracy (as widthkit evaluated them, distance 0 of
    the rays), the width tables, the figures, the files and the timings."""
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    lines = [f"# widthkit report: {run}", "",
             f"{cfg.model} on {cfg.dataset}; budget {cfg.epochs} epochs, lr {cfg.lr}, weight decay "
             f"{cfg.weight_decay}, SWA from epoch {cfg.swa_start_epoch} at lr {cfg.swa_lr} to epoch "
             f"{cfg.swa_end_epoch}; seed {cfg.seed}.", ""]
    rays_res = results.get("rays")
    lines += ["## Test accuracy", "", "| model | test accuracy (%) | test loss (nats) | train loss (nats) |",
              "|---|---|---|---|"]
    for label, key in (("SGD", "sgd"), ("SWA", "swa")):
        lines.append(f"| {label} | " + " | ".join(_accuracy(rays_res, key, paths[key])) + " |")
    if rays_res is None:
        lines += ["", "(as the trainer measured them: the rays stage was skipped)"]
    if rays_res is not None:
        prov = rays_res.data["attrs"].get("provenance") or {}
        lines += ["", f"Evaluated on {prov.get('device', '?')} with {prov.get('threads', '?')} threads, "
                  f"{prov.get('precision', '?')}, torch {prov.get('torch_version', '?')}: results are bit-identical "
                  "for the same device, thread count and precision."]
        cfg_rays = rays_res.config["rays"]
        lines += ["", "## Width along random rays", "",
                  f"{cfg_rays['dirs']} random {cfg_rays['norm']} directions, the same for SGD and SWA; width = "
                  "distance at which the metric first exceeds its threshold.", ""]
        for r in getattr(rays_res, "reports", None) or []:
            lines += ["```", r["table"], "```", ""]
    for name, title in (("rays", "Rays"), ("line", "Line through SWA and SGD"),
                        ("plane", "Plane through start, SGD and SWA"),
                        ("iterates", "Plane through three SWA-phase iterates, SWA and SGD marked (the paper's Figure 1)"),
                        ("trajectory", "The SWA-phase iterates' principal plane and their trajectory")):
        res = results.get(name)
        pngs = [f for f in getattr(res, "figures", None) or [] if str(f).endswith(".png")]
        if pngs:
            lines += [f"## {title}", ""] + [f"![{name}]({rel(f)})" for f in pngs] + [""]
        projections = getattr(res, "projections", None)
        if name in ("iterates", "trajectory") and callable(projections):
            table = projections().get("table")
            if table:
                lines += ["```", table, "```", ""]
    ens = results.get("ensemble")
    if ens is not None:
        lines += ["## SWA vs FGE at the same budget", "",
                  "The ensemble of the snapshots SWA averages (their averaged softmax, as Fast Geometric Ensembling "
                  "predicts; Garipov et al. 2018) against SWA (one model at the average of the same weights) and SGD. "
                  f"BN statistics {((ens.config.get('eval') or {}).get('bn_mode'))} for every model.", ""]
        lines += _family_lines(family_numbers(ens, results.get("fge_budgets") or {}), ens) + [""]
        lines += [f"![ensemble]({rel(f)})" for f in getattr(ens, "figures", None) or [] if str(f).endswith(".png")]
        lines += [""]
    elif "ensemble" in results.get("skipped", ()):
        lines += ["## SWA vs FGE", "", "Skipped (`--skip ensemble`); drop it from `--skip` to compare the ensemble "
                  "of the SWA phase's snapshots with SWA.", ""]
    if results.get("curvature") is not None:
        from .spectrum import curvature_markdown

        lines += [curvature_markdown(results["curvature"]), ""]
        lines += [f"![curvature]({rel(f)})" for f in results.get("curvature_figures") or [] if str(f).endswith(".png")]
        lines += [""]
    lines += ["## Files", ""] + [f"- {k}: `{rel(v)}`" for k, v in paths.items() if k in ("start", "sgd", "swa", "log")]
    lines += [f"- {name}: `{rel(getattr(res, 'path', res))}`" for name, res in results.items()
              if name not in ("curvature_figures", "fge_budgets", "skipped")]
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s.", ""]
    return atomic_write(path, "\n".join(lines))


# --------------------------------------------------------------------------------------------------------
# Several seeds: the paper's table (mean ± std over runs), widths per seed and pooled, paired tests
# --------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> dict:
    """``{"n", "values", "mean", "std"}`` of per-seed numbers; ``std`` is the sample standard deviation
    (``ddof=1``; None for a single value). NaN values (a seed without the number) are left out."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    mean = float(np.mean(vals)) if n else None
    std = float(np.std(vals, ddof=1)) if n > 1 else None
    return {"n": n, "values": vals, "mean": mean, "std": std}


def paired_test(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("a", "b")) -> dict:
    """Paired comparison of two per-seed quantities (seed i of ``a`` with seed i of ``b``): differences b − a,
    their mean and sample std, a two-sided paired t-test (:func:`scipy.stats.ttest_rel`) and the Wilcoxon
    signed-rank test (:func:`scipy.stats.wilcoxon`, with the smallest p-value it can give for this n).

    Differences equal up to float rounding (within :data:`~widthkit.report.width.ROUNDING_REL` of the largest
    |value|, :func:`~widthkit.report.width.without_rounding`) count as equal: when every seed moved by the same
    amount (e.g. SWA got exactly one more test image right on each seed) the t statistic is undefined, and
    instead of the huge t that rounding noise would give, no p-value and a note that says so. ``mean_diff`` and
    ``std_diff`` are those of the differences without rounding (``differences`` holds them as computed).

    With 3 seeds the Wilcoxon test cannot go below p = 0.25; the t-test assumes roughly normal differences.
    """
    from .width import ROUNDING_REL, without_rounding

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_test needs two equally long 1-D sequences, got shapes {x.shape} and {y.shape}")
    raw = y - x
    n = int(raw.size)
    scale = float(np.abs(np.concatenate([x, y])).max()) if n else 0.0
    d = without_rounding(raw, scale)
    out: dict = {"names": list(names), "n": n, "differences": raw.tolist(),
                 "mean_diff": float(d.mean()) if n else None, "std_diff": float(d.std(ddof=1)) if n > 1 else None,
                 "t": None, "t_pvalue": None, "wilcoxon_statistic": None, "wilcoxon_pvalue": None,
                 "wilcoxon_min_pvalue": None, "notes": []}
    if n < 2:
        out["notes"].append("fewer than 2 seeds: no paired test")
        return out
    if float(raw.max() - raw.min()) <= ROUNDING_REL * scale:
        if not d.any():
            out["notes"].append("every seed gave the same value: no difference to test")
        else:
            out["notes"].append(f"all seeds moved by the same amount (difference {float(d.mean()):+.6g}): the t "
                                "statistic is undefined, no p-value")
    else:
        t = stats.ttest_rel(y, x)
        out["t"], out["t_pvalue"] = float(t.statistic), float(t.pvalue)
    nonzero = int(np.count_nonzero(d))
    if nonzero:
        w = stats.wilcoxon(d, alternative="two-sided")
        out["wilcoxon_statistic"], out["wilcoxon_pvalue"] = float(w.statistic), float(w.pvalue)
        out["wilcoxon_min_pvalue"] = 2.0 / 2 ** nonzero
    return out


def _floats(values) -> np.ndarray:
    """A width list as stored (floats, "inf"/"nan" strings, None for unknown) -> float64 array."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def pool_widths(reports: Sequence[dict], names: tuple[str, str] = ("SGD", "SWA")) -> dict:
    """Widths of several seeds at one threshold, compared per seed, pooled and across seeds.

    Args:
        reports: one width report per seed (:meth:`~widthkit.analyses.result.Analysis.widths`, as returned or as
            stored in the file), all at the same threshold, each holding ``per_direction``, ``crossed`` and
            ``summaries`` for both ``names``.
        names: the two models, the second compared with the first.

    Every seed's rays end at its own ``max_distance``; the pooled statistics use the smallest, m, and count a
    ray that crossed beyond m as not crossed within m (right-censoring at a smaller bound is always true). Only
    directions complete for both models are used.

    Returns:
        JSON-serialisable dict: ``threshold``, ``max_distance`` (m), ``per_seed`` (each seed's summaries and
        comparison as its report holds them), ``pooled`` (``summaries`` of all seeds' directions together and
        their paired ``comparison`` across directions, :func:`~widthkit.report.width.compare`), ``seed_means``
        ({name: per-seed mean width, censored rays at m}) with ``seed_means_lower_bound`` and ``across_seeds``
        (:func:`paired_test` of the per-seed means).
    """
    from .width import compare, summarize

    if not reports:
        raise ValueError("pool_widths needs at least one seed's width report")
    thresholds = {r["threshold"] for r in reports}
    if len(thresholds) != 1:
        raise ValueError(f"pool_widths needs reports at one threshold, got {sorted(thresholds)}")
    m = min(float(r["summaries"][n]["max_distance"]) for r in reports for n in names)
    pooled = {n: ([], []) for n in names}
    means = {n: [] for n in names}
    lower = False
    for r in reports:
        w = {n: _floats(r["per_direction"][n]) for n in names}
        c = {n: np.asarray(r["crossed"][n], dtype=bool) for n in names}
        usable = ~np.isnan(w[names[0]]) & ~np.isnan(w[names[1]])
        for n in names:
            crossed = c[n][usable] & (w[n][usable] <= m)
            widths = np.where(crossed, w[n][usable], np.inf)
            pooled[n][0].append(widths)
            pooled[n][1].append(crossed)
            means[n].append(float(np.mean(np.where(crossed, widths, m))) if crossed.size else math.nan)
            lower = lower or bool((~crossed).any())
    cat = {n: (np.concatenate(pooled[n][0]), np.concatenate(pooled[n][1])) for n in names}
    return {
        "threshold": reports[0]["threshold"],
        "max_distance": m,
        "per_seed": [{"summaries": r["summaries"], "comparison": r.get("comparison")} for r in reports],
        "pooled": {"summaries": {n: summarize(*cat[n], m) for n in names},
                   "comparison": compare(*cat[names[0]], *cat[names[1]], names=names, max_distance=m)},
        "seed_means": means,
        "seed_means_lower_bound": lower,
        "across_seeds": paired_test(means[names[0]], means[names[1]], names),
    }


def aggregate_seeds(seeds: Sequence[dict], names: tuple[str, str] = ("SGD", "SWA")) -> dict:
    """The multi-seed summary of the pipeline.

    Args:
        seeds: one dict per seed: ``{"seed": int, "sgd": test accuracy %, "swa": {budget: test accuracy %},
            "widths": [width reports, one per threshold] (may be empty)}``; the accuracies as the trainer
            measured them (eval mode; BatchNorm recomputed for the averages).
        names: the labels of the SGD and SWA models in the width reports.

    Returns:
        JSON-serialisable dict: ``seeds``, ``budgets``, ``per_seed`` (the accuracies given); ``accuracy``: ``{"sgd": mean_std, "swa": {budget: mean_std}}``
        (:func:`mean_std`: sample std over seeds); ``accuracy_tests``: ``{budget: paired_test(SGD, SWA at that
        budget)}`` across seeds; ``widths``: one :func:`pool_widths` per threshold that every seed reports.
    """
    if not seeds:
        raise ValueError("aggregate_seeds needs at least one seed")
    budgets = sorted({b for s in seeds for b in s["swa"]})
    sgd = [s["sgd"] for s in seeds]
    out: dict = {"seeds": [s["seed"] for s in seeds], "budgets": budgets,
                 "per_seed": [{"seed": s["seed"], "sgd": s["sgd"], "swa": dict(s["swa"])} for s in seeds],
                 "accuracy": {"sgd": mean_std(sgd),
                              "swa": {b: mean_std([s["swa"].get(b, math.nan) for s in seeds]) for b in budgets}},
                 "accuracy_tests": {}, "widths": []}
    for b in budgets:
        pairs = [(s["sgd"], s["swa"][b]) for s in seeds if b in s["swa"] and s["sgd"] is not None]
        out["accuracy_tests"][b] = paired_test([p[0] for p in pairs], [p[1] for p in pairs], names)
    by_threshold: dict[str, list] = {}
    for s in seeds:
        for r in s.get("widths") or []:
            by_threshold.setdefault(r["threshold"], []).append(r)
    for threshold, reports in by_threshold.items():
        if len(reports) == len(seeds):
            out["widths"].append(pool_widths(reports, names))
    out["family"] = aggregate_family([s.get("family") for s in seeds])
    return out


def aggregate_family(per_seed: Sequence[dict | None]) -> dict | None:
    """SWA vs FGE over seeds (each :func:`family_numbers`, None where the stage did not run): per budget the
    mean ± std of test accuracy and NLL of SWA and FGE, FGE's forward passes, and paired tests across seeds of
    FGE − SWA (accuracy and NLL); SGD's accuracy and NLL. None when no seed has the numbers."""
    fams = [f for f in per_seed if f]
    if not fams:
        return None
    budgets = sorted({b for f in fams for b in f["budgets"]})
    out: dict = {"n_seeds": len(fams), "sgd": {k: mean_std([f["sgd"][k] for f in fams if f["sgd"]])
                                               for k in ("acc", "nll")}, "budgets": {}}
    for b in budgets:
        both = [f["budgets"][b] for f in fams if b in f["budgets"]]
        row = {name: {k: mean_std([r[name][k] for r in both]) for k in ("acc", "nll", "passes")}
               for name in ("swa", "fge")}
        row["tests"] = {k: paired_test([r["swa"][k] for r in both], [r["fge"][k] for r in both], ("SWA", "FGE"))
                        for k in ("acc", "nll")}
        out["budgets"][b] = row
    return out


def _pm(stat: dict | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    if stat.get("std") is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _budget_label(b: float) -> str:
    return f"SWA {b:g} budget" + ("" if b == 1 else "s")


def _p(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def seed_table(agg: dict, row_label: str, paper: dict | None = None) -> list[str]:
    """The paper's Table 1 layout as Markdown rows: SGD and SWA at each budget, test accuracy (%) mean ± std over
    seeds; with ``paper`` (a recipe's ``[paper]`` table) the published numbers in a row beneath, and "—" where
    the source gives none."""
    budgets = sorted(set(agg["budgets"]) | set((paper or {}).get("swa", {})))
    lines = ["| | SGD | " + " | ".join(_budget_label(b) for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets),
             f"| {row_label} | {_pm(agg['accuracy']['sgd'])} | "
             + " | ".join(_pm(agg["accuracy"]["swa"].get(b)) for b in budgets) + " |"]
    if paper:
        def cell(v):
            return "—" if v is None else f"{v[0]:.2f} ± {v[1]:.2f}"
        lines.append(f"| published ({paper.get('runs') or '?'} runs) | {cell(paper.get('sgd'))} | "
                     + " | ".join(cell(paper["swa"].get(b)) for b in budgets) + " |")
    return lines


def _width_lines(w: dict, seeds: Sequence[int], names: tuple[str, str]) -> list[str]:
    from .width import format_table

    a, b = names
    lines = [f"### Width at {w['threshold']}", "",
             f"| seed | {a} mean | {a} median | {b} mean | {b} median | {b} wider | median ratio {b}/{a} | "
             f"Wilcoxon p (directions) |", "|---|---|---|---|---|---|---|---|"]
    for seed, s in zip(seeds, w["per_seed"]):
        sa, sb, comp = s["summaries"][a], s["summaries"][b], s.get("comparison") or {}
        ratio = comp.get("median_ratio")
        wider = comp.get("wider", {})
        lines.append(f"| {seed} | {_stat(sa, 'mean')} | {_stat(sa, 'median')} | {_stat(sb, 'mean')} | "
                     f"{_stat(sb, 'median')} | {wider.get(b, '?')}/{comp.get('n', '?')} | "
                     f"{'?' if ratio is None else (ratio if isinstance(ratio, str) else format(ratio, '.3g'))} | "
                     f"{_p((comp.get('wilcoxon') or {}).get('pvalue'))} |")
    pooled = w["pooled"]
    lines += ["", f"Pooled over {len(seeds)} seeds ({pooled['comparison']['n']} directions; rays censored at the "
                  f"smallest max distance, {w['max_distance']:.4g}):", "", "```",
              format_table(pooled["summaries"], pooled["comparison"]), "```", ""]
    t = w["across_seeds"]
    bound = " (lower bounds: some rays never crossed)" if w["seed_means_lower_bound"] else ""
    lines.append(f"Across seeds (per-seed mean widths{bound}: {a} "
                 + ", ".join(f"{v:.4g}" for v in w["seed_means"][a]) + f"; {b} "
                 + ", ".join(f"{v:.4g}" for v in w["seed_means"][b])
                 + f"): mean difference {b} − {a} {_num(t['mean_diff'])}, {_t_text(t)}, "
                   f"Wilcoxon p = {_p(t['wilcoxon_pvalue'])}"
                 + (f" (cannot go below {t['wilcoxon_min_pvalue']:.3g} with {t['n']} seeds)"
                    if t["wilcoxon_min_pvalue"] else "") + ".")
    return lines + [""]


def _stat(summary: dict, key: str) -> str:
    v = summary.get(key)
    if v is None:
        return "?"
    return ("> " if (summary.get("lower_bound") or {}).get(key) else "") + f"{v:.4g}"


def _acc(v) -> str:
    return "n/a" if v is None or math.isnan(v) else f"{v:.2f}"


def _t_text(t: dict) -> str:
    if t["t_pvalue"] is not None:
        return f"paired t-test p = {t['t_pvalue']:.3g}"
    return "no t-test: " + "; ".join(t["notes"]) if t["notes"] else "no t-test"


def _signed(v) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:+.4g}"


def _family_seed_lines(fam: dict) -> list[str]:
    """The multi-seed SWA-vs-FGE table with the paired tests (Markdown)."""
    lines = [f"## SWA vs FGE at the same budget, mean ± std over {fam['n_seeds']} seeds", "",
             "FGE = the ensemble of the snapshots SWA averages (their averaged softmax), at each budget the snapshots "
             "that budget's average holds; SWA = one model at the average of the same weights. Forward passes per "
             "prediction: SWA 1, FGE one per snapshot.", "",
             "| budget | SGD acc | SWA acc | FGE acc | SGD NLL | SWA NLL | FGE NLL | FGE passes |",
             "|---|---|---|---|---|---|---|---|"]
    for b, row in fam["budgets"].items():
        lines.append(f"| {b:g} | {_pm(fam['sgd']['acc'])} | {_pm(row['swa']['acc'])} | {_pm(row['fge']['acc'])} | "
                     f"{_pm(fam['sgd']['nll'], 4)} | {_pm(row['swa']['nll'], 4)} | {_pm(row['fge']['nll'], 4)} | "
                     f"{_pm(row['fge']['passes'], 1)} |")
    lines += [""]
    for b, row in fam["budgets"].items():
        acc, nll = row["tests"]["acc"], row["tests"]["nll"]
        lines.append(f"- at {b:g} budget{'' if b == 1 else 's'}: FGE − SWA test accuracy {_signed(acc['mean_diff'])} "
                     f"points ({_t_text(acc)}, Wilcoxon p = {_p(acc['wilcoxon_pvalue'])}); FGE − SWA NLL "
                     f"{_num(nll['mean_diff'])} nats ({_t_text(nll)}, Wilcoxon p = {_p(nll['wilcoxon_pvalue'])})")
    return lines + [""]


def _curve_lines(res, rel) -> list[str]:
    """The curve between two seeds' SGD solutions: barriers of both paths, figures (Markdown)."""
    info, b = res.info, res.barriers()
    lines = [f"## A curve between {info['endpoints'][0]} and {info['endpoints'][1]}", "",
             f"A {info['label']} trained for {info['training']['epochs']} epochs (lr {info['training']['lr']:.4g}, "
             f"endpoints fixed, t ~ U(0, 1) per batch; Garipov et al. 2018), evaluated with the straight line at "
             f"{len(res.data['axes']['t'])} values of t, BN statistics recomputed at every point. Barrier = the "
             "largest value along the path minus the mean of its two endpoints.", "",
             "| path | train loss barrier (nats) | train loss + L2 barrier | test error barrier (points) | "
             "largest test error (%) |", "|---|---|---|---|---|"]
    for p, name in (("line", "straight line"), ("curve", info["label"])):
        m = res.models[p]["metrics"]
        l2 = b[p].get("train_loss_l2")
        lines.append(f"| {name} | {b[p]['train_loss']:.4f} | {'n/a' if l2 is None else format(l2, '.4f')} | "
                     f"{b[p]['test_err']:.2f} | {np.nanmax(m['test_err']):.2f} |")
    pngs = [f for f in getattr(res, "figures", None) or [] if str(f).endswith(".png")]
    return lines + [""] + [f"![curve]({rel(f)})" for f in pngs] + [""]


def write_seed_report(path: Path, run: str, cfg, agg: dict, paper: dict | None, seed_reports: dict,
                      timings: dict, total: float, names: tuple[str, str] = ("SGD", "SWA"),
                      figures: dict | None = None, curve=None) -> Path:
    """The pipeline's multi-seed Markdown page: the paper's table (measured, and published with a paper recipe),
    accuracies per seed with the paired test across seeds, widths per seed, pooled and across seeds, links to
    every seed's own report, timings. ``aggregate.json`` beside it holds every number."""
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    seeds = agg["seeds"]
    lines = [f"# widthkit report: {run} (seeds {', '.join(map(str, seeds))})", "",
             f"{cfg.model} on {cfg.dataset}; budget {cfg.epochs} epochs, lr {cfg.lr}, weight decay {cfg.weight_decay}; "
             f"a shared SGD prefix to epoch {cfg.swa_start_epoch}, then an SGD branch to epoch {cfg.epochs} and an "
             f"SWA branch ({cfg.swa_schedule} learning rate {cfg.swa_lr}) to epoch {cfg.swa_end_epoch}.", "",
             f"## Test accuracy (%), mean ± std over {len(seeds)} seeds", ""]
    lines += seed_table(agg, f"{cfg.model} ({cfg.epochs})", paper)
    lines += ["", "As the trainer measured them: eval mode on the test set; each SWA average with its BatchNorm "
                  "statistics recomputed on the training set. Std is the sample standard deviation (n − 1)."]
    if paper:
        lines += ["", f"Published: {paper['source']}."]
    budgets = agg["budgets"]
    lines += ["", "| seed | SGD | " + " | ".join(_budget_label(b) for b in budgets) + " |",
              "|---|---|" + "---|" * len(budgets)]
    for s in agg["per_seed"]:
        cells = [_acc(s["sgd"])] + [_acc(s["swa"].get(b)) for b in budgets]
        lines.append(f"| {s['seed']} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired across seeds, {names[1]} − {names[0]} test accuracy (points): " + "; ".join(
        f"at {b:g} budget{'' if b == 1 else 's'} {_signed(t['mean_diff'])} ({_t_text(t)})"
        for b, t in agg["accuracy_tests"].items()) + ".", ""]
    if agg.get("family"):
        lines += _family_seed_lines(agg["family"])
    if curve is not None:
        lines += _curve_lines(curve, rel)
    elif len(seeds) < 2:
        lines += ["(The curve between two SGD solutions needs two seeds: --seeds 0,1.)", ""]
    if agg["widths"]:
        lines += ["## Widths along random rays", "",
                  "Each seed's rays use their own random directions; pooled, every seed's directions count once.", ""]
        for w in agg["widths"]:
            lines += _width_lines(w, seeds, names)
    for title, pngs in (figures or {}).items():  # e.g. the first seed's iterate planes and Hessian density
        pngs = [f for f in pngs if str(f).endswith(".png")]
        if pngs:
            lines += [f"## {title}", ""] + [f"![{Path(f).stem}]({rel(f)})" for f in pngs] + [""]
    lines += ["## Each seed", ""] + [f"- seed {s}: [{rel(p)}]({rel(p)})" for s, p in seed_reports.items()]
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s.", ""]
    extra = {"curve": {"file": str(curve.path), "barriers": curve.barriers(), "info": curve.info}} if curve else {}
    write_json(path.with_name("aggregate.json"), {"run": run, "config": cfg.resolved(), "paper": paper, **agg,
                                                  **extra})
    return atomic_write(path, "\n".join(lines))
