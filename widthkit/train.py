"""Train SGD and SWA checkpoints: ``python -m widthkit.train --recipe digits --out checkpoints/digits``.

A recipe (bundled name or TOML file) gives the base config, ``--config FILE`` layers a TOML file over it and
one flag per :class:`widthkit.trainer.TrainConfig` field layers on top (``--lr 0.1 --epochs 4``). Running the
same command again continues an interrupted run. See :mod:`widthkit.trainer` for the protocol.

Examples::

    python -m widthkit.train --recipe digits --out checkpoints/digits
    python -m widthkit.train --recipe preresnet164-cifar100 --out checkpoints/prn164 --data-root ~/data --precision bf16
    python -m widthkit.train --recipe imagenet-resnet50 --data imagefolder:/data/imagenet \
        --init resnet50-weights.pth --out checkpoints/imagenet-swa          # SWA from pretrained weights
    python -m widthkit.train --recipe digits --mode fge --out checkpoints/digits-fge   # FGE + SWA of its snapshots
    python -m widthkit.train --list-recipes
"""

from __future__ import annotations

import argparse
import sys

from . import cli
from .training.trainer import MODES, TrainConfig, layered_config, list_recipes, train, train_branches


# the evaluator's speed levers: the trainer has no use for them (no flags in this command)
TRAIN_RUNTIME_SKIP = ("points_in_flight", "channels_last", "cuda_graphs", "compile")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m widthkit.train",
        description="Train SGD and SWA checkpoints with the schedule of Izmailov et al. (2018).",
    )
    parser.add_argument("--recipe", default="digits",
                        help=f"bundled recipe ({', '.join(list_recipes())}) or a TOML file (default: digits)")
    parser.add_argument("--config", metavar="FILE", help="TOML file whose keys override the recipe")
    parser.add_argument("--out", help="output folder (default: checkpoints/<recipe>)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="branches (default): SGD and SWA from one shared prefix; sgd or swa: a single run "
                             "(swa is the default with --init); fge: FGE snapshots (fge_XXX.pt, the ensemble) and "
                             "SWA of the same snapshots (swa.pt) in one run (cycle: --fge-c, rates: --fge-lr-max "
                             "--fge-lr)")
    parser.add_argument("--overwrite", action="store_true", help="delete this trainer's files in --out first")
    cli.add_quiet_flag(parser)
    parser.add_argument("--list-recipes", action="store_true", help="print the bundled recipes and exit")
    cli.add_config_flags(parser.add_argument_group(
        "training config", "one flag per TrainConfig field; an unset flag keeps the recipe's (or --config's) value"),
        TrainConfig, layered=True)
    cli.add_runtime_flags(parser, skip=TRAIN_RUNTIME_SKIP)
    return parser


def _default_out(recipe: str) -> str:
    stem = recipe.replace("\\", "/").rsplit("/", 1)[-1]
    return f"checkpoints/{stem[:-5] if stem.endswith('.toml') else stem}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0

    def body() -> int:
        cfg = layered_config(args.recipe, args.config, cli.config_values(args, TrainConfig, layered=True))
        runtime = cli.runtime_config(args, skip=TRAIN_RUNTIME_SKIP)
        out = args.out or _default_out(args.recipe)
        mode = args.mode or ("swa" if cfg.init else "branches")
        if mode == "branches":
            paths = train_branches(cfg, out, runtime=runtime, overwrite=args.overwrite, progress=not args.quiet)
        else:
            paths = train(cfg, out, mode, runtime=runtime, overwrite=args.overwrite, progress=not args.quiet)
        for role in ("start", "sgd", "swa"):
            if role in paths:
                print(f"{role:>8}: {paths[role]}")
        for budget, path in sorted(paths["budgets"].items()):
            print(f"{'SWA ' + format(budget, 'g') + 'B':>8}: {path}")
        for key, what in (("iterates", "snapshots" if mode == "fge" else "iterates"), ("sgd_iterates", "SGD its")):
            if paths[key]:
                print(f"{what:>8}: {len(paths[key])} files, {paths[key][0]} ... {paths[key][-1]}")
        print(f"     log: {paths['log']}")
        return 0

    return cli.run(body, saved="every finished epoch is saved in the output folder")


if __name__ == "__main__":
    sys.exit(main())
