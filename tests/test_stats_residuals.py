"""The residuals ‖Hy − λy‖ widthkit stores are measured, checked against the float64 Hessian of a tiny model
(``torch.autograd.functional.hessian``); Lanczos' own estimates are kept under their own name; files written
before keep loading, their residuals read as the estimates they are."""

import copy
import importlib

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from widthkit.engine.curvature import HessianOperator, lanczos
from widthkit.report.curvature_store import read_curvature
from widthkit.report.spectrum import curvature_markdown, curvature_table

curvature_cmd = importlib.import_module("widthkit.curvature")


@pytest.fixture(scope="module")
def tiny():
    """A tiny BN CNN in eval mode, 40 examples, and its float64 Hessian of the mean cross-entropy."""
    torch.manual_seed(4)
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 3))
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    m64 = copy.deepcopy(model).double()
    names = [(n, p.shape, p.numel()) for n, p in m64.named_parameters()]
    bufs = dict(m64.named_buffers())

    def loss(t):
        params, o = {}, 0
        for n, shape, k in names:
            params[n] = t[o:o + k].view(shape)
            o += k
        return F.cross_entropy(functional_call(m64, (params, bufs), (x.double(),)), y)

    theta = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    return model, x, y, torch.autograd.functional.hessian(loss, theta)


def _true(H, vector, value):
    y = torch.as_tensor(vector, dtype=torch.float64)
    return float(torch.linalg.vector_norm(H @ y - value * y))


def test_measured_residuals_equal_those_of_the_float64_hessian(tiny):
    model, x, y, H = tiny
    op = HessianOperator(model, x, y, batch_size=16, method="double-backward")
    scale = float(torch.linalg.eigvalsh(H).abs().max())
    # stopped early: residuals far above rounding, the measured ones are the true ones
    early = lanczos(op.hvp, op.dim, k=3, tol=1e-12, max_iter=5, seed=0)
    assert not early.converged and early.iterations == 5
    for i in range(3):
        true = _true(H, early.eigenvectors[i], early.eigenvalues[i])
        assert true > 1e-3 * scale
        assert early.residuals[i] == pytest.approx(true, rel=1e-4)
    assert early.lambda_min_residual == pytest.approx(_true(H, early.lambda_min_vector, early.lambda_min), rel=1e-4)
    # converged: Lanczos' estimates fall far below what float32 products resolve; the measured residuals stay at
    # the true level (the float64 Hessian's residual plus at most the operator's own rounding)
    n0 = op.hvp_count
    done = lanczos(op.hvp, op.dim, k=2, tol=1e-8, max_iter=op.dim, seed=0)
    assert done.converged and op.hvp_count - n0 == done.iterations + 3  # one product per measured residual
    for i in range(2):
        y_i = done.eigenvectors[i]
        true = _true(H, y_i, done.eigenvalues[i])
        rounding = float(torch.linalg.vector_norm(op.hvp(y_i) - H @ y_i))  # the operator against float64
        assert abs(done.residuals[i] - true) <= rounding * 1.001 + 1e-15
        assert done.residuals[i] > 0 and done.ritz_residuals[i] < 1e-3 * done.residuals[i], \
            (done.ritz_residuals[i], done.residuals[i])
    off = lanczos(op.hvp, op.dim, k=2, tol=1e-8, max_iter=op.dim, seed=0, measure_residuals=False)
    assert np.isnan(off.residuals).all() and np.isnan(off.lambda_min_residual)
    np.testing.assert_array_equal(off.eigenvalues, done.eigenvalues)


def test_a_matrix_operator_gives_residuals_at_float64_rounding():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64)
    H = A + A.T
    r = lanczos(lambda v: H @ v, 30, k=3, tol=1e-10, max_iter=30, seed=1)
    for i in range(3):
        assert r.residuals[i] == pytest.approx(_true(H, r.eigenvectors[i], r.eigenvalues[i]), rel=1e-6, abs=1e-13)
        assert r.residuals[i] < 1e-10 * float(torch.linalg.eigvalsh(H).abs().max())


SMALL = ["--loss-subset", "96", "--top-k", "2", "--lanczos-max-iter", "40", "--trace-hvps", "0", "--slq-probes", "0",
         "--bn-mode", "keep", "--hvp", "double-backward", "--threads", "1", "--quiet", "--no-plot",
         "--device", "cpu"]


def test_files_store_both_and_earlier_files_read_as_estimates(digits_ckpts, tmp_path):
    out = tmp_path / "c.h5"
    assert curvature_cmd.main(["--ckpt", digits_ckpts["swa"], *SMALL, "--out", str(out)]) == 0
    v = read_curvature(out)["models"]["swa"]["values"]
    assert v["eigen_residuals"].shape == v["eigen_residuals_lanczos"].shape == (2,)
    assert np.isfinite(v["lambda_min_residual"]) and np.isfinite(v["lambda_min_residual_lanczos"])
    # measured: an operator built here on the same examples gives the same residuals, to its rounding
    import widthkit
    from widthkit.inputs.data import load_dataset
    from widthkit.runtime import random_subset

    tr = load_dataset("digits", split="train")
    idx = random_subset(len(tr), 96, 0)
    op = HessianOperator(widthkit.load_checkpoint(digits_ckpts["swa"]).model, tr.normalized()[idx], tr.labels[idx],
                         method="double-backward")
    for i in range(2):
        yv = torch.as_tensor(v["eigenvectors"][i], dtype=torch.float64)
        true = float(torch.linalg.vector_norm(op.hvp(yv) - v["eigenvalues"][i] * yv))
        assert v["eigen_residuals"][i] == pytest.approx(true, rel=0.05, abs=1e-6 * v["eigenvalues"][0])
    with h5py.File(out, "r") as f:
        assert "measured" in f["swa/eigen_residuals"].attrs["what"]
        assert "estimate" in f["swa/eigen_residuals_lanczos"].attrs["what"]
    assert read_curvature(out)["models"]["swa"]["notes"] == []
    table = curvature_table(out)
    assert "largest ‖Hy − λy‖ of λ_1..λ_2" in table and "Lanczos estimate" not in table

    # a file as earlier versions wrote it: the estimates under eigen_residuals, no *_lanczos datasets
    old = tmp_path / "old.h5"
    old.write_bytes(out.read_bytes())
    with h5py.File(old, "r+") as f:
        g = f["swa"]
        for name in ("eigen_residuals", "lambda_min_residual"):
            est = g[f"{name}_lanczos"][...]
            del g[name], g[f"{name}_lanczos"]
            g.create_dataset(name, data=est)
    m = read_curvature(old)["models"]["swa"]
    np.testing.assert_array_equal(m["values"]["eigen_residuals_lanczos"], v["eigen_residuals_lanczos"])
    assert m["values"]["lambda_min_residual_lanczos"] == v["lambda_min_residual_lanczos"]
    assert "eigen_residuals" not in m["values"] and "lambda_min_residual" not in m["values"]
    assert "Lanczos' estimates" in m["notes"][0]
    table = curvature_table(old)
    assert "(Lanczos estimate)" in table and "SWA: written before residuals were measured" in table
    assert "written before residuals were measured" in curvature_markdown(old)
    np.testing.assert_array_equal(m["values"]["eigenvalues"], v["eigenvalues"])  # the rest reads as it was
