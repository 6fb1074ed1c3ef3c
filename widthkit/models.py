"""Model registry and the architectures of the SWA paper.

A small registry in the style of timm: factories are registered by name with :func:`register_model` and built
with :func:`create_model`, which drops ``None``-valued keyword arguments so that CLI defaults fall through to
the factory's own defaults.  ``"torchvision:NAME"`` builds any torchvision classification model with random
weights.

The CIFAR architectures follow the shapes of the models the SWA authors trained (Izmailov et al. 2018,
"Averaging Weights Leads to Wider Optima and Better Generalization", https://arxiv.org/abs/1803.05407, code
at github.com/timgaripov/swa): VGG16 (with and without BatchNorm), pre-activation ResNets and
WideResNet-28-10.  Module names match that code, so the state dicts of its checkpoints load without
renaming (``features.0.weight``, ``layer1.0.downsample.0.weight``, ``fc.weight``, ``linear.weight``, ...).

>>> model = create_model("preresnet20", num_classes=10)
>>> model(torch.zeros(2, *model_input_shape("preresnet20"))).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "register_model",
    "create_model",
    "list_models",
    "model_input_shape",
    "VGG",
    "PreResNet",
    "WideResNet",
    "DigitsCNN",
    "DigitsMLP",
]

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
CIFAR_INPUT_SHAPE = (3, 32, 32)
DIGITS_INPUT_SHAPE = (1, 8, 8)
TORCHVISION_INPUT_SHAPE = (3, 224, 224)


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, *, input_shape: tuple[int, ...] = CIFAR_INPUT_SHAPE):
    """Decorator that registers a model factory ``fn(num_classes=10, **kw) -> nn.Module`` under ``name``.

    Args:
        name: registry name (lower case by convention); must not be taken already and must not start with
            ``"torchvision:"``.
        input_shape: the (C, H, W) shape of one input the model expects by default, returned by
            :func:`model_input_shape`.

    >>> @register_model("my_mlp", input_shape=(1, 8, 8))
    ... def my_mlp(num_classes=10):
    ...     return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
        raise ValueError(f"model name {name!r} may not start with {TORCHVISION_PREFIX!r} or {TIMM_PREFIX!r}: those "
                         "prefixes are reserved for torchvision and timm models")
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints such as (3, 32, 32), got {input_shape!r}")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered (by {_REGISTRY[name].factory.__qualname__}); "
                             "pick another name")
        _REGISTRY[name] = _Entry(fn, shape)
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted names of the registered models (torchvision models, reachable as ``"torchvision:NAME"``, are not
    listed)."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    """Build the model registered as ``name`` with freshly initialised weights (uses the global torch RNG).

    Args:
        name: a name from :func:`list_models`, or ``"torchvision:NAME"`` for
            ``torchvision.models.get_model(NAME, weights=None, num_classes=num_classes, **kwargs)``.
        num_classes: number of output logits (>= 1).
        **kwargs: architecture options (e.g. ``depth=56`` for ``preresnet``); those that are ``None`` are
            dropped, so an unset CLI flag leaves the factory's default in place.

    Returns:
        the model in train mode, on the CPU, in float32; it maps (N, *model_input_shape(name)) to
        (N, num_classes) logits.

    Raises:
        ValueError: unknown name (the message lists the valid ones), an option the factory does not take, or an
            invalid option value (the message says which values are valid).

    >>> type(create_model("wideresnet", depth=16, widen_factor=2, dropout=None)).__name__  # dropout -> 0.0
    'WideResNet'
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    _check_int("num_classes", num_classes, minimum=1)
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        return _create_torchvision(name[len(TORCHVISION_PREFIX):], num_classes, kwargs)
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        return _create_timm(name[len(TIMM_PREFIX):], num_classes, kwargs)
    entry = _lookup(name)
    _check_kwargs(name, entry.factory, kwargs)
    return entry.factory(num_classes=num_classes, **kwargs)


def model_input_shape(name: str) -> tuple[int, ...]:
    """The (C, H, W) shape of one input for model ``name``: (3, 32, 32) for the CIFAR models, (1, 8, 8) for the
    digits models, (3, 224, 224) for ``"torchvision:NAME"``.  Unknown names raise ``ValueError``."""
    if isinstance(name, str) and name.startswith(TORCHVISION_PREFIX):
        _check_torchvision_name(name[len(TORCHVISION_PREFIX):])
        return TORCHVISION_INPUT_SHAPE
    if isinstance(name, str) and name.startswith(TIMM_PREFIX):
        model = _create_timm(name[len(TIMM_PREFIX):], 1, {})
        return tuple(getattr(model, "pretrained_cfg", {}).get("input_size") or TORCHVISION_INPUT_SHAPE)
    return _lookup(name).input_shape


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("'timm:NAME' models need timm, which is not installed: pip install timm (or "
                         "pip install 'widthkit[timm]'); the weights still come from your checkpoint") from None
    return timm


def _create_timm(arch: str, num_classes: int, kwargs: dict) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=...)``: nothing is downloaded, the weights come
    from the user's checkpoint."""
    timm = _timm()
    if not arch:
        raise ValueError(f"'{TIMM_PREFIX}' needs a model name, e.g. '{TIMM_PREFIX}resnet18'")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ValueError(f"timm has no model {arch!r}" + (f"; did you mean {', '.join(TIMM_PREFIX + c for c in close)}?"
                                                          if close else "; see timm.list_models()"))
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"{TIMM_PREFIX}{arch} does not take the options {sorted(kwargs)}: {err}") from None


def _lookup(name: str) -> _Entry:
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    hint = ""
    if isinstance(name, str):
        close = difflib.get_close_matches(name.lower(), list_models(), n=3)
        if close:
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?"
    raise ValueError(f"unknown model {name!r}{hint} Valid names: {', '.join(list_models())}, "
                     f"or '{TORCHVISION_PREFIX}NAME' for a torchvision model")


def _check_kwargs(name: str, factory: Callable[..., nn.Module], kwargs: dict) -> None:
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p != "num_classes"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"model {name!r} does not take option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(accepted) if accepted else 'none'}")


def _check_torchvision_name(tv_name: str) -> None:
    import torchvision

    valid = torchvision.models.list_models()
    if tv_name not in valid:
        close = difflib.get_close_matches(tv_name, valid, n=3)
        hint = f"; did you mean {', '.join(TORCHVISION_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"unknown torchvision model {tv_name!r}{hint} "
                         "(see torchvision.models.list_models() for the valid names)")


def _create_torchvision(tv_name: str, num_classes: int, kwargs: dict) -> nn.Module:
    import torchvision

    _check_torchvision_name(tv_name)
    try:
        return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
    except TypeError as err:  # an option the torchvision builder does not take
        raise ValueError(f"torchvision model {tv_name!r} rejected options {kwargs}: {err}") from err


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_int(what: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _check_probability(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")


def _he_normal_fan_out_(module: nn.Module) -> None:
    """Init used by the SWA code for VGG and PreResNet: conv weights ~ N(0, 2/n), n = k_h * k_w * out_channels;
    conv biases 0; BatchNorm weight 1, bias 0.  Linear layers keep PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------------------------
# VGG16
# --------------------------------------------------------------------------------------------------------------

# Channel plan of VGG16's 13 conv layers; "M" is a 2x2 max-pool.  Five pools take 32x32 inputs to 1x1.
VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG for 32x32 inputs as in the SWA code: 3x3 convs (bias, optional BatchNorm) + ReLU, five max-pools,
    then Dropout-Linear(512, 512)-ReLU-Dropout-Linear(512, 512)-ReLU-Linear(512, num_classes).

    Input (N, in_channels, 32, 32) -> logits (N, num_classes).  Other spatial sizes are rejected by the
    classifier (it expects 512 features, i.e. a 1x1 map after the five pools).
    """

    def __init__(self, config=VGG16_CONFIG, num_classes: int = 10, batch_norm: bool = False, in_channels: int = 3):
        super().__init__()
        self.features = _vgg_features(config, batch_norm, in_channels)
        width = [c for c in config if c != "M"][-1]
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(width, 512),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )
        _he_normal_fan_out_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 512, 1, 1) for 32x32 inputs
        return self.classifier(torch.flatten(x, 1))


def _vgg_features(config, batch_norm: bool, in_channels: int) -> nn.Sequential:
    # Layer order (conv, [bn], relu, ..., pool) fixes the Sequential indices, hence the state-dict keys.
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(channels, item, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(item))
        layers.append(nn.ReLU())
        channels = item
    return nn.Sequential(*layers)


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG16 without BatchNorm (~15.2M parameters for 10 classes)."""
    _check_int("in_channels", in_channels, minimum=1)
    return VGG(VGG16_CONFIG, num_classes=num_classes, batch_norm=False, in_channels=in_channels)


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG16 with BatchNorm after every conv (~15.3M parameters for 10 classes)."""
    _check_int("in_channels", in_channels, minimum=1)
    return VGG(VGG16_CONFIG, num_classes=num_classes, batch_norm=True, in_channels=in_channels)


# --------------------------------------------------------------------------------------------------------------
# Pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks")
# --------------------------------------------------------------------------------------------------------------

PRERESNET_BLOCKS = ("basic", "bottleneck")


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut; (N, in_planes, H, W) -> (N, planes, H/s, W/s)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.downsample = _projection(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 (x4 channels) plus the shortcut;
    (N, in_planes, H, W) -> (N, 4 * planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.downsample = _projection(in_planes, planes * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential | None:
    """1x1 strided conv shortcut where the shape changes, else None (identity).  Wrapped in a Sequential so the
    key is ``downsample.0.weight`` as in the SWA checkpoints."""
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))


def preresnet_plan(depth: int, block: str | None = None) -> tuple[str, int]:
    """Block type and blocks per stage for a PreResNet of ``depth`` layers.

    With ``block=None`` the SWA code's rule applies: depth < 44 uses basic blocks with n = (depth - 2) / 6,
    depth >= 44 uses bottleneck blocks with n = (depth - 2) / 9 (so PreResNet-110 there is a bottleneck net
    with 12 blocks per stage, ~1.15M parameters; He et al.'s basic-block ResNet-110, 1.7M parameters, is
    ``block="basic"``).

    Returns:
        (block, n) with block in ``PRERESNET_BLOCKS``.
    """
    _check_int("preresnet depth", depth, minimum=1)
    if block is None:
        block = "basic" if depth < 44 else "bottleneck"
    elif block not in PRERESNET_BLOCKS:
        raise ValueError(f"preresnet block must be one of {PRERESNET_BLOCKS} or None (by depth), got {block!r}")
    layers_per_block = 2 if block == "basic" else 3
    step = 3 * layers_per_block  # 3 stages
    if (depth - 2) % step != 0 or depth - 2 < step:
        raise ValueError(_preresnet_depth_message(depth, block, step))
    return block, (depth - 2) // step


def _preresnet_depth_message(depth: int, block: str, step: int) -> str:
    if block == "basic":
        rule = "basic blocks need depth - 2 divisible by 6 (e.g. 8, 14, 20, 32, 56, 110)"
    else:
        rule = "bottleneck blocks need depth - 2 divisible by 9 (e.g. 47, 56, 110, 164)"
    return (f"invalid preresnet depth={depth} for {block} blocks: {rule}.  Without block=, depth < 44 uses basic "
            f"blocks (valid: 8, 14, 20, 26, 32, 38) and depth >= 44 uses bottleneck blocks (valid: 47, 56, 65, "
            f"..., 110, ..., 164, i.e. 9n + 2)")


class PreResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs: conv3x3(16), three stages of n blocks at 16/32/64 planes
    (strides 1/2/2), then BN-ReLU-global average pool-Linear.

    Input (N, in_channels, H, W) -> logits (N, num_classes); the SWA models use H = W = 32 (8x8 before the pool).
    """

    def __init__(self, depth: int = 110, num_classes: int = 10, block: str | None = None, in_channels: int = 3):
        super().__init__()
        kind, n = preresnet_plan(depth, block)
        block_cls = PreActBasicBlock if kind == "basic" else PreActBottleneck
        self.depth, self.block = depth, kind
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(block_cls(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        _he_normal_fan_out_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64 * expansion, H/4, W/4)
        x = F.relu(self.bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


@register_model("preresnet")
def preresnet(num_classes: int = 10, depth: int = 110, block: str | None = None, in_channels: int = 3) -> PreResNet:
    """Pre-activation ResNet of any valid ``depth`` (see :func:`preresnet_plan`; default 110 as in the SWA
    code).  ``block`` forces ``"basic"`` or ``"bottleneck"`` blocks."""
    _check_int("in_channels", in_channels, minimum=1)
    return PreResNet(depth=depth, num_classes=num_classes, block=block, in_channels=in_channels)


def _register_preresnet_depth(depth: int) -> None:
    def factory(num_classes: int = 10, in_channels: int = 3) -> PreResNet:
        _check_int("in_channels", in_channels, minimum=1)
        return PreResNet(depth=depth, num_classes=num_classes, in_channels=in_channels)

    factory.__name__ = factory.__qualname__ = f"preresnet{depth}"
    factory.__doc__ = f"PreResNet-{depth} with the SWA code's block choice (see preresnet_plan)."
    register_model(f"preresnet{depth}")(factory)


for _depth in (20, 56, 110, 164):
    _register_preresnet_depth(_depth)


# --------------------------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016)
# --------------------------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-Dropout-BN-ReLU-conv3x3(stride) plus a 1x1 conv shortcut where the shape changes.

    As in the SWA code the convs have biases and the stride sits on the second conv.
    (N, in_planes, H, W) -> (N, planes, H/s, W/s).
    """

    def __init__(self, in_planes: int, planes: int, dropout: float, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs: conv3x3(16), three stages of n = (depth - 4) / 6 wide blocks at
    16k/32k/64k planes (strides 1/2/2), then BN-ReLU-global average pool-Linear.  Weights keep PyTorch's
    default init (the SWA code defines a custom init but never applies it).

    Input (N, in_channels, H, W) -> logits (N, num_classes).
    """

    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        _check_int("wideresnet depth", depth, minimum=1)
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"invalid wideresnet depth={depth}: depth must be 6n + 4 with n >= 1 "
                             "(e.g. 10, 16, 22, 28, 40)")
        _check_int("widen_factor", widen_factor, minimum=1)
        _check_probability("dropout", dropout)
        n = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=True)
        in_planes = 16
        stages = []
        for planes, stride in zip(widths, (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBasicBlock(in_planes, planes, dropout, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        # The SWA code sets momentum=0.9 here (a TF-convention slip: in PyTorch that keeps only 10% of the old
        # running stats); momentum is not stored in checkpoints, so the default is used.
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))  # (N, 64k, H/4, W/4)
        x = F.relu(self.bn1(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.linear(x)


@register_model("wideresnet")
def wideresnet(num_classes: int = 10, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0,
               in_channels: int = 3) -> WideResNet:
    """WideResNet-depth-widen_factor (default WRN-28-10, ~36.5M parameters)."""
    _check_int("in_channels", in_channels, minimum=1)
    return WideResNet(depth=depth, widen_factor=widen_factor, dropout=dropout, num_classes=num_classes,
                      in_channels=in_channels)


@register_model("wideresnet28x10")
def wideresnet28x10(num_classes: int = 10, dropout: float = 0.0, in_channels: int = 3) -> WideResNet:
    """WRN-28-10 as trained in the SWA paper (~36.5M parameters)."""
    return wideresnet(num_classes=num_classes, depth=28, widen_factor=10, dropout=dropout, in_channels=in_channels)


# --------------------------------------------------------------------------------------------------------------
# Small models for the bundled 8x8 digits data (fast CPU tests and demos)
# --------------------------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Small CNN with BatchNorm: conv3x3(width)-BN-ReLU, conv3x3(2 width)-BN-ReLU, maxpool 2, conv3x3(2 width)-
    BN-ReLU, global average pool, Linear.  ~14.5k parameters at width 16.

    Input (N, in_channels, H, W) (8x8 digits) -> logits (N, num_classes); any H, W >= 2 works.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        w1, w2 = width, 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w1, 3, padding=1, bias=False),
            nn.BatchNorm2d(w1),
            nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(w2, w2, 3, padding=1, bias=False),
            nn.BatchNorm2d(w2),
            nn.ReLU(),
        )
        self.fc = nn.Linear(w2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 2 width, H/2, W/2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DigitsMLP(nn.Module):
    """MLP without normalisation: flatten, Linear(in_features, hidden), ReLU, Linear(hidden, num_classes).

    Input (N, *) with prod(*) = in_features (64 for 1x8x8 digits) -> logits (N, num_classes).
    """

    def __init__(self, num_classes: int = 10, in_features: int = 64, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


@register_model("digits_cnn", input_shape=DIGITS_INPUT_SHAPE)
def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> DigitsCNN:
    """Small BatchNorm CNN for 1x8x8 digits (``width`` = channels of the first conv)."""
    _check_int("in_channels", in_channels, minimum=1)
    _check_int("width", width, minimum=1)
    return DigitsCNN(num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("digits_mlp", input_shape=DIGITS_INPUT_SHAPE)
def digits_mlp(num_classes: int = 10, hidden: int = 64, in_features: int = 64) -> DigitsMLP:
    """One-hidden-layer MLP without BatchNorm for flattened 1x8x8 digits."""
    _check_int("hidden", hidden, minimum=1)
    _check_int("in_features", in_features, minimum=1)
    return DigitsMLP(num_classes=num_classes, in_features=in_features, hidden=hidden)
