"""A grid of train loss and test error on a plane in weight space.

    python -m widthkit.plane --ckpt start.pt --ckpt sgd.pt --ckpt swa.pt      # through three checkpoints
    python -m widthkit.plane --ckpt swa.pt --random                           # random filter-normalised plane
    python -m widthkit.plane --ckpt swa_iter_005.pt --ckpt swa_iter_010.pt --ckpt swa_iter_015.pt --mark SWA=swa.pt
    python -m widthkit.plane --pca run/swa_iter_*.pt --trajectory run/swa_iter_*.pt --ckpt SWA=swa.pt

Through three checkpoints (Izmailov et al. 2018, Figure 1): u = w₂ − w₁, v = (w₃ − w₁) ⟂ u, orthonormal,
coordinates in weight-space units, 20% margins around the three points. Random (Li et al. 2018): two
filter-normalised directions around one checkpoint, coordinates in [-span, span]. PCA (Li et al. 2018, section 7):
the top two principal directions of iterates, centred on their mean (or --pca-center), the --ckpt checkpoints
marked at their projections. --mark draws further checkpoints at their projections and reports their distance
from the plane; --trajectory draws iterates as a path.
"""

from __future__ import annotations

import argparse

from . import cli
from .analyses import PlaneConfig, plane
from .report.summary import finish_figures


def build_parser() -> argparse.ArgumentParser:
    return cli.analysis_parser("plane", __doc__, "three; one with --random; any number, marked, with --pca",
                               ("plane", PlaneConfig), ckpt_required=False)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def after(figures):
        draw = finish_figures(figures, cli.log)

        def report(res):  # marks, trajectory and explained variance on the terminal, then the figures
            table = res.projections()["table"]
            if table:
                cli.log(table)
            draw(res)
        return report

    def body() -> int:
        if not args.ckpt and not args.pca:
            raise ValueError("name the plane: --ckpt three times, --ckpt once with --random, or --pca ITERATES")
        kind = "plane-pca" if args.pca else "plane-random" if args.random else "plane"
        return cli.run_command(plane, kind, args, PlaneConfig, after)

    return cli.run(body)


cli.callable_module(__name__, plane)  # widthkit.plane(...) stays the Python API after `import widthkit.plane`

if __name__ == "__main__":
    raise SystemExit(main())
