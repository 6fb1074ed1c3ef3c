"""Train loss and test error along the line through two checkpoints, beyond both ends.

    python -m widthkit.line --ckpt checkpoints/digits/swa.pt --ckpt checkpoints/digits/sgd.pt

t = 0 is the first checkpoint, t = 1 the second (default range t in [-1, 2]); distances are t·‖w₂ − w₁‖.
"""

from __future__ import annotations

import argparse

from . import cli
from .analysis import line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m widthkit.line", description=__doc__.split("\n\n")[0])
    cli.add_analysis_flags(p, "exactly two")
    p.add_argument("--t-min", type=float, default=-1.0, help="start of the line, in units of the distance (default -1)")
    p.add_argument("--t-max", type=float, default=2.0, help="end of the line (default 2)")
    p.add_argument("--steps", type=int, default=61, help="grid points (default 61)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        res = cli.run_analysis("line", args, lambda models, common: line(
            models, t_min=args.t_min, t_max=args.t_max, steps=args.steps, **common))
        if res is not None:
            cli.render(res.path, args, cli.log_fn())
        return 0

    return cli.run(body)


cli.make_callable(__name__, line)  # widthkit.line(...) is the Python API, see widthkit.analysis.line

if __name__ == "__main__":
    raise SystemExit(main())
