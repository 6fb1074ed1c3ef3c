"""What a finished analysis turns into besides its grid: width tables (terminal + JSON), figures, the
pipeline's one-page Markdown report. Called while the analysis file is still locked by its writer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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
    for name, title in (("rays", "Rays"), ("line", "Line through SWA and SGD"), ("plane", "Plane through start, SGD and SWA")):
        res = results.get(name)
        pngs = [f for f in getattr(res, "figures", None) or [] if str(f).endswith(".png")]
        if pngs:
            lines += [f"## {title}", ""] + [f"![{name}]({rel(f)})" for f in pngs] + [""]
    lines += ["## Files", ""] + [f"- {k}: `{rel(v)}`" for k, v in paths.items() if k in ("start", "sgd", "swa", "log")]
    lines += [f"- {name}: `{rel(res.path)}`" for name, res in results.items()]
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s.", ""]
    return atomic_write(path, "\n".join(lines))
