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
from widthkit.engine.levers import (COMPILE_PRIOR_S, CaptureFailed, ChannelsLastInput, EmulatedGraphs, GraphedStep, batch_probe,
                                    choose_batch_size, choose_compile, choose_points_in_flight, compile_cache_dir,
                                    compile_probe, forward_probe, resolve_channels_last, stacked_sums)
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
                  cuda_graphs=True, out=out, threads=1, device="cpu")
    prov = read(out)["attrs"]["provenance"]
    assert prov["precision"] == "tf32" and "no effect on CPU" in prov["precision_effect"]
    assert "tf32_matmul" not in prov
    lev = prov["levers"]
    assert lev["points_in_flight"] == 1 and lev["cuda_graphs"] is False
    assert "CUDA graphs need a CUDA device" in lev["cuda_graphs_reason"]
    # every lever's choice and its reason are in the file
    assert lev["compile"] is False and "measured and chosen on CUDA only" in lev["compile_reason"]
    assert lev["eval_batch_size"] == 64 and lev["eval_batch_size_chosen_by"].startswith("default on cpu")
    assert read(out)["config"]["eval"]["precision"] == "tf32"


# -- channels-last and points in flight together (VGG16-BN bf16 on CUDA: "NYI: querying is_contiguous inside of
# vmap") -------------------------------------------------------------------------------------------------------

class LayoutQuery(nn.Module):
    """What some CUDA kernels do with their input (cuDNN batch norm and pooling choose their kernel this way): a
    channels-last-strided tensor is asked ``is_contiguous(memory_format=channels_last)``, which vmap does not
    implement for its batched tensors (the NYI error of issue 19); a contiguous one is not asked."""

    def forward(self, x):
        if x.dim() == 4 and x.stride(1) == 1 and x.shape[1] > 1:
            x.is_contiguous(memory_format=torch.channels_last)
        return x


class ConvBNQuery(ConvBN):
    def __init__(self):
        super().__init__()
        self.query = LayoutQuery()

    def forward(self, x):
        self.calls += 1
        x = self.query(F.relu(self.bn(self.conv(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("bn_mode", ["keep", "recompute"])
def test_points_in_flight_with_channels_last_keep_inputs_contiguous(setup, bn_mode):
    """Channels-last is on, K = 3: the stacked (vmap) calls get contiguous inputs (the query above would raise
    NYI on their channels-last activations), the K = 1 path still gets NHWC ones; results equal the loop."""
    net = ConvBNQuery()
    net.load_state_dict(setup[0].state_dict())
    q_setup = (net.eval(), *setup[1:])
    # the fault itself, reproduced: the channels-last hook left on inside the stacked call
    from widthkit import EvalSet

    hooked = copy.deepcopy(net)
    hooked.register_forward_pre_hook(ChannelsLastInput())
    with pytest.raises(RuntimeError, match="NYI: querying is_contiguous inside of vmap"):
        stacked_sums(hooked, ThetaLayout.from_model(net), torch.stack([setup[3], setup[3]]),
                     [(0, EvalSet(*setup[2]))], 16, torch.zeros(2, 5, dtype=torch.float64))
    ev = evaluator(q_setup, bn_mode=bn_mode, channels_last=True, points_in_flight=3, precision="bf16")
    seen = []
    ev.model.conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))
    res = ev.evaluate(*setup[3:])
    assert seen and all(seen)  # contiguous_format inside every stacked call
    d = ev.levers.describe()
    assert d["channels_last"] is True and "contiguous inside the stacked (vmap) calls" in d["channels_last_reason"]
    one = evaluator(q_setup, bn_mode=bn_mode, channels_last=True, points_in_flight=1, precision="bf16")
    seen.clear()
    one.model.conv.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    ref = one.evaluate(*setup[3:])
    assert seen and all(seen)  # one point at a time: NHWC as before
    for m in ("train_loss", "test_loss"):  # bf16: the two paths round differently (tolerance: tests/conftest.py)
        np.testing.assert_allclose(res[m], ref[m], rtol=2e-2)


@pytest.mark.slow  # ~10 s on 2 cores: VGG16-BN's 15 M weights, three times
def test_vgg16_bn_bf16_with_points_in_flight_and_channels_last():
    """The issue's crash case on CPU: VGG16-BN, bf16, channels-last on, 2 points in flight, BN keep and
    recompute, against one point at a time."""
    from widthkit import EvalSet
    from widthkit.models import create_model

    torch.manual_seed(0)
    m = create_model("vgg16_bn", num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    tr, te = EvalSet(x, y, (0.5,) * 3, (0.25,) * 3, "cpu"), EvalSet(x[:6], y[:6], (0.5,) * 3, (0.25,) * 3, "cpu")
    basis = torch.randn(2, ThetaLayout.from_model(m).size, generator=g) * 1e-3
    coords = [[0.0, 0.0], [1.0, -1.0]]
    for bn_mode in ("keep", "recompute"):
        res = {}
        for k in (2, 1):
            ev = Evaluator(m, tr, te, EvalConfig(bn_mode=bn_mode), RuntimeConfig(
                device="cpu", precision="bf16", points_in_flight=k, channels_last=True, eval_batch_size=6))
            res[k] = ev.evaluate(ev.theta0, basis, coords)
        for name in ("train_loss", "test_loss"):
            np.testing.assert_allclose(res[2][name], res[1][name], rtol=2e-2)


# -- the forward batch size ------------------------------------------------------------------------------------

def test_batch_size_is_chosen_by_a_timing_up_to_the_memory_limit():
    """choose_batch_size on a fake clock: doubles from 4096, keeps the most images/s, stops at 16384, at the first
    size that does not fit, and at the largest split; nothing fitting keeps the start (halved later on OOM)."""
    asked = []

    def clock(times):
        def seconds_for(b):
            asked.append(b)
            return times[b]
        return seconds_for

    got = choose_batch_size(clock({4096: 1.0, 8192: 1.6, 16384: 3.6}))  # 4096, 5120, 4551 images/s
    assert got["batch_size"] == 8192 and asked == [4096, 8192, 16384] and got["chosen_by"] == "timing"
    assert got["images_per_second"] == {4096: 4096.0, 8192: 8192 / 1.6, 16384: 16384 / 3.6}
    asked.clear()
    got = choose_batch_size(clock({4096: 1.0, 8192: 1.0, 16384: float("inf"), 32768: 0.1}))
    assert got["batch_size"] == 8192 and asked == [4096, 8192, 16384]  # 16384 did not fit: 32768 not tried
    asked.clear()
    assert choose_batch_size(clock({4096: 1.0, 8192: 1.5, 10000: 1.2}), largest=10000)["batch_size"] == 10000
    assert asked == [4096, 8192, 10000]  # no batch larger than the largest split
    asked.clear()
    assert choose_batch_size(clock({1000: 0.5}), largest=1000)["batch_size"] == 1000 and asked == [1000]
    got = choose_batch_size(clock({4096: float("inf")}))
    assert got["batch_size"] == 4096 and "did not fit" in got["chosen_by"]
    # a tie keeps the smaller batch (less memory for the same speed)
    assert choose_batch_size(clock({4096: 1.0, 8192: 2.0, 16384: 4.0}))["batch_size"] == 4096


def test_batch_probe_times_real_forward_passes(setup):
    net, train = setup[0], setup[1]
    sizes = []

    def inputs(b):
        sizes.append(b)
        return train[0][:b]

    seconds_for = batch_probe(copy.deepcopy(net).eval(), inputs, torch.device("cpu"), repeats=1)
    assert 0 < seconds_for(8) < 10 and 0 < seconds_for(16) < 10 and sizes == [8, 16]
    got = choose_batch_size(seconds_for, start=4, limit=16, largest=40)
    assert got["batch_size"] in (4, 8, 16) and set(got["images_per_second"]) == {4, 8, 16}


def test_the_cpu_keeps_its_batch_size_and_says_why(setup):
    ev = evaluator(setup, bn_mode="keep", eval_batch_size=None)
    rep = ev.levers_report()
    assert ev.batch_size == 64 and rep["eval_batch_size"] == 64 and "default on cpu" in rep["eval_batch_size_chosen_by"]
    rep = evaluator(setup, bn_mode="keep", eval_batch_size=16).levers_report()
    assert (rep["eval_batch_size"], rep["eval_batch_size_chosen_by"]) == (16, "asked")


# -- compile ---------------------------------------------------------------------------------------------------

def test_compile_auto_is_off_on_cpu_with_its_reason(setup):
    ev = evaluator(setup, bn_mode="keep")
    assert ev.runtime.compile == "auto"
    d = ev.levers_report()
    assert d["compile"] is False and d["compile_reason"].startswith("off (auto: compile is measured and chosen on CUDA")
    assert ev.levers.forward is ev.model
    assert evaluator(setup, compile=False).levers.describe()["compile_reason"] == "off (asked)"
    with pytest.raises(ValueError, match="compile must be 'auto', True or False"):
        RuntimeConfig(compile="yes")
    import importlib

    p = importlib.import_module("widthkit.rays").build_parser()
    for argv, want in ((["--compile"], True), (["--compile", "off"], False), (["--compile", "auto"], "auto"), ([], "auto")):
        assert cli.runtime_config(p.parse_args(["--ckpt", "x.pt", *argv])).compile == want, argv


def test_compile_is_chosen_when_the_run_pays_for_it():
    """choose_compile on a fake clock: not tried when the run's points cannot repay an assumed compile, kept when
    measured faster by more than 10 %, dropped when not; what was assumed and measured is returned."""
    tried = []

    def compile_and_time(compile_s, batch_s):
        def run():
            tried.append(1)
            return "compiled", compile_s, batch_s
        return run

    # 10 points x 12 batches x 0.01 s = 1.2 s eager: nothing a 60 s compile could repay
    got = choose_compile(10, 0.01, 12, 1, compile_and_time(30.0, 0.005))
    assert got["compile"] is False and not tried and got["compiled"] is None
    assert "assumed 60 s" in got["reason"] and got["seconds"]["estimated_saving_s"] == pytest.approx(0.4)
    # 2601 points x 12 batches x 0.05 s = 1560 s eager, a third of it saved at 1.5x: 520 s > 3 shapes x 60 s
    got = choose_compile(2601, 0.05, 12, 3, compile_and_time(40.0, 0.02))
    assert got["compile"] is True and got["compiled"] == "compiled" and len(tried) == 1
    assert got["reason"].startswith("on (auto: measured 2.50x faster per forward batch after a 40 s compile")
    assert got["seconds"]["compile_s"] == 40.0 and got["seconds"]["assumed_compile_s"] == 3 * COMPILE_PRIOR_S
    # measured only 5 % faster: not kept
    got = choose_compile(2601, 0.05, 12, 3, compile_and_time(40.0, 0.0476))
    assert got["compile"] is False and "not 10 % faster" in got["reason"]
    # more shapes to compile raise the bar: 9 shapes x 60 s = 540 s > 520 s
    assert choose_compile(2601, 0.05, 12, 9, compile_and_time(40.0, 0.02))["compile"] is False


def test_compile_cache_folder_is_persistent_unless_the_user_chose_one(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert compile_cache_dir() == str(tmp_path / "cache" / "widthkit" / "inductor")
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "widthkit" / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == str(tmp_path / "mine")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compile_probe_compiles_and_times_on_cpu(setup, monkeypatch, tmp_path):
    """The measurement compile="auto" runs on CUDA, here on CPU: torch.compile of a tiny model (inductor's C++
    backend), its compile time and its batch time, its outputs equal to eager."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    net = copy.deepcopy(setup[0]).eval()
    x = setup[1][0][:16]
    try:
        compiled, compile_s, batch_s = compile_probe(net, x, repeats=1)()
    except Exception as e:  # no C++ compiler, an unsupported platform: say so instead of failing
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    assert compile_s > 0 and batch_s > 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), net(x), rtol=1e-5, atol=1e-6)
    got = choose_compile(10 ** 6, 1.0, 1, 1, lambda: (compiled, compile_s, batch_s))
    assert got["seconds"]["compiled_batch_s"] == batch_s


# -- start-up cost and progress within a point ----------------------------------------------------------------

def test_the_thread_probe_touches_a_few_batches_not_the_data(monkeypatch):
    """Before the first point, the CPU thread-count probe ran the origin through all the data four times (16
    minutes on MNIST-size data); now a few forward batches of the test split: on a test split of 20,000 images,
    what the model sees before the first point is bounded by the probe's batches, whatever the data's size."""
    import widthkit
    from widthkit.models import create_model

    torch.manual_seed(0)
    net = create_model("digits_cnn").eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20_000, 1, 8, 8, generator=g), torch.randint(0, 10, (20_000,), generator=g)
    images, at_first_point = [], []
    net.register_forward_pre_hook(lambda m, a: images.append(a[0].shape[0]))  # deep copies keep it

    real_point = Evaluator._point

    def point(self, out):
        if not at_first_point:
            at_first_point.append(sum(images))
        return real_point(self, out)

    monkeypatch.setattr(Evaluator, "_point", point)
    old = torch.get_num_threads()
    torch.set_num_threads(2)  # the probe runs only where there is a choice to make
    try:
        res = widthkit.rays(net, data=((x[:1000], y[:1000]), (x, y)), dirs=1, steps=2, bn_mode="keep", device="cpu")
        prov = res.data["attrs"]["provenance"]
    finally:
        torch.set_num_threads(old)
    probe = at_first_point[0]
    # 2 thread counts x 2 repeats x 2 batches of 64 images (+ the 2 images prepare() checks the model with),
    # against 4 x 21,000 before
    assert 2 < probe <= 2 * 2 * 2 * 64 + 2, probe
    assert sum(images) - probe == 2 * 21_000  # then the 2 points, each over both splits
    assert prov["thread_choice"]["chosen_by"] == "timing" and set(prov["thread_choice"]["seconds"]) == {"1", "2"} \
        or set(prov["thread_choice"]["seconds"]) == {1, 2}


def test_progress_within_a_point(setup):
    """on_progress: after every eager forward batch, the call's points done so far, the current one fractionally
    and never whole; none on graph replays."""
    ev = evaluator(setup, bn_mode="recompute")  # 24 BN images + 40 train + 20 test at batch 16: 2 + 3 + 2 batches
    seen = []
    ev.on_progress = seen.append
    ev.evaluate(setup[3], setup[4], setup[5][:2])
    per_point = 2 + 3 + 2
    assert len(seen) == 2 * per_point
    assert seen == sorted(seen) and seen[0] == pytest.approx(1 / per_point) and max(seen) < 2
    assert seen[per_point - 1] == pytest.approx(0.99) and seen[per_point] == pytest.approx(1 + 1 / per_point)
    graphed = evaluator(setup, EmulatedGraphs(), bn_mode="keep")
    graphed.on_progress = seen.append
    seen.clear()
    graphed.evaluate(*setup[3:])
    assert seen == []


def test_progress_within_points_is_throttled():
    from widthkit.analyses.grid import within_points

    now = [0.0]
    calls = []
    on_progress = within_points(lambda d, t: calls.append((d, t)), base=10, total=100, every_s=2.0,
                                clock=lambda: now[0])
    for t, p in ((0.5, 0.2), (2.5, 0.57), (3.0, 0.9), (4.6, 1.99), (9.0, 2.5)):
        now[0] = t
        on_progress(p)
    assert calls == [(10.5, 100), (11.9, 100), (12.5, 100)]  # every 2 s at most; rounded down to tenths


def test_an_analysis_reports_progress_within_long_points(monkeypatch):
    """Through the grid: with points slower than the bar's interval (a clock that moves 1 s per reading), the
    progress callback gets fractional counts between the written ones, never a whole point early."""
    import types

    import widthkit
    from widthkit.analyses import grid
    from widthkit.models import create_model

    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(grid, "time", types.SimpleNamespace(monotonic=clock))  # the grid's clock only
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 1, 8, 8, generator=g), torch.randint(0, 10, (300,), generator=g)
    seen = []
    widthkit.rays(create_model("digits_cnn"), data=((x, y), (x[:100], y[:100])), dirs=1, steps=3, bn_mode="keep",
                  device="cpu", threads=1, chunk_size=1, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 3) and seen[-1] == (3, 3) and all(t == 3 for _, t in seen)
    fractional = [d for d, _ in seen if d != int(d)]
    assert fractional and all(0 < d < 3 for d in fractional)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # the bar never goes back
