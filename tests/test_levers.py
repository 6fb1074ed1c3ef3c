"""Speed levers and the precision policy on CPU: each lever equals the plain per-point loop; the GPU-only ones
(CUDA graphs, points in flight chosen by timing) fall back cleanly here with their reason, and the graph path
itself runs through its CPU twin (EmulatedGraphs), which replays recorded ops on the same tensors as a CUDA
graph would."""

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from widthkit import EvalConfig, Evaluator, cli
from widthkit.engine.directions import random_directions
from widthkit.engine.levers import (CaptureFailed, EmulatedGraphs, GraphedStep, choose_points_in_flight,
                                    forward_probe, resolve_channels_last, stacked_sums)
from widthkit.engine.space import ThetaLayout
from widthkit.runtime import RuntimeConfig, precision_policy, precision_record, provenance, tf32_state
from widthkit.settings import split_kwargs

B = torch.backends


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)
        self.calls = 0  # Python-level forward calls (a graph replay makes none)
        self.layouts = []  # whether each input arrived channels-last

    def forward(self, x):
        self.calls += 1
        self.layouts.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = ConvBN()
    net.train()
    with torch.no_grad():  # non-trivial running statistics, as a trained checkpoint has
        for _ in range(3):
            net(torch.randn(32, 2, 6, 6) * 2 + 0.5)
    net.eval()
    layout = ThetaLayout.from_model(net)
    theta0 = layout.flatten(net)
    dirs = random_directions(layout, theta0, 2, seed=1)
    coords = np.array([[0.0, 0.0], [0.4, -1.0], [1.5, 0.2], [-1.0, 1.0], [2.0, 2.0]])
    return net, data(40, 1), data(20, 2), theta0, dirs, coords


def loop(net, theta, train, test, bn_mode, bn_idx=None, bs=16):
    """The plain per-point loop, written independently: load θ tensor by tensor, update_bn over a DataLoader
    of the BN images (cumulative average), eval mode, a DataLoader over each split, `.item()` per batch."""
    m = copy.deepcopy(net)
    params = dict(m.named_parameters())
    for e in ThetaLayout.from_model(m):
        params[e.name].data.copy_(theta[e.slice].view(e.shape))
    with torch.no_grad():
        if bn_mode == "recompute":
            x = train[0] if bn_idx is None else train[0][bn_idx]
            torch.optim.swa_utils.update_bn(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x),
                                                                        batch_size=bs), m)
        m.eval()
        if bn_mode == "batch":
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.train()
        out = {}
        for split, (x, y) in (("train", train), ("test", test)):
            loss = err = 0.0
            for xb, yb in torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=bs):
                logits = m(xb)
                loss += F.cross_entropy(logits, yb, reduction="sum").item()
                err += (logits.argmax(1) != yb).sum().item()
            out[f"{split}_loss"], out[f"{split}_err"] = loss / len(y), 100.0 * err / len(y)
    return out


def check_against_loop(res, setup, bn_mode, bn_idx=None, rel=1e-5):
    net, train, test, theta0, dirs, coords = setup
    for p, c in enumerate(coords):
        ref = loop(net, theta0 + torch.as_tensor(c, dtype=torch.float32) @ dirs, train, test, bn_mode, bn_idx)
        for m, v in ref.items():
            assert res[m][p] == pytest.approx(v, rel=rel, abs=1e-6), (m, p, bn_mode)


def evaluator(setup, graph_backend=None, **settings):
    """An evaluator on the CPU (exact CPU arithmetic is compared): evaluation and runtime settings by name."""
    net, train, test = setup[:3]
    how, cfg = split_kwargs(RuntimeConfig, {"eval_batch_size": 16, **settings})
    if cfg.get("bn_mode") == "recompute":
        cfg.setdefault("bn_subset", 24)
    return Evaluator(net, train=train, test=test, config=EvalConfig(**cfg),
                     runtime=RuntimeConfig(**{"device": "cpu", **how}), graph_backend=graph_backend)


# -- precision policy -----------------------------------------------------------------------------------------

@pytest.fixture
def clean_flags():
    """Every test leaves the process's float32 math flags as it found them."""
    leaves = [B.cuda.matmul, B.cudnn.conv, B.mkldnn.matmul, B.mkldnn.conv]
    saved = [leaf.fp32_precision for leaf in leaves]
    yield
    for leaf, value in zip(leaves, saved):
        leaf.fp32_precision = value


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # the CUDA flags are plain process state: settable here
def test_precision_policy_sets_the_flags_and_restores_them(device, clean_flags):
    cuda = device == "cuda"
    matmul, conv = (B.cuda.matmul, B.cudnn.conv) if cuda else (B.mkldnn.matmul, B.mkldnn.conv)
    others = (B.mkldnn.matmul, B.mkldnn.conv) if cuda else (B.cuda.matmul, B.cudnn.conv)
    matmul.fp32_precision, conv.fp32_precision = "bf16" if not cuda else "tf32", "none"
    before = (matmul.fp32_precision, conv.fp32_precision, [o.fp32_precision for o in others])
    for precision, want in (("fp32", "ieee"), ("bf16", "ieee"), ("tf32", "tf32" if cuda else "ieee")):
        with precision_policy(precision, device):
            assert (matmul.fp32_precision, conv.fp32_precision) == (want, want), precision
            assert [o.fp32_precision for o in others] == before[2]  # the other device type's flags untouched
            if cuda:
                assert tf32_state() == {"matmul": want == "tf32", "conv": want == "tf32"}
        assert (matmul.fp32_precision, conv.fp32_precision, [o.fp32_precision for o in others]) == before
    with pytest.raises(RuntimeError, match="boom"):  # restored on an error too
        with precision_policy("tf32", device):
            raise RuntimeError("boom")
    assert (matmul.fp32_precision, conv.fp32_precision) == before[:2]


def test_precision_policy_leaves_the_old_flag_api_readable(clean_flags):
    """A process that set TF32 through the old flags can still read them after the policy ran (torch raises on
    reading them once the new API was used, unless the new values are put back exactly)."""
    B.cuda.matmul.allow_tf32, B.cudnn.allow_tf32 = True, False
    with precision_policy("fp32", "cuda"):
        assert tf32_state() == {"matmul": False, "conv": False}
    assert (B.cuda.matmul.allow_tf32, B.cudnn.allow_tf32) == (True, False)
    assert torch.get_float32_matmul_precision() == "high"
    B.cuda.matmul.allow_tf32, B.cudnn.allow_tf32 = False, True  # torch's defaults


def test_precision_is_recorded_as_its_effect_on_the_device():
    cpu = provenance("cpu", "tf32")
    assert cpu["precision"] == "tf32" and "no effect on CPU" in cpu["precision_effect"]
    assert "tf32_matmul" not in cpu and "tf32_conv" not in cpu  # TF32 flags mean nothing on a CPU
    assert provenance("cpu", "bf16")["autocast"] == "bfloat16"
    assert provenance("cpu")["precision"] == "fp32" and provenance("cpu", True)["precision"] == "bf16"
    rec = precision_record("tf32", "cuda")
    assert rec["tf32_matmul"] and rec["tf32_conv"] and rec["autocast"] is None
    assert not precision_record("bf16", "cuda")["tf32_conv"]
    with pytest.raises(ValueError, match="valid choices: fp32, tf32, bf16"):
        precision_record("half", "cpu")


def test_evaluation_runs_under_the_policy_and_ignores_a_process_wide_bf16_setting(setup, clean_flags):
    """A process-wide "bf16 for float32 matmuls" (e.g. set_float32_matmul_precision("medium")) must not reach
    an fp32 evaluation: the policy pins oneDNN to IEEE float32 while it runs and puts the setting back."""
    net = setup[0]
    seen = []
    B.mkldnn.matmul.fp32_precision = B.mkldnn.conv.fp32_precision = "bf16"
    probe = copy.deepcopy(net)
    probe.register_forward_pre_hook(lambda m, a: seen.append((B.mkldnn.matmul.fp32_precision,
                                                               B.mkldnn.conv.fp32_precision)))
    ev = evaluator((probe, *setup[1:]), bn_mode="keep")
    res = ev.evaluate(setup[3], setup[4], setup[5])
    assert seen and set(seen) == {("ieee", "ieee")}
    assert (B.mkldnn.matmul.fp32_precision, B.mkldnn.conv.fp32_precision) == ("bf16", "bf16")
    B.mkldnn.matmul.fp32_precision = B.mkldnn.conv.fp32_precision = "none"
    check_against_loop(res, setup, "keep")


def test_bf16_on_cpu_is_within_tolerance_of_fp32(setup):
    """bf16 autocast on CPU: losses within 2 % relative of fp32 (bf16 keeps 8 mantissa bits; PERF-NOTES saw
    up to 3e-3 on ResNet-20), error rates within 2 images; and it is really applied (not bit-equal)."""
    fp32 = evaluator(setup, bn_mode="recompute").evaluate(*setup[3:])
    bf16 = evaluator(setup, bn_mode="recompute", precision="bf16").evaluate(*setup[3:])
    tf32 = evaluator(setup, bn_mode="recompute", precision="tf32").evaluate(*setup[3:])
    for m in ("train_loss", "test_loss"):
        np.testing.assert_allclose(bf16[m], fp32[m], rtol=2e-2)
        assert not np.array_equal(bf16[m], fp32[m])
        np.testing.assert_array_equal(tf32[m], fp32[m])  # tf32 has no effect on CPU
    assert np.abs(bf16["train_err"] - fp32["train_err"]).max() <= 100 * 2 / 40
    assert np.abs(bf16["test_err"] - fp32["test_err"]).max() <= 100 * 2 / 20


# -- channels-last, compile ------------------------------------------------------------------------------------

def test_channels_last_equals_contiguous(setup):
    ev = evaluator(setup, bn_mode="recompute", channels_last=True)
    ev.model.layouts.clear()
    res = ev.evaluate(*setup[3:])
    assert ev.model.layouts and all(ev.model.layouts)  # every forward pass got an NHWC input
    assert ev.levers.describe()["channels_last"] is True
    check_against_loop(res, setup, "recompute", ev.bn_index.cpu(), rel=1e-5)
    off = evaluator(setup, bn_mode="keep", channels_last=False)
    off.model.layouts.clear()
    off.evaluate_weights(off.theta0)
    assert off.model.layouts and not any(off.model.layouts)


def test_channels_last_auto_is_a_fixed_rule(setup):
    """auto: on for CUDA conv nets, on CPU with bf16 only (never a run-time timing: it changes last bits)."""
    net = setup[0]
    assert resolve_channels_last("auto", net, "cuda") == (True, "on (auto: CUDA conv net)")
    assert resolve_channels_last("auto", net, "cpu", "bf16")[0] is True
    assert resolve_channels_last("auto", net, "cpu", "fp32") == \
        (False, "off (auto: CPU with fp32, where it was not reliably faster)")
    assert resolve_channels_last(True, nn.Linear(3, 2), "cuda") == (False, "off (no convolution in the model)")
    ev = evaluator(setup, bn_mode="keep", precision="bf16")
    ev.model.layouts.clear()
    ev.evaluate_weights(ev.theta0)
    assert ev.levers.describe()["channels_last"] is True and ev.model.layouts and all(ev.model.layouts)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_equals_the_loop(setup):
    """torch.compile of the evaluation forward (inductor's C++ backend on CPU: ~15 s the first time a machine
    compiles it, ~1 s from inductor's cache)."""
    try:
        ev = evaluator(setup, bn_mode="recompute", compile=True)
        res = ev.evaluate(*setup[3:])
    except Exception as e:  # no C++ compiler, an unsupported platform: say so instead of failing
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    assert ev.levers.describe()["compile"] is True and ev.levers.points_in_flight == 1
    check_against_loop(res, setup, "recompute", ev.bn_index.cpu(), rel=1e-4)


# -- CUDA graphs ------------------------------------------------------------------------------------------------

def test_cuda_graphs_fall_back_on_cpu_with_the_reason(setup, caplog):
    for setting in (True, "auto"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="widthkit"):
            ev = evaluator(setup, bn_mode="keep", cuda_graphs=setting)
            res = ev.evaluate(*setup[3:])
        d = ev.levers.describe()
        assert d["cuda_graphs"] is False and "CUDA graphs need a CUDA device" in d["cuda_graphs_reason"]
        # asked for: one logged line with the reason; auto: only recorded (every CPU run would say it)
        assert [r.getMessage() for r in caplog.records] == ([f"cuda_graphs: {d['cuda_graphs_reason']}"]
                                                            if setting is True else [])
        check_against_loop(res, setup, "keep")
    assert evaluator(setup, cuda_graphs=False).levers.describe()["cuda_graphs_reason"] == "off (asked)"


@pytest.mark.parametrize("bn_mode,k", [("keep", 1), ("recompute", 1), ("batch", 1), ("keep", 3), ("recompute", 3)])
def test_graph_path_replays_and_equals_the_loop(setup, bn_mode, k):
    """The graph path on its CPU twin: one capture per evaluator, every point a replay (no Python forward
    call), a short last group of points padded, results equal to the loop."""
    graphs = EmulatedGraphs()
    ev = evaluator(setup, graphs, bn_mode=bn_mode, points_in_flight=k, chunk_size=2)
    res = ev.evaluate(*setup[3:])
    assert graphs.captures == 1 and ev.levers.describe()["cuda_graphs"] is True
    calls = ev.model.calls
    again = ev.evaluate(*setup[3:])
    assert ev.model.calls == calls  # replayed: the model's Python code did not run again
    for m in res:
        np.testing.assert_array_equal(again[m], res[m])
    check_against_loop(res, setup, bn_mode, ev.bn_index.cpu() if ev.bn_index is not None else None)


class Syncing(ConvBN):
    def forward(self, x):
        if float(x.abs().max()) > 1e9:  # a host read of a device value: no CUDA graph can hold it
            x = x * 0
        return super().forward(x)


def test_a_failed_capture_falls_back_to_eager_with_a_logged_reason(setup, caplog):
    net = Syncing()
    net.load_state_dict(setup[0].state_dict())
    sync_setup = (net.eval(), *setup[1:])
    with caplog.at_level(logging.WARNING, logger="widthkit"):
        ev = evaluator(sync_setup, EmulatedGraphs(), bn_mode="keep")
        res = ev.evaluate(*setup[3:])
    reason = ev.levers.describe()["cuda_graphs_reason"]
    assert reason.startswith("off (capture failed, evaluating eagerly:") and "_local_scalar_dense" in reason
    assert ev.levers.describe()["cuda_graphs"] is False
    assert [r.getMessage() for r in caplog.records] == [f"cuda_graphs: {reason}"]
    check_against_loop(res, sync_setup, "keep")


def test_the_graph_twin_rejects_what_a_cuda_capture_rejects(setup):
    """BatchNorm's momentum=None reads the batch count back from the device: the emulated capture refuses it
    (which is why the evaluator's BN pass uses explicit 1/i momenta), and a refused capture leaves the
    buffers as they were."""
    net = copy.deepcopy(setup[0])
    x = setup[1][0]
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def bn_pass(out):
        for m in (net.bn, net.bn2):
            m.reset_running_stats()
            m.momentum = None
            m.train()
        net(x[:16])
        net(x[16:])
        net.eval()
        out += net.bn.running_mean.sum()

    with torch.no_grad(), pytest.raises(CaptureFailed, match="_local_scalar_dense"):
        GraphedStep(bn_pass, torch.zeros(1), EmulatedGraphs(), list(net.buffers()))
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue  # the warm-up runs counted batches; values below are what the capture must not touch
        if "running" in k:
            assert torch.isfinite(v).all()
        else:
            assert torch.equal(v, before[k])


# -- points in flight ------------------------------------------------------------------------------------------

def test_points_in_flight_auto_is_one_on_cpu_and_recorded(setup):
    ev = evaluator(setup, bn_mode="recompute")
    assert ev.runtime.points_in_flight == "auto" and ev.levers.points_in_flight == 1
    d = ev.levers_report()
    assert d["points_in_flight"] == 1 and d["points_in_flight_chosen_by"].startswith("auto: CPU")
    asked = evaluator(setup, bn_mode="keep", points_in_flight=4).levers_report()
    assert (asked["points_in_flight"], asked["points_in_flight_chosen_by"]) == (4, "asked")


def test_choosing_points_in_flight_by_timing():
    timings = {1: 1.0, 4: 0.5, 16: 0.45}
    assert choose_points_in_flight(timings.get)["points_in_flight"] == 16
    assert choose_points_in_flight({1: 1.0, 4: 0.95, 16: float("inf")}.get)["points_in_flight"] == 1  # < 10 % gain
    assert choose_points_in_flight({1: float("inf"), 4: 2.0, 16: 3.0}.get)["points_in_flight"] == 4
    got = choose_points_in_flight({1: 1.0, 4: 0.8, 16: 0.8}.get)
    assert got["points_in_flight"] == 4 and got["seconds_per_point"] == {1: 1.0, 4: 0.8, 16: 0.8}


def test_forward_probe_times_each_k(setup):
    net, train = setup[0], setup[1]
    probe = forward_probe(copy.deepcopy(net).eval(), ThetaLayout.from_model(net), setup[3], train[0][:16],
                          repeats=1)
    for k in (1, 3):
        s = probe(k)
        assert 0 < s < 10


def test_stacked_recompute_equals_one_point_at_a_time(setup):
    """BN statistics recomputed per point inside one vmap call, against the per-point loop."""
    ev = evaluator(setup, bn_mode="recompute", points_in_flight=3, weight_decay=1e-3)
    res = ev.evaluate(*setup[3:])
    check_against_loop(res, setup, "recompute", ev.bn_index.cpu())
    # the function itself, for two points, against the evaluator's one-point path
    net, train, test, theta0, dirs = setup[:5]
    thetas = torch.stack([theta0, theta0 + 0.5 * dirs[0]])
    out = torch.zeros(2, 5, dtype=torch.float64)
    model = copy.deepcopy(ev.model)
    es = type(ev.test)
    stacked_sums(model, ev.layout, thetas, [(0, es(*test))], 16, out, "recompute", (es(train[0][:24], train[1][:24]), None))
    one = evaluator(setup, bn_mode="recompute", bn_subset=None, points_in_flight=1)
    one.train = type(one.train)(train[0][:24], train[1][:24])
    one.bn_index = None
    for p in range(2):
        r = one.evaluate_weights(thetas[p])
        assert out[p, 1].item() == len(test[1]) and out[p, 3].item() == len(test[1])  # (sum, count) pairs
        assert out[p, 0].item() / len(test[1]) == pytest.approx(r["test_loss"], rel=1e-5)
        assert 100 * out[p, 2].item() / len(test[1]) == pytest.approx(r["test_err"])
        assert out[p, 4].item() == pytest.approx(float(thetas[p].double().square().sum()))
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [0.1, 0.1]  # restored


# -- config and flags ------------------------------------------------------------------------------------------

def test_lever_flags_and_validation():
    import importlib

    p = importlib.import_module("widthkit.rays").build_parser()
    args = p.parse_args(["--ckpt", "x.pt", "--precision", "tf32", "--channels-last", "on", "--cuda-graphs", "off",
                         "--points-in-flight", "4", "--compile", "--bn", "keep"])
    with pytest.raises(ValueError, match="compile=True needs points_in_flight 1 or 'auto'"):
        cli.runtime_config(args)
    args = p.parse_args(["--ckpt", "x.pt", "--amp", "--cuda-graphs", "auto", "--points-in-flight", "auto"])
    rt = cli.runtime_config(args)
    assert (rt.precision, rt.cuda_graphs, rt.points_in_flight, rt.channels_last) == ("bf16", "auto", "auto", "auto")
    with pytest.raises(SystemExit):
        p.parse_args(["--ckpt", "x.pt", "--cuda-graphs", "maybe"])
    with pytest.raises(ValueError, match="channels_last must be 'auto', True or False"):
        RuntimeConfig(channels_last="yes")
    with pytest.raises(ValueError, match="points_in_flight must be an integer >= 1"):
        RuntimeConfig(points_in_flight=0)
    # speed levers are not part of what a file's results depend on; precision is
    rec = EvalConfig().recorded(RuntimeConfig(channels_last=True, cuda_graphs=False, compile=True, points_in_flight=1))
    assert rec == EvalConfig().recorded(RuntimeConfig()) and rec["precision"] == "fp32"


def test_levers_and_precision_recorded_in_the_file(tmp_path):
    import widthkit
    from widthkit.report.store import read

    torch.manual_seed(0)
    from widthkit.models import create_model

    net = create_model("digits_cnn")
    out = tmp_path / "r.h5"
    x, y = torch.randn(30, 1, 8, 8), torch.randint(0, 10, (30,))
    widthkit.rays(net, data=((x, y), (x, y)), dirs=1, steps=2, bn_mode="keep", precision="tf32",
                  cuda_graphs=True, out=out, threads=1)
    prov = read(out)["attrs"]["provenance"]
    assert prov["precision"] == "tf32" and "no effect on CPU" in prov["precision_effect"]
    assert "tf32_matmul" not in prov
    lev = prov["levers"]
    assert lev["points_in_flight"] == 1 and lev["cuda_graphs"] is False
    assert "CUDA graphs need a CUDA device" in lev["cuda_graphs_reason"]
    assert read(out)["config"]["eval"]["precision"] == "tf32"
