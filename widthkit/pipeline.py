"""Train SGD and SWA from scratch, then analyse and draw them: one command from nothing to a report.

    python -m widthkit.pipeline                      # the bundled digits recipe, a few minutes on 2 CPU cores
    python -m widthkit.pipeline --seeds 0,1,2        # three seeds and the paper's table over them
    python -m widthkit.pipeline --recipe preresnet164-cifar100 --data-root ~/data --device cuda

Stages (each skipped when already finished, resumed when interrupted):

1. train the paper's protocol (:func:`widthkit.training.trainer.train_branches`): a shared SGD prefix saved as
   ``start``, then an SGD branch and an SWA branch -> ``checkpoints/<run>/{start,sgd,swa}.pt``, the average at
   each budget (``swa_budget<B>.pt``) and the SGD iterates of both branches (``save_iterates`` is on unless
   ``--no-save-iterates``);
2. rays from SGD and SWA along the same random unit directions, with widths -> ``analyses/<run>/rays.h5``;
3. the line through SWA and SGD -> ``analyses/<run>/line.h5``;
4. the plane through start, SGD and SWA -> ``analyses/<run>/plane.h5``;
5. the paper's Figure 1: the plane through the first, middle and last SWA-phase iterates, SWA and SGD marked at
   their projections -> ``analyses/<run>/iterates.h5``;
6. the plane of the SWA-phase iterates' top two principal directions, their trajectory drawn over it, SWA and
   SGD marked (Li et al. 2018) -> ``analyses/<run>/trajectory.h5``;
7. SWA vs FGE: the ensemble of the SWA phase's snapshots (the iterates SWA averages; their averaged softmax, as
   Fast Geometric Ensembling predicts) beside SWA at each budget and SGD: test accuracy, NLL and forward passes
   per prediction -> ``analyses/<run>/ensemble.h5``;
8. the Hessian of the training loss at SGD and SWA: top eigenvalues, λ_min, trace, spectral density
   (``--curvature-*``; the pipeline's defaults are a quick look: 512 examples, 30 products for the trace, 4
   density probes; ``python -m widthkit.curvature`` for the full measurement) -> ``analyses/<run>/curvature.h5``;
9. a one-page Markdown report -> ``analyses/<run>/report.md``; figures of every stage in ``figures/<run>/``.

With ``--seeds 0,1,2`` every seed runs these stages in its own sub-folder (``<run>/seed0``, ...; the run name
defaults to ``<recipe>-seeds``), and ``analyses/<run>/report.md`` (+ ``aggregate.json``) summarises them: the
paper's Table 1 layout (SGD and SWA at each budget, mean ± std over seeds; with a paper recipe the published
numbers beneath), widths per seed and pooled, SWA vs FGE at each budget, and paired tests across seeds and across
directions; with two or more seeds, a curve is trained between the first two seeds' SGD solutions (Garipov et al.
2018, ``--curve-*``) and its loss barrier reported beside the straight line's -> ``analyses/<run>/curve.h5``.

The analysis flags are those of ``rays`` (same names, same defaults), ``--line-*`` those of ``line`` and
``--plane-*`` those of ``plane``. Data, seed and weight decay are the training config's; the runtime flags
(``--device``, ``--precision``, ``--threads``, ``--eval-batch-size``, the levers) make one
:class:`~widthkit.runtime.RuntimeConfig` that the trainer and every analysis run under (``--threads`` unset:
timed by the trainer and by every analysis).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

from . import cli
from .analyses import LineConfig, PlaneConfig, RaysConfig, WidthConfig, line, plane, rays
from .analyses.curve import CurveConfig, curve
from .analyses.ensemble import ensemble
from .analyses.hessian import curvature
from .engine.config import EvalConfig
from .engine.curvature import CurvatureConfig, LossConfig
from .fileio import check_writable
from .inputs.checkpoints import load_checkpoint
from .runtime import RuntimeConfig
from .report.summary import FigureOptions, aggregate_seeds, family_numbers, finish_curve, finish_ensemble, \
    finish_figures, finish_rays, seed_table, write_report, write_seed_report
from .report.spectrum import write_spectrum_figure
from .training.trainer import TrainConfig, layered_config, list_recipes, read_log, recipe_info, train_branches

STAGES = ("train", "rays", "line", "plane", "iterates", "trajectory", "ensemble", "curvature", "curve")
# evaluation settings the training config already holds (the same names in both): the pipeline evaluates the
# data it trained on, with its seed and weight decay
FROM_TRAINING = tuple(sorted(set(EvalConfig.__dataclass_fields__) & set(TrainConfig.__dataclass_fields__)))
# the pipeline's planes are start/SGD/SWA and its iterate planes: what places them is not a flag here
PLANE_THROUGH_CHECKPOINTS = ("random", "span", "norm", "exclude", "mark", "pca", "pca_center", "trajectory")
# a quick look at the Hessian in the pipeline (the curvature command's own defaults measure more)
# 4 density probes: with 2 the effective dimension's standard error reached 21 % on the digits checkpoints
# (4: ≤ 10.5 %, about 12 s more per model)
PIPELINE_CURVATURE = {"top_k": 2, "trace_hvps": 30, "slq_probes": 4, "slq_steps": 40, "loss_subset": 512}
# what the pipeline sets unless the recipe's --config file or a flag says otherwise: the SGD iterates of both
# branches are kept for the analyses through iterates (planes through them, trajectories)
PIPELINE_DEFAULTS = {"save_iterates": True}
LABELS = ("SGD", "SWA")
SEED_MAX = 2**63 - 1  # the largest seed every generator and file format involved takes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m widthkit.pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="digits", help=f"bundled recipe ({', '.join(list_recipes())}) or a TOML file")
    p.add_argument("--config", metavar="FILE", help="TOML file whose keys override the recipe")
    p.add_argument("--run", help="run name: folders checkpoints/<run>, analyses/<run>, figures/<run> "
                                 "(default: the recipe name, plus -seedN for a non-zero --seed, or -seeds with --seeds)")
    p.add_argument("--seeds", metavar="S,S,...",
                   help="comma-separated seeds (e.g. 0,1,2): train and analyse each in <run>/seedS, then summarise "
                        "them (the paper's table, mean ± std; widths pooled; paired tests across seeds)")
    p.add_argument("--root", default=".", help="folder holding checkpoints/, analyses/, figures/ (default: .)")
    p.add_argument("--skip", default="", help=f"comma-separated stages to skip: {', '.join(STAGES[1:])}")
    p.add_argument("--overwrite", action="store_true", help="recompute every stage from scratch")
    cli.add_quiet_flag(p)
    cli.add_figure_flags(p)
    cli.add_config_flags(p.add_argument_group(
        "training config", "one flag per TrainConfig field; an unset flag keeps the recipe's value"),
        TrainConfig, layered=True)
    cli.add_config_flags(p.add_argument_group("rays"), RaysConfig, skip=("two_sided",))
    cli.add_config_flags(p.add_argument_group("widths"), WidthConfig)
    cli.add_config_flags(p.add_argument_group("line"), LineConfig, prefix="line_")
    cli.add_config_flags(p.add_argument_group("plane"), PlaneConfig, prefix="plane_", skip=PLANE_THROUGH_CHECKPOINTS)
    shown = ", ".join(f"{k} {v}" for k, v in PIPELINE_CURVATURE.items())
    group = p.add_argument_group("curvature", f"the Hessian stage (pipeline defaults: {shown}; else the field's)")
    cli.add_config_flags(group, CurvatureConfig, prefix="curvature_", layered=True)
    cli.add_config_flags(group, LossConfig, prefix="curvature_", layered=True)
    cli.add_config_flags(p.add_argument_group(
        "curve", "with --seeds: the curve between the first two seeds' SGD solutions (Garipov et al. 2018)"),
        CurveConfig, prefix="curve_")
    cli.add_config_flags(p.add_argument_group("evaluation"), EvalConfig, skip=FROM_TRAINING)
    cli.add_runtime_flags(p)
    return p


def curvature_settings(args) -> dict:
    """The curvature stage's keywords: the pipeline's quick-look defaults, then the --curvature-* flags given."""
    values = dict(PIPELINE_CURVATURE)
    for cls in (CurvatureConfig, LossConfig):
        values.update(cli.config_values(args, cls, prefix="curvature_", layered=True))
    CurvatureConfig(**{k: v for k, v in values.items() if k != "loss_subset" and k != "l2"})  # checked up front
    LossConfig(**{k: v for k, v in values.items() if k in ("loss_subset", "l2")})
    return values


def eval_config(args, train_cfg: TrainConfig) -> EvalConfig:
    """The evaluation config of every analysis stage: the evaluation flags, and the training config's data,
    seed and weight decay."""
    return EvalConfig(**cli.config_values(args, EvalConfig, skip=FROM_TRAINING),
                      **{name: getattr(train_cfg, name) for name in FROM_TRAINING})


def parse_seeds(text: str | None) -> list[int] | None:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (None stays None); ``ValueError`` for anything but distinct integers >= 0."""
    if text is None:
        return None
    parts = [t.strip() for t in text.split(",") if t.strip()]
    try:
        seeds = [int(t) for t in parts]
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers such as 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct integers >= 0 such as 0,1,2, got {text!r}")
    if max(seeds) > SEED_MAX:  # torch's generators take 64 bits: refused here, before any folder exists
        raise ValueError(f"--seeds: {max(seeds)} is too large; seeds run from 0 to {SEED_MAX} (2**63 - 1)")
    return seeds


def check_run_name(run: str) -> str:
    """``--run`` names folders under ``<root>/checkpoints``, ``analyses`` and ``figures``: it may hold
    sub-folders, but never climb out of them (``..``, an absolute path)."""
    parts = Path(run).parts
    if not run.strip() or Path(run).is_absolute() or ".." in parts or "\x00" in run:
        raise ValueError(f"--run {run!r} would place the run outside the checkpoints/, analyses/ and figures/ of "
                         "--root; give a name such as digits-lr0.1 (sub-folders like ablation/lr0.1 are fine), and "
                         "--root to choose where they go")
    return run


def _stem(recipe: str) -> str:
    stem = Path(recipe).name
    return stem[:-5] if stem.endswith(".toml") else stem


def _run_name(args, seed: int) -> str:
    if args.run:
        return check_run_name(args.run)
    stem = _stem(args.recipe)
    return stem if seed == 0 else f"{stem}-seed{seed}"


@dataclasses.dataclass
class _Settings:
    """Everything a stage needs besides the training config (built and validated once, before any work)."""

    args: argparse.Namespace
    skip: set
    geometry: dict
    widths: WidthConfig
    formats: tuple
    curvature: dict
    runtime: RuntimeConfig  # the trainer's and every analysis's
    curve: CurveConfig


def run_one(cfg: TrainConfig, ck_dir: Path, an_dir: Path, fig_dir: Path, s: _Settings, name: str,
            title: str = "") -> dict:
    """Train one seed and analyse it: the stages of the module docstring (``name`` heads its report, ``title``
    its progress lines). Returns ``{"paths", "results", "timings", "report"}``."""
    args = s.args
    config = eval_config(args, cfg)
    figures = FigureOptions(fig_dir, s.formats)
    timings, results = {}, {"skipped": sorted(s.skip)}
    t0 = time.perf_counter()
    print(f"[1/{9 if cfg.save_iterates else 7}] {title}training {cfg.model} on {cfg.dataset}: prefix {cfg.swa_start_epoch} epochs, SGD to "
          f"{cfg.epochs}, SWA to {cfg.swa_end_epoch} -> {ck_dir}", flush=True)
    timer = cli.Timer()
    paths = train_branches(cfg, ck_dir, runtime=s.runtime, overwrite=args.overwrite, progress=not args.quiet)
    timings["train"] = timer.seconds
    plane_geometry = dataclasses.asdict(s.geometry["plane"])
    iterates = paths.get("iterates") or []
    marks = {"SWA": paths["swa"], "SGD": paths["sgd"]}
    stages = [
        ("rays", rays, {"SGD": paths["sgd"], "SWA": paths["swa"]}, dataclasses.asdict(s.geometry["rays"]),
         finish_rays(s.widths, figures, print, reuse=not args.overwrite)),
        ("line", line, {"SWA": paths["swa"], "SGD": paths["sgd"]}, dataclasses.asdict(s.geometry["line"]),
         finish_figures(figures, print)),
        ("plane", plane, {"start": paths["start"], "SGD": paths["sgd"], "SWA": paths["swa"]}, plane_geometry,
         finish_figures(figures, print)),
    ]
    if len(iterates) >= 3:
        picked = [iterates[0], iterates[len(iterates) // 2], iterates[-1]]
        stages += [
            ("iterates", plane, picked, {**plane_geometry, "mark": marks}, finish_figures(figures, print)),
            ("trajectory", plane, marks, {**plane_geometry, "pca": list(iterates), "trajectory": list(iterates)},
             finish_figures(figures, print)),
        ]
    elif not {"iterates", "trajectory"} <= s.skip:
        print(f"(the iterate planes need 3 SWA-phase iterates; this run kept {len(iterates)}: skipped)", flush=True)
    n_stages = 2 + len(stages) + 2
    for i, (stage, analysis, models, geometry, after) in enumerate(stages, start=2):
        if stage in s.skip:
            continue
        print(f"[{i}/{n_stages}] {title}{stage}", flush=True)
        progress, close = cli.progress_bar(not args.quiet, stage)
        timer = cli.Timer()
        try:
            results[stage] = analysis(models, config=config, runtime=s.runtime, out=an_dir / f"{stage}.h5",
                                      overwrite=args.overwrite, progress=progress, after=after, **geometry)
        finally:
            close()
        timings[stage] = timer.seconds
    if "ensemble" not in s.skip:
        print(f"[{n_stages - 2}/{n_stages}] {title}SWA vs FGE: the ensemble of the SWA phase's snapshots", flush=True)
        if len(iterates) >= 2:
            progress, close = cli.progress_bar(not args.quiet, "ensemble")
            timer = cli.Timer()
            try:
                results["ensemble"] = ensemble(iterates, config=config, runtime=s.runtime, compare=_single_models(paths),
                                               out=an_dir / "ensemble.h5", overwrite=args.overwrite, progress=progress,
                                               after=finish_ensemble(figures, print))
            finally:
                close()
            results["fge_budgets"] = _snapshots_by_budget(paths)
            timings["ensemble"] = timer.seconds
        else:
            print(f"(an ensemble needs 2 SWA-phase snapshots; this run kept {len(iterates)}: skipped)", flush=True)
    if "curvature" not in s.skip:
        print(f"[{n_stages - 1}/{n_stages}] {title}curvature", flush=True)
        progress, close = cli.progress_bar(not args.quiet, "curvature")
        timer = cli.Timer()
        try:
            # the Hessian of the training loss itself: float32 weights, float64 sums, every training example
            # (and none of the evaluator's speed levers: the same device, threads and batch size)
            curv_config = config.replace(train_subset=None, test_subset=None)
            curv_runtime = RuntimeConfig(device=s.runtime.device, threads=s.runtime.threads,
                                         eval_batch_size=s.runtime.eval_batch_size)
            curvature(marks, config=curv_config, runtime=curv_runtime, out=an_dir / "curvature.h5",
                      overwrite=args.overwrite, progress=progress, **s.curvature)
        finally:
            close()
        results["curvature"] = an_dir / "curvature.h5"
        if figures.folder is not None and figures.formats:
            results["curvature_figures"] = write_spectrum_figure(an_dir / "curvature.h5", fig_dir / "curvature",
                                                                 figures.formats)
            for f in results["curvature_figures"]:
                print(f"figure: {f}")
        timings["curvature"] = timer.seconds
    print(f"[{n_stages}/{n_stages}] {title}report", flush=True)
    report = write_report(an_dir / "report.md", name, cfg, paths, results, timings, time.perf_counter() - t0)
    return {"paths": paths, "results": results, "timings": timings, "report": report}


def _single_models(paths: dict) -> dict:
    """The single models the ensemble is compared with: SGD (one budget) and SWA at each evaluated budget."""
    return {"SGD": paths["sgd"], **{f"SWA {b:g}B": p for b, p in sorted(paths["budgets"].items())}}


def _snapshots_by_budget(paths: dict) -> dict:
    """{budget: how many snapshots the SWA average at that budget holds}: the FGE ensemble of the same points."""
    return {b: int(load_checkpoint(p).meta.get("extra", {}).get("n_averaged") or 0)
            for b, p in sorted(paths["budgets"].items())}


def seed_numbers(seed: int, one: dict) -> dict:
    """One seed's input to :func:`~widthkit.report.summary.aggregate_seeds`: test accuracies (%) as the trainer
    logged them (``sgd_final``; every evaluation of the average, by budget) and the rays' width reports."""
    rows = read_log(one["paths"]["log"])
    acc = {"sgd": None, "swa": {}}
    for r in rows:
        if r["phase"] == "sgd_final":
            acc["sgd"] = 100.0 - r["test_err"]
        elif r["weights"] == "average" and not math.isnan(r["budget"]):
            acc["swa"][float(r["budget"])] = 100.0 - r["test_err"]
    rays_res = one["results"].get("rays")
    reports = list(getattr(rays_res, "reports", None) or []) if rays_res is not None else []
    ens = one["results"].get("ensemble")
    family = family_numbers(ens, one["results"]["fge_budgets"]) if ens is not None else None
    return {"seed": seed, **acc, "widths": reports, "family": family}


def run_curve(cfg: TrainConfig, seeds: list[int], ck_dir: Path, an_dir: Path, fig_dir: Path, s: _Settings):
    """The curve between two seeds' SGD solutions, beside the straight line (Garipov et al. 2018) ->
    ``analyses/<run>/curve.h5`` (+ ``curve-plane.h5``, ``curve.curve.pt``), figures in ``figures/<run>/``."""
    args = s.args
    ends = {f"SGD seed {seed}": ck_dir / f"seed{seed}" / "sgd.pt" for seed in seeds}
    print(f"[curve] a {s.curve.kind} curve ({s.curve.bends} bend{'s' if s.curve.bends > 1 else ''}) between "
          f"{' and '.join(ends)}, and the straight line", flush=True)
    progress, close = cli.progress_bar(not args.quiet, "curve")
    try:
        return curve({k: str(v) for k, v in ends.items()}, config=eval_config(args, cfg), runtime=s.runtime,
                     out=an_dir / "curve.h5", overwrite=args.overwrite, progress=progress, train_progress=not args.quiet,
                     after=finish_curve(FigureOptions(fig_dir, s.formats), print), **dataclasses.asdict(s.curve))
    finally:
        close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        t0 = time.perf_counter()
        skip = {x.strip() for x in args.skip.split(",") if x.strip()}
        bad = sorted(skip - set(STAGES[1:]))
        if bad:
            raise ValueError(f"unknown stage(s) {bad} in --skip; valid: {', '.join(STAGES[1:])}")
        seeds = parse_seeds(args.seeds)
        if args.run is not None:
            check_run_name(args.run)
        overrides = cli.config_values(args, TrainConfig, layered=True)
        if seeds is not None and "seed" in overrides:
            raise ValueError("pass either --seed (one run) or --seeds (several), not both")
        cfg = layered_config(args.recipe, args.config, overrides, defaults=PIPELINE_DEFAULTS)
        if cfg.init:
            raise ValueError("the pipeline trains SGD and SWA from scratch; for SWA from given weights run "
                             "python -m widthkit.train --init FILE, then rays/line on its start.pt and swa.pt")
        settings = _Settings(
            args=args, skip=skip,
            geometry={"rays": RaysConfig(**cli.config_values(args, RaysConfig, skip=("two_sided",))),
                      "line": LineConfig(**cli.config_values(args, LineConfig, prefix="line_")),
                      "plane": PlaneConfig(**cli.config_values(args, PlaneConfig, prefix="plane_",
                                                               skip=PLANE_THROUGH_CHECKPOINTS))},
            widths=WidthConfig(**cli.config_values(args, WidthConfig)), formats=cli.formats_of(args),
            curvature=curvature_settings(args), runtime=cli.runtime_config(args),
            curve=CurveConfig(**cli.config_values(args, CurveConfig, prefix="curve_")))
        eval_config(args, cfg)  # every evaluation flag checked before training
        FigureOptions(None, settings.formats)  # and the figure formats
        root = check_writable(args.root)
        if seeds is None:
            run = _run_name(args, cfg.seed)
            dirs = [root / kind / run for kind in ("checkpoints", "analyses", "figures")]
            one = run_one(cfg, *dirs, settings, run)
            print(f"\ncheckpoints: {dirs[0]}\nanalyses:    {dirs[1]}\nfigures:     {dirs[2]}\nreport:      {one['report']}")
            print(f"total time {time.perf_counter() - t0:.0f} s")
            return 0

        run = args.run or f"{_stem(args.recipe)}-seeds"
        numbers, reports, timings, figures = [], {}, {}, {}
        for i, seed in enumerate(seeds):
            dirs = [root / kind / run / f"seed{seed}" for kind in ("checkpoints", "analyses", "figures")]
            timer = cli.Timer()
            one = run_one(cfg.replace(seed=seed), *dirs, settings, f"{run}/seed{seed}",
                          f"seed {seed} ({i + 1}/{len(seeds)}): ")
            timings[f"seed {seed}"] = timer.seconds
            numbers.append(seed_numbers(seed, one))
            reports[seed] = one["report"]
            if i == 0:  # the first seed's pictures on the aggregate page (every seed's are in its own report)
                res = one["results"]
                figures = {f"{title} (seed {seed})": list(getattr(res.get(key), "figures", None) or [])
                           for key, title in (("iterates", "Plane through three SWA-phase iterates, SWA and SGD "
                                                           "marked (the paper's Figure 1)"),
                                              ("trajectory", "The SWA-phase iterates' principal plane and trajectory"),
                                              ("ensemble", "SWA vs FGE: error and NLL as snapshots join the ensemble"))}
                figures[f"Hessian spectral density (seed {seed})"] = list(res.get("curvature_figures") or [])
        agg = aggregate_seeds(numbers, LABELS)
        paper = recipe_info(args.recipe).paper
        an_dir = root / "analyses" / run
        curve_res = None
        if len(seeds) >= 2 and "curve" not in skip:
            timer = cli.Timer()
            curve_res = run_curve(cfg, seeds[:2], root / "checkpoints" / run, an_dir, root / "figures" / run,
                                  settings)
            timings["curve"] = timer.seconds
        report = write_seed_report(an_dir / "report.md", run, cfg, agg, paper, reports, timings,
                                   time.perf_counter() - t0, LABELS, figures, curve=curve_res)
        print(f"\nTest accuracy (%), mean ± std over seeds {', '.join(map(str, seeds))}:")
        print("\n".join(seed_table(agg, f"{cfg.model} ({cfg.epochs})", paper)))
        print(f"\ncheckpoints: {root / 'checkpoints' / run}\nanalyses:    {an_dir}\nfigures:     "
              f"{root / 'figures' / run}\nreport:      {report}")
        print(f"total time {time.perf_counter() - t0:.0f} s")
        return 0

    return cli.run(body, saved="every finished stage, epoch and chunk of points is saved")


if __name__ == "__main__":
    raise SystemExit(main())
