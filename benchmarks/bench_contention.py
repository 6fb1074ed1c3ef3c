"""A shared CPU: the same rays command alone and beside one busy process, at the default settings (threads
chosen by timing at the start) and at each fixed thread count, in one run.

    python benchmarks/bench_contention.py                 # digits, rays --dirs 4 --steps 11, BN recompute

Trains two tiny digits checkpoints (or reuses them), then times ``python -m widthkit.rays`` as a user runs it,
every setting alone and beside one busy process (a pure-Python loop spinning on one core), interleaved round by
round, best of ``--rounds``. Prints a Markdown table with each time's ratio to the best setting of the same
condition (also written with ``--out``). Target (issue 14): default ≥ 0.95 of the best alone and ≥ 0.85 of the
best beside the busy process.
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

import torch

BUSY = "while True:\n    pass\n"


def _checkpoints(folder: Path) -> list[str]:
    from widthkit.training.trainer import load_recipe, train_branches

    if not (folder / "swa.pt").exists():
        train_branches(load_recipe("digits").replace(epochs=4), folder, progress=False)
    return [str(folder / "sgd.pt"), str(folder / "swa.pt")]


def _time(cmd: list[str], cwd: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t = time.perf_counter()
    run = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{run.stderr[-2000:]}")
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dirs", type=int, default=4)
    p.add_argument("--steps", type=int, default=11)
    p.add_argument("--rounds", type=int, default=2, help="best of this many runs per setting and condition")
    p.add_argument("--out", help="write the Markdown table here too")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    counts = sorted({1, torch.get_num_threads()})
    settings = {"default (chosen by timing)": []} | {f"--threads {n}": ["--threads", str(n)] for n in counts}
    with tempfile.TemporaryDirectory(prefix="wk-contention-") as tmp:
        work = Path(tmp)
        ckpts = _checkpoints(work / "ck")
        base = [sys.executable, "-m", "widthkit.rays", *[a for c in ckpts for a in ("--ckpt", c)],
                "--dirs", str(args.dirs), "--steps", str(args.steps), "--bn", "recompute", "--no-plot", "--quiet",
                "--no-refine", "--overwrite"]
        best = {}
        for cond in ("alone", "beside one busy process"):
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if cond != "alone" else None
            try:
                for _ in range(args.rounds):
                    for name, extra in settings.items():
                        s = _time([*base, *extra, "--out", str(work / "r.h5")], work)
                        best[cond, name] = min(best.get((cond, name), float("inf")), s)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    lines = [f"`rays --dirs {args.dirs} --steps {args.steps}` on two digits checkpoints, BN recompute, "
             f"{cores} cores, torch default {torch.get_num_threads()} threads, best of {args.rounds}; "
             f"{dt.date.today()}, commit {commit}", "",
             "| condition | setting | seconds | of the best |", "|---|---|---|---|"]
    for cond in ("alone", "beside one busy process"):
        fastest = min(v for (c, _), v in best.items() if c == cond)
        for name in settings:
            s = best[cond, name]
            lines.append(f"| {cond} | {name} | {s:.1f} | {fastest / s:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
