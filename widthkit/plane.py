"""A grid of train loss and test error on a plane in weight space.

    python -m widthkit.plane --ckpt start.pt --ckpt sgd.pt --ckpt swa.pt      # through three checkpoints
    python -m widthkit.plane --ckpt swa.pt --random                           # random filter-normalised plane

Through three checkpoints (Izmailov et al. 2018, Figure 1): u = w₂ − w₁, v = (w₃ − w₁) ⟂ u, orthonormal,
coordinates in weight-space units, 20% margins around the three points. Random (Li et al. 2018): two
filter-normalised directions around one checkpoint, coordinates in [-span, span].
"""

from __future__ import annotations

import argparse

from . import cli
from .analyses import PlaneConfig, plane


def build_parser() -> argparse.ArgumentParser:
    return cli.analysis_parser("plane", __doc__, "three, or one with --random", ("plane", PlaneConfig))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: cli.run_command(plane, "plane-random" if args.random else "plane", args, PlaneConfig))


cli.callable_module(__name__, plane)  # widthkit.plane(...) stays the Python API after `import widthkit.plane`

if __name__ == "__main__":
    raise SystemExit(main())
