"""Every random estimate of curvature and sharpness comes with its standard error: against per-probe and
per-draw loops written here, against the exact spectrum of a known matrix (the errors describe the actual
spread of repeated estimates), and in the files and tables of the commands."""

import copy
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widthkit.engine.curvature import (
    STREAM_SHARPNESS,
    HessianOperator,
    exact_effective_dimension,
    generator,
    slq_probe,
    slq_uncertainty,
    standard_error,
)
from widthkit.engine.sharpness import SharpnessConfig, average_sharpness, scale_of, sharpness_of
from widthkit.report.curvature_store import read_curvature
from widthkit.report.spectrum import curvature_markdown, curvature_table

curvature_cmd = importlib.import_module("widthkit.curvature")
sharpness_cmd = importlib.import_module("widthkit.sharpness")


def test_standard_error_is_the_sample_std_over_root_n():
    assert standard_error([1.0, 2.0, 4.0]) == pytest.approx(np.std([1, 2, 4], ddof=1) / math.sqrt(3))
    np.testing.assert_allclose(standard_error(np.array([[1.0, 5.0], [3.0, 5.0]])), [1.0, 0.0])
    assert standard_error([2.0]) == math.inf  # one estimate says nothing about its spread


@pytest.fixture(scope="module")
def spectrum():
    """A 40×40 symmetric matrix with a known spectrum: a few large eigenvalues, a bulk, some negative ones."""
    g = torch.Generator().manual_seed(0)
    evals = torch.cat([torch.tensor([9.0, 4.0, 2.5]), torch.rand(32, generator=g, dtype=torch.float64) * 0.3,
                       -torch.rand(5, generator=g, dtype=torch.float64) * 0.2]).double()
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    return q @ torch.diag(evals) @ q.T, evals.numpy()


def test_slq_errors_are_over_probes_and_describe_the_spread_of_repeated_estimates(spectrum):
    H, evals = spectrum
    D, alphas = 40, (0.1, 1.0)
    mv = lambda v: H @ v  # noqa: E731

    def run(seed, probes=4):
        pr = [slq_probe(mv, D, 12, seed=seed, index=i) for i in range(probes)]
        return np.array([p[0] for p in pr]), np.array([p[1] for p in pr])

    nodes, weights = run(0)
    u = slq_uncertainty(nodes, weights, D, alphas)
    # by hand, one probe at a time: its trace estimate D·Σᵢ wᵢθᵢ, its effective dimension
    # D·Σᵢ wᵢ λ⁺/(λ⁺ + α)
    per_trace = [D * sum(w * t for t, w in zip(n, ww)) for n, ww in zip(nodes, weights)]
    per_eff = [[D * sum(w * max(t, 0) / (max(t, 0) + a) for t, w in zip(n, ww)) for a in alphas]
               for n, ww in zip(nodes, weights)]
    assert u["probes"] == 4 and u["trace"] == pytest.approx(np.mean(per_trace), rel=1e-12)
    assert u["trace_stderr"] == pytest.approx(np.std(per_trace, ddof=1) / 2, rel=1e-10)
    np.testing.assert_allclose(u["effective_dimension_stderr"], np.std(per_eff, axis=0, ddof=1) / 2, rtol=1e-10)
    np.testing.assert_allclose(u["spectral_moments_stderr"][0], u["trace_stderr"] / D, rtol=1e-12)
    # 40 independent runs of 4 probes: their means scatter as the reported errors say, around the truth
    runs = [slq_uncertainty(*run(seed), D, alphas) for seed in range(1, 41)]
    for name, truth in (("trace", evals.sum()),):
        values = np.array([r[name] for r in runs])
        rms = math.sqrt(np.mean([r[f"{name}_stderr"] ** 2 for r in runs]))
        assert 0.5 < values.std(ddof=1) / rms < 2.0, (values.std(ddof=1), rms)
        assert abs(values.mean() - truth) <= 3 * rms / math.sqrt(40)
    eff_true = exact_effective_dimension(evals, alphas)
    eff_se = np.sqrt(np.mean([r["effective_dimension_stderr"] ** 2 for r in runs], axis=0))
    from widthkit.engine.curvature import effective_dimension

    eff = np.array([effective_dimension(*run(seed), D, alphas) for seed in range(1, 41)])
    assert (np.abs(eff.mean(0) - eff_true) <= 3 * eff_se / math.sqrt(40) + 1e-9).all()
    assert (0.5 < eff.std(0, ddof=1) / eff_se).all() and (eff.std(0, ddof=1) / eff_se < 2.0).all()


@pytest.fixture(scope="module")
def small_minimum():
    torch.manual_seed(3)
    x, y = torch.randn(30, 1, 4, 4), torch.randint(0, 3, (30,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=60, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.01 * sum(p.square().sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval(), x, y


def test_average_sharpness_error_equals_a_per_draw_loop(small_minimum):
    model, x, y = small_minimum
    op = HessianOperator(model, x, y, method="double-backward")
    rhos, n = (0.0, 0.05, 0.2), 12
    c = scale_of("avg_adaptive", op.theta0)
    values, se = average_sharpness(op, c, rhos, samples=n, seed=5)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()

    def loss_at(t):  # the model itself, weights put in by hand
        m = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(t.float(), m.parameters())
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

    base = loss_at(theta)
    assert values[0] == 0.0 and se[0] == 0.0
    for i, rho in enumerate(rhos[1:], 1):
        gen = generator(5, STREAM_SHARPNESS)  # the same draws for every ρ
        rises = [loss_at(theta + rho * theta.abs() * torch.randn(op.dim, generator=gen, dtype=torch.float64)) - base
                 for _ in range(n)]
        assert values[i] == pytest.approx(np.mean(rises), rel=1e-4, abs=1e-7)
        assert se[i] == pytest.approx(np.std(rises, ddof=1) / math.sqrt(n), rel=1e-3, abs=1e-7)
        assert se[i] > 0
    res = sharpness_of("avg", op, SharpnessConfig(rho_avg=(0.05,), samples=6), seed=1)
    assert res["samples"] == 6 and res["stderr"].shape == (1,) and res["stderr"][0] > 0


def test_pac_bayes_reports_the_error_at_sigma_with_its_error(small_minimum):
    model, x, y = small_minimum
    op = HessianOperator(model, x, y, method="double-backward")
    res = sharpness_of("pac_bayes", op, SharpnessConfig(pac_samples=5, pac_tol=0.05), seed=2)
    gen = generator(2, STREAM_SHARPNESS, 1)
    zs = [torch.randn(op.dim, generator=gen, dtype=torch.float64) for _ in range(5)]
    theta = op.theta0.double()
    errs = [op.loss_and_error(theta + res["sigma"] * z)[1] for z in zs]
    assert res["error"] == pytest.approx(np.mean(errs)) and res["error"] <= res["target"]
    assert res["error_stderr"] == pytest.approx(np.std(errs, ddof=1) / math.sqrt(5))


SMALL = ["--loss-subset", "96", "--top-k", "2", "--lanczos-max-iter", "12", "--trace-hvps", "6", "--slq-probes", "3",
         "--slq-steps", "6", "--bn-mode", "keep", "--hvp", "double-backward", "--threads", "1", "--quiet", "--no-plot",
         "--device", "cpu"]


def test_curvature_file_and_tables_carry_the_errors_and_probe_counts(digits_ckpts, tmp_path, capsys):
    out = tmp_path / "c.h5"
    assert curvature_cmd.main(["--ckpt", digits_ckpts["sgd"], "--ckpt", digits_ckpts["swa"], *SMALL,
                               "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = read_curvature(out)
    D = data["config"]["theta_size"]
    for g in ("sgd", "swa"):
        v = data["models"][g]["values"]
        nodes, weights = v["slq_nodes"], v["slq_weights"]
        per_trace = D * (nodes * weights).sum(axis=1)  # each probe's own estimate, by hand from the stored probes
        assert v["slq_trace"] == pytest.approx(per_trace.mean(), rel=1e-12)
        assert v["slq_trace_stderr"] == pytest.approx(per_trace.std(ddof=1) / math.sqrt(3), rel=1e-10)
        assert v["spectral_moments"][0] == pytest.approx(v["slq_trace"] / D, rel=1e-12)
        assert v["effective_dimension_stderr"].shape == (3,) and (v["effective_dimension_stderr"] > 0).all()
        assert v["spectral_moments_stderr"].shape == (2,)
    sgd = data["models"]["sgd"]["values"]
    for text in (printed, curvature_table(out), curvature_markdown(out)):
        assert "trace (Hutch++, 6 products)" in text and "trace (D × density mean, 3 probes)" in text
        assert f"{sgd['slq_trace']:.4g} ± {sgd['slq_trace_stderr']:.2g}" in text
        assert (f"effective dim. (α=1, 3 probes)" in text
                and f"{sgd['effective_dimension'][2]:.4g} ± {sgd['effective_dimension_stderr'][2]:.2g}" in text)
    assert "standard error over the random probes" in curvature_markdown(out)


def test_sharpness_file_and_tables_carry_the_errors_and_draw_counts(digits_ckpts, tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert sharpness_cmd.main(["--ckpt", digits_ckpts["swa"], "--loss-subset", "64", "--bn-mode", "keep",
                               "--kinds", "avg", "worst_l2", "pac_bayes", "--rho-avg", "0.01", "0.05",
                               "--rho-l2", "0.05", "--samples", "5", "--ascent-steps", "2", "--pac-samples", "3",
                               "--pac-tol", "0.2", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    v = read_curvature(out)["models"]["swa"]["values"]
    assert v["avg_stderr"].shape == (2,) and (v["avg_stderr"] > 0).all() and "worst_l2_stderr" not in v
    assert 0 <= v["pac_bayes_error"] <= 1 and v["pac_bayes_error_stderr"] >= 0
    for text in (printed, curvature_markdown(out)):
        assert "average-case, c = 1, ρ=0.05 (5 draws)" in text
        assert f"{v['avg'][1]:.4g} ± {v['avg_stderr'][1]:.2g}" in text
        assert "PAC-Bayes flatness 1/σ'² (3 draws)" in text and "error there" in text
    assert "Monte-Carlo standard error over the draws" in curvature_markdown(out)
