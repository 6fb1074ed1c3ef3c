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
from .analysis import plane
from .directions import NORMS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m widthkit.plane", description=__doc__.split("\n\n")[0])
    cli.add_analysis_flags(p, "three, or one with --random")
    p.add_argument("--resolution", type=int, nargs="+", default=[21], metavar="N",
                   help="grid points along x and y: one number for both, or two (default 21)")
    p.add_argument("--margin", type=float, default=0.2, help="margin beyond the three points, as a fraction (default 0.2)")
    p.add_argument("--random", action="store_true", help="random plane around one checkpoint")
    p.add_argument("--span", type=float, default=1.0, help="random plane: coordinates in [-span, span] (default 1)")
    p.add_argument("--norm", choices=NORMS, default="filter", help="random plane: direction normalisation (default filter)")
    p.add_argument("--exclude", default="biasbn", help="random plane: leave out bias, norm or biasbn (default biasbn); 'none' keeps all")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        res_xy = args.resolution * 2 if len(args.resolution) == 1 else args.resolution
        exclude = () if args.exclude == "none" else args.exclude
        res = cli.run_analysis("plane", args, lambda models, common: plane(
            models, resolution=tuple(res_xy), margin=args.margin, random=args.random, span=args.span,
            norm=args.norm, exclude=exclude, **common), out_kind="plane-random" if args.random else "plane")
        if res is not None:
            cli.render(res.path, args, cli.log_fn())
        return 0

    return cli.run(body)


cli.make_callable(__name__, plane)  # widthkit.plane(...) is the Python API, see widthkit.analysis.plane

if __name__ == "__main__":
    raise SystemExit(main())
