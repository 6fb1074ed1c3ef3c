"""Train SGD and SWA from scratch, then analyse and draw them: one command from nothing to a report.

    python -m widthkit.pipeline                      # the bundled digits recipe, a few minutes on 2 CPU cores
    python -m widthkit.pipeline --recipe preresnet164-cifar100 --data-root ~/data --device cuda

Stages (each skipped when already finished, resumed when interrupted):

1. train the paper's protocol (:func:`widthkit.trainer.train_branches`): a shared SGD prefix saved as
   ``start``, then an SGD branch and an SWA branch -> ``checkpoints/<run>/{start,sgd,swa}.pt``;
2. rays from SGD and SWA along the same random unit directions, with widths -> ``analyses/<run>/rays.h5``;
3. the line through SWA and SGD -> ``analyses/<run>/line.h5``;
4. the plane through start, SGD and SWA -> ``analyses/<run>/plane.h5``;
5. figures -> ``figures/<run>/``, and a one-page Markdown report -> ``analyses/<run>/report.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import cli
from .analysis import DataSpec, EvalSettings, line, plane, rays
from .evaluator import BN_MODES
from .train import add_config_flags, config_from_args
from .trainer import list_recipes, train_branches

STAGES = ("train", "rays", "line", "plane")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m widthkit.pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="digits", help=f"bundled recipe ({', '.join(list_recipes())}) or a TOML file")
    p.add_argument("--config", metavar="FILE", help="TOML file whose keys override the recipe")
    p.add_argument("--run", help="run name: folders checkpoints/<run>, analyses/<run>, figures/<run> "
                                 "(default: the recipe name, plus -seedN for a non-zero --seed)")
    p.add_argument("--root", default=".", help="folder holding checkpoints/, analyses/, figures/ (default: .)")
    p.add_argument("--skip", default="", help=f"comma-separated stages to skip: {', '.join(STAGES[1:])}")
    p.add_argument("--overwrite", action="store_true", help="recompute every stage from scratch")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a = p.add_argument_group("analysis")
    a.add_argument("--dirs", type=int, default=10, help="random directions for the rays (default 10, as the paper)")
    a.add_argument("--steps", type=int, default=21, help="grid points per ray (default 21)")
    a.add_argument("--max-dist", type=float, help="largest ray distance (default: ‖θ_SGD‖/2 rounded up)")
    a.add_argument("--line-steps", type=int, default=31, help="grid points on the SWA-SGD line (default 31)")
    a.add_argument("--resolution", type=int, default=15, help="plane grid points per side (default 15)")
    a.add_argument("--threshold", action="append", metavar="METRIC=LEVEL",
                   help="width thresholds (default test_err=+5 and train_loss_l2=+0.5)")
    a.add_argument("--no-refine", dest="refine", action="store_false", help="widths from the grid only (no bisection)")
    a.add_argument("--bn", choices=BN_MODES, default="recompute", help="BN statistics at each point (default recompute)")
    a.add_argument("--bn-subset", type=int, help="recompute BN from N training images (default: all)")
    a.add_argument("--train-subset", type=int, help="train metrics on N random training images (default: all)")
    a.add_argument("--eval-batch-size", type=int, help="evaluation batch size (default: 64 CPU, 4096 CUDA)")
    a.add_argument("--format", default="png,pdf", help="figure formats (default png,pdf)")
    add_config_flags(p)
    return p


def _run_name(args, seed: int) -> str:
    if args.run:
        return args.run
    stem = Path(args.recipe).name
    stem = stem[:-5] if stem.endswith(".toml") else stem
    return stem if seed == 0 else f"{stem}-seed{seed}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = sorted(skip - set(STAGES[1:]))
    if bad:
        print(f"error: unknown stage(s) {bad} in --skip; valid: {', '.join(STAGES[1:])}", file=sys.stderr)
        return 2

    def body() -> int:
        t0 = time.perf_counter()
        cfg = config_from_args(args)
        run = _run_name(args, cfg.seed)
        root = Path(args.root)
        ck_dir, an_dir, fig_dir = root / "checkpoints" / run, root / "analyses" / run, root / "figures" / run
        an_dir.mkdir(parents=True, exist_ok=True)
        fig_dir.mkdir(parents=True, exist_ok=True)
        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
        timings = {}

        print(f"[1/5] training {cfg.model} on {cfg.dataset}: prefix {cfg.swa_start_epoch} epochs, SGD to "
              f"{cfg.epochs}, SWA to {cfg.swa_end_epoch} -> {ck_dir}", flush=True)
        t = time.perf_counter()
        paths = train_branches(cfg, ck_dir, overwrite=args.overwrite, progress=args.progress)
        timings["train"] = time.perf_counter() - t
        models = {"SGD": paths["sgd"], "SWA": paths["swa"]}
        device = cfg.device if args.device is None else args.device
        settings = EvalSettings(bn=args.bn, bn_subset=args.bn_subset, batch_size=args.eval_batch_size,
                                device=device, seed=cfg.seed)
        spec = DataSpec(name=cfg.dataset, root=cfg.data_root, train_subset=args.train_subset)
        common = dict(settings=settings, data_spec=spec, overwrite=args.overwrite)
        results = {}

        def stage(i, name, fn, **kw):
            if name in skip:
                return
            progress, close = cli.progress_bar(args.progress, name)
            print(f"[{i}/5] {name}", flush=True)
            t = time.perf_counter()
            try:
                results[name] = fn(out=an_dir / f"{name}.h5", progress=progress, **common, **kw)
            finally:
                close()
            timings[name] = time.perf_counter() - t

        stage(2, "rays", rays, models=models, dirs=args.dirs, steps=args.steps, max_dist=args.max_dist)
        reports = []
        if "rays" in results:
            res = results["rays"]
            specs = args.threshold or res.default_thresholds()
            stored = res.data["attrs"].get("width_report") or []
            if not args.overwrite and [r.get("threshold") for r in stored] == specs and \
                    all(r.get("refined") == args.refine for r in stored):
                reports = stored  # finished in an earlier run
            else:
                t = time.perf_counter()
                reports = [res.widths(s, refine=args.refine) for s in specs]
                res.record_widths(reports)
                timings["widths"] = time.perf_counter() - t
            cli.report_widths(res, reports, print)
        stage(3, "line", line, models={"SWA": paths["swa"], "SGD": paths["sgd"]}, steps=args.line_steps)
        stage(4, "plane", plane, models={"start": paths["start"], "SGD": paths["sgd"], "SWA": paths["swa"]},
              resolution=(args.resolution, args.resolution))

        print("[5/5] figures and report", flush=True)
        from .plots import plot_file

        figures = {}
        for name in ("rays", "line", "plane"):
            h5 = an_dir / f"{name}.h5"
            if h5.exists():
                figures[name] = plot_file(h5, out_dir=fig_dir, formats=formats)
        report = write_report(an_dir / "report.md", run, cfg, paths, results, reports, figures, timings,
                              time.perf_counter() - t0)
        print(f"\ncheckpoints: {ck_dir}\nanalyses:    {an_dir}\nfigures:     {fig_dir}\nreport:      {report}")
        print(f"total time {time.perf_counter() - t0:.0f} s")
        return 0

    return cli.run(body)


def _accuracy(path) -> dict:
    from .checkpoints import load_checkpoint

    meta = load_checkpoint(path).meta
    m = meta.get("metrics") or {}
    final = m.get("final", m) if isinstance(m, dict) else {}
    return {k: final.get(k) for k in ("test_err", "test_loss", "train_err", "train_loss")}


def write_report(path: Path, run, cfg, paths, results, reports, figures, timings, total) -> Path:
    """A one-page Markdown summary with the figures, SGD/SWA test accuracy and the width table."""
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    lines = [f"# widthkit report: {run}", "",
             f"{cfg.model} on {cfg.dataset}; budget {cfg.epochs} epochs, lr {cfg.lr}, weight decay "
             f"{cfg.weight_decay}, SWA from epoch {cfg.swa_start_epoch} at lr {cfg.swa_lr} to epoch "
             f"{cfg.swa_end_epoch}; seed {cfg.seed}.", "", "## Test accuracy", "",
             "| model | test accuracy (%) | test loss (nats) | train loss (nats) |", "|---|---|---|---|"]
    rays_res = results.get("rays")
    for label, key in (("SGD", "sgd"), ("SWA", "swa")):
        if rays_res is not None:  # distance 0 of the rays: the checkpoint itself, evaluated by widthkit
            m = rays_res.models[key]["metrics"]
            err, tl, trl = m["test_err"][0, 0], m["test_loss"][0, 0], m["train_loss"][0, 0]
        else:
            a = _accuracy(paths[key])
            err, tl, trl = a["test_err"], a["test_loss"], a["train_loss"]
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {label} | {fmt(None if err is None else 100 - err, '.2f')} | {fmt(tl, '.4f')} | {fmt(trl, '.4f')} |")
    if reports:
        lines += ["", "## Width along random rays", "",
                  f"{rays_res.data['axes']['directions_shape'][0] if rays_res else '?'} random unit directions, the "
                  "same for SGD and SWA; width = distance at which the metric first exceeds its threshold.", ""]
        for r in reports:
            lines += ["```", r["table"], "```", ""]
    for name, title in (("rays", "Rays"), ("line", "Line through SWA and SGD"), ("plane", "Plane through start, SGD and SWA")):
        pngs = [f for f in figures.get(name, []) if str(f).endswith(".png")]
        if pngs:
            lines += [f"## {title}", ""] + [f"![{name}]({rel(f)})" for f in pngs] + [""]
    lines += ["## Files", ""] + [f"- {k}: `{rel(v)}`" for k, v in paths.items() if k in ("start", "sgd", "swa", "log")]
    lines += [f"- {name}: `{rel(path.parent / (name + '.h5'))}`" for name in results]
    lines += ["", "Timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f"; total {total:.0f} s.", ""]
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
