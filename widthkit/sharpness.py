"""Sharpness of the training loss, beside width: average- and worst-case, adaptive, Keskar ε- and PAC-Bayes.

    python -m widthkit.sharpness --ckpt checkpoints/digits/sgd.pt --ckpt checkpoints/digits/swa.pt

For every checkpoint, on the same training examples and BN statistics as ``widthkit.curvature``: average-case
and worst-case (projected gradient ascent, ℓ2 and ℓ∞) sharpness with c = 1 and c = |θ| (adaptive), Keskar et
al.'s ε-sharpness and the PAC-Bayes flatness 1/σ'² (plain and magnitude-aware). Prints a side-by-side table and
writes the HDF5 file (``analyses/`` by default). Re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse

from . import cli, cli_hessian
from .analyses.hessian import sharpness
from .engine.sharpness import SharpnessConfig


def build_parser() -> argparse.ArgumentParser:
    return cli_hessian.hessian_parser("sharpness", __doc__, ("sharpness", SharpnessConfig))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: cli_hessian.run_hessian_command(sharpness, "sharpness", args, SharpnessConfig))


cli.callable_module(__name__, sharpness)  # widthkit.sharpness(...) stays the Python API after `import widthkit.sharpness`

if __name__ == "__main__":
    raise SystemExit(main())
