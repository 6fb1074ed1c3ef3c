"""Train a curve between two checkpoints and evaluate it beside the straight line (Garipov et al. 2018).

    python -m widthkit.curve --ckpt A=seed0/sgd.pt --ckpt B=seed1/sgd.pt --bends 1 --kind bezier --epochs 20

The endpoints stay fixed; the bends are trained on the loss at a t ~ U(0, 1) drawn per batch (+ the L2 term at
that point), with the paper's SGD schedule. Then train loss and test error at 61 values of t in [0, 1] on the
curve and on the straight line, BatchNorm statistics recomputed at every point, and the loss barrier of each
path (its maximum minus the mean of the endpoints); the plane through the endpoints and the bend with the curve
drawn. Writes ``analyses/curve-A-B.h5`` (the evaluation, a line file with a ``curve`` group),
``curve-A-B-plane.h5`` and the trained curve ``curve-A-B.curve.pt`` beside it, figures into ``figures/``.
Re-running the same command continues an interrupted training after its last finished epoch, and the
evaluations where they stopped.
"""

from __future__ import annotations

import argparse
import functools

from . import cli
from .analyses.curve import CurveConfig, curve
from .report.summary import finish_curve


def build_parser() -> argparse.ArgumentParser:
    return cli.analysis_parser("curve", __doc__, "exactly two: the endpoints", ("curve", CurveConfig))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    analysis = functools.partial(curve, train_progress=not args.quiet)
    return cli.run(lambda: cli.run_command(analysis, "curve", args, CurveConfig,
                                           lambda figures: finish_curve(figures, cli.log)))


cli.callable_module(__name__, curve)  # widthkit.curve(...) stays the Python API after `import widthkit.curve`

if __name__ == "__main__":
    raise SystemExit(main())
