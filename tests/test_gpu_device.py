"""On a GPU, against CPU references: the evaluator (every lever on auto, fp32 / tf32 / bf16), the VGG16-BN bf16
case with points in flight and channels-last, compile, a trainer's SGD steps, Hessian-vector products, and an
analysis end to end. Each CUDA result is compared with the fp32 CPU result of the same computation under the
tolerance policy of tests/conftest.py (TOLERANCE).

Marked ``gpu`` and skipped without CUDA: ``python -m pytest -m gpu`` runs them (with the other gpu-marked
tests) in under 4 minutes on one GPU. Their CPU twins run everywhere (tests/test_levers.py, test_engine.py).
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TOLERANCE, allowed_flips, assert_derivative_close, assert_forward_close
from widthkit import EvalConfig, EvalSet, Evaluator
from widthkit.engine.curvature import HVP_METHODS, HessianOperator
from widthkit.engine.directions import random_directions
from widthkit.engine.space import ThetaLayout
from widthkit.models import create_model
from widthkit.runtime import RuntimeConfig, precision_policy, resolve_device, same_device

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
COORDS = np.array([[0.0, 0.0], [0.3, -0.2], [-0.5, 0.4]])


def images(n, seed, shape=(3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def with_bn_statistics(model, x):
    """A fresh model with BN running statistics set at θ₀ (as a trained checkpoint carries them)."""
    model.train()
    with torch.no_grad():
        for xb in x.split(256):
            model(xb)
    return model.eval()


def cifar_subject(arch, n_train, n_test, seed=0):
    torch.manual_seed(seed)
    xtr, ytr = images(n_train, seed)
    xte, yte = images(n_test, seed + 1)
    norm = (xtr.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    model = with_bn_statistics(create_model(arch, num_classes=10), norm[:512])
    layout = ThetaLayout.from_model(model)
    basis = random_directions(layout, layout.flatten(model), 2, seed=seed, norm="filter", exclude="biasbn")
    return model, (xtr, ytr), (xte, yte), basis


def evaluate(model, train, test, basis, bn_mode, runtime, coords=COORDS, bn_subset=256, expect=None):
    device = runtime.resolved_device()
    tr = EvalSet(train[0].to(device), train[1], MEAN, STD, device)
    te = EvalSet(test[0].to(device), test[1], MEAN, STD, device)
    ev = Evaluator(model, tr, te, EvalConfig(bn_mode=bn_mode, bn_subset=bn_subset), runtime=runtime)
    if expect:
        ev.expect_points(expect)
    report = ev.levers_report()
    return ev.evaluate(ev.theta0, basis, coords), report, ev


def check_against(res, ref, precision, n_train, n_test):
    """Losses within the policy; error rates too where predictions are decisive (fp32 here: these models are
    freshly initialised, their logits near-ties that tf32 and bf16 may flip; trained models' errors are checked
    at every precision in the analysis test below)."""
    for split, n in (("train", n_train), ("test", n_test)):
        assert_forward_close(res[f"{split}_loss"], ref[f"{split}_loss"], precision, f"{split}_loss")
        if precision == "fp32":
            flips = np.abs(res[f"{split}_err"] - ref[f"{split}_err"]) * n / 100
            assert flips.max() <= allowed_flips(precision, n), (split, flips)


@pytest.fixture(scope="module")
def resnet20():
    model, train, test, basis = cifar_subject("preresnet20", 1024, 512)
    refs = {bn: evaluate(model, train, test, basis, bn, RuntimeConfig(device="cpu", eval_batch_size=256))[0]
            for bn in ("keep", "recompute")}
    return model, train, test, basis, refs


@pytest.mark.parametrize("bn_mode", ["keep", "recompute"])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_evaluator_on_cuda_matches_the_cpu_reference(resnet20, precision, bn_mode):
    """Every lever on auto, resident data: CUDA graphs captured (with their reason), the batch size timed, K and
    compile decided with their reasons; the metrics within the precision's tolerance of the fp32 CPU result."""
    model, train, test, basis, refs = resnet20
    res, rep, ev = evaluate(model, train, test, basis, bn_mode, RuntimeConfig(device="cuda", precision=precision))
    assert ev.device == resolve_device("cuda") and ev.train.resident and ev.test.resident
    assert rep["cuda_graphs"] is True and rep["cuda_graphs_reason"] == "on (auto: CUDA)", rep
    assert rep["channels_last"] is True
    assert rep["eval_batch_size_chosen_by"] == "timing" and rep["eval_batch_size"] == 1024  # the largest split
    # decided before the first point, for the points announced (none here: one): not worth a compile
    assert rep["compile"] is False and rep["compile_reason"].startswith("off (auto: 1 point at"), rep
    assert rep["points_in_flight_chosen_by"] == "timing" and "1" in rep["points_in_flight_seconds"]
    check_against(res, refs[bn_mode], precision, 1024, 512)


@pytest.mark.parametrize("bn_mode", ["keep", "recompute"])
def test_vgg16_bn_bf16_with_points_in_flight_and_channels_last_on_cuda(bn_mode):
    """Issue 19's crash ("NYI: querying is_contiguous inside of vmap"): VGG16-BN, bf16, channels-last, K = 2 and
    4, graphs on; against the fp32 CPU evaluator."""
    model, train, test, basis = cifar_subject("vgg16_bn", 256, 128)
    ref = evaluate(model, train, test, basis, bn_mode, RuntimeConfig(device="cpu", eval_batch_size=128),
                   bn_subset=128)[0]
    for k in (2, 4):
        res, rep, _ = evaluate(model, train, test, basis, bn_mode, RuntimeConfig(
            device="cuda", precision="bf16", points_in_flight=k, channels_last=True), coords=np.tile(COORDS, (2, 1)),
            bn_subset=128)
        assert rep["points_in_flight"] == k and rep["channels_last"] is True
        assert "contiguous inside the stacked (vmap) calls" in rep["channels_last_reason"]
        check_against({m: v[:3] for m, v in res.items()}, ref, "bf16", 256, 128)
        for m in res:  # the repeated coordinates give the same numbers in another group position
            np.testing.assert_allclose(res[m][3:], res[m][:3], rtol=TOLERANCE["bf16"]["rtol"])


@pytest.mark.timeout(300)  # inductor compiles ResNet-20 with an empty cache
def test_compile_auto_and_compile_with_graphs_on_cuda(tmp_path, monkeypatch):
    """compile="auto" for a run long enough to repay it: measured (compile time, eager and compiled batch times
    recorded) and kept or dropped with its reason; compile on with CUDA graphs asked: captured, or off with the
    capture's reason; both within fp32 of the CPU."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # both splits of 256 images: one batch shape, one compile (then inductor's cache for the second evaluator)
    model, train, test, basis = cifar_subject("preresnet20", 256, 256)
    ref = evaluate(model, train, test, basis, "keep", RuntimeConfig(device="cpu", eval_batch_size=256))[0]
    res, rep, _ = evaluate(model, train, test, basis, "keep", RuntimeConfig(device="cuda"), expect=10 ** 7)
    seconds = rep["compile_seconds"]
    assert seconds["points"] == 10 ** 7 and seconds["compile_s"] > 0 and seconds["compiled_batch_s"] > 0, rep
    assert rep["compile_reason"].startswith(("on (auto: measured", "off (auto: compiled forward measured")), rep
    if rep["compile"]:
        assert rep["cuda_graphs_reason"].startswith("off (auto: the compiled forward pass is not captured")
    check_against(res, ref, "fp32", 256, 256)
    res, rep, _ = evaluate(model, train, test, basis, "keep", RuntimeConfig(device="cuda", compile=True,
                                                                            cuda_graphs=True))
    assert rep["compile"] is True
    assert rep["cuda_graphs"] is True or rep["cuda_graphs_reason"].startswith("off (capture failed"), rep
    check_against(res, ref, "fp32", 256, 256)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_trainer_steps_on_cuda_match_the_cpu(precision):
    """Three SGD steps of the trainer's own epoch function (augmentation on, momentum, weight decay) on CUDA
    and on the CPU from the same weights and draws: the updates and the epoch's loss within the policy."""
    from widthkit.inputs.data import load_dataset
    from widthkit.training.config import TrainConfig
    from widthkit.training.trainer import TrainData, train_epoch

    cfg = TrainConfig(batch_size=64, augment=True)
    tr = load_dataset("digits", split="train")
    x, y = tr.normalized()[:192], tr.labels[:192]
    fill = tuple(-m / s for m, s in zip(tr.mean, tr.std))
    torch.manual_seed(0)
    start = create_model("digits_cnn", num_classes=10)
    theta0 = torch.cat([p.detach().flatten() for p in start.parameters()])
    out = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(start).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        data = TrainData(x.to(device), y.to(device), None, None, 10, fill)
        pol = precision if device == "cuda" else "fp32"
        with precision_policy(pol, device):
            loss, _ = train_epoch(model, opt, data, cfg, torch.Generator().manual_seed(1), precision=pol)
        out[device] = (loss, torch.cat([p.detach().cpu().flatten() for p in model.parameters()]) - theta0)
    assert_forward_close(out["cuda"][0], out["cpu"][0], precision, "epoch loss")
    assert_derivative_close(out["cuda"][1], out["cpu"][1], precision, "SGD update")


@pytest.mark.parametrize("bn_mode", ["keep", "recompute"])
@pytest.mark.parametrize("method", HVP_METHODS)
def test_hessian_vector_products_on_cuda_match_the_cpu(method, bn_mode):
    """H·v (fp32 by the operator's own policy) and the gradient on CUDA against the CPU, ResNet-20 on 384
    CIFAR-shaped examples in batches of 128."""
    model, train, _, _ = cifar_subject("preresnet20", 384, 1)
    x = (train[0].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    v = torch.randn(ThetaLayout.from_model(model).size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = {}
    for device in ("cpu", "cuda"):
        op = HessianOperator(model, x.to(device), train[1].to(device), weight_decay=5e-4, bn_mode=bn_mode,
                             batch_size=128, method=method)
        got[device] = (op.hvp(v), op.loss_and_grad()[1])
    assert_derivative_close(got["cuda"][0], got["cpu"][0], "fp32", "H·v")
    assert_derivative_close(got["cuda"][1], got["cpu"][1], "fp32", "gradient")


@pytest.fixture(scope="module")
def digits_cpu_rays(digits_ckpts, tmp_path_factory):
    import widthkit

    out = tmp_path_factory.mktemp("rays") / "cpu.h5"
    return widthkit.rays(digits_ckpts["sgd"], device="cpu", out=out, **DIGITS_RAYS)


DIGITS_RAYS = dict(dirs=2, steps=3, max_dist=0.5, norm="filter", bn_mode="recompute", train_subset=400,
                   test_subset=200, bn_subset=200)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_an_analysis_on_cuda_matches_the_cpu_and_resolves_its_device(digits_ckpts, digits_cpu_rays, tmp_path,
                                                                     precision):
    """rays of a trained checkpoint through the whole grid path on CUDA ("cuda" resolved once to cuda:N, the
    data resident, graphs on) against the same analysis on the CPU in fp32: losses and error rates (its
    predictions are decisive) within the precision's policy."""
    import widthkit
    from widthkit.report.store import read

    assert same_device("cuda", f"cuda:{torch.cuda.current_device()}")
    cpu = digits_cpu_rays
    gpu = widthkit.rays(digits_ckpts["sgd"], device="cuda", precision=precision, out=tmp_path / "gpu.h5",
                        **DIGITS_RAYS)
    prov = read(tmp_path / "gpu.h5")["attrs"]["provenance"]
    assert prov["device"] == str(resolve_device("cuda")) and prov["levers"]["cuda_graphs"] is True, prov["levers"]
    assert "thread_choice" not in prov  # the GPU does the work: no CPU thread probe
    for m in ("train_loss", "test_loss"):
        assert_forward_close(gpu.models["sgd"]["metrics"][m], cpu.models["sgd"]["metrics"][m], precision, m)
    for split, n in (("train", 400), ("test", 200)):
        m = f"{split}_err"
        flips = np.abs(gpu.models["sgd"]["metrics"][m] - cpu.models["sgd"]["metrics"][m]) * n / 100
        assert flips.max() <= allowed_flips(precision, n), (m, flips)


def test_a_cpu_run_on_a_gpu_host_stays_on_the_cpu():
    """device="cpu" where CUDA exists: the evaluator, its data and its levers are the CPU's (no graphs, batch 64)."""
    x, y = images(64, 0, (1, 8, 8))
    ev = Evaluator(create_model("digits_cnn"), (x.float(), y), (x.float(), y), EvalConfig(bn_mode="keep"),
                   runtime=RuntimeConfig(device="cpu"))
    rep = ev.levers_report()
    assert ev.device == torch.device("cpu") and ev.train.x.device.type == "cpu"
    assert rep["cuda_graphs"] is False and rep["eval_batch_size"] == 64
    assert RuntimeConfig().resolved_device().type == "cuda"  # while "auto" means this GPU
    with pytest.raises(ValueError, match="GPU"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert float(F.relu(torch.ones(1, device="cuda")).cpu()) == 1.0
