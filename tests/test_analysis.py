"""Rays, lines, planes and plots end to end, from the command line and from Python."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import widthkit
import importlib

line_cli = importlib.import_module("widthkit.line")
plane_cli = importlib.import_module("widthkit.plane")
plot_cli = importlib.import_module("widthkit.plot")
rays_cli = importlib.import_module("widthkit.rays")
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit import EvalConfig, Evaluator
from widthkit.runtime import RuntimeConfig
from widthkit.models import create_model
from conftest import ANALYSIS_CHILD, kill9, python_child, wait_for_marker
from widthkit.report.store import read

# small evaluation sets keep every point cheap; the numbers are still real (and CPU arithmetic: on a GPU host too)
CPU = RuntimeConfig(device="cpu")
SMALL = ["--train-subset", "160", "--test-subset", "120", "--quiet", "--device", "cpu"]


@pytest.fixture
def ckpts(digits_ckpts):
    return digits_ckpts


def _direct(path, train_subset=160, test_subset=120, bn="recompute"):
    """Metrics of a checkpoint evaluated on its own (no directions), on the CLI's data subsets."""
    from widthkit.analyses.subjects import resolve_data

    ck = load_checkpoint(path)
    train, test, _ = resolve_data("digits", [], EvalConfig(train_subset=train_subset, test_subset=test_subset), "cpu")
    ev = Evaluator(ck.model, train, test, EvalConfig(bn_mode=bn, weight_decay=5e-4), runtime=CPU)
    return ev.evaluate_weights(ev.theta0), ev.theta0


def test_rays_cli_end_to_end(ckpts, tmp_path, capsys):
    out = tmp_path / "rays.h5"
    figs = tmp_path / "figs"
    code = rays_cli.main(["--ckpt", ckpts["sgd"], "--ckpt", ckpts["swa"], "--dirs", "3", "--steps", "5",
                          "--max-dist", "8", "--out", str(out), "--figures", str(figs), "--refine", "--tol", "0.05",
                          *SMALL])
    assert code == 0
    printed = capsys.readouterr().out
    assert "width at test_err=+5" in printed and "SWA wider than SGD on" in printed
    data = read(out, load_large=True)
    assert data["kind"] == "rays" and set(data["models"]) == {"sgd", "swa"}
    np.testing.assert_allclose(data["axes"]["distances"], np.linspace(0, 8, 5))
    dirs = data["axes"]["directions"]
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0, rtol=1e-5)
    for group, path in (("sgd", ckpts["sgd"]), ("swa", ckpts["swa"])):
        m = data["models"][group]
        assert m["done"].all() and m["metrics"]["test_err"].shape == (3, 5)
        assert all(np.isfinite(v).all() for v in m["metrics"].values())
        assert m["attrs"]["checkpoint"] == path and len(m["attrs"]["sha256"]) == 64
        direct, _ = _direct(path)
        for metric in ("train_loss", "test_err", "train_loss_l2"):
            np.testing.assert_allclose(m["metrics"][metric][:, 0], direct[metric], rtol=1e-6)
    report = json.loads((tmp_path / "rays.widths.json").read_text())
    assert [r["threshold"] for r in report] == ["test_err=+5", "train_loss_l2=+0.5"]
    assert report[0]["refined"] and set(report[0]["summaries"]) == {"SGD", "SWA"}
    assert "comparison" in report[0] and data["widths"]["SWA"]["metric"] == "test_err"
    pngs = sorted(p.name for p in figs.glob("*.png"))
    assert pngs and all((figs / p).stat().st_size > 10_000 for p in pngs)
    assert list(figs.glob("*.pdf"))


def test_refined_width_is_a_crossing(ckpts, tmp_path):
    """The bisected width lies within tol of where the metric really crosses its level."""
    res = widthkit.rays({"SWA": ckpts["swa"]}, dirs=2, steps=5, max_dist=10.0, bn_mode="keep",
                        train_subset=160, test_subset=120, device="cpu")
    w = res.widths("train_loss=+0.3", refine=True, tol=0.02)
    ev, theta, dirs = res.evaluators["SWA"]
    for i, width in enumerate(w["per_direction"]["SWA"]):
        assert np.isfinite(width)
        level = w["levels"]["SWA"][i]
        coords = np.zeros((2, 2))
        coords[:, i] = [width - 0.02, width]
        vals = ev.evaluate(theta, dirs, coords)["train_loss"]
        assert vals[0] < level <= vals[1]


def test_filter_rays_scale_to_each_model(ckpts, tmp_path):
    """Weight-scaled directions: the same draws, each scaled to its own model's filters (Li et al. 2018)."""
    out = tmp_path / "filter.h5"
    assert rays_cli.main(["--ckpt", ckpts["sgd"], "--ckpt", ckpts["swa"], "--norm", "filter", "--exclude", "biasbn",
                          "--dirs", "2", "--steps", "2", "--out", str(out), "--no-plot", *SMALL]) == 0
    data = read(out, load_large=True)
    assert data["axes"]["distances"][-1] == 1.0  # default max distance for weight-scaled directions
    for key, role in (("directions", "sgd"), ("directions_swa", "swa")):
        theta = _direct(ckpts[role])[1]
        d = torch.as_tensor(data["axes"][key][0])
        model = load_checkpoint(ckpts[role]).model
        off = 0
        for name, p in model.named_parameters():
            n = p.numel()
            if p.dim() > 1:  # every filter of the direction as long as the model's own filter
                df, wf = d[off:off + n].view(p.shape[0], -1), theta[off:off + n].view(p.shape[0], -1)
                torch.testing.assert_close(df.norm(dim=1), wf.norm(dim=1), rtol=1e-4, atol=1e-6)
            off += n


def test_line_cli(ckpts, tmp_path):
    out = tmp_path / "line.h5"
    assert line_cli.main(["--ckpt", ckpts["swa"], "--ckpt", ckpts["sgd"], "--steps", "7", "--out", str(out),
                          "--figures", str(tmp_path), *SMALL]) == 0
    data = read(out, load_large=True)
    t = data["axes"]["t"]
    np.testing.assert_allclose(t, np.linspace(-1, 2, 7))
    m = data["models"]["line"]["metrics"]
    assert m["test_err"].shape == (7,) and data["models"]["line"]["done"].all()
    assert data["axes"]["point_labels"] == ["SWA", "SGD"]
    for ti, path in ((2, ckpts["swa"]), (4, ckpts["sgd"])):  # t = 0 and t = 1
        direct, _ = _direct(path)
        assert m["test_loss"][ti] == pytest.approx(direct["test_loss"], rel=1e-4)
    d_swa_sgd = float((_direct(ckpts["sgd"])[1] - _direct(ckpts["swa"])[1]).norm())
    np.testing.assert_allclose(data["axes"]["distances"], t * d_swa_sgd, rtol=1e-5)
    assert list(tmp_path.glob("line*.png"))


def test_plane_cli_three_points(ckpts, tmp_path):
    out = tmp_path / "plane.h5"
    assert plane_cli.main(["--ckpt", ckpts["start"], "--ckpt", ckpts["sgd"], "--ckpt", ckpts["swa"],
                           "--resolution", "4", "3", "--out", str(out), "--figures", str(tmp_path), *SMALL]) == 0
    data = read(out, load_large=True)
    m = data["models"]["plane"]
    assert m["metrics"]["train_loss"].shape == (4, 3) and m["done"].all()
    basis, points = data["axes"]["basis"], data["axes"]["points"]
    np.testing.assert_allclose(basis @ basis.T, np.eye(2), atol=1e-5)
    assert data["axes"]["point_labels"] == ["start", "SGD", "SWA"]
    thetas = [_direct(ckpts[r])[1].double().numpy() for r in ("start", "sgd", "swa")]
    for k, theta in enumerate(thetas):  # each checkpoint sits at its stored plane coordinates
        np.testing.assert_allclose(thetas[0] + points[k] @ basis, theta, atol=2e-4)
    # the three points evaluated through the plane equal the checkpoints evaluated directly
    ck = load_checkpoint(ckpts["start"])
    from widthkit.analyses.subjects import resolve_data

    train, test, _ = resolve_data("digits", [], EvalConfig(train_subset=160, test_subset=120), "cpu")
    ev = Evaluator(ck.model, train, test, EvalConfig(bn_mode="recompute"), runtime=CPU)
    through = ev.evaluate(ev.theta0, torch.as_tensor(basis), points)
    for k, r in enumerate(("start", "sgd", "swa")):
        direct, _ = _direct(ckpts[r])
        assert through["test_err"][k] == pytest.approx(direct["test_err"], abs=1e-9)
        assert through["train_loss"][k] == pytest.approx(direct["train_loss"], rel=1e-4)
    # the grid covers the three points with margins
    x, y = data["axes"]["x"], data["axes"]["y"]
    assert x[0] < points[:, 0].min() and x[-1] > points[:, 0].max() and y[0] < 0 and y[-1] > points[:, 1].max()
    assert len(list(tmp_path.glob("plane*.png"))) >= 2


def test_random_plane_and_plot_cli(ckpts, tmp_path):
    out = tmp_path / "rp.h5"
    assert plane_cli.main(["--ckpt", ckpts["swa"], "--random", "--resolution", "3", "--bn", "keep", "--out", str(out),
                           "--no-plot", *SMALL]) == 0
    data = read(out, load_large=True)
    basis = data["axes"]["basis"]
    assert basis.shape[0] == 2 and data["models"]["plane"]["done"].all()
    centre = data["models"]["plane"]["metrics"]["test_err"][1, 1]
    assert centre == pytest.approx(_direct(ckpts["swa"], bn="keep")[0]["test_err"])
    figs = tmp_path / "f"
    assert plot_cli.main([str(out), "--figures", str(figs), "--format", "png,svg"]) == 0
    assert list(figs.glob("*.svg")) and list(figs.glob("*.png"))
    for kind in ("heatmap", "surface"):
        assert plot_cli.main([str(out), "--figures", str(figs), "--format", "png", "--plane", kind]) == 0
        assert (figs / f"rp_test_err_{kind}.png").stat().st_size > 5000


def test_bad_inputs_give_clear_errors(ckpts, tmp_path, capsys):
    out = tmp_path / "r.h5"
    args = ["--ckpt", ckpts["sgd"], "--dirs", "1", "--steps", "2", "--out", str(out), "--no-plot", *SMALL]
    assert rays_cli.main(args) == 0
    capsys.readouterr()
    assert rays_cli.main(args[:-len(SMALL)] + ["--seed", "3", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "seed" in err and "--overwrite" in err
    assert rays_cli.main(["--ckpt", ckpts["sgd"], "--ckpt", ckpts["mlp"], "--no-plot", *SMALL]) == 2
    assert "does not share the architecture" in capsys.readouterr().err
    assert line_cli.main(["--ckpt", ckpts["sgd"], "--no-plot", *SMALL]) == 2
    assert "exactly two checkpoints" in capsys.readouterr().err
    assert rays_cli.main(["--ckpt", str(tmp_path / "nope.pt"), "--no-plot"]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert rays_cli.main(["--ckpt", ckpts["sgd"], "--data", "cifar10", "--data-root", str(tmp_path), "--no-plot"]) == 2
    assert "cifar-10-batches-py" in capsys.readouterr().err


def test_python_api_with_modules_and_tensors(tmp_path):
    torch.manual_seed(0)
    a, b = create_model("digits_mlp"), create_model("digits_mlp")
    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    data = ((tr.normalized()[:100], tr.labels[:100]), (te.normalized()[:50], te.labels[:50]))
    before = {k: v.clone() for k, v in a.state_dict().items()}
    res = widthkit.rays({"A": a, "B": b}, data, dirs=2, steps=3, max_dist=1.0, device="cpu")
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())
    assert res.metric("test_err", "a").shape == (2, 3) and res.complete()
    saved = res.save(tmp_path / "api.h5")
    again = widthkit.load(saved)
    np.testing.assert_array_equal(again.metric("test_loss", "b"), res.metric("test_loss", "b"))
    import matplotlib.pyplot as plt

    ax = again.plot()
    assert ax.get_xlabel()
    plt.close("all")
    assert "comparison" in again.widths("test_err=+1")


def _rays_args(ckpts, out):
    return ["--ckpt", ckpts["sgd"], "--ckpt", ckpts["swa"], "--dirs", "3", "--steps", "6", "--max-dist", "6",
            "--chunk-size", "1", "--out", str(out), "--no-plot", *SMALL]


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_then_resume_equals_uninterrupted(ckpts, tmp_path, spawn):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # every process of this test does the same arithmetic
    rays = [sys.executable, "-m", "widthkit.rays"]
    full, killed = tmp_path / "full.h5", tmp_path / "killed.h5"
    subprocess.run([*rays, *_rays_args(ckpts, full)], check=True, capture_output=True, cwd=tmp_path, env=env)
    # the same command in a child that stops (alive, blocked) in its progress callback once 5 points are written
    proc, log = spawn(python_child(ANALYSIS_CHILD, tmp_path / "stop", 5, "widthkit.rays", *_rays_args(ckpts, killed)),
                      cwd=tmp_path, env=env)
    wait_for_marker(tmp_path / "stop.0", proc, log)
    kill9(proc)
    partial = read(killed)
    assert partial["models"]["sgd"]["done"].sum() == 5 and not partial["models"]["swa"]["done"].any()
    subprocess.run([*rays, *_rays_args(ckpts, killed)], check=True, capture_output=True, cwd=tmp_path, env=env)
    a, b = read(full), read(killed)
    for g in ("sgd", "swa"):
        assert b["models"][g]["done"].all()
        for m, v in a["models"][g]["metrics"].items():
            np.testing.assert_array_equal(b["models"][g]["metrics"][m], v)


def test_both_models_of_an_swa_authors_file(ckpts, tmp_path):
    """--ckpt file.pt#sgd --ckpt file.pt#swa analyses the two models a training checkpoint of the SWA authors holds."""
    sgd, swa = load_checkpoint(ckpts["sgd"]), load_checkpoint(ckpts["swa"])
    path = tmp_path / "checkpoint-30.pt"
    torch.save({"epoch": 30, "state_dict": sgd.state_dict, "swa_state_dict": swa.state_dict, "swa_n": 8,
                "optimizer": {}}, path)
    assert rays_cli.main(["--ckpt", f"{path}#sgd", "--ckpt", f"{path}#swa", "--data", "digits", "--bn", "keep",
                          "--dirs", "1", "--steps", "2", "--out", str(tmp_path / "r.h5"), "--no-plot", *SMALL]) == 0
    data = read(tmp_path / "r.h5")
    assert {g: m["attrs"]["label"] for g, m in data["models"].items()} == {"sgd": "SGD", "swa": "SWA"}
    for group, role in (("sgd", "sgd"), ("swa", "swa")):
        direct, _ = _direct(ckpts[role], bn="keep")
        assert data["models"][group]["metrics"]["test_loss"][0, 0] == pytest.approx(direct["test_loss"], rel=1e-6)


def test_two_sided_rays_report_asymmetry(ckpts, tmp_path, capsys):
    out = tmp_path / "two.h5"
    assert rays_cli.main(["--ckpt", ckpts["swa"], "--two-sided", "--dirs", "2", "--steps", "5", "--max-dist", "10",
                          "--bn", "keep", "--out", str(out), "--figures", str(tmp_path), *SMALL]) == 0
    assert "asymmetry at test_err=+5" in capsys.readouterr().out
    data = read(out)
    np.testing.assert_allclose(data["axes"]["distances"], [-10, -5, 0, 5, 10])
    reports = json.loads((tmp_path / "two.asymmetry.json").read_text())
    swa = reports[0]["SWA"]
    assert len(swa["plus"]) == len(swa["minus"]) == 2
    err = data["models"]["swa"]["metrics"]["test_err"]
    assert np.all(err[:, 2] == err[0, 2])  # distance 0 is the checkpoint itself on every ray
    assert list(tmp_path.glob("two*.png"))
