"""Train loss and test error along the line through two checkpoints, beyond both ends.

    python -m widthkit.line --ckpt checkpoints/digits/swa.pt --ckpt checkpoints/digits/sgd.pt

t = 0 is the first checkpoint, t = 1 the second (default range t in [-1, 2]); distances are t·‖w₂ − w₁‖.
"""

from __future__ import annotations

import argparse

from . import cli
from .analyses import LineConfig, line
from .engine.config import EvalConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m widthkit.line", description=__doc__.split("\n\n")[0])
    cli.add_ckpt_flags(p, "exactly two")
    cli.add_config_flags(p.add_argument_group("line"), LineConfig)
    cli.add_config_flags(p.add_argument_group("evaluation"), EvalConfig)
    cli.add_output_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return cli.run(lambda: cli.run_command(line, "line", args, LineConfig))


cli.callable_module(__name__, line)  # widthkit.line(...) stays the Python API after `import widthkit.line`

if __name__ == "__main__":
    raise SystemExit(main())
