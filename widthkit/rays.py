"""Rays from each checkpoint along the same random directions, with width numbers (Izmailov et al. 2018, 3.4).

    python -m widthkit.rays --ckpt checkpoints/digits/sgd.pt --ckpt checkpoints/digits/swa.pt --dirs 10

Writes the HDF5 file (``analyses/`` by default), figures (``figures/``), prints the width table and writes it
as JSON next to the HDF5 file (``*.widths.json``). Re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse

from . import cli
from .analyses import RaysConfig, WidthConfig, rays
from .report.summary import finish_rays


def build_parser() -> argparse.ArgumentParser:
    return cli.analysis_parser("rays", __doc__, "one or more; all share the same directions",
                               ("rays", RaysConfig), ("widths", WidthConfig))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        widths = WidthConfig(**cli.config_values(args, WidthConfig))
        return cli.run_command(rays, "rays", args, RaysConfig, lambda figures: finish_rays(
            widths, figures, cli.log, two_sided=args.two_sided, reuse=not args.overwrite))

    return cli.run(body)


cli.callable_module(__name__, rays)  # widthkit.rays(...) stays the Python API after `import widthkit.rays`

if __name__ == "__main__":
    raise SystemExit(main())
