"""The one evaluation config: how every point of an analysis is evaluated, and on which data.

Used by the Python API (``widthkit.rays(..., bn_mode="keep")``), by every analysis command and the pipeline
(their flags are generated from these fields: ``--bn-mode``, ``--eval-batch-size``, ...) and stored in every
HDF5 file's ``config["eval"]``. Validated once, on construction.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..runtime import PRECISIONS, parse_bytes
from ..settings import check_choice, check_int, check_number, choices_of, field_types, from_dict, option
from .objectives import Objective

BNMode = Literal["recompute", "keep", "batch"]
BN_MODES: tuple[str, ...] = ("recompute", "keep", "batch")
Precision = Literal["fp32", "tf32", "bf16"]
Auto = Literal["auto"]

# Settings that change how fast results come, not what they are: left out of the stored config, so a run
# resumed with other values continues the same file (the device, thread count and levers go to its provenance).
HOW_FIELDS = ("device", "eval_batch_size", "threads", "points_in_flight", "chunk_size", "channels_last",
              "cuda_graphs", "compile", "cache_dir", "max_memory", "workers", "download")
NORMALIZE = ("auto", "dataset", "imagenet")
# Old spellings folded into their replacement on construction and never stored: amp=True is precision="bf16".
ALIAS_FIELDS = ("amp",)

_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def parse_auto_bool(text: str):
    """Command-line value of an auto/on/off setting: ``"auto"``, True or False."""
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    if t in _ON or t in _OFF:
        return t in _ON
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")


def parse_auto_int(text: str):
    """Command-line value of an auto-or-integer setting: ``"auto"`` or an int."""
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _check_auto_bool(name: str, value) -> None:
    if not (value == "auto" and isinstance(value, str)) and not isinstance(value, bool):
        raise ValueError(f"{name} must be 'auto', True or False (on the command line: auto, on, off), got {value!r}")


@dataclass
class EvalConfig:
    """How points are evaluated and on which data. Every field is also a flag of every analysis command."""

    bn_mode: BNMode = option(
        "recompute", "BatchNorm statistics at each point: recompute (from the training data, as the paper), keep "
        "(the checkpoint's), or batch (each batch's own)", aliases=("--bn",))
    bn_subset: int | None = option(None, "recompute BN statistics from N fixed random training images (default: all)",
                                   metavar="N")
    weight_decay: float | None = option(
        None, "adds train_loss_l2 = CE + wd/2·‖θ‖² (default: the weight decay the checkpoint records, else none)")
    dataset: str | None = option(None, "dataset: digits, cifar10, cifar100, mnist, fashion-mnist, kmnist, "
                                       "emnist:SPLIT, svhn, stl10, imagefolder:PATH (default: the checkpoint's)",
                                 aliases=("--data",))
    data_root: str | None = option(None, "the folder torchvision's datasets live in (cifar-10-batches-py/, MNIST/raw/, "
                                         "...; default: $WIDTHKIT_DATA or ./data)")
    download: bool = option(False, "fetch a torchvision dataset into --data-root with torchvision's download "
                                   "(needs internet; never done otherwise)")
    train_subset: int | None = option(None, "train metrics on N fixed random training images (default: all)",
                                      metavar="N")
    test_subset: int | None = option(None, "test metrics on N fixed random test images (default: all)", metavar="N")
    image_size: int | None = option(
        None, "image folders: resize the shorter side to N·8/7 (256 for 224) and centre-crop N x N (default: images "
              "of one size are kept as they are; photos of mixed sizes get 224)", metavar="N")
    normalize: str = option(
        "auto", "input normalisation: dataset (the train split's channel mean/std), imagenet (torchvision's "
                "constants, what pretrained models expect), auto (imagenet for resized photo folders, else dataset)")
    cache_dir: str | None = option(None, "image folders: where the decoded uint8 cache lives (default: "
                                         "PATH/.widthkit-cache, else ~/.cache/widthkit)")
    max_memory: str | None = option(
        None, "memory budget per split, e.g. 8GB or 500MB: a split larger than this is streamed in batches from "
              "host memory or the cache instead of kept on the device (default: half of the free memory)")
    workers: int | None = option(None, "processes decoding an image folder into the cache (default: the CPU count, "
                                       "at most 16)")
    loss: str | Callable[..., Any] = option(
        "cross_entropy", "per-example loss: cross_entropy, mse, or module:function (fn(output, target) -> (B,) "
                         "values or a (sum, count) pair); a callable in Python")
    metrics: str | Any = option(
        "", "metrics per split, comma-separated: loss, err, top5_err, class_err:K (default: loss,err with "
            "cross_entropy, else loss); callables in Python", metavar="LIST")
    forward: str | Callable[..., Any] | None = option(
        None, "how the model is called: module:function fn(model, inputs) -> output (default: model(inputs)); a "
              "callable in Python, e.g. lambda m, x: m(input_ids=x).logits")
    seed: int = option(0, "seed of the random directions and subsets")
    device: str = option("auto", "auto (CUDA when available), cpu, cuda, cuda:N")
    precision: Precision = option(
        "fp32", "float math of the forward passes: fp32 (TF32 off), tf32 (TF32 matmuls and cuDNN convolutions; "
        "no effect on CPU) or bf16 (bf16 autocast; weights, perturbations float32, sums float64)")
    amp: bool = option(False, "same as --precision bf16 (the older name; folded into precision, never stored)")
    eval_batch_size: int | None = option(None, "images per forward pass (default: 64 on CPU, 4096 on CUDA)")
    threads: int | None = option(None, "CPU threads per process (default: timed at the start, torch's default vs "
                                       "one, the faster kept; a resumed file keeps its recorded count)")
    points_in_flight: int | Auto = option(
        "auto", "evaluate K points per forward pass (torch.func.vmap over stacked weights; bn_mode keep or "
        "recompute); auto: 1 on CPU, on CUDA the fastest of 1, 4, 16 in a short measurement",
        type=parse_auto_int, metavar="K|auto")
    channels_last: Auto | bool = option(
        "auto", "channels-last (NHWC) inputs for convolutions; auto: on for CUDA conv nets, on CPU with bf16 only "
        "(where it was measured faster)",
        type=parse_auto_bool, metavar="auto|on|off")
    cuda_graphs: Auto | bool = option(
        "auto", "capture one point's forward passes in a CUDA graph and replay it per point; auto: on CUDA, "
        "falling back (with the reason logged) where capture fails; off on CPU",
        type=parse_auto_bool, metavar="auto|on|off")
    compile: bool = option(False, "torch.compile the model's forward pass (compiles on first use; needs "
                                  "points_in_flight 1 or auto)")
    chunk_size: int = option(4, "points evaluated between two saves to the file")

    def __post_init__(self):
        check_choice("bn_mode", self.bn_mode, choices_of(field_types(EvalConfig)["bn_mode"]))
        for name in ("bn_subset", "train_subset", "test_subset", "eval_batch_size", "threads"):
            check_int(name, getattr(self, name))
        check_int("chunk_size", self.chunk_size, optional=False)
        if self.points_in_flight != "auto":
            check_int("points_in_flight", self.points_in_flight, optional=False)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.amp, bool):
            raise ValueError(f"amp must be True or False, got {self.amp!r}")
        if self.amp:  # the old flag: fold it into the policy, so only precision is stored
            if self.precision == "tf32":
                raise ValueError("amp=True (--amp) means precision 'bf16' but precision 'tf32' was given; drop "
                                 "--amp and keep --precision")
            self.precision, self.amp = "bf16", False
        for name in ("channels_last", "cuda_graphs"):
            _check_auto_bool(name, getattr(self, name))
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        check_int("seed", self.seed, minimum=0, optional=False)
        check_int("image_size", self.image_size, minimum=8)
        check_int("workers", self.workers)
        check_choice("normalize", self.normalize, NORMALIZE)
        if self.max_memory is not None:
            parse_bytes(self.max_memory, "max_memory")
        self.objective()  # validates loss, metrics and forward
        check_number("weight_decay", self.weight_decay, minimum=0)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a name such as 'auto', 'cpu', 'cuda:0', got {self.device!r}")
        if self.points_in_flight != "auto" and self.points_in_flight > 1:
            if self.bn_mode == "batch":
                raise ValueError(
                    "points_in_flight > 1 needs bn_mode 'keep' or 'recompute' (got 'batch', where every batch is "
                    "normalised with its own statistics); use points_in_flight=1 with it")
            if self.compile:
                raise ValueError("compile=True needs points_in_flight 1 or 'auto' (the compiled forward pass "
                                 f"evaluates one point at a time), got {self.points_in_flight}")

    @classmethod
    def from_dict(cls, values) -> "EvalConfig":
        return from_dict(cls, values, "evaluation config")

    def replace(self, **changes) -> "EvalConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def objective(self) -> Objective:
        """The :class:`~widthkit.engine.objectives.Objective` these settings describe."""
        return Objective(self.loss, self.metrics or None, self.forward)

    def recorded(self) -> dict:
        """What the results depend on (stored in the file, compared on resume); see :data:`HOW_FIELDS`.
        The batch size counts in ``batch`` mode, where each batch is normalised with its own statistics.
        Callables (loss, metrics, forward) are recorded by name."""
        d = {k: v for k, v in self.to_dict().items() if k not in HOW_FIELDS and k not in ALIAS_FIELDS}
        d.update(self.objective().recorded())
        if self.bn_mode == "batch":
            d["eval_batch_size"] = self.eval_batch_size
        return d
