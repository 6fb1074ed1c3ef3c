"""Curvature and sharpness against independent answers: the exact float64 Hessian of tiny models
(``torch.autograd.functional.hessian``), hand-checkable identities of the estimators, reparametrised models,
a killed and resumed command, two torchrun ranks against one process, the commands on digits checkpoints."""

import copy
import importlib
import math
import os
import subprocess
import sys

import h5py
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import widthkit
from conftest import STOP_HERE, kill9, python_child, wait_for_marker
from widthkit.engine.curvature import (
    STREAM_SLQ,
    CurvatureConfig,
    HessianOperator,
    density_moments,
    effective_dimension,
    exact_effective_dimension,
    generator,
    hutchpp,
    lanczos,
    log_spectral_density,
    rademacher,
    slq_probe,
    spectral_density,
    tree_nodes,
    tree_sum,
)
from widthkit.engine.sharpness import SharpnessConfig, sharpness_of
from widthkit.report.curvature_store import read_curvature
from widthkit.report.spectrum import curvature_markdown, curvature_table, write_spectrum_figure

curvature_cmd = importlib.import_module("widthkit.curvature")
sharpness_cmd = importlib.import_module("widthkit.sharpness")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WIDTHKIT_DIST_TIMEOUT_MIN": "2"}


# --------------------------------------------------------------------------------------------- tiny problems


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def tiny_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))


@pytest.fixture(scope="module")
def problem():
    """A tiny BN CNN (BN statistics set by a pass in train mode) and 48 examples of 3 classes."""
    torch.manual_seed(0)
    x = torch.randn(48, 1, 4, 4)
    y = torch.randint(0, 3, (48,))
    model = tiny_cnn()
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x, y


def exact_hessian(model, x, y, wd=0.0, buffers=None):
    """The float64 Hessian of mean CE (+ ½·wd·‖θ‖²) w.r.t. θ (named_parameters order), BN in eval mode."""
    m64 = copy.deepcopy(model).double().eval()
    names = [(n, p.shape, p.numel()) for n, p in m64.named_parameters()]
    bufs = {k: v.double() for k, v in (buffers or dict(m64.named_buffers())).items()}
    theta = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])

    def loss(t):
        params, o = {}, 0
        for n, shape, k in names:
            params[n] = t[o:o + k].view(shape)
            o += k
        out = functional_call(m64, (params, bufs), (x.double(),))
        return F.cross_entropy(out, y) + 0.5 * wd * t.square().sum()

    return torch.autograd.functional.hessian(loss, theta)


@pytest.fixture(scope="module")
def exact(problem):
    model, x, y = problem
    H = exact_hessian(model, x, y, wd=0.01)
    evals, evecs = torch.linalg.eigh(H)
    return H, evals.numpy(), evecs


# --------------------------------------------------------------------------------------------- the operator


@pytest.mark.parametrize("method", ["double-backward", "forward-over-reverse"])
def test_operator_equals_the_exact_hessian(problem, exact, method):
    model, x, y = problem
    H = exact[0]
    op = HessianOperator(model, x, y, weight_decay=0.01, batch_size=10, method=method)  # 5 batches, the last short
    assert op.dim == H.shape[0] and op.method == method
    for seed in range(3):
        v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        hv = op.hvp(v)
        assert hv.dtype == torch.float64
        torch.testing.assert_close(hv, H @ v, rtol=2e-5, atol=2e-6 * float((H @ v).abs().max()))
    before = [p.clone() for p in model.parameters()]
    loss, grad = op.loss_and_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the caller's model untouched
    assert op.hvp(torch.zeros(op.dim)).abs().max() == 0 and op.hvp_count == 4
    # keeping the per-batch gradient graphs between products changes nothing, bit for bit
    kept, fresh = (HessianOperator(model, x, y, weight_decay=0.01, batch_size=10, method=method, cache_graphs=c)
                   for c in (True, False))
    v = torch.randn(op.dim, dtype=torch.float64)
    assert torch.equal(kept.hvp(v), fresh.hvp(v)) and torch.equal(kept.hvp(2 * v), fresh.hvp(2 * v))
    assert kept.describe()["graph_cache"] and not fresh.describe()["graph_cache"]


def test_recompute_bn_uses_statistics_recomputed_once_at_theta0(problem):
    model, x, y = problem
    bn_x = x[:20]
    op = HessianOperator(model, x, y, bn_mode="recompute", bn_x=bn_x, batch_size=7, method="double-backward")
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        ref(bn_x[:7]), ref(bn_x[7:14]), ref(bn_x[14:])
    H = exact_hessian(ref.eval(), x, y)
    v = torch.randn(op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.hvp(v), H @ v, rtol=2e-5, atol=1e-5)
    assert not torch.equal(op.buffers["1.running_mean"], model[1].running_mean)  # recomputed, the model's kept


def test_the_batch_tree_adds_every_batch_once_in_a_fixed_order():
    vals = {b: torch.tensor([float(b) + 0.1]) for b in range(11)}
    assert float(tree_sum(vals.__getitem__, 0, 11)) == pytest.approx(sum(b + 0.1 for b in range(11)))
    for depth in range(4):
        nodes = tree_nodes(0, 11, depth)
        assert len(nodes) == 2 ** depth and nodes[0][0] == 0 and nodes[-1][1] == 11
        assert all(a[1] == b[0] for a, b in zip(nodes, nodes[1:]))
        level = [tree_sum(vals.__getitem__, lo, hi) for lo, hi in nodes]
        while len(level) > 1:  # combining the subtree sums in tree order gives the very same bits
            level = [level[i] if level[i + 1] is None else (level[i + 1] if level[i] is None else level[i] + level[i + 1])
                     for i in range(0, len(level), 2)]
        assert torch.equal(level[0], tree_sum(vals.__getitem__, 0, 11))


# --------------------------------------------------------------------------------------------- estimators


def test_lanczos_top_k_and_lambda_min_equal_the_exact_spectrum(problem, exact):
    model, x, y = problem
    H, evals, evecs = exact
    op = HessianOperator(model, x, y, weight_decay=0.01, batch_size=16, method="double-backward")
    r = lanczos(op.hvp, op.dim, k=4, tol=1e-7, max_iter=op.dim, seed=3)
    assert r.converged and r.iterations < op.dim
    np.testing.assert_allclose(r.eigenvalues, evals[::-1][:4], rtol=1e-5)
    assert r.lambda_min == pytest.approx(evals[0], rel=1e-4, abs=1e-6)
    for i in range(4):  # up to sign
        assert abs(float(evecs[:, -1 - i] @ r.eigenvectors[i])) > 1 - 1e-6
    assert abs(float(evecs[:, 0] @ r.lambda_min_vector)) > 1 - 1e-4
    # the reported residuals are the true ones: ‖Hy − λy‖
    true = [float(torch.linalg.vector_norm(H @ r.eigenvectors[i] - r.eigenvalues[i] * r.eigenvectors[i]))
            for i in range(4)]
    assert max(true) < 1e-4 * evals[-1]


def test_lanczos_on_a_matrix_with_repeated_eigenvalues_and_an_invariant_start():
    """Exact spectrum of a diagonal matrix, including a double top eigenvalue (Lanczos needs a restart for the
    second copy: the Krylov space of one start vector holds one vector per distinct eigenvalue)."""
    d = torch.tensor([5.0, 5.0, 3.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    r = lanczos(lambda v: d * v, 6, k=3, tol=1e-10, max_iter=6, seed=0)
    np.testing.assert_allclose(r.eigenvalues, [5.0, 5.0, 3.0], atol=1e-9)
    assert r.lambda_min == pytest.approx(-2.0)
    assert abs(float(r.eigenvectors[0] @ r.eigenvectors[1])) < 1e-9


def test_hutchpp_is_unbiased_within_three_standard_errors(exact):
    H = exact[0]
    true = float(torch.trace(H))
    est = [hutchpp(lambda v: H @ v, H.shape[0], hvps=12, seed=s) for s in range(40)]
    values = np.array([e.trace for e in est])
    se_mean = math.sqrt(sum(e.stderr ** 2 for e in est)) / len(est)  # E[estimate | Q] = tr(H) for every Q
    assert abs(values.mean() - true) <= 3 * se_mean, (values.mean(), true, se_mean)
    assert all(e.hvps == 12 for e in est)
    # the reported standard errors describe the actual spread of the estimates
    spread = values.std(ddof=1)
    rms = math.sqrt(np.mean([e.stderr ** 2 for e in est]))
    assert 0.4 < spread / rms < 2.5, (spread, rms)
    # with as many probes as dimensions the low-rank part is the whole trace
    full = hutchpp(lambda v: H @ v, H.shape[0], hvps=3 * H.shape[0], seed=0)
    assert full.trace == pytest.approx(true, rel=1e-9) and full.low_rank == pytest.approx(true, rel=1e-9)


def test_slq_quadrature_density_and_effective_dimension(exact):
    H, evals, _ = exact
    D = H.shape[0]
    mv = lambda v: H @ v  # noqa: E731
    nodes, weights = slq_probe(mv, D, 8, seed=5, index=2)
    v = rademacher(D, generator(5, STREAM_SLQ, 2), "cpu") / math.sqrt(D)
    for p in range(4):  # Gauss quadrature with 8 nodes is exact for degree < 16
        assert (weights * nodes ** p).sum() == pytest.approx(float(v @ torch.linalg.matrix_power(H, p) @ v), rel=1e-8)
    # many probes, each as long as the space (exact quadrature): moments unbiased for tr(H^p)/D
    probes = [slq_probe(mv, D, D, seed=1, index=i) for i in range(30)]
    nodes, weights = np.array([p[0] for p in probes]), np.array([p[1] for p in probes])
    for order in (1, 2):
        per_probe = (weights * nodes ** order).sum(axis=1)
        exact_moment = float((evals ** order).sum() / D)
        assert abs(per_probe.mean() - exact_moment) <= 3 * per_probe.std(ddof=1) / math.sqrt(30) + 1e-12
        assert density_moments(nodes, weights)[order] == pytest.approx(per_probe.mean())
    grid, dens, sigma = spectral_density(nodes, weights, points=4000, sigma=0.01)
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, abs=1e-5)
    m1 = np.trapezoid(grid * dens, grid)
    m2 = np.trapezoid(grid ** 2 * dens, grid)
    mom = density_moments(nodes, weights)
    assert m1 == pytest.approx(mom[1], rel=1e-4, abs=1e-9)
    assert m2 == pytest.approx(mom[2] + sigma ** 2, rel=1e-4)  # smoothing adds σ² to the second moment
    logd = log_spectral_density(nodes, weights, points=4000)
    assert logd["positive_mass"] + logd["negative_mass"] + logd["excluded"] == pytest.approx(1.0)
    assert np.trapezoid(logd["positive"], logd["grid"]) == pytest.approx(logd["positive_mass"], rel=1e-4)
    assert np.trapezoid(logd["negative"], logd["grid"]) == pytest.approx(logd["negative_mass"], rel=1e-4, abs=1e-9)
    alphas = (0.01, 0.1, 1.0)
    per_probe = np.array([effective_dimension(n[None], w[None], D, alphas) for n, w in zip(nodes, weights)])
    truth = exact_effective_dimension(evals, alphas)
    err = np.abs(per_probe.mean(0) - truth)
    assert (err <= 3 * per_probe.std(0, ddof=1) / math.sqrt(30) + 1e-9).all(), (per_probe.mean(0), truth)
    np.testing.assert_allclose(effective_dimension(nodes, weights, D, alphas), per_probe.mean(0))


# --------------------------------------------------------------------------------------------- sharpness


@pytest.fixture(scope="module")
def minimum():
    """A tiny tanh MLP trained to the minimum of CE + ½·0.01·‖θ‖² (L-BFGS), with its data."""
    torch.manual_seed(1)
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3)).double()  # smooth: L-BFGS converges
    x = x.double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.005 * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model.float().eval(), x.float(), y


def test_sharpness_is_zero_at_rho_zero_and_never_decreases_with_rho(minimum):
    model, x, y = minimum
    op = HessianOperator(model, x, y, weight_decay=0.01, method="double-backward")
    assert float(torch.linalg.vector_norm(op.loss_and_grad()[1])) < 1e-3  # a minimum
    cfg = SharpnessConfig(rho_avg=(0.0, 0.01, 0.03, 0.1), rho_l2=(0.0, 0.05, 0.2, 0.5),
                          rho_linf=(0.0, 0.005, 0.02, 0.05), keskar_eps=(0.0, 0.001, 0.01), samples=24, ascent_steps=10)
    for kind in ("avg", "avg_adaptive", "worst_l2", "worst_l2_adaptive", "worst_linf", "worst_linf_adaptive", "keskar"):
        values = sharpness_of(kind, op, cfg, seed=0)["values"]
        assert values[0] == 0.0, kind
        assert (np.diff(values) >= 0).all() and values[-1] > 0, (kind, values)
    # worst case ℓ2 at small ρ: at least the rise along the top eigenvector, at most ½·λ_max·ρ² (+ third order)
    top = lanczos(op.hvp, op.dim, k=1, tol=1e-8, max_iter=op.dim)
    rho = 0.05
    worst = sharpness_of("worst_l2", op, SharpnessConfig(rho_l2=(rho,), ascent_steps=20), seed=0)["values"][0]
    base = op.loss_and_error()[0]
    t0 = op.theta0.double()
    along = max(op.loss_and_error(t0 + s * rho * top.eigenvectors[0])[0] for s in (1, -1)) - base
    assert 0.9 * along <= worst <= 1.2 * 0.5 * top.eigenvalues[0] * rho ** 2, (along, worst, top.eigenvalues[0])


def _rescaled(model, a):
    """Dinh et al.'s reparametrisation: the first BN layer's scale and shift times a, the next conv's weights
    times 1/a (ReLU(a·z) = a·ReLU(z) for a > 0): the same function, the second BN's statistics unchanged."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m[1].weight.mul_(a)
        m[1].bias.mul_(a)
        m[3].weight.div_(a)
    return m


def test_adaptive_sharpness_is_invariant_to_a_bn_preserving_rescaling_plain_is_not(problem):
    model, x, y = problem
    other = _rescaled(model, 4.0)
    torch.testing.assert_close(other(x), model(x), rtol=1e-5, atol=1e-5)  # the same network
    ops = [HessianOperator(m, x, y, method="double-backward") for m in (model, other)]
    cfg = SharpnessConfig(rho_avg=(0.05, 0.2), rho_l2=(0.1, 0.3), rho_linf=(0.01, 0.05), samples=8, ascent_steps=8)
    for kind in ("avg_adaptive", "worst_l2_adaptive", "worst_linf_adaptive"):
        a, b = (sharpness_of(kind, op, cfg, seed=0)["values"] for op in ops)
        np.testing.assert_allclose(b, a, rtol=2e-3, err_msg=kind)
        assert np.abs(a).min() > 0, kind  # not trivially equal
    for kind in ("avg", "worst_l2", "worst_linf"):
        a, b = (sharpness_of(kind, op, cfg, seed=0)["values"] for op in ops)
        assert np.abs(b - a).max() > 0.1 * np.abs(a).max(), (kind, a, b)


def test_pac_bayes_sigma_sits_at_the_error_rise(minimum):
    model, x, y = minimum
    op = HessianOperator(model, x, y, method="double-backward")
    cfg = SharpnessConfig(pac_samples=6, pac_tol=0.02, pac_error_rise=0.1)
    for kind, magnitude in (("pac_bayes", False), ("pac_bayes_mag", True)):
        res = sharpness_of(kind, op, cfg, seed=7)
        sigma = res["sigma"]
        assert "note" not in res and 0 < sigma < 10, res
        assert res["flatness"] == pytest.approx(1 / sigma ** 2)
        theta = op.theta0.double()
        gen = generator(7, 4, 1 + int(magnitude))
        zs = [torch.randn(op.dim, generator=gen, dtype=torch.float64) for _ in range(6)]

        def expected(s):
            std = torch.sqrt(s ** 2 * theta ** 2 + 1e-6) if magnitude else s
            return np.mean([op.loss_and_error(theta + z * std)[1] for z in zs])

        assert expected(sigma) <= res["target"] < expected(res["sigma_hi"])
        assert sigma < res["sigma_hi"] <= sigma * 1.02


def test_configs_refuse_bad_values():
    for kwargs, message in ((dict(trace_hvps=10), "multiple of 3"), (dict(hvp="finite-differences"), "unknown hvp"),
                            (dict(eff_dim_alpha=(-1.0,)), "eff_dim_alpha must be a positive number")):
        with pytest.raises(ValueError, match=message):
            CurvatureConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown sharpness kind 'sam'"):
        SharpnessConfig(kinds=("sam",))
    with pytest.raises(ValueError, match="rho_l2 must be increasing"):
        SharpnessConfig(rho_l2=(0.2, 0.1))


# --------------------------------------------------------------------------------------------- files and commands

SMALL = ["--loss-subset", "96", "--top-k", "2", "--lanczos-max-iter", "12", "--trace-hvps", "6", "--slq-probes", "2",
         "--slq-steps", "6",
         "--bn-mode", "keep", "--hvp", "double-backward", "--threads", "1", "--quiet", "--device", "cpu"]


def _same_file(a, b):
    ra, rb = read_curvature(a), read_curvature(b)
    assert ra["config"] == rb["config"]
    for g, m in ra["models"].items():
        assert all(m["done"].values()) and all(rb["models"][g]["done"].values())
        for name, value in m["values"].items():
            if name not in ("seconds", "hvps"):  # what this run spent, not what it found
                np.testing.assert_array_equal(rb["models"][g]["values"][name], value, err_msg=f"{g}/{name}")


def test_curvature_command_on_digits_checkpoints(digits_ckpts, tmp_path, capsys):
    out = tmp_path / "c.h5"
    args = ["--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"], *SMALL, "--out", str(out),
            "--figures", str(tmp_path / "fig"), "--format", "png"]
    assert curvature_cmd.main(args) == 0
    printed = capsys.readouterr().out
    assert "SGD" in printed and "SWA" in printed and "λ_1 (λ_max)" in printed
    assert "trace (Hutch++, 6 products)" in printed
    assert (tmp_path / "fig" / "c.png").stat().st_size > 5000
    data = read_curvature(out)
    assert data["kind"] == "curvature" and data["attrs"]["operator"]["n_examples"] == 96
    assert data["attrs"]["provenance"]["threads"] == 1 and data["config"]["loss"]["loss_subset"] == 96
    D = data["config"]["theta_size"]
    with h5py.File(out, "r") as f:  # what `rays --dirs-from hessian:FILE.h5` reads
        assert f["sgd/eigenvectors"].shape == (2, D) and f["sgd/eigenvectors"].dtype == np.float32
        assert f["swa/eigenvalues"].shape == (2,)
    # the stored top eigenpair is one of the operator's: H y = λ y
    ck = widthkit.load_checkpoint(digits_ckpts["swa"])
    from widthkit.inputs.data import load_dataset
    from widthkit.runtime import random_subset

    tr = load_dataset("digits", split="train")
    idx = random_subset(len(tr), 96, 0)
    op = HessianOperator(ck.model, tr.normalized()[idx], tr.labels[idx], method="double-backward")
    vals = data["models"]["swa"]["values"]
    for i in range(2):  # each stored pair's true residual ‖Hy − λy‖ is the one reported
        y = torch.as_tensor(vals["eigenvectors"][i], dtype=torch.float64)
        true = float(torch.linalg.vector_norm(op.hvp(y) - vals["eigenvalues"][i] * y))
        assert true == pytest.approx(vals["eigen_residuals"][i], rel=0.05, abs=1e-4 * vals["eigenvalues"][0])
    assert vals["eigen_residuals"][0] < 0.05 * vals["eigenvalues"][0]
    assert vals["lambda_min"] <= vals["eigenvalues"][-1] and vals["trace_stderr"] > 0
    md = curvature_markdown(out)
    assert "| quantity | SGD | SWA |" in md and "| λ_1 (λ_max) |" in md
    assert curvature_table(out).splitlines()[1].split() == ["SGD", "SWA"]
    assert not plt.get_fignums()
    # a re-run of the finished command computes nothing and leaves the file as it is
    stamp = out.stat().st_mtime_ns
    assert curvature_cmd.main(args + ["--no-plot"]) == 0 and out.stat().st_mtime_ns == stamp
    # other settings are refused, with the keys named; --overwrite starts afresh
    assert curvature_cmd.main(args + ["--top-k", "3"]) == 2
    assert "different configuration (curvature.top_k: 2 -> 3)" in capsys.readouterr().err
    assert curvature_cmd.main(args + ["--top-k", "3", "--overwrite", "--no-plot"]) == 0
    assert read_curvature(out)["models"]["sgd"]["values"]["eigenvalues"].shape == (3,)


def test_commands_refuse_bad_input_before_any_work(digits_ckpts, tmp_path, capsys):
    base = ["--ckpt", digits_ckpts["swa"], "--out", str(tmp_path / "c.h5"), "--quiet"]
    for cmd, flags, message in (
            (curvature_cmd, ["--bn-mode", "batch"], "bn_mode 'batch'"),
            (curvature_cmd, ["--trace-hvps", "10"], "trace_hvps must be a multiple of 3"),
            (curvature_cmd, ["--loss-subset", "-1"], "loss_subset must be an integer >= 0"),
            (sharpness_cmd, ["--kinds", "sam"], "unknown sharpness kind 'sam'"),
            (sharpness_cmd, ["--device", "bogus"], "unknown device 'bogus'")):
        assert cmd.main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="unknown setting"):
        widthkit.curvature(digits_ckpts["swa"], top_kk=3)


def test_top_k_is_checked_against_the_iterations_and_the_parameter_count_before_any_file(digits_ckpts, tmp_path,
                                                                                         capsys):
    out = tmp_path / "a" / "c.h5"
    base = ["--ckpt", digits_ckpts["swa"], "--out", str(out), "--quiet", "--loss-subset", "64", "--no-plot"]
    # today: an 836 MB file of (20000, D) eigenvectors, then "got shape (6,), the file holds (14458,)"
    assert curvature_cmd.main(base + ["--top-k", "20000", "--lanczos-max-iter", "6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "top_k 20000 eigenpairs need at least as many Lanczos steps, but " \
        "lanczos_max_iter is 6" in err and "--lanczos-max-iter" in err, err
    D = widthkit.load_checkpoint(digits_ckpts["swa"]).model
    D = sum(p.numel() for p in D.parameters())
    assert curvature_cmd.main(base + ["--top-k", str(D + 1), "--lanczos-max-iter", str(D + 1)]) == 2
    err = capsys.readouterr().err
    assert f"top_k {D + 1} is more than the {D} parameters of SWA" in err and f"--top-k {D} or fewer" in err, err
    assert not out.exists() and not list(out.parent.glob("*"))
    with pytest.raises(ValueError, match="3 eigenpairs need at least 3 Lanczos steps, but max_iter is 2"):
        lanczos(lambda v: v, 10, k=3, max_iter=2)
    # along a surface only λ_max is computed: a small --lanczos-max-iter is no contradiction there
    assert CurvatureConfig(top_k=2, lanczos_max_iter=2).top_k == 2


def test_sharpness_command_on_digits_checkpoints(digits_ckpts, tmp_path, capsys):
    out = tmp_path / "s.h5"
    args = ["--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"], "--loss-subset", "64", "--bn-mode", "keep",
            "--kinds", "avg_adaptive", "worst_l2", "keskar", "pac_bayes", "--rho-l2", "0.05", "0.1",
            "--samples", "2", "--ascent-steps", "2", "--pac-samples", "2", "--pac-tol", "0.1", "--quiet",
            "--out", str(out), "--device", "cpu"]
    assert sharpness_cmd.main(args) == 0
    printed = capsys.readouterr().out
    assert "worst-case ℓ2, c = 1, ρ=0.1" in printed and "PAC-Bayes flatness" in printed
    data = read_curvature(out)
    assert list(data["axes"]["rho_l2"]) == [0.05, 0.1]
    for g in ("sgd", "swa"):
        v = data["models"][g]["values"]
        assert v["worst_l2"].shape == (2,) and v["worst_l2"][1] >= v["worst_l2"][0] > 0
        assert np.isfinite(v["pac_bayes"]) and v["pac_bayes_sigma"] > 0
        assert "worst_linf" not in v
    assert "## Sharpness" in curvature_markdown(out)


CURVATURE_CHILD = STOP_HERE + '''
# argv: MARKER N ARGS...: `python -m widthkit.curvature ARGS...`, stopping once N results are written to the file
from widthkit.report import curvature_store
from widthkit.curvature import main

marker, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real, writes = curvature_store.ResultFile.write, []


def write(self, *a, **kw):
    real(self, *a, **kw)
    writes.append(1)
    if len(writes) == n:
        stop_here(marker)


curvature_store.ResultFile.write = write
sys.exit(main(args))
'''


@pytest.mark.subprocess
def test_a_killed_curvature_run_resumes_to_the_uninterrupted_result(digits_ckpts, tmp_path, spawn):
    args = ["--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"], *SMALL, "--no-plot"]
    full, killed = tmp_path / "full.h5", tmp_path / "killed.h5"
    assert curvature_cmd.main(args + ["--out", str(full)]) == 0
    # SGD: point, Lanczos, Hutch++, 2 probes, density (6 writes); SWA: point, Lanczos, then the first probe
    proc, log = spawn(python_child(CURVATURE_CHILD, tmp_path / "stop", 10, *args, "--out", killed), env=ENV,
                      cwd=tmp_path)
    wait_for_marker(tmp_path / "stop", proc, log)
    kill9(proc)
    partial = read_curvature(killed)
    assert all(partial["models"]["sgd"]["done"].values())
    assert partial["models"]["swa"]["done"] == {"point": True, "lanczos": True, "hutchpp": True, "slq": False}
    assert partial["models"]["swa"]["values"]["slq_done"].tolist() == [1, 0]
    assert np.isnan(partial["models"]["swa"]["values"]["density"]).all()
    with pytest.raises(ValueError, match="no finished spectral density"):
        write_spectrum_figure({**partial, "models": {"swa": partial["models"]["swa"]}}, tmp_path / "x")
    assert "partial: 7 of 8 estimators finished" in curvature_table(partial)
    assert curvature_cmd.main(args + ["--out", str(killed)]) == 0
    _same_file(full, killed)


def test_surface_curvature_at_the_origin_and_along_a_ray(digits_ckpts, tmp_path):
    rays_file = tmp_path / "rays.h5"
    widthkit.rays(digits_ckpts["swa"], dirs=2, steps=3, bn_mode="keep", train_subset=40, test_subset=40, out=rays_file,
                  device="cpu")
    common = dict(loss_subset=64, bn_mode="keep", hvp="double-backward", lanczos_tol=1e-6, lanczos_max_iter=80,
                  device="cpu")
    res = widthkit.surface_curvature(rays_file, points=[(0, 0), (1, 2)], **common)
    assert res["points"].tolist() == [[0, 0], [1, 2]] and res["coords"].shape == (2, 2)
    # at distance 0: the checkpoint itself, as curvature() sees it
    ref = widthkit.curvature(digits_ckpts["swa"], top_k=1, trace_hvps=0, slq_probes=0, **common)
    vals = ref["models"]["swa"]["values"]
    assert res["lambda_max"][0] == pytest.approx(float(vals["eigenvalues"][0]), rel=1e-6)
    assert res["lambda_min"][0] == pytest.approx(vals["lambda_min"], rel=1e-4, abs=1e-6)
    # --l2 adds ½·wd·‖θ‖² with the checkpoint's recorded wd (5e-4): every eigenvalue moves up by wd
    l2 = widthkit.curvature(digits_ckpts["swa"], top_k=1, trace_hvps=0, slq_probes=0, l2=True, **common)
    assert l2["attrs"]["operator"]["weight_decay_term"] == 5e-4
    assert float(l2["models"]["swa"]["values"]["eigenvalues"][0]) - float(vals["eigenvalues"][0]) \
        == pytest.approx(5e-4, abs=1e-5 * float(vals["eigenvalues"][0]))
    # at the end of the second ray: an operator built by hand on θ₀ + d·direction
    from widthkit.report.store import read

    rays = read(rays_file, load_large=True)
    ck = widthkit.load_checkpoint(digits_ckpts["swa"])
    theta = torch.cat([p.detach().reshape(-1) for p in ck.model.parameters()]).double()
    theta = theta + rays["axes"]["distances"][2] * torch.as_tensor(rays["axes"]["directions"][1], dtype=torch.float64)
    torch.nn.utils.vector_to_parameters(theta.float(), ck.model.parameters())
    from widthkit.inputs.data import load_dataset
    from widthkit.runtime import random_subset

    tr = load_dataset("digits", split="train")
    idx = random_subset(len(tr), 64, 0)
    op = HessianOperator(ck.model, tr.normalized()[idx], tr.labels[idx], method="double-backward")
    top = lanczos(op.hvp, op.dim, k=1, tol=1e-6, max_iter=80, seed=0)
    assert res["lambda_max"][1] == pytest.approx(top.eigenvalues[0], rel=1e-5)
    assert res["ratio"][1] == pytest.approx(abs(top.lambda_min) / top.eigenvalues[0], rel=1e-3)
    with pytest.raises(ValueError, match="outside the rays grid"):
        widthkit.surface_curvature(rays_file, points=[(5, 0)], **common)


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_torchrun_ranks_equal_one_process(digits_ckpts, tmp_path):
    args = ["--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"], *SMALL, "--no-plot"]
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    run = subprocess.run([sys.executable, "-m", "widthkit.curvature", *args, "--out", str(one)], env=ENV,
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "widthkit.curvature", *args, "--out", str(two)], env=ENV, cwd=tmp_path,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("curvature: ") == 1  # one rank reports
    _same_file(one, two)  # bit for bit: every product is summed in the same tree order


def test_density_figures_take_arrays_and_an_axes():
    from widthkit.report.spectrum import plot_log_spectral_density, plot_spectral_density

    grid = np.linspace(-1, 5, 50)
    curves = {"SGD": (grid, np.exp(-grid ** 2)), "SWA": (grid, np.exp(-(grid - 1) ** 2))}
    fig, (a, b) = plt.subplots(1, 2)
    try:
        assert plot_spectral_density(curves, a) is a
        assert a.get_yscale() == "log" and "eigenvalue" in a.get_xlabel()
        assert [t.get_text() for t in a.get_legend().get_texts()] == ["SGD", "SWA"]
        assert [ln.get_color() for ln in a.get_lines()] == ["#2ca02c", "#1f77b4"]  # SGD green, SWA blue
        logs = {"SWA": (grid, np.exp(-grid ** 2), np.zeros(50))}
        assert plot_log_spectral_density(logs, b, excluded={"SWA": 0.9}) is b
        assert [t.get_text() for t in b.get_legend().get_texts()] == ["SWA, λ > 0 (90.0% at λ≈0)"]
    finally:
        plt.close(fig)
