"""The one evaluation config: how every point of an analysis is evaluated, and on which data.

Used by the Python API (``widthkit.rays(..., bn_mode="keep")``), by every analysis command and the pipeline
(their flags are generated from these fields: ``--bn-mode``, ``--eval-batch-size``, ...) and stored in every
HDF5 file's ``config["eval"]``. Validated once, on construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..runtime import RuntimeConfig, parse_bytes
from ..settings import check_choice, check_int, check_number, choices_of, field_types, from_dict, option
from .objectives import Objective

BNMode = Literal["recompute", "keep", "batch"]
BN_MODES: tuple[str, ...] = ("recompute", "keep", "batch")

# Settings that change how fast results come, not what they are: left out of the stored config, so a run
# resumed with other values continues the same file (the device, thread count and levers go to its provenance).
# (Device, precision, threads, batch size and levers are not here at all: they are the runtime config's,
# :class:`widthkit.runtime.RuntimeConfig`, and go to provenance.) The precision policy is the one runtime
# setting that changes numbers: it is recorded beside these, from the runtime config.
HOW_FIELDS = ("chunk_size", "cache_dir", "max_memory", "workers", "download")
NORMALIZE = ("auto", "dataset", "imagenet")


@dataclass
class EvalConfig:
    """How points are evaluated and on which data. Every field is also a flag of every analysis command."""

    bn_mode: BNMode = option(
        "recompute", "BatchNorm statistics at each point: recompute (from the training data, as the paper), keep "
        "(the checkpoint's), or batch (each batch's own)", old=("--bn",))
    bn_subset: int | None = option(None, "recompute BN statistics from N fixed random training images (default: all)",
                                   metavar="N")
    weight_decay: float | None = option(
        None, "adds train_loss_l2 = CE + wd/2·‖θ‖² (default: the weight decay the checkpoint records, else none)")
    dataset: str | None = option(None, "dataset: digits, cifar10, cifar100, mnist, fashion-mnist, kmnist, "
                                       "emnist:SPLIT, svhn, stl10, imagefolder:PATH (default: the checkpoint's)",
                                 flag="--data", old=("--dataset",))
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
    chunk_size: int = option(4, "points evaluated between two saves to the file")

    def __post_init__(self):
        check_choice("bn_mode", self.bn_mode, choices_of(field_types(EvalConfig)["bn_mode"]))
        for name in ("bn_subset", "train_subset", "test_subset"):
            check_int(name, getattr(self, name))
        check_int("chunk_size", self.chunk_size, optional=False)
        check_int("seed", self.seed, minimum=0, optional=False)
        check_int("image_size", self.image_size, minimum=8)
        check_int("workers", self.workers)
        check_choice("normalize", self.normalize, NORMALIZE)
        if self.max_memory is not None:
            parse_bytes(self.max_memory, "max_memory")
        self.objective()  # validates loss, metrics and forward
        check_number("weight_decay", self.weight_decay, minimum=0)

    def check_runtime(self, runtime: RuntimeConfig) -> None:
        """The settings that meet across the two configs: ``ValueError`` when they cannot work together."""
        if runtime.points_in_flight != "auto" and runtime.points_in_flight > 1 and self.bn_mode == "batch":
            raise ValueError(
                "points_in_flight > 1 needs bn_mode 'keep' or 'recompute' (got 'batch', where every batch is "
                "normalised with its own statistics); use points_in_flight=1 with it")

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

    def recorded(self, runtime: RuntimeConfig) -> dict:
        """What the results depend on (stored in the file, compared on resume): these fields but
        :data:`HOW_FIELDS`, and of the runtime config the precision policy (and, in ``batch`` mode, where each
        batch is normalised with its own statistics, the batch size). Callables (loss, metrics, forward) are
        recorded by name."""
        d = {k: v for k, v in self.to_dict().items() if k not in HOW_FIELDS}
        d["precision"] = runtime.precision
        d.update(self.objective().recorded())
        if self.bn_mode == "batch":
            d["eval_batch_size"] = runtime.eval_batch_size
        return d
