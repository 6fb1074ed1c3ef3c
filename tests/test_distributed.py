"""Real multi-process runs under torchrun (gloo on CPU, 127.0.0.1): same file as a single process."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import ANALYSIS_CHILD, wait_for_marker
from widthkit.report.store import read

SMALL = ["--train-subset", "160", "--test-subset", "120", "--no-plot", "--quiet", "--device", "cpu"]  # gloo, also on GPU hosts
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WIDTHKIT_DIST_TIMEOUT_MIN": "2"}
pytestmark = pytest.mark.subprocess  # every test here starts torchrun


def torchrun(n, module, args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            "-m", module, *args]


def single(module, args):
    return [sys.executable, "-m", module, *args]


def assert_same_results(a_path, b_path):
    a, b = read(a_path, load_large=True), read(b_path, load_large=True)
    assert a["config"] == b["config"]
    for name in ("distances", "directions", "x", "y", "basis", "points"):
        if name in a["axes"]:
            np.testing.assert_array_equal(a["axes"][name], b["axes"][name])
    for g, m in a["models"].items():
        assert b["models"][g]["done"].all() and m["done"].all()
        for metric, values in m["metrics"].items():
            np.testing.assert_array_equal(b["models"][g]["metrics"][metric], values, err_msg=f"{g}/{metric}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rays", "plane"])
def test_two_processes_equal_one(digits_ckpts, tmp_path, kind):
    if kind == "rays":
        args = ["--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"], "--dirs", "2", "--steps", "4"]
    else:
        args = ["--ckpt", digits_ckpts["start"], "--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"],
                "--resolution", "3"]
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    subprocess.run(single(f"widthkit.{kind}", [*args, "--out", str(one), *SMALL]), check=True, env=ENV,
                   cwd=tmp_path, capture_output=True)
    run = subprocess.run(torchrun(2, f"widthkit.{kind}", [*args, "--out", str(two), *SMALL]), env=ENV,
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(f"{kind}: ") == 1  # one rank reports; the other stays quiet
    assert_same_results(one, two)


@pytest.mark.slow
def test_killed_rank_then_resume_with_one_process(digits_ckpts, tmp_path, spawn):
    args = ["--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"], "--dirs", "3", "--steps", "6",
            "--chunk-size", "1"]
    full, killed = tmp_path / "full.h5", tmp_path / "killed.h5"
    subprocess.run(single("widthkit.rays", [*args, "--out", str(full), *SMALL]), check=True, env=ENV, cwd=tmp_path,
                   capture_output=True)
    # the same command under torchrun, each rank a child that stops at a known point: rank 0 (the writer) once
    # 4 points are in the file, rank 1 after it computed and posted its first chunk
    script = tmp_path / "child.py"
    script.write_text(ANALYSIS_CHILD)
    proc, log = spawn([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(script), str(tmp_path / "stop"), "4", "widthkit.rays", *args, "--out", str(killed), *SMALL],
                      env=ENV, cwd=tmp_path)
    wait_for_marker(tmp_path / "stop.0", proc, log)
    rank1 = wait_for_marker(tmp_path / "stop.1", proc, log)
    os.kill(rank1, signal.SIGKILL)  # one rank dies mid-run; torchrun stops the job
    assert proc.wait() != 0
    partial = read(killed)
    assert int(partial["models"]["sgd"]["done"].sum()) == 4 and not partial["models"]["swa"]["done"].any()
    # finish with a single process: only the missing points are computed, and the file equals a clean run
    subprocess.run(single("widthkit.rays", [*args, "--out", str(killed), *SMALL]), check=True, env=ENV, cwd=tmp_path,
                   capture_output=True)
    assert_same_results(full, killed)
