"""Render any widthkit analysis file as publication figures.

    python -m widthkit.plot analyses/rays-sgd-swa.h5 [--metric test_err] [--format png,pdf,svg]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m widthkit.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE.h5", help="analysis files")
    p.add_argument("--metric", action="append", help="metric(s) to draw (default: test error and train loss)")
    p.add_argument("--plane", choices=("contour", "heatmap", "surface"), default="contour",
                   help="how to draw planes: log-level filled contours (default), a heatmap, or a 3D surface")
    cli.add_figure_flags(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from .fileio import check_writable
        from .report import store
        from .report.render import partial_note, plot_analysis

        figures = check_writable(args.figures or "figures")  # a read-only folder: one line, before any drawing
        for f in args.files:
            data = store.read(f)
            note = partial_note(data, f)
            if note:
                print(f"warning: {note}", file=sys.stderr)
            for out in plot_analysis(data, figures / Path(f).stem,
                                     formats=cli.formats_of(args), metric=args.metric, plane_kind=args.plane):
                print(f"figure: {out}")
        return 0

    return cli.run(body)


if __name__ == "__main__":
    raise SystemExit(main())
