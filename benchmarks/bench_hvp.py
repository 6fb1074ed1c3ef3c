"""How fast does widthkit compute Hessian-vector products, against a plain loop and PyHessian, and do the top
eigenvalues agree?

In ONE process, on the same model, data and batches (BN in eval mode, the checkpoint's statistics, mean
cross-entropy over the examples), interleaved round by round so that machine noise hits every contestant alike:

(a) ``widthkit``     :class:`~widthkit.engine.curvature.HessianOperator` (its H·v method and graph caching chosen
    as in the commands: timed / by memory), float32 with float64 sums;
(b) ``loop``         the plain double-backward loop: per batch ``loss.backward``-free ``autograd.grad(loss,
    params, create_graph=True)`` then ``autograd.grad(g·v)``, summed weighted by batch size;
(c) ``pyhessian``    PyHessian 0.1 (Yao et al. 2020) ``hessian(model, criterion, dataloader=...)`` and its
    ``dataloader_hv_product`` over the same batches; PyHessian is installed for this script only (``pip install
    --target`` into a temporary folder) when it is not importable, and skipped with a message if that fails;
(d) ``pyhessian-1batch`` (information only) PyHessian with all examples as ONE batch, its graph reused between
    products (needs the whole batch's graph in memory).

Reported: seconds per product (median over rounds) and products per second, the ratios widthkit/x, and the top
eigenvalue of each: widthkit's Lanczos, Lanczos on the plain loop's products, PyHessian's power iteration (its
``eigenvalues(maxIter, tol)``), with their relative differences. On a shared machine the ratios move by ±25 %
from one run to the next: run it at least 3 times and quote the range (benchmarks/RESULTS.md does).

    python benchmarks/bench_hvp.py --ckpt checkpoints/digits/sgd.pt            # digits: all 1,438 train images
    python benchmarks/bench_hvp.py --ckpt sgd.pt --examples 4096 --rounds 3 --out benchmarks/hvp.md
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from widthkit.engine.curvature import HessianOperator, lanczos
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit.runtime import random_subset, tune_allocator


def get_pyhessian():
    """The pyhessian module, installed into a temporary folder for this process if needed; None if impossible."""
    if importlib.util.find_spec("pyhessian") is None:
        target = tempfile.mkdtemp(prefix="bench-pyhessian-")
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                              "pyhessian==0.1"], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"PyHessian skipped: pip could not install it ({run.stderr.strip().splitlines()[-1:]})")
            return None
        sys.path.insert(0, target)
    try:
        return importlib.import_module("pyhessian")
    except ImportError as err:
        print(f"PyHessian skipped: {err}")
        return None


def plain_loop(model, batches):
    """H·v by the textbook double-backward loop over batches (float32), v and H·v as flat float64 vectors."""
    params = [p for p in model.parameters()]
    n = sum(len(y) for _, y in batches)

    def hvp(v):
        v32 = v.float()
        chunks, o = [], 0
        for p in params:
            chunks.append(v32[o:o + p.numel()].view_as(p))
            o += p.numel()
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=chunks)
            for t, h in zip(total, hv):
                t.add_(h, alpha=len(y))
        return torch.cat([t.reshape(-1) for t in total]).double() / n

    return hvp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (widthkit format, or --arch)")
    p.add_argument("--arch")
    p.add_argument("--data", help="dataset (default: the checkpoint's)")
    p.add_argument("--examples", type=int, default=4096, help="training examples (a fixed subset; all if fewer)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (each: --per-round products per contestant)")
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-iter", type=int, default=100, help="Lanczos steps / power iterations for λ_max")
    p.add_argument("--tol", type=float, default=1e-6, help="relative tolerance of the λ_max computations")
    p.add_argument("--out", help="also write the results as Markdown here (and JSON beside it)")
    args = p.parse_args(argv)
    tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.ckpt, arch=args.arch)
    ds = load_dataset(args.data or ck.meta.get("dataset") or "digits", split="train")
    idx = random_subset(len(ds), args.examples, 0)
    x, y = ds.normalized(), ds.labels
    if idx is not None:
        x, y = x[idx], y[idx]
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, len(y), args.batch_size)]
    model = copy.deepcopy(ck.model).float().eval()
    print(f"{ck.meta.get('arch')} ({sum(q.numel() for q in model.parameters())} parameters), {len(y)} examples in "
          f"{len(batches)} batches of {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")

    op = HessianOperator(model, x, y, batch_size=args.batch_size)
    print(f"widthkit: H·v by {op.method} (timed {op.method_seconds}), graph cache {op.cache_graphs}")
    contestants = {"widthkit": op.hvp, "loop": plain_loop(copy.deepcopy(model), batches)}
    pyh = get_pyhessian()
    ph = None
    if pyh is not None:
        from pyhessian import hessian

        ph = hessian(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=False)

        def ph_hvp(v, ph=ph):
            chunks, o = [], 0
            for q in ph.params:
                chunks.append(v[o:o + q.numel()].view_as(q).float())
                o += q.numel()
            _, hv = ph.dataloader_hv_product(chunks)
            return torch.cat([h.reshape(-1) for h in hv]).double()

        contestants["pyhessian"] = ph_hvp
        one = hessian(copy.deepcopy(model), torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        from pyhessian.utils import hessian_vector_product

        def one_hvp(v, one=one):
            chunks, o = [], 0
            for q in one.params:
                chunks.append(v[o:o + q.numel()].view_as(q).float())
                o += q.numel()
            return torch.cat([h.reshape(-1) for h in hessian_vector_product(one.gradsH, one.params, chunks)]).double()

        contestants["pyhessian-1batch"] = one_hvp

    dim = op.dim
    v = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = op.hvp(v)
    agree = {}
    for name, fn in contestants.items():  # warm-up, and the products agree
        out = fn(v)
        agree[name] = float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))
    times = {name: [] for name in contestants}
    for _ in range(args.rounds):
        for name, fn in contestants.items():
            t0 = time.perf_counter()
            for _ in range(args.per_round):
                fn(v)
            times[name].append((time.perf_counter() - t0) / args.per_round)
    sec = {name: statistics.median(t) for name, t in times.items()}

    t0 = time.perf_counter()
    top = lanczos(op.hvp, dim, k=1, tol=args.tol, max_iter=args.max_iter, seed=0)
    eig = {"widthkit": (float(top.eigenvalues[0]), top.iterations, time.perf_counter() - t0)}
    t0 = time.perf_counter()
    top_loop = lanczos(contestants["loop"], dim, k=1, tol=args.tol, max_iter=args.max_iter, seed=0)
    eig["loop"] = (float(top_loop.eigenvalues[0]), top_loop.iterations, time.perf_counter() - t0)
    if ph is not None:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        vals, _ = ph.eigenvalues(maxIter=args.max_iter, tol=args.tol, top_n=1)
        eig["pyhessian"] = (float(vals[0]), None, time.perf_counter() - t0)

    lines = ["| contestant | s per H·v | H·v per s | widthkit speed-up | ‖Hv − Hv_widthkit‖/‖Hv‖ |", "|---|---|---|---|---|"]
    for name in contestants:
        lines.append(f"| {name} | {sec[name]:.4f} | {1 / sec[name]:.2f} | {sec[name] / sec['widthkit']:.2f}x | "
                     f"{agree[name]:.1e} |")
    lines += ["", "| λ_max by | value | relative difference to widthkit | products | seconds |", "|---|---|---|---|---|"]
    for name, (val, iters, secs) in eig.items():
        lines.append(f"| {name} | {val:.6g} | {abs(val - eig['widthkit'][0]) / abs(eig['widthkit'][0]):.1e} | "
                     f"{iters if iters is not None else '≤ ' + str(args.max_iter)} | {secs:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")
        out.with_suffix(".json").write_text(json.dumps({"seconds_per_hvp": sec, "rounds": times, "agreement": agree,
                                                        "lambda_max": eig, "threads": torch.get_num_threads(),
                                                        "examples": len(y), "batch_size": args.batch_size,
                                                        "method": op.method, "graph_cache": op.cache_graphs},
                                                       indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
