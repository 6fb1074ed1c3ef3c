"""Tests for widthkit.models: registry behaviour, architectures' shapes and parameter counts (checked against
closed-form counts written here from layer shapes, and against the published sizes), init, error messages."""

import math

import pytest
import torch
from torch import nn

from widthkit import models
from widthkit.models import create_model, list_models, model_input_shape, register_model

# The names docs/INTERFACES.md promises.
BUILTIN = [
    "digits_cnn", "digits_mlp", "vgg16", "vgg16_bn", "preresnet", "preresnet20", "preresnet56", "preresnet110",
    "preresnet164", "wideresnet", "wideresnet28x10",
]
BIG = {"vgg16", "vgg16_bn", "wideresnet", "wideresnet28x10"}  # forward on batch 1 only
CHEAP = [n for n in BUILTIN if n not in BIG]
CIFAR = [n for n in BUILTIN if not n.startswith("digits")]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- closed-form parameter counts, from layer shapes alone -------------------------------------------------


def conv(cin, cout, k, bias):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c  # affine weight + bias; running stats are buffers


def linear(i, o):
    return i * o + o


VGG16_PLAN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16_count(num_classes=10, batch_norm=False, in_channels=3):
    total, cin = 0, in_channels
    for c in VGG16_PLAN:
        if c == "M":
            continue
        total += conv(cin, c, 3, True) + (bn(c) if batch_norm else 0)
        cin = c
    return total + linear(512, 512) + linear(512, 512) + linear(512, num_classes)


def preresnet_count(depth, num_classes=10, block=None, in_channels=3):
    block = block or ("basic" if depth < 44 else "bottleneck")
    n = (depth - 2) // (6 if block == "basic" else 9)
    expansion = 1 if block == "basic" else 4
    total, cin = conv(in_channels, 16, 3, False), 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(n):
            cout = planes * expansion
            if block == "basic":
                total += bn(cin) + conv(cin, planes, 3, False) + bn(planes) + conv(planes, planes, 3, False)
            else:
                total += (bn(cin) + conv(cin, planes, 1, False) + bn(planes) + conv(planes, planes, 3, False)
                          + bn(planes) + conv(planes, cout, 1, False))
            if i == 0 and (stride != 1 or cin != cout):
                total += conv(cin, cout, 1, False)
            cin = cout
    return total + bn(cin) + linear(cin, num_classes)


def wideresnet_count(depth=28, k=10, num_classes=10, in_channels=3):
    n = (depth - 4) // 6
    total, cin = conv(in_channels, 16, 3, True), 16
    for planes, stride in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
        for i in range(n):
            total += bn(cin) + conv(cin, planes, 3, True) + bn(planes) + conv(planes, planes, 3, True)
            if i == 0 and (stride != 1 or cin != planes):
                total += conv(cin, planes, 1, True)
            cin = planes
    return total + bn(cin) + linear(cin, num_classes)


def digits_cnn_count(num_classes=10, in_channels=1, width=16):
    w, w2 = width, 2 * width
    return (conv(in_channels, w, 3, False) + bn(w) + conv(w, w2, 3, False) + bn(w2) + conv(w2, w2, 3, False)
            + bn(w2) + linear(w2, num_classes))


def digits_mlp_count(num_classes=10, hidden=64):
    return linear(64, hidden) + linear(hidden, num_classes)


EXPECTED_COUNTS = {
    "digits_cnn": digits_cnn_count(),
    "digits_mlp": digits_mlp_count(),
    "vgg16": vgg16_count(),
    "vgg16_bn": vgg16_count(batch_norm=True),
    "preresnet": preresnet_count(110),
    "preresnet20": preresnet_count(20),
    "preresnet56": preresnet_count(56),
    "preresnet110": preresnet_count(110),
    "preresnet164": preresnet_count(164),
    "wideresnet": wideresnet_count(28, 10),
    "wideresnet28x10": wideresnet_count(28, 10),
}


# ---- registry -------------------------------------------------------------------------------------------------


def test_builtin_names_registered_and_sorted():
    names = list_models()
    assert names == sorted(names)
    assert set(BUILTIN) <= set(names)
    assert set(EXPECTED_COUNTS) == set(BUILTIN)
    assert not any(n.startswith("torchvision:") for n in names)


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_finite(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    batch = 1 if name in BIG else 2
    x = torch.randn(batch, *model_input_shape(name))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", BUILTIN)
def test_parameter_count_matches_closed_form(name):
    assert n_params(create_model(name)) == EXPECTED_COUNTS[name]


@pytest.mark.parametrize("name, kwargs, expected", [
    ("preresnet", dict(depth=8, num_classes=100, in_channels=1), preresnet_count(8, 100, in_channels=1)),
    ("preresnet", dict(depth=47), preresnet_count(47)),
    ("preresnet", dict(depth=110, block="basic"), preresnet_count(110, block="basic")),
    ("preresnet", dict(depth=20, block="bottleneck"), preresnet_count(20, block="bottleneck")),
    ("wideresnet", dict(depth=16, widen_factor=2, num_classes=100), wideresnet_count(16, 2, 100)),
    ("wideresnet", dict(depth=10, widen_factor=1, in_channels=1), wideresnet_count(10, 1, in_channels=1)),
    ("vgg16_bn", dict(num_classes=100, in_channels=1), vgg16_count(100, True, 1)),
    ("digits_cnn", dict(width=4, in_channels=3, num_classes=3), digits_cnn_count(3, 3, 4)),
    ("digits_mlp", dict(hidden=5, num_classes=2), digits_mlp_count(2, 5)),
])
def test_parameter_count_with_options(name, kwargs, expected):
    assert n_params(create_model(name, **kwargs)) == expected


def test_published_sizes():
    # He et al. 2016 / Zagoruyko & Komodakis 2016 / Simonyan & Zisserman (CIFAR variant) sizes.
    assert abs(preresnet_count(110, block="basic") - 1.7e6) / 1.7e6 < 0.03  # ResNet-110: 1.7M
    assert abs(preresnet_count(164) - 1.7e6) / 1.7e6 < 0.03  # PreResNet-164 (bottleneck): 1.7M
    assert abs(preresnet_count(20) - 0.27e6) / 0.27e6 < 0.03  # ResNet-20: 0.27M
    assert abs(wideresnet_count(28, 10) - 36.5e6) / 36.5e6 < 0.01  # WRN-28-10: 36.5M
    assert 15.0e6 < vgg16_count() < 15.5e6  # VGG16 on CIFAR-10: ~15.2M
    # The SWA code's depth rule makes its PreResNet-110 a 12-blocks-per-stage bottleneck net (~1.15M).
    assert abs(preresnet_count(110) - 1.15e6) / 1.15e6 < 0.01
    assert 10_000 <= digits_cnn_count() <= 30_000


def test_preresnet_block_choice_by_depth():
    assert models.preresnet_plan(20) == ("basic", 3)
    assert models.preresnet_plan(38) == ("basic", 6)
    assert models.preresnet_plan(56) == ("bottleneck", 6)
    assert models.preresnet_plan(110) == ("bottleneck", 12)
    assert models.preresnet_plan(164) == ("bottleneck", 18)
    assert models.preresnet_plan(110, "basic") == ("basic", 18)
    m = create_model("preresnet164")
    assert (m.depth, m.block) == (164, "bottleneck")
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == 18


def test_state_dict_keys_match_swa_checkpoints():
    # Key names used by the SWA authors' code, so their checkpoints load without renaming.
    vgg = create_model("vgg16").state_dict()
    assert {"features.0.weight", "features.0.bias", "features.28.weight", "classifier.1.weight",
            "classifier.4.weight", "classifier.6.weight", "classifier.6.bias"} <= set(vgg)
    assert vgg["features.28.weight"].shape == (512, 512, 3, 3)
    vgg_bn = create_model("vgg16_bn").state_dict()
    assert vgg_bn["features.1.running_mean"].shape == (64,) and vgg_bn["features.40.weight"].shape == (512, 512, 3, 3)
    pre = create_model("preresnet164").state_dict()
    assert {"conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
            "layer3.17.bn3.running_var", "bn.weight", "fc.weight", "fc.bias"} <= set(pre)
    assert "layer1.1.downsample.0.weight" not in pre
    wrn = create_model("wideresnet", depth=16, widen_factor=2).state_dict()
    assert {"conv1.weight", "conv1.bias", "layer1.0.shortcut.0.weight", "layer2.0.shortcut.0.bias",
            "layer3.1.conv2.bias", "bn1.weight", "linear.weight"} <= set(wrn)
    assert "layer1.1.shortcut.0.weight" not in wrn


def test_wideresnet_stride_on_second_conv():
    m = create_model("wideresnet", depth=10, widen_factor=1)
    assert m.layer2[0].conv1.stride == (1, 1)
    assert m.layer2[0].conv2.stride == (2, 2)
    assert m.layer2[0].shortcut[0].stride == (2, 2)


def test_none_kwargs_are_ignored():
    default = create_model("preresnet")
    m = create_model("preresnet", depth=None, block=None, in_channels=None)
    assert (m.depth, m.block) == (default.depth, default.block) == (110, "bottleneck")
    assert n_params(create_model("digits_cnn", width=None, in_channels=None)) == digits_cnn_count()
    assert n_params(create_model("wideresnet", depth=10, widen_factor=1, dropout=None)) == wideresnet_count(10, 1)
    assert n_params(create_model("digits_mlp", hidden=None, num_classes=3)) == digits_mlp_count(3)


@pytest.mark.parametrize("name", [n for n in CIFAR if n not in BIG] + ["vgg16_bn"])
def test_cifar_models_accept_in_channels(name):
    model = create_model(name, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_wideresnet_dropout_kwarg_builds_dropout_layers():
    m = create_model("wideresnet", depth=10, widen_factor=1, dropout=0.3)
    assert [d.p for d in m.modules() if isinstance(d, nn.Dropout)] == [0.3, 0.3, 0.3]


def test_model_input_shape():
    assert model_input_shape("vgg16") == (3, 32, 32)
    assert model_input_shape("preresnet110") == (3, 32, 32)
    assert model_input_shape("wideresnet28x10") == (3, 32, 32)
    assert model_input_shape("digits_cnn") == (1, 8, 8)
    assert model_input_shape("digits_mlp") == (1, 8, 8)
    assert model_input_shape("torchvision:resnet18") == (3, 224, 224)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        model_input_shape("nope")
    with pytest.raises(ValueError, match="unknown torchvision model 'nope'"):
        model_input_shape("torchvision:nope")


# ---- init -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CHEAP + ["vgg16_bn"])
def test_init_is_deterministic_under_manual_seed(name):
    torch.manual_seed(123)
    a = create_model(name).state_dict()
    torch.manual_seed(123)
    b = create_model(name).state_dict()
    torch.manual_seed(124)
    c = create_model(name).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_init_leaves_caller_rng_reproducible():
    torch.manual_seed(5)
    create_model("digits_cnn")
    after = torch.rand(3)
    torch.manual_seed(5)
    create_model("digits_cnn")
    assert torch.equal(torch.rand(3), after)


@pytest.mark.parametrize("name", ["vgg16", "preresnet20"])
def test_conv_init_is_he_normal_fan_out(name):
    torch.manual_seed(0)
    model = create_model(name)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    big = max(convs, key=lambda m: m.weight.numel())
    fan_out = big.kernel_size[0] * big.kernel_size[1] * big.out_channels
    std = big.weight.double().std().item()
    assert abs(std / math.sqrt(2.0 / fan_out) - 1) < 0.05
    assert abs(big.weight.double().mean().item()) < 5 * std / math.sqrt(big.weight.numel())  # 5 std errors
    for m in convs:
        if m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


# ---- functional use (what the evaluator does) ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp", "preresnet20", "preresnet56"])
def test_functional_call_matches_module(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(3, *model_input_shape(name))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        direct = model(x)
        functional = torch.func.functional_call(model, state, (x,))
    torch.testing.assert_close(functional, direct, rtol=0, atol=0)


# ---- digits models train -----------------------------------------------------------------------------------------


def _digits_split():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x = (x - x[:1400].mean()) / x[:1400].std()
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


@pytest.mark.parametrize("name, min_acc", [("digits_cnn", 0.95), ("digits_mlp", 0.93)])
def test_digits_models_train_quickly(name, min_acc):
    (xtr, ytr), (xte, yte) = _digits_split()
    torch.manual_seed(0)
    model = create_model(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        model.train()
        for idx in torch.randperm(len(ytr), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).double().mean().item()
    assert acc > min_acc


# ---- torchvision -------------------------------------------------------------------------------------------------


def test_torchvision_resnet18():
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", num_classes=10).eval()
    assert model.fc.out_features == 10
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_torchvision_errors():
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnt18'.*torchvision:resnet18"):
        create_model("torchvision:resnt18")
    with pytest.raises(ValueError, match="torchvision model 'resnet18' rejected options"):
        create_model("torchvision:resnet18", bogus_option=3)


# ---- errors ------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_model("resnet9000")
    msg = str(err.value)
    assert "unknown model 'resnet9000'" in msg
    assert all(n in msg for n in list_models())
    assert "torchvision:NAME" in msg
    with pytest.raises(ValueError, match="did you mean 'vgg16'"):
        create_model("VGG16")


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(depth=50), r"invalid preresnet depth=50 for bottleneck blocks: .*depth - 2 divisible by 9"),
    (dict(depth=44), r"invalid preresnet depth=44 .*depth >= 44 uses bottleneck blocks"),
    (dict(depth=21), r"invalid preresnet depth=21 for basic blocks: .*depth - 2 divisible by 6"),
    (dict(depth=2), r"invalid preresnet depth=2 "),
    (dict(depth=56, block="basic2"), r"preresnet block must be one of \('basic', 'bottleneck'\) or None"),
    (dict(depth=110.0), r"preresnet depth must be an integer >= 1, got 110.0"),
    (dict(depth="110"), r"preresnet depth must be an integer >= 1, got '110'"),
])
def test_invalid_preresnet_options(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_model("preresnet", **kwargs)


@pytest.mark.parametrize("name, kwargs, pattern", [
    ("wideresnet", dict(depth=27), r"invalid wideresnet depth=27: depth must be 6n \+ 4"),
    ("wideresnet", dict(depth=4), r"invalid wideresnet depth=4"),
    ("wideresnet", dict(widen_factor=0), r"widen_factor must be an integer >= 1, got 0"),
    ("wideresnet", dict(dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
    ("wideresnet28x10", dict(dropout=-0.1), r"dropout must be a number in \[0, 1\), got -0.1"),
    ("digits_cnn", dict(width=0), r"width must be an integer >= 1, got 0"),
    ("digits_mlp", dict(hidden=2.5), r"hidden must be an integer >= 1, got 2.5"),
    ("vgg16", dict(in_channels=0), r"in_channels must be an integer >= 1, got 0"),
    ("preresnet20", dict(depth=56), r"model 'preresnet20' does not take option\(s\) depth; it accepts: in_channels"),
    ("vgg16", dict(batch_norm=True), r"does not take option\(s\) batch_norm; it accepts: in_channels"),
    ("digits_cnn", dict(num_classes=0), r"num_classes must be an integer >= 1, got 0"),
    ("digits_cnn", dict(num_classes=True), r"num_classes must be an integer >= 1, got True"),
])
def test_invalid_options(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        create_model(name, **kwargs)


def test_register_model(monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @register_model("tiny_test_net", input_shape=(2, 4, 4))
    def tiny(num_classes=10, hidden=3):
        return nn.Sequential(nn.Flatten(), nn.Linear(32, hidden), nn.Linear(hidden, num_classes))

    assert "tiny_test_net" in list_models()
    assert model_input_shape("tiny_test_net") == (2, 4, 4)
    m = create_model("tiny_test_net", num_classes=4, hidden=None)
    assert m[1].out_features == 3 and m[2].out_features == 4
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny_test_net")(tiny)
    with pytest.raises(ValueError, match="reserved for torchvision"):
        register_model("torchvision:x")
    with pytest.raises(ValueError, match="input_shape must be a tuple of positive ints"):
        register_model("other", input_shape=(3, 0))
    with pytest.raises(ValueError, match="non-empty string"):
        register_model("")
