"""What the curvature and sharpness commands share: their parser and their body (on top of :mod:`widthkit.cli`).

Flags: ``--ckpt`` (and ``--arch``, ``--which``), one group per config (the command's own, then
:class:`~widthkit.engine.curvature.LossConfig`), the evaluation flags that apply (``--bn-mode`` keep|recompute,
``--bn-subset``, ``--weight-decay``, ``--data``, ``--data-root``, ``--seed``), the runtime flags that apply
(``--device``, ``--eval-batch-size``, ``--threads``: the same names and defaults as in ``rays``) and the output flags.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable

from . import cli


def hessian_parser(prog: str, doc: str, *configs) -> argparse.ArgumentParser:
    from .analyses.hessian import EVAL_SKIP, RUNTIME_SKIP
    from .engine.config import EvalConfig
    from .engine.curvature import LossConfig

    p = argparse.ArgumentParser(prog=f"python -m widthkit.{prog}", description=doc.split("\n\n")[0])
    cli.add_ckpt_flags(p, "one or more, side by side")
    for title, cls in (*configs, ("loss", LossConfig)):
        cli.add_config_flags(p.add_argument_group(title), cls)
    cli.add_config_flags(p.add_argument_group("evaluation"), EvalConfig, skip=EVAL_SKIP)
    cli.add_runtime_flags(p, skip=RUNTIME_SKIP)
    cli.add_output_flags(p)
    return p


def run_hessian_command(analysis: Callable, kind: str, args, spec_cls) -> int:
    """Configs from the flags (validated before any work), the run with a progress bar (in Hessian-vector
    products), the side-by-side table, the density figure (curvature), the file reported."""
    from .analyses.hessian import EVAL_SKIP, RUNTIME_SKIP
    from .engine.config import EvalConfig
    from .engine.curvature import LossConfig
    from .fileio import check_writable
    from .report.spectrum import curvature_table, write_spectrum_figure

    spec = spec_cls(**cli.config_values(args, spec_cls))
    loss = LossConfig(**cli.config_values(args, LossConfig))
    config = EvalConfig(**cli.config_values(args, EvalConfig, skip=EVAL_SKIP))
    runtime = cli.runtime_config(args, skip=RUNTIME_SKIP)
    out = Path(args.out or cli.default_out(kind, args.ckpt))
    figures = cli.figure_options(args)
    for folder in (out.parent, figures.folder if kind == "curvature" else None):
        if folder is not None:
            check_writable(folder)
    progress, close = cli.progress_bar(not args.quiet, kind)
    timer = cli.Timer()
    try:
        res = analysis(cli.models_from(args.ckpt), config=config, runtime=runtime, out=out, overwrite=args.overwrite, progress=progress,
                       arch=args.arch, which=args.which, **dataclasses.asdict(spec), **dataclasses.asdict(loss))
    finally:
        close()
    if res is None:  # a torchrun rank that does not write
        return 0
    cli.log("")
    cli.log(curvature_table(res))
    if kind == "curvature" and figures.folder is not None and any(m["done"].get("slq") for m in res["models"].values()):
        for f in write_spectrum_figure(res, figures.folder / out.stem, figures.formats):
            cli.log(f"figure: {f}")
    cli.log(f"\n{kind}: {out} ({timer})")
    return 0
