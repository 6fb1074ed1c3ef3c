"""Train SGD and SWA from scratch, then analyse and draw them: one command from nothing to a report.

    python -m widthkit.pipeline                      # the bundled digits recipe, a few minutes on 2 CPU cores
    python -m widthkit.pipeline --recipe preresnet164-cifar100 --data-root ~/data --device cuda

Stages (each skipped when already finished, resumed when interrupted):

1. train the paper's protocol (:func:`widthkit.training.trainer.train_branches`): a shared SGD prefix saved as
   ``start``, then an SGD branch and an SWA branch -> ``checkpoints/<run>/{start,sgd,swa}.pt``;
2. rays from SGD and SWA along the same random unit directions, with widths -> ``analyses/<run>/rays.h5``;
3. the line through SWA and SGD -> ``analyses/<run>/line.h5``;
4. the plane through start, SGD and SWA -> ``analyses/<run>/plane.h5``;
5. a one-page Markdown report -> ``analyses/<run>/report.md``; figures of every stage in ``figures/<run>/``.

The analysis flags are those of ``rays`` (same names, same defaults), ``--line-*`` those of ``line`` and
``--plane-*`` those of ``plane``. Data, device, precision, seed and weight decay are the training config's.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from . import cli
from .analyses import LineConfig, PlaneConfig, RaysConfig, WidthConfig, line, plane, rays
from .engine.config import EvalConfig
from .fileio import check_writable
from .report.summary import FigureOptions, finish_figures, finish_rays, write_report
from .training.trainer import TrainConfig, layered_config, list_recipes, train_branches

STAGES = ("train", "rays", "line", "plane")
# evaluation settings the training config already holds: the pipeline evaluates what it trained
FROM_TRAINING = {"dataset": "dataset", "data_root": "data_root", "device": "device", "amp": "amp", "seed": "seed",
                 "weight_decay": "weight_decay"}
PLANE_THROUGH_CHECKPOINTS = ("random", "span", "norm", "exclude")  # the pipeline's plane is start/SGD/SWA


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
    cli.add_figure_flags(p)
    cli.add_config_flags(p.add_argument_group(
        "training config", "one flag per TrainConfig field; an unset flag keeps the recipe's value"),
        TrainConfig, layered=True)
    cli.add_config_flags(p.add_argument_group("rays"), RaysConfig, skip=("two_sided",))
    cli.add_config_flags(p.add_argument_group("widths"), WidthConfig)
    cli.add_config_flags(p.add_argument_group("line"), LineConfig, prefix="line_")
    cli.add_config_flags(p.add_argument_group("plane"), PlaneConfig, prefix="plane_", skip=PLANE_THROUGH_CHECKPOINTS)
    cli.add_config_flags(p.add_argument_group("evaluation"), EvalConfig, skip=tuple(FROM_TRAINING))
    return p


def eval_config(args, train_cfg: TrainConfig) -> EvalConfig:
    """The evaluation config of every analysis stage: the evaluation flags, and the training config's data,
    device, precision, seed and weight decay."""
    return EvalConfig(**cli.config_values(args, EvalConfig, skip=tuple(FROM_TRAINING)),
                      **{e: getattr(train_cfg, t) for e, t in FROM_TRAINING.items()})


def _run_name(args, seed: int) -> str:
    if args.run:
        return args.run
    stem = Path(args.recipe).name
    stem = stem[:-5] if stem.endswith(".toml") else stem
    return stem if seed == 0 else f"{stem}-seed{seed}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        t0 = time.perf_counter()
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        bad = sorted(skip - set(STAGES[1:]))
        if bad:
            raise ValueError(f"unknown stage(s) {bad} in --skip; valid: {', '.join(STAGES[1:])}")
        cfg = layered_config(args.recipe, args.config, cli.config_values(args, TrainConfig, layered=True))
        config = eval_config(args, cfg)
        geometry = {"rays": RaysConfig(**cli.config_values(args, RaysConfig, skip=("two_sided",))),
                    "line": LineConfig(**cli.config_values(args, LineConfig, prefix="line_")),
                    "plane": PlaneConfig(**cli.config_values(args, PlaneConfig, prefix="plane_",
                                                             skip=PLANE_THROUGH_CHECKPOINTS))}
        widths = WidthConfig(**cli.config_values(args, WidthConfig))
        run = _run_name(args, cfg.seed)
        root = check_writable(args.root)
        ck_dir, an_dir, fig_dir = root / "checkpoints" / run, root / "analyses" / run, root / "figures" / run
        figures = FigureOptions(fig_dir, cli.formats_of(args))
        timings, results = {}, {}

        print(f"[1/5] training {cfg.model} on {cfg.dataset}: prefix {cfg.swa_start_epoch} epochs, SGD to "
              f"{cfg.epochs}, SWA to {cfg.swa_end_epoch} -> {ck_dir}", flush=True)
        timer = cli.Timer()
        paths = train_branches(cfg, ck_dir, overwrite=args.overwrite, progress=args.progress)
        timings["train"] = timer.seconds
        stages = [
            ("rays", rays, {"SGD": paths["sgd"], "SWA": paths["swa"]},
             finish_rays(widths, figures, print, reuse=not args.overwrite)),
            ("line", line, {"SWA": paths["swa"], "SGD": paths["sgd"]}, finish_figures(figures, print)),
            ("plane", plane, {"start": paths["start"], "SGD": paths["sgd"], "SWA": paths["swa"]},
             finish_figures(figures, print)),
        ]
        for i, (name, analysis, models, after) in enumerate(stages, start=2):
            if name in skip:
                continue
            print(f"[{i}/5] {name}", flush=True)
            progress, close = cli.progress_bar(args.progress, name)
            timer = cli.Timer()
            try:
                results[name] = analysis(models, config=config, out=an_dir / f"{name}.h5", overwrite=args.overwrite,
                                         progress=progress, after=after, **dataclasses.asdict(geometry[name]))
            finally:
                close()
            timings[name] = timer.seconds

        print("[5/5] report", flush=True)
        report = write_report(an_dir / "report.md", run, cfg, paths, results, timings, time.perf_counter() - t0)
        print(f"\ncheckpoints: {ck_dir}\nanalyses:    {an_dir}\nfigures:     {fig_dir}\nreport:      {report}")
        print(f"total time {time.perf_counter() - t0:.0f} s")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    raise SystemExit(main())
