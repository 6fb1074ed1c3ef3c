"""Curves between two solutions (widthkit.curve, Garipov et al. 2018) against independent answers: the
coefficients against their formulas, a Bezier curve with its bend at the midpoint against the line, the curve's
file against widthkit.line, a killed training against an uninterrupted one."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import widthkit
from conftest import STOP_HERE, kill9, python_child, train_digits, wait_for_marker
from widthkit.analyses.curve import files_of, load_curve
from widthkit.engine.config import EvalConfig
from widthkit.engine.curves import (CurveModel, barrier, bezier_coefficients, coefficients, curve_basis,
                                    curve_coordinates, curve_points, initial_bends, polychain_coefficients)
from widthkit.engine.evaluator import Evaluator
from widthkit.runtime import RuntimeConfig
from widthkit.engine.space import ThetaLayout
from widthkit.inputs.checkpoints import safe_load, save_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit.report.store import read

pytestmark = pytest.mark.usefixtures("one_thread")
command = importlib.import_module("widthkit.curve")
QUICK = ["--epochs", "2", "--points", "5", "--plane", "3", "--train-subset", "150", "--test-subset", "80",
         "--bn-subset", "128", "--device", "cpu", "--quiet", "--no-plot"]


@pytest.fixture(scope="module")
def ends(tmp_path_factory):
    """Two digits_cnn solutions of different seeds (the endpoints) and a digits_mlp one."""
    d = tmp_path_factory.mktemp("ends")
    recorded = {"weight_decay": 5e-4, "epochs": 2, "lr": 0.05, "batch_size": 64, "augment": False}
    out = {}
    for name, seed, arch in (("a", 0, "digits_cnn"), ("b", 1, "digits_cnn"), ("mlp", 2, "digits_mlp")):
        out[name] = str(d / f"{name}.pt")
        save_checkpoint(out[name], train_digits(seed, 2, arch), arch=arch, num_classes=10, dataset="digits",
                        role="sgd", config=recorded)
    return out


# --------------------------------------------------------------------------------------------------------
# the coefficients and the geometry
# --------------------------------------------------------------------------------------------------------


def test_bezier_coefficients_are_the_bernstein_polynomials():
    t = np.linspace(0, 1, 11)
    c1 = bezier_coefficients(t, 1).numpy()
    np.testing.assert_allclose(c1, np.stack([(1 - t) ** 2, 2 * t * (1 - t), t ** 2], 1), rtol=0, atol=1e-15)
    c2 = bezier_coefficients(t, 2).numpy()
    np.testing.assert_allclose(c2, np.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3], 1),
                               rtol=0, atol=1e-15)
    assert bezier_coefficients(0.3, 3).shape == (5,)


@pytest.mark.parametrize("bends", [1, 2, 3])
def test_polychain_coefficients_are_the_piecewise_linear_formula(bends):
    n = bends + 1  # segments
    for t in np.linspace(0, 1, 97):
        expected = np.zeros(n + 1)
        j = min(int(math.floor(t * n)), n - 1)  # the segment t falls in, [j/n, (j+1)/n]
        s = t * n - j
        expected[j], expected[j + 1] = 1 - s, s
        np.testing.assert_allclose(polychain_coefficients(t, bends).numpy(), expected, rtol=0, atol=1e-12)
    # at t = i/n the chain is at node i
    points = torch.randn(n + 1, 7, dtype=torch.float64)
    torch.testing.assert_close(curve_points("polychain", np.arange(n + 1) / n, points), points, rtol=0, atol=1e-12)


def test_coefficients_sum_to_one_so_the_basis_form_is_the_curve():
    g = torch.Generator().manual_seed(0)
    start, end, bends = torch.randn(9, generator=g), torch.randn(9, generator=g), torch.randn(2, 9, generator=g)
    t = np.linspace(0, 1, 13)
    for kind in ("bezier", "polychain"):
        assert np.allclose(coefficients(kind, t, 2).sum(1).numpy(), 1.0)
        origin, basis = curve_basis(start, bends, end)
        via_basis = origin.double() + torch.from_numpy(curve_coordinates(kind, t, 2)) @ basis.double()
        direct = curve_points(kind, t, torch.cat([start[None], bends, end[None]]))
        torch.testing.assert_close(via_basis, direct, rtol=0, atol=1e-6)


def test_barrier_is_the_maximum_minus_the_mean_of_the_endpoints():
    assert barrier([1.0, 3.0, 2.5, 2.0]) == 3.0 - 1.5
    assert barrier([0.2, 0.1, 0.4]) == pytest.approx(0.1)  # below the higher end is still measured from the mean
    assert math.isnan(barrier([1.0, np.nan, 2.0]))


def test_a_bezier_curve_with_its_bend_at_the_midpoint_evaluates_like_the_line(ends):
    """The untrained curve (bend initialised on the segment) is the line: every point, every metric."""
    a, b = widthkit.load_checkpoint(ends["a"]), widthkit.load_checkpoint(ends["b"])
    tr, te = load_dataset("digits", split="train", subset=200), load_dataset("digits", split="test", subset=100)
    ev = Evaluator(a.model, train=tr, test=te, config=EvalConfig(bn_mode="recompute"),
                   runtime=RuntimeConfig(device="cpu"))
    wa, wb = ev.theta0, ev.layout.flatten(b.model)
    mid = initial_bends(wa, wb, 1)
    torch.testing.assert_close(mid[0], (wa + wb) / 2)
    t = np.linspace(0, 1, 7)
    origin, basis = curve_basis(wa, mid, wb)
    on_curve = ev.evaluate(origin, basis, curve_coordinates("bezier", t, 1))
    on_line = ev.evaluate(wa, (wb - wa)[None], t[:, None])
    for m in on_line:
        np.testing.assert_allclose(on_curve[m], on_line[m], rtol=1e-5, atol=1e-6, err_msg=m)
    pts = curve_points("bezier", t, torch.stack([wa, mid[0], wb]))
    line = wa.double() + torch.from_numpy(t)[:, None] * (wb - wa).double()
    torch.testing.assert_close(pts, line, rtol=0, atol=1e-5)


def test_the_curve_model_runs_the_network_at_the_curve_point_and_trains_only_the_bends(ends):
    a, b = widthkit.load_checkpoint(ends["a"]), widthkit.load_checkpoint(ends["b"])
    layout = ThetaLayout.from_model(a.model)
    wa, wb = layout.flatten(a.model), layout.flatten(b.model)
    curve = CurveModel(a.model, wa, wb, bends=1, kind="bezier", weight_decay=5e-4).train()
    with torch.no_grad():
        curve.bends.add_(0.01 * torch.randn_like(curve.bends))
    x, y = load_dataset("digits", split="train").normalized()[:32], load_dataset("digits", split="train").labels[:32]
    out = curve(x, t=0.3)
    # independently: a plain copy of the network holding φ(0.3) = 0.49·A + 0.42·bend + 0.09·B, in train mode
    plain = widthkit.load_checkpoint(ends["a"]).model.train()
    theta = 0.49 * wa + 0.42 * curve.bends.detach()[0] + 0.09 * wb
    plain.load_state_dict({**plain.state_dict(), **layout.unflatten(theta)})
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    # the gradient reaches the bend only, scaled by its coefficient: dL/dbend = 0.42 · dL/dθ
    loss = F.cross_entropy(out, y) + curve.penalty()
    loss.backward()
    theta_leaf = theta.clone().requires_grad_(True)
    ref = torch.func.functional_call(widthkit.load_checkpoint(ends["a"]).model.train(), layout.unflatten(theta_leaf), (x,))
    (F.cross_entropy(ref, y) + 0.5 * 5e-4 * theta_leaf.square().sum()).backward()
    torch.testing.assert_close(curve.bends.grad[0], 0.42 * theta_leaf.grad, rtol=1e-4, atol=1e-6)
    assert [n for n, p in curve.named_parameters() if p.requires_grad] == ["bends"]


# --------------------------------------------------------------------------------------------------------
# the command: training, evaluation, the files
# --------------------------------------------------------------------------------------------------------


def test_curve_file_is_a_line_file_with_the_curve_beside_it(ends, tmp_path, capsys):
    out = tmp_path / "c.h5"
    assert command.main(["--ckpt", f"A={ends['a']}", "--ckpt", f"B={ends['b']}", "--out", str(out), *QUICK]) == 0
    printed = capsys.readouterr().out
    data = read(out)
    assert data["kind"] == "line" and set(data["models"]) == {"line", "curve"}
    # the group "line" is exactly what widthkit.line computes on [0, 1] with the same settings
    line = widthkit.line({"A": ends["a"], "B": ends["b"]}, t_min=0.0, t_max=1.0, steps=5, train_subset=150,
                         test_subset=80, bn_subset=128, device="cpu")
    for m, v in line.models["line"]["metrics"].items():
        np.testing.assert_array_equal(data["models"]["line"]["metrics"][m], v, err_msg=m)
    # the curve starts and ends where the line does; its barriers are stored and printed
    for m, v in data["models"]["curve"]["metrics"].items():
        np.testing.assert_allclose(v[[0, -1]], data["models"]["line"]["metrics"][m][[0, -1]], rtol=1e-5, atol=1e-6)
    res = load_curve(out)
    for p in ("line", "curve"):
        for m in ("train_loss", "test_err"):
            assert data["attrs"]["barriers"][p][m] == pytest.approx(barrier(data["models"][p]["metrics"][m]))
    assert "barrier" in printed and "train_loss     curve" in printed
    info = data["attrs"]["curve"]
    assert info["kind"] == "bezier" and info["bends"] == 1 and info["endpoints"] == ["A", "B"]
    assert info["training"]["lr"] == pytest.approx(0.3 * 0.05) and info["training"]["epochs"] == 2
    # the stored control points are the trained curve's, whose checkpoint lies beside it
    ck = safe_load(files_of(out)["checkpoint"])
    ev_layout = ThetaLayout.from_model(widthkit.load_checkpoint(ends["a"]).model)
    wa = ev_layout.flatten(widthkit.load_checkpoint(ends["a"]).model)
    basis_curve = read(out, load_large=True)["axes"]["basis_curve"]
    np.testing.assert_allclose(basis_curve[0], (ck["bends"][0] - wa).numpy(), rtol=0, atol=1e-6)
    assert [r["epoch"] for r in ck["log"]] == [1, 2]
    # the plane through A, B and the bend, the curve's points on it (one bend: distance 0 from the plane)
    plane = res.plane.data
    assert plane["kind"] == "plane" and plane["axes"]["point_labels"] == ["A", "B", "bend"]
    assert plane["axes"]["curve"].shape == (5, 2) and np.all(plane["axes"]["curve_plane_distances"] < 1e-3)
    np.testing.assert_allclose(plane["axes"]["curve"][[0, -1]], plane["axes"]["points"][:2], atol=1e-4)
    ax = res.plot_plane()
    assert any(line.get_gid() == "straight-line" for line in ax.lines)
    import matplotlib.pyplot as plt
    plt.close(ax.figure)
    # readers of line and plane files read both files as they are: the straight line, the plane
    from widthkit.report.render import plot_file

    assert widthkit.load(out).kind == "line"
    written = plot_file(out, tmp_path / "old", formats=("png",)) + plot_file(files_of(out)["plane"], tmp_path / "old",
                                                                              formats=("png",))
    assert len(written) >= 2 and all((tmp_path / "old" / p).exists() for p in written)
    assert not plt.get_fignums()
    # the same command again: the trained curve and both evaluations are reused, no file rewritten
    stamps = {f: f.stat().st_mtime_ns for f in files_of(out).values()}
    assert command.main(["--ckpt", f"A={ends['a']}", "--ckpt", f"B={ends['b']}", "--out", str(out), *QUICK]) == 0
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps


def test_curve_bad_inputs_are_one_line_errors_before_any_work(ends, tmp_path, capsys):
    out = tmp_path / "bad.h5"
    cases = [
        (["--ckpt", ends["a"], "--ckpt", ends["mlp"]], "does not share the architecture"),
        (["--ckpt", f"A={ends['a']}", "--ckpt", f"B={ends['b']}", "--bends", "0"], "--bends must be an integer >= 1"),
        (["--ckpt", f"A={ends['a']}", "--ckpt", f"B={ends['b']}", "--bn-mode", "keep"], "use bn_mode recompute"),
        (["--ckpt", ends["a"]], "a curve needs exactly two checkpoints, got 1"),
        (["--ckpt", f"A={ends['a']}", "--ckpt", f"B={ends['a']}"], "identical weights"),
    ]
    for argv, message in cases:
        assert command.main([*argv, "--out", str(out), *QUICK]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not list(tmp_path.iterdir())


# a curve command that stops after STEP steps of its EPOCH-th epoch of curve training
CURVE_CHILD = STOP_HERE + '''
from widthkit.training import curve as training
from widthkit.curve import main

marker, epoch, step, args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
real, epochs = training.train_epoch, []


def train_epoch(*a, on_batch=None, **kw):
    epochs.append(1)
    steps = []

    def counted():
        if on_batch is not None:
            on_batch()
        steps.append(1)
        if len(epochs) == epoch and len(steps) == step:
            stop_here(marker)

    return real(*a, on_batch=counted, **kw)


training.train_epoch = train_epoch
sys.exit(main(args))
'''


@pytest.mark.slow
@pytest.mark.subprocess
def test_curve_training_resumes_after_kill_9_bit_identically(ends, tmp_path, spawn, capsys):
    argv = ["--ckpt", f"A={ends['a']}", "--ckpt", f"B={ends['b']}", *QUICK, "--epochs", "3"]
    whole = tmp_path / "whole.h5"
    assert command.main([*argv, "--out", str(whole)]) == 0
    killed = tmp_path / "killed.h5"
    marker = tmp_path / "marker"
    proc, log = spawn(python_child(CURVE_CHILD, marker, 2, 5, *argv, "--out", killed))
    wait_for_marker(marker, proc, log)
    kill9(proc)  # in the second epoch: the first one's state is on disk, no curve, no evaluation yet
    state = files_of(killed)["checkpoint"].with_name("killed.curve-state.pt")
    assert state.exists() and not files_of(killed)["checkpoint"].exists() and not killed.exists()
    assert safe_load(state)["epoch"] == 1
    assert command.main([*argv, "--out", str(killed)]) == 0
    assert not state.exists()
    a, b = safe_load(files_of(whole)["checkpoint"]), safe_load(files_of(killed)["checkpoint"])
    assert torch.equal(a["bends"], b["bends"])
    assert [r["train_loss"] for r in a["log"]] == [r["train_loss"] for r in b["log"]]
    for p in ("line", "curve"):
        for m, v in read(whole)["models"][p]["metrics"].items():
            np.testing.assert_array_equal(read(killed)["models"][p]["metrics"][m], v)
    # a finished curve is reused; other settings are refused, naming what differs
    capsys.readouterr()
    assert command.main([*argv, "--out", str(killed), "--lr", "0.2"]) == 2
    assert "settings.lr" in capsys.readouterr().err
