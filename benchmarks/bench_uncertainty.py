"""How uncertain are the random estimates of curvature and sharpness, and what does more work buy?

For each checkpoint, through the public API (the commands' own code path):

* ``widthkit.curvature`` with ``--probes`` SLQ probes of ``--steps`` steps and the default Hutch++ budget: the
  standard error (SE) over probes of the trace the density implies (D × its mean) and of the effective
  dimension, for the first P probes (P = 2, 4, ... up to ``--probes``; every probe is an independent estimate,
  so the first P are what ``--slq-probes P`` computes), and the Hutch++ trace's SE;
* ``widthkit.sharpness`` of the average-case measures with ``--draws`` draws, the SE for the first n draws
  (the same draws ``--samples n`` takes), and PAC-Bayes' expected error at σ' with its SE;

printed as SE / |value| (the fraction the tables' ± amounts to) with the seconds each estimator took.

    python benchmarks/bench_uncertainty.py --ckpt checkpoints/digits/sgd.pt --ckpt checkpoints/digits/swa.pt
    python benchmarks/bench_uncertainty.py --ckpt sgd.pt --loss-subset 512 --probes 4 --steps 40   # the pipeline's
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import widthkit
from widthkit.engine.curvature import effective_dimension, slq_uncertainty


def _ratio(se, value) -> str:
    return "—" if value == 0 or not math.isfinite(se) else f"{100 * abs(se / value):.1f} %"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", action="append", required=True)
    p.add_argument("--loss-subset", type=int, default=4096)
    p.add_argument("--probes", type=int, default=16, help="SLQ probes computed (SEs are shown for the first 2, 4, ...)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--trace-hvps", type=int, default=99)
    p.add_argument("--draws", type=int, default=64, help="average-case draws (SEs shown for 16 and all)")
    p.add_argument("--pac-samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", nargs="*", default=(), choices=("curvature", "sharpness"))
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    common = dict(loss_subset=args.loss_subset, bn_mode="keep", threads=args.threads, device="cpu")
    result: dict = {"args": vars(args)}
    if "curvature" not in args.skip:
        res = widthkit.curvature(args.ckpt, top_k=1, trace_hvps=args.trace_hvps, slq_probes=args.probes,
                                 slq_steps=args.steps, hvp="double-backward", **common)
        dim, alphas = res["config"]["theta_size"], res["config"]["curvature"]["eff_dim_alpha"]
        units = ["point", "lanczos", "hutchpp", "slq"]
        print(f"curvature: D = {dim}, {res['attrs']['operator']['n_examples']} examples, SLQ {args.probes} probes "
              f"x {args.steps} steps, Hutch++ {args.trace_hvps} products")
        print("| model | quantity | P | value | SE | SE/value |\n|---|---|---|---|---|---|")
        for group, m in res["models"].items():
            v = m["values"]
            secs = dict(zip(units, v["seconds"]))
            hvps = dict(zip(units, v["hvps"]))
            rows = {"hutchpp": {"trace": (v["trace"], v["trace_stderr"])},
                    "seconds_per_product": secs["slq"] / hvps["slq"], "seconds": secs}
            print(f"| {group} | trace (Hutch++) | {args.trace_hvps} products | {v['trace']:.4g} | "
                  f"{v['trace_stderr']:.2g} | {_ratio(v['trace_stderr'], v['trace'])} |")
            P = 2
            while P <= args.probes:
                u = slq_uncertainty(v["slq_nodes"][:P], v["slq_weights"][:P], dim, alphas)
                eff = effective_dimension(v["slq_nodes"][:P], v["slq_weights"][:P], dim, alphas)
                rows[P] = {"trace": (u["trace"], u["trace_stderr"]),
                           **{f"eff_dim_{a:g}": (e, s)
                              for a, e, s in zip(alphas, eff, u["effective_dimension_stderr"])}}
                for name, (val, se) in rows[P].items():
                    print(f"| {group} | {name} | {P} | {val:.4g} | {se:.2g} | {_ratio(se, val)} |")
                P *= 2
            print(f"| {group} | seconds | | Lanczos {secs['lanczos']:.1f}, Hutch++ {secs['hutchpp']:.1f}, SLQ "
                  f"{secs['slq']:.1f} ({secs['slq'] / hvps['slq']:.3f} s per product) | | |")
            result[f"curvature/{group}"] = {str(k): val for k, val in rows.items()}
    if "sharpness" not in args.skip:
        kinds = ("avg", "avg_adaptive", "pac_bayes", "pac_bayes_mag")
        res = widthkit.sharpness(args.ckpt, kinds=kinds, samples=args.draws, pac_samples=args.pac_samples, **common)
        rho = res["axes"]["rho_avg"]
        print(f"\nsharpness: average-case over {args.draws} draws (SE for the first n from the per-draw spread)")
        print("| model | measure | ρ | value | SE/value, 16 draws | SE/value, all draws | seconds |\n"
              "|---|---|---|---|---|---|---|")
        units = ["point", *kinds]
        for group, m in res["models"].items():
            v = m["values"]
            secs = dict(zip(units, v["seconds"]))
            out = {}
            for kind in kinds[:2]:
                for j, r in enumerate(rho):
                    val, se = float(v[kind][j]), float(v[f"{kind}_stderr"][j])
                    se16 = se * math.sqrt(args.draws / 16)  # the same spread over 16 draws
                    out[f"{kind}@{r:g}"] = (val, se, se16)
                    print(f"| {group} | {kind} | {r:g} | {val:.4g} | {_ratio(se16, val)} | {_ratio(se, val)} | "
                          f"{secs[kind]:.1f} |")
            for kind in kinds[2:]:
                out[kind] = (float(v[kind]), float(v[f"{kind}_error"]), float(v[f"{kind}_error_stderr"]))
                print(f"| {group} | {kind} 1/σ'² | | {v[kind]:.4g} (error at σ' {100 * v[f'{kind}_error']:.1f} ± "
                      f"{100 * v[f'{kind}_error_stderr']:.1f} %, {args.pac_samples} draws) | | | {secs[kind]:.1f} |")
            result[f"sharpness/{group}"] = out
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
