"""Train loss and test error along the line through two checkpoints, beyond both ends.

    python -m widthkit.line --ckpt checkpoints/digits/swa.pt --ckpt checkpoints/digits/sgd.pt

t = 0 is the first checkpoint, t = 1 the second (default range t in [-1, 2]); distances are t·‖w₂ − w₁‖.
"""

from __future__ import annotations

import argparse

from . import cli
from .analyses import LineConfig, line


def build_parser() -> argparse.ArgumentParser:
    return cli.analysis_parser("line", __doc__, "exactly two", ("line", LineConfig))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: cli.run_command(line, "line", args, LineConfig))


cli.callable_module(__name__, line)  # widthkit.line(...) stays the Python API after `import widthkit.line`

if __name__ == "__main__":
    raise SystemExit(main())
