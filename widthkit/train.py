"""Train SGD and SWA checkpoints: ``python -m widthkit.train --recipe digits --out checkpoints/digits``.

A recipe (bundled name or TOML file) gives the base config, ``--config FILE`` layers a TOML file over it and
one flag per :class:`widthkit.trainer.TrainConfig` field layers on top (``--lr 0.1 --epochs 4``). Running the
same command again continues an interrupted run. See :mod:`widthkit.trainer` for the protocol.

Examples::

    python -m widthkit.train --recipe digits --out checkpoints/digits
    python -m widthkit.train --recipe preresnet164-cifar100 --out checkpoints/prn164 --data-root ~/data --amp
    python -m widthkit.train --list-recipes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from widthkit.trainer import (
    MODES,
    TrainConfig,
    _base_type,
    _field_types,
    list_recipes,
    read_config_file,
    train,
    train_branches,
)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); e.g. '{{\"depth\": 56}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 56}}', got {text!r}")
    return value


class _Auto:
    """Marks an optional int flag given as 'auto': the field goes back to None (its computed default)."""

    def __repr__(self) -> str:
        return "auto"


AUTO = _Auto()


def _int_or_auto(text: str) -> int | _Auto:
    if text.strip().lower() == "auto":
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--swa-lr`` and ``--swa_lr``), typed from its annotation, help from its
    metadata, default ``None`` so that unset flags leave the recipe's value alone."""
    group = parser.add_argument_group(
        "training config", "one flag per TrainConfig field; an unset flag keeps the recipe's (or --config's) value")
    hints = _field_types()
    for f in dataclasses.fields(TrainConfig):
        kind, optional = _base_type(hints[f.name])
        names = sorted({f"--{f.name.replace('_', '-')}", f"--{f.name}"}, key=lambda s: "_" in s)
        help_text = f.metadata.get("help", "")
        if kind is bool:  # --flag / --no-flag, hyphenated only
            group.add_argument(names[0], dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif kind is dict:
            group.add_argument(*names, dest=f.name, type=_json_dict, default=None, metavar="JSON", help=help_text)
        elif optional and kind is int:  # 'auto' sets it back to None (e.g. swa_start over a recipe's value)
            group.add_argument(*names, dest=f.name, type=_int_or_auto, default=None, metavar="INT|auto",
                               help=help_text)
        else:
            group.add_argument(*names, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m widthkit.train",
        description="Train SGD and SWA checkpoints with the schedule of Izmailov et al. (2018).",
    )
    parser.add_argument("--recipe", default="digits",
                        help=f"bundled recipe ({', '.join(list_recipes())}) or a TOML file (default: digits)")
    parser.add_argument("--config", metavar="FILE", help="TOML file whose keys override the recipe")
    parser.add_argument("--out", help="output folder (default: checkpoints/<recipe>)")
    parser.add_argument("--mode", choices=MODES, default="branches",
                        help="branches (default): SGD and SWA from one shared prefix; sgd or swa: a single run")
    parser.add_argument("--overwrite", action="store_true", help="delete this trainer's files in --out first")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--list-recipes", action="store_true", help="print the bundled recipes and exit")
    add_config_flags(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Recipe, then ``--config``, then the field flags; validated once at the end."""
    values, _ = read_config_file(args.recipe)
    if args.config:
        values.update(read_config_file(args.config)[0])
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            values[f.name] = None if value is AUTO else value
    return TrainConfig.from_dict(values)


def _default_out(recipe: str) -> str:
    stem = recipe.replace("\\", "/").rsplit("/", 1)[-1]
    return f"checkpoints/{stem[:-5] if stem.endswith('.toml') else stem}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_recipes:
        print("\n".join(list_recipes()))
        return 0
    from widthkit.cli import tune_allocator

    tune_allocator()  # the BN-update and evaluation passes allocate like the evaluator does
    try:
        cfg = config_from_args(args)
        out = args.out or _default_out(args.recipe)
        if args.mode == "branches":
            paths = train_branches(cfg, out, overwrite=args.overwrite, progress=args.progress)
        else:
            paths = train(cfg, out, args.mode, overwrite=args.overwrite, progress=args.progress)
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    for role in ("start", "sgd", "swa"):
        if role in paths:
            print(f"{role:>8}: {paths[role]}")
    if paths["iterates"]:
        print(f"iterates: {len(paths['iterates'])} files, {paths['iterates'][0]} ... {paths['iterates'][-1]}")
    print(f"     log: {paths['log']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
