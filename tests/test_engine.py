"""θ layout, directions, the batched evaluator and the HDF5 store, against independent answers."""

import copy
import json
import subprocess
import sys

import h5py

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widthkit.engine.directions import line_basis, normalize_direction, plane_basis, random_directions
from widthkit import EvalConfig, EvalSet, Evaluator
from widthkit.runtime import RuntimeConfig, canonical, resolve_device, same_device
from widthkit.engine.space import ThetaLayout
from widthkit.fileio import WriterLock
from widthkit.report.store import ConfigMismatch, StoreError, open_analysis, read


class TinyNet(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.drop(x.mean(dim=(2, 3)))
        return self.fc(x)


def make_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


@pytest.fixture
def net():
    torch.manual_seed(0)
    m = TinyNet(dropout=0.3)
    # give BN non-trivial running statistics, as a trained checkpoint has
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(32, 1, 6, 6) * 2 + 0.5)
    return m.eval()


def reference_point(model, theta, train, test, bn_mode, bn_idx=None, bs=16, bn_bs=16, wd=0.0):
    """The plain per-point loop: load weights, (recompute BN), model.eval(), loop over a DataLoader."""
    m = copy.deepcopy(model)
    layout = ThetaLayout.from_model(m)
    with torch.no_grad():
        for name, t in layout.unflatten(theta).items():
            dict(m.named_parameters())[name].copy_(t)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    if bn_mode == "recompute":
        x = train[0] if bn_idx is None else train[0][bn_idx]
        for b in bns:
            b.reset_running_stats()
            b.momentum = None
        m.eval()
        for b in bns:
            b.train()
        with torch.no_grad():
            for (xb,) in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=bn_bs):
                m(xb)
    m.eval()
    if bn_mode == "batch":
        for b in bns:
            b.train()
            b.momentum = 0.0
    out = {}
    for split, (x, y) in (("train", train), ("test", test)):
        loss, wrong = 0.0, 0
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs)
        with torch.no_grad():
            for xb, yb in loader:
                logits = m(xb)
                loss += F.cross_entropy(logits, yb, reduction="sum").item()
                wrong += (logits.argmax(1) != yb).sum().item()
        out[f"{split}_loss"] = loss / len(y)
        out[f"{split}_err"] = 100.0 * wrong / len(y)
    out["train_loss_l2"] = out["train_loss"] + 0.5 * wd * float(theta.double().square().sum())
    return out


# -- space ------------------------------------------------------------------------------------------

def test_layout_kinds_and_roundtrip(net):
    layout = ThetaLayout.from_model(net)
    kinds = {e.name: e.kind for e in layout}
    assert kinds == {"conv.weight": "weight", "conv.bias": "bias", "bn.weight": "norm", "bn.bias": "norm",
                     "conv2.weight": "weight", "bn2.weight": "norm", "bn2.bias": "norm", "fc.weight": "weight",
                     "fc.bias": "bias"}
    assert layout.size == sum(p.numel() for p in net.parameters())
    theta = layout.flatten(net)
    assert "bn.running_mean" not in layout.names  # buffers are not θ
    for name, t in layout.unflatten(theta).items():
        assert torch.equal(t, dict(net.named_parameters())[name])
    with pytest.raises(ValueError, match="flat weight vector"):
        layout.unflatten(theta[:-1])


# -- directions -------------------------------------------------------------------------------------

def test_unit_directions_norm_and_reproducible(net):
    layout = ThetaLayout.from_model(net)
    theta = layout.flatten(net)
    d = random_directions(layout, theta, 5, seed=3)
    assert d.shape == (5, layout.size)
    assert torch.allclose(torch.linalg.vector_norm(d, dim=1), torch.ones(5), atol=1e-6)
    assert torch.equal(d, random_directions(layout, theta, 5, seed=3))
    assert torch.equal(d[:2], random_directions(layout, theta, 2, seed=3))  # prefix-stable
    assert not torch.equal(d, random_directions(layout, theta, 5, seed=4))
    # independent: the first direction is a normalised standard Gaussian draw from torch.Generator(seed)
    raw = torch.randn(layout.size, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(d[0], raw / raw.norm(), atol=1e-7)


def test_filter_directions_match_direct_computation(net):
    layout = ThetaLayout.from_model(net)
    theta = layout.flatten(net)
    d = random_directions(layout, theta, 1, seed=0, norm="filter", exclude="biasbn")[0]
    raw = torch.randn(layout.size, generator=torch.Generator().manual_seed(0))
    params = dict(net.named_parameters())
    off = 0
    for name, p in net.named_parameters():
        n = p.numel()
        piece, r = d[off:off + n].view_as(p), raw[off:off + n].view_as(p)
        if p.dim() == 1:
            assert torch.all(piece == 0), f"{name} should be excluded"
        else:
            for f in range(p.shape[0]):
                expect = r[f] / r[f].norm() * params[name][f].norm()
                assert torch.allclose(piece[f], expect, atol=1e-6)
        off += n


def test_layer_and_adaptive_directions(net):
    layout = ThetaLayout.from_model(net)
    theta = layout.flatten(net)
    raw = torch.randn(layout.size, generator=torch.Generator().manual_seed(1))
    lay = normalize_direction(raw, theta, layout, "layer")
    for e in layout:
        assert torch.allclose(lay[e.slice].norm(), theta[e.slice].norm(), rtol=1e-5)
    ada = normalize_direction(raw, theta, layout, "adaptive")
    assert torch.allclose(ada, raw * theta.abs())
    with pytest.raises(ValueError, match="valid choices: unit, filter, layer, adaptive"):
        random_directions(layout, theta, 1, norm="sphere")
    with pytest.raises(ValueError, match="valid kinds"):
        random_directions(layout, theta, 1, exclude=("bn",))


def test_plane_basis_orthonormal_and_coords():
    g = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(50, generator=g) for _ in range(3))
    origin, basis, coords = plane_basis(w1, w2, w3)
    gram = (basis.double() @ basis.double().T)
    assert torch.allclose(gram, torch.eye(2, dtype=torch.float64), atol=1e-6)
    for w, c in zip((w1, w2, w3), coords):
        rebuilt = origin.double() + c @ basis.double()
        assert torch.allclose(rebuilt, w.double(), atol=1e-5)
    assert coords[1, 0] == pytest.approx(float((w2 - w1).norm()), rel=1e-6)
    with pytest.raises(ValueError, match="one line"):
        plane_basis(w1, w2, w1 + 2 * (w2 - w1))
    origin, basis, length = line_basis(w1, w2)
    assert torch.allclose(origin + basis[0], w2, atol=1e-6) and length == pytest.approx(float((w2 - w1).norm()))


# -- evaluator --------------------------------------------------------------------------------------

@pytest.mark.parametrize("bn_mode,bn_subset", [("keep", None), ("recompute", None), ("recompute", 20), ("batch", None)])
def test_evaluator_matches_per_point_loop(net, bn_mode, bn_subset):
    train, test = make_data(50, 1), make_data(30, 2)
    cfg = EvalConfig(bn_mode=bn_mode, bn_subset=bn_subset, weight_decay=1e-3, chunk_size=3)
    ev = Evaluator(net, train=train, test=test, config=cfg, runtime=RuntimeConfig(device="cpu", eval_batch_size=16))
    layout = ThetaLayout.from_model(net)
    theta0 = layout.flatten(net)
    dirs = random_directions(layout, theta0, 2, seed=0)
    coords = np.array([[0.0, 0.0], [0.5, -1.0], [2.0, 0.3], [-1.5, 1.5]])
    chunks = []
    res = ev.evaluate(theta0, dirs, coords, on_chunk=lambda ids, vals: chunks.append((ids.copy(), vals)))
    assert [list(c[0]) for c in chunks] == [[0, 1, 2], [3]]
    idx = ev.bn_index.cpu() if ev.bn_index is not None else None
    for p, c in enumerate(coords):
        theta = theta0 + torch.as_tensor(c, dtype=torch.float32) @ dirs
        ref = reference_point(net, theta, train, test, bn_mode, bn_idx=idx, wd=1e-3)
        for m, v in ref.items():
            assert res[m][p] == pytest.approx(v, rel=1e-5, abs=1e-6), (m, p)


def test_evaluator_leaves_model_untouched(net):
    before = copy.deepcopy(net.state_dict())
    net.train()
    ev = Evaluator(net, train=make_data(20, 1), test=make_data(20, 2), config=EvalConfig(bn_mode="recompute"),
                   runtime=RuntimeConfig(device="cpu"))
    theta0 = ev.theta0
    ev.evaluate(theta0, torch.randn(1, theta0.numel()), np.array([[1.0]]))
    assert net.training  # mode restored (never changed)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_evaluator_rejects_nan_weights(net):
    ev = Evaluator(net, train=make_data(20, 1), test=make_data(20, 2), config=EvalConfig(bn_mode="keep"),
                   runtime=RuntimeConfig(device="cpu"))
    theta = ev.theta0
    theta[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf values in \\['conv.weight'\\]"):
        ev.evaluate(theta, torch.zeros(1, theta.numel()), np.zeros((1, 1)))


def test_evaluator_halves_batch_on_oom(net):
    class Picky(nn.Module):  # a CPU twin of a GPU out-of-memory: batches over 8 images "do not fit"
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if x.shape[0] > 8:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(x)

    train, test = make_data(40, 1), make_data(20, 2)
    ev = Evaluator(Picky(net), train=train, test=test, config=EvalConfig(bn_mode="keep"),
                   runtime=RuntimeConfig(device="cpu", eval_batch_size=32))
    res = ev.evaluate_weights(ev.theta0)
    assert ev.batch_size == 8
    ref = reference_point(net, ThetaLayout.from_model(net).flatten(net), train, test, "keep")
    assert res["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)


def test_evalconfig_validation():
    with pytest.raises(ValueError, match="valid choices: recompute, keep, batch"):
        EvalConfig(bn_mode="train")
    with pytest.raises(ValueError, match="eval_batch_size must be an integer >= 1"):
        RuntimeConfig(eval_batch_size=0)
    # amp is the old name of precision="bf16" (which runs on CPU too): folded in, never stored
    rt = RuntimeConfig(amp=True)
    assert (rt.precision, rt.amp) == ("bf16", False) and "amp" not in EvalConfig().recorded(rt)
    assert EvalConfig().recorded(rt)["precision"] == "bf16"
    assert EvalConfig().recorded(RuntimeConfig())["precision"] == "fp32"
    with pytest.raises(ValueError, match="amp=True .* means precision 'bf16' but precision 'tf32'"):
        RuntimeConfig(amp=True, precision="tf32")
    with pytest.raises(ValueError, match="unknown precision 'fp16'; valid choices: fp32, tf32, bf16"):
        RuntimeConfig(precision="fp16")
    # the runtime settings are not evaluation settings: one home each
    with pytest.raises(TypeError):
        EvalConfig(device="cpu")


def test_devices_are_compared_by_what_they_are():
    """``torch.device("cuda") != torch.device("cuda:0")``: widthkit resolves and compares canonical devices, so
    data already on the evaluation device is resident (the CPU twin of CUDA graphs never running on a GPU)."""
    assert torch.device("cpu") != torch.device("cpu:0")  # why it matters
    assert same_device("cpu", "cpu:0") and same_device("cuda", "cuda:0") == (canonical("cuda").index == 0)
    assert canonical("cpu:0") == torch.device("cpu") and canonical("cuda").index is not None
    x, y = make_data(10, 0)
    for name in ("cpu", "cpu:0", torch.device("cpu", 0)):
        es = EvalSet(x, y, device=name)
        assert es.resident and es.device == torch.device("cpu"), name
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cpu:0") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; use device 'cpu' or 'auto'"):
            resolve_device("cuda:1")
        assert resolve_device("auto") == torch.device("cpu")
    else:
        assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
        assert resolve_device("cpu") == torch.device("cpu")  # a GPU host honours --device cpu
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_evalset_from_dataloader():
    x, y = make_data(10, 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    es = EvalSet.from_any(loader)
    assert torch.equal(es.x, x) and torch.equal(es.y, y)


# -- store ------------------------------------------------------------------------------------------

def _open(path, config=None, overwrite=False):
    return open_analysis(
        path, "rays", config or {"a": 1, "nested": {"b": 2}},
        axes={"distances": (np.linspace(0, 1, 4), ["step"]), "directions": (np.ones((2, 5), np.float32), ["direction", "theta"])},
        groups={"swa": {"label": "SWA", "sha256": "abc"}}, grid_shape=(2, 4), metrics=["test_err", "train_loss"],
        attrs={"point_labels": ["x"]}, overwrite=overwrite,
    )


def test_store_roundtrip_and_resume(tmp_path):
    path = tmp_path / "r.h5"
    with _open(path) as af:
        assert not af.resumed and len(af.pending("swa")) == 8
        af.write("swa", [1, 6], {"test_err": np.array([10.0, 20.0]), "train_loss": np.array([0.1, 0.2])})
    data = read(path)
    err = data["models"]["swa"]["metrics"]["test_err"]
    assert err[0, 1] == 10.0 and err[1, 2] == 20.0 and np.isnan(err).sum() == 6
    assert data["models"]["swa"]["done"].sum() == 2 and data["models"]["swa"]["attrs"]["label"] == "SWA"
    assert data["axes"]["directions_shape"] == (2, 5) and data["axes"]["point_labels"] == ["x"]
    assert data["kind"] == "rays" and data["config"] == {"a": 1, "nested": {"b": 2}}
    with h5py.File(path) as f:
        assert json.loads(f["directions"].attrs["dims"]) == ["direction", "theta"]
        assert f.attrs["schema"] == 1 and "torch_version" in f.attrs
    with _open(path) as af:
        assert af.resumed and list(af.pending("swa")) == [0, 2, 3, 4, 5, 7]


@pytest.mark.subprocess
def test_store_refuses_changed_config_and_second_writer(tmp_path):
    path = tmp_path / "r.h5"
    _open(path).close()
    with pytest.raises(ConfigMismatch, match=r"nested.b: 2 -> 3.*--overwrite"):
        _open(path, config={"a": 1, "nested": {"b": 3}})
    with _open(path, config={"a": 5}, overwrite=True) as af:
        assert not af.resumed
        # a second process (a real one: flock is per open file) is refused while the first holds the file
        code = ("import sys; from widthkit.fileio import WriterLock, OutputBusy\n"
                "try:\n    WriterLock(sys.argv[1]).acquire()\nexcept OutputBusy as e:\n    print(e); sys.exit(3)")
        other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
        assert other.returncode == 3 and "being written by another widthkit process" in other.stdout
        assert (tmp_path / ".r.h5.lock").exists()
    assert not (tmp_path / ".r.h5.lock").exists()  # released on close, and nothing left beside the result
    other = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stdout + other.stderr


def test_writer_lock_is_reentrant_in_one_process(tmp_path):
    path = tmp_path / "r.h5"
    with WriterLock(path):
        with WriterLock(path):  # e.g. update_attrs inside a command that holds the lock
            assert (tmp_path / ".r.h5.lock").exists()
        assert (tmp_path / ".r.h5.lock").exists()
    assert not (tmp_path / ".r.h5.lock").exists()


def test_store_refuses_foreign_file(tmp_path):
    path = tmp_path / "r.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        _open(path)


def test_points_in_flight_equal_one_at_a_time(net):
    """Several points per forward pass (vmap over stacked weights) give the per-point loop's numbers."""
    train, test = make_data(40, 1), make_data(30, 2)
    layout = ThetaLayout.from_model(net)
    theta0 = layout.flatten(net)
    dirs = random_directions(layout, theta0, 2, seed=1)
    coords = np.array([[0.0, 0.0], [0.4, -1.0], [1.5, 0.2], [-1.0, 1.0], [2.0, 2.0]])
    cfg = EvalConfig(bn_mode="keep", weight_decay=1e-3, chunk_size=4)
    stacked = Evaluator(net, train=train, test=test, config=cfg,
                        runtime=RuntimeConfig(device="cpu", eval_batch_size=16, points_in_flight=3))
    res = stacked.evaluate(theta0, dirs, coords)
    for p, c in enumerate(coords):
        theta = theta0 + torch.as_tensor(c, dtype=torch.float32) @ dirs
        ref = reference_point(net, theta, train, test, "keep", wd=1e-3)
        for m, v in ref.items():
            assert res[m][p] == pytest.approx(v, rel=1e-5, abs=1e-6), (m, p)
    # recompute works stacked too (tests/test_levers.py); batch mode does not
    with pytest.raises(ValueError, match="points_in_flight > 1 needs bn_mode 'keep' or 'recompute'"):
        Evaluator(net, train=train, test=test, config=EvalConfig(bn_mode="batch"),
                  runtime=RuntimeConfig(device="cpu", points_in_flight=2))
