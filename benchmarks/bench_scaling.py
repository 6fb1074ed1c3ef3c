"""Scale-out measurement: one analysis as 1 process vs N processes under torchrun, in one run.

Trains (or reuses) two tiny digits checkpoints, then times the same rays command

  (a) as one process with all CPU threads,
  (b) as one process with one thread per process (OMP_NUM_THREADS=1),
  (c) under ``torchrun --nproc_per_node=N`` with one thread per process (gloo on CPU, NCCL on GPUs),

checks that every file holds identical values, and prints a Markdown table (also written with ``--out``).
On a multi-GPU machine pass ``--device cuda --nproc N`` (each rank takes its local GPU).

    python benchmarks/bench_scaling.py --nproc 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _checkpoints(folder: Path) -> list[str]:
    from widthkit.training.trainer import load_recipe, train_branches

    if not (folder / "swa.pt").exists():
        cfg = load_recipe("digits").replace(epochs=4)
        train_branches(cfg, folder, progress=False)
    return [str(folder / "sgd.pt"), str(folder / "swa.pt")]


def _time(cmd: list[str], env: dict, cwd: Path) -> float:
    t = time.perf_counter()
    run = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
    return time.perf_counter() - t


def _values(path: Path) -> dict:
    from widthkit.report.store import read

    data = read(path)
    return {(g, m): v for g, d in data["models"].items() for m, v in d["metrics"].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dirs", type=int, default=4)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the Markdown table here too")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="wk-scaling-"))
    ckpts = _checkpoints(work / "ckpts")
    base = [a for c in ckpts for a in ("--ckpt", c)] + [
        "--dirs", str(args.dirs), "--steps", str(args.steps), "--max-dist", "10", "--no-plot", "--quiet", "--no-refine",
        "--device", args.device, "--chunk-size", "2"]
    env_all = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env_one = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "1 process, all threads": ([sys.executable, "-m", "widthkit.rays"], env_all),
        "1 process, 1 thread": ([sys.executable, "-m", "widthkit.rays"], env_one),
        f"torchrun {args.nproc} processes, 1 thread each": (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
             "-m", "widthkit.rays"], env_one),
    }
    n_points = 2 * args.dirs * args.steps
    rows, files = [], {}
    for name, (cmd, env) in runs.items():
        out = work / f"{len(files)}.h5"
        seconds = _time([*cmd, *base, "--out", str(out)], env, work)
        files[name] = out
        rows.append((name, seconds))
    # the same thread count gives the same float reduction order: 1-thread single process vs torchrun must be
    # identical; all threads vs 1 thread may differ in the last bits (reported, not required)
    names = list(files)
    one, dist_run = _values(files[names[1]]), _values(files[names[2]])
    identical = all(np.array_equal(v, dist_run[k]) for k, v in one.items())
    many = _values(files[names[0]])
    max_rel = max(float(np.max(np.abs(many[k] - v) / np.maximum(np.abs(v), 1e-12))) for k, v in one.items())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "?"
    lines = [
        f"Scaling, {dt.date.today()}, commit {commit}, torch {torch.__version__}, device {args.device}, "
        f"{os.cpu_count()} CPUs; rays on digits_cnn: {n_points} points (2 checkpoints x {args.dirs} dirs x "
        f"{args.steps} steps), full digits data, BN recomputed. Wall time includes start-up (~ a few s per process).",
        "",
        "| run | wall s | points/s | speed-up vs 1 process, all threads |",
        "|---|---|---|---|",
    ]
    t0 = rows[0][1]
    for name, s in rows:
        lines.append(f"| {name} | {s:.1f} | {n_points / s:.2f} | {t0 / s:.2f}x |")
    lines += ["", f"torchrun file identical, value for value, to the 1-process 1-thread file: {identical}; "
                  f"largest relative difference between the all-threads and 1-thread files: {max_rel:.1e}"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
