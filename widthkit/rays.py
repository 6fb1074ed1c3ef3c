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
                                                  "checkpoint, rounded up to 1, 2 or 5·10^k)")
    p.add_argument("--steps", type=int, default=31, help="grid points per ray, distance 0 included (default 31)")
    p.add_argument("--two-sided", action="store_true", help="rays from -max-dist to +max-dist (no widths)")
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
        out = cli.default_out("rays", args.ckpt) if args.out is None else args.out
        progress, close = cli.progress_bar(not args.quiet, "rays")
        timer = cli.Timer()
        try:
            res = rays(cli.models_from(args), data=None, dirs=args.dirs, max_dist=args.max_dist, steps=args.steps,
                       two_sided=args.two_sided, norm=args.norm, exclude=args.exclude or (),
                       settings=cli.settings_from(args), data_spec=cli.data_spec_from(args), out=out,
                       overwrite=args.overwrite, progress=progress, chunk_size=args.chunk_size, arch=args.arch,
                       which=args.which)
        finally:
            close()
        if res is None:  # a non-writing rank under torchrun
            return 0
        log(f"rays: {res.path} ({timer})")
        if not args.two_sided:
            has_l2 = "train_loss_l2" in next(iter(res.models.values()))["metrics"]
            specs = args.threshold or ["test_err=+5", "train_loss_l2=+0.5" if has_l2 else "train_loss=+0.5"]
            reports = [res.widths(s, refine=args.refine, tol=args.tol) for s in specs]
            res.record_widths(reports)
            for r in reports:
                log("")
                log(r["table"])
            json_path = res.path.with_suffix(".widths.json")
            cli.write_json(json_path, [{k: v for k, v in r.items() if k != "table"} for r in reports])
            log(f"\nwidths: {json_path}")
        cli.render(res.path, args, log)
        return 0

    return cli.run(body)


cli.make_callable(__name__, rays)  # widthkit.rays(...) is the Python API, see widthkit.analysis.rays

if __name__ == "__main__":
    raise SystemExit(main())
