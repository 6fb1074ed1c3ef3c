"""Hessian spectrum, trace and spectral density of the training loss, beside width.

    python -m widthkit.curvature --ckpt checkpoints/digits/sgd.pt --ckpt checkpoints/digits/swa.pt

For every checkpoint: the top-k eigenvalues and eigenvectors and λ_min (Lanczos, full reorthogonalisation),
the trace (Hutch++, with a standard error), the spectral density (stochastic Lanczos quadrature) and the
effective dimension, of one fixed Hessian operator (the same training examples, BN statistics and probes for
every checkpoint). Prints a side-by-side table, writes the HDF5 file (``analyses/`` by default) and the density
figure (``figures/``). Re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse

from . import cli, cli_hessian
from .analyses.hessian import curvature
from .engine.curvature import CurvatureConfig


def build_parser() -> argparse.ArgumentParser:
    return cli_hessian.hessian_parser("curvature", __doc__, ("curvature", CurvatureConfig))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: cli_hessian.run_hessian_command(curvature, "curvature", args, CurvatureConfig))


cli.callable_module(__name__, curvature)  # widthkit.curvature(...) stays the Python API after `import widthkit.curvature`

if __name__ == "__main__":
    raise SystemExit(main())
