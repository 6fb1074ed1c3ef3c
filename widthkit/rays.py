"""Rays from each checkpoint along the same random directions, with width numbers (Izmailov et al. 2018, 3.4).

    python -m widthkit.rays --ckpt checkpoints/digits/sgd.pt --ckpt checkpoints/digits/swa.pt --dirs 10

Writes the HDF5 file (``analyses/`` by default), figures (``figures/``), prints the width table and writes it
as JSON next to the HDF5 file (``*.widths.json``). Re-running the same command resumes an interrupted run.
"""

from __future__ import annotations

import argparse

from . import cli
from .analysis import rays
from .directions import NORMS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m widthkit.rays", description=__doc__.split("\n\n")[0])
    cli.add_analysis_flags(p, "one or more; all share the same directions")
    p.add_argument("--dirs", type=int, default=10, help="number of random directions (default 10)")
    p.add_argument("--max-dist", type=float, help="largest distance along a ray (default: ‖θ‖/2 of the first "
                                                  "checkpoint, rounded up to 1, 2 or 5·10^k; 1 for --norm other than unit)")
    p.add_argument("--steps", type=int, default=31, help="grid points per ray, distance 0 included (default 31)")
    p.add_argument("--two-sided", action="store_true",
                   help="rays from -max-dist to +max-dist: reports each side's width and their asymmetry")
    p.add_argument("--norm", choices=NORMS, default="unit",
                   help="direction normalisation (default unit: uniform on the sphere, absolute distances)")
    p.add_argument("--exclude", default="", help="leave parameters out of the directions: bias, norm, biasbn")
    p.add_argument("--threshold", action="append", metavar="METRIC=LEVEL",
                   help="width threshold, e.g. test_err=+5 (5 points above the start), train_loss=+0.5, "
                        "test_err=20 (absolute); repeatable (default: test_err=+5 and train_loss=+0.5, "
                        "train_loss_l2 when weight decay is known)")
    p.add_argument("--refine", action="store_true", help="refine each width by bisection along its ray")
    p.add_argument("--tol", type=float, help="bisection tolerance in distance units (default: 1/100 of a step)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        log = cli.log_fn()
        res = cli.run_analysis("rays", args, lambda models, common: rays(
            models, dirs=args.dirs, max_dist=args.max_dist, steps=args.steps, two_sided=args.two_sided,
            norm=args.norm, exclude=args.exclude or (), **common))
        if res is None:  # a non-writing rank under torchrun
            return 0
        if not args.two_sided:
            reports = [res.widths(s, refine=args.refine, tol=args.tol) for s in args.threshold or res.default_thresholds()]
            res.record_widths(reports)
            cli.report_widths(res, reports, log)
        else:
            reports = [res.asymmetry(s) for s in args.threshold or res.default_thresholds()]
            for r in reports:
                log("")
                log(r["table"])
            json_path = res.path.with_suffix(".asymmetry.json")
            cli.write_json(json_path, [{k: v for k, v in r.items() if k != "table"} for r in reports])
            log(f"\nasymmetry: {json_path}")
        cli.render(res.path, args, log)
        return 0

    return cli.run(body)


cli.make_callable(__name__, rays)  # widthkit.rays(...) is the Python API, see widthkit.analysis.rays

if __name__ == "__main__":
    raise SystemExit(main())
