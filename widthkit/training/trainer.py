"""SGD and SWA training with the learning-rate schedule of the SWA paper, resumable, bit-exact on the CPU.

Izmailov, Podoprikhin, Garipov, Vetrov, Wilson (2018), "Averaging Weights Leads to Wider Optima and Better
Generalization", https://arxiv.org/abs/1803.05407 (reference code: github.com/timgaripov/swa). The trainer
produces the checkpoints the width analyses compare: an SGD solution and an SWA solution that share their
first ``swa_start`` epochs (:func:`train_branches`), or either one on its own (:func:`train`).

Averaging uses :class:`torch.optim.swa_utils.AveragedModel` (equal weights) and the BatchNorm statistics of
the averaged weights are recomputed with :func:`torch.optim.swa_utils.update_bn`.

What a run writes into its output folder:

- ``start.pt`` / ``sgd.pt`` / ``swa.pt`` / ``swa_iter_XXX.pt``: widthkit checkpoints (see
  :func:`widthkit.checkpoints.save_checkpoint`) with roles ``start`` / ``sgd`` / ``swa`` / ``iterate``, the
  resolved config, the per-epoch metrics and, for ``sgd``/``swa``, the final train/test loss and error;
- ``log.csv``: one row per epoch (``phase, epoch, lr, train_loss, train_err, test_loss, test_err, time_s``)
  plus one ``<phase>_final`` row per finished model; losses in nats, errors in %;
- ``train_state.pt``: everything needed to continue after the last finished epoch (written atomically after
  every epoch; plain tensors and containers, readable with ``torch.load(weights_only=True)``);
- ``branch_state.pt`` (branch protocol only, until both branches are done): the training state at
  ``swa_start`` that both branches continue from.

Running the same call (or CLI command) again continues from the last finished epoch and skips finished
phases; on the CPU the result is bit-identical to an uninterrupted run. A folder that holds a run with a
different configuration is refused (use a new folder or ``overwrite=True`` / ``--overwrite``).

>>> cfg = load_recipe("digits")
>>> paths = train_branches(cfg, "checkpoints/digits")
>>> paths["sgd"], paths["swa"]
('checkpoints/digits/sgd.pt', 'checkpoints/digits/swa.pt')
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from ..engine.objectives import split_sums
from ..fileio import WriterLock, atomic_write
from ..inputs.checkpoints import atomic_save, safe_load, save_checkpoint
from ..inputs.data import IMAGEFOLDER_PREFIX, augment, list_datasets, load_dataset
from ..models import create_model, model_input_shape
from ..runtime import autocast, check_amp, default_batch_size, provenance
from ..runtime import resolve_device as runtime_device
from ..settings import base_type, field_types, from_dict, option

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

__all__ = [
    "TrainConfig",
    "lr_at",
    "list_recipes",
    "load_recipe",
    "train",
    "train_branches",
    "MODES",
    "SCHEDULES",
    "DEVICES",
    "LOG_COLUMNS",
]

MODES = ("branches", "sgd", "swa")  # the CLI's --mode; train() takes the last two
SCHEDULES = ("sgd", "swa", "swa_branch")  # the `branch` argument of lr_at
DEVICES = ("auto", "cpu", "cuda")
SGD_FINAL_RATIO = 0.01  # the SGD schedule ends at 1% of the initial learning rate
LOG_COLUMNS = ("phase", "epoch", "lr", "train_loss", "train_err", "test_loss", "test_err", "time_s")

STATE_FILE = "train_state.pt"
BRANCH_FILE = "branch_state.pt"
LOG_FILE = "log.csv"
STATE_FORMAT = "widthkit-train-state"
STATE_VERSION = 1
# config fields that may change between a run and its continuation (they do not change the numbers)
RESUME_FREE_FIELDS = ("data_root", "device")



# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything that determines a training run; the defaults are the bundled ``digits`` recipe.

    Epoch counts are whole epochs; ``epochs`` is the budget B of the paper (the length of a conventional SGD
    run). Learning rates are per SGD step, weight decay is the L2 coefficient of ``torch.optim.SGD``.
    Construction validates every value and raises ``ValueError`` saying what to change.
    """

    model: str = option("digits_cnn", "architecture: a name from widthkit.models.list_models() or 'torchvision:NAME'")
    model_kwargs: dict = option({}, "extra create_model arguments, e.g. {\"depth\": 56} (CLI: JSON)")
    dataset: str = option("digits", "dataset: a name from widthkit.data.list_datasets() or 'imagefolder:PATH'")
    data_root: str | None = option(None, "folder holding the CIFAR folders (default: $WIDTHKIT_DATA or ./data)")
    epochs: int = option(20, "budget B: epochs of the SGD run")
    batch_size: int = option(64, "images per SGD step")
    lr: float = option(0.1, "initial learning rate (constant for the first half of the budget)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "L2 weight decay of torch.optim.SGD")
    swa_lr: float = option(0.05, "constant learning rate of the SWA phase")
    swa_start: int | None = option(None, "epoch at which SWA branches off / starts averaging (default: 0.75*epochs)")
    swa_budget: float = option(1.5, "SWA ends after swa_budget*epochs epochs (the paper: 1, 1.25 or 1.5)")
    swa_c: int = option(1, "average every swa_c epochs (1: once per epoch)")
    seed: int = option(0, "seed of the model init, the shuffling and the augmentation")
    device: str = option("auto", "'auto' (CUDA when available), 'cpu' or 'cuda'")
    amp: bool = option(False, "bf16 autocast for forward passes (CUDA only)")
    augment: bool = option(False, "random crop (zero-padded by `pad`, black pixels) and flip of training images")
    pad: int = option(4, "padding of the random crop, pixels per side")
    flip: bool = option(True, "random horizontal flips when augment is on")
    save_iterates: bool = option(False, "also save every averaged SWA iterate as swa_iter_XXX.pt")

    def __post_init__(self) -> None:
        self.model_kwargs = dict(self.model_kwargs) if isinstance(self.model_kwargs, dict) else self.model_kwargs
        _check_types(self)
        _check_values(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build a config from a plain dict (a TOML table, a checkpoint's recorded config).

        Raises:
            ValueError: a key that is not a field (the message lists the valid ones) or an invalid value.
        """
        return from_dict(cls, values, "training config")

    def to_dict(self) -> dict:
        """The fields as a plain dict (``model_kwargs`` copied)."""
        return asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with some fields changed (unknown names raise ``ValueError``)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @property
    def swa_start_epoch(self) -> int:
        """``swa_start`` with its default filled in: ``floor(0.75 * epochs)``, at least 1."""
        return self.swa_start if self.swa_start is not None else max(1, math.floor(0.75 * self.epochs))

    @property
    def swa_end_epoch(self) -> int:
        """Epoch at which the SWA run ends: ``swa_budget * epochs`` rounded half up."""
        return math.floor(self.swa_budget * self.epochs + 0.5)

    def resolved(self) -> dict:
        """The config as saved into outputs: a dict with ``swa_start`` filled in."""
        return {**self.to_dict(), "swa_start": self.swa_start_epoch}


def _check_types(cfg: TrainConfig) -> None:
    for name, hint in field_types(TrainConfig).items():
        value = getattr(cfg, name)
        kind, optional = base_type(hint)
        if value is None and optional:
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            setattr(cfg, name, value)
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not ok:
            want = kind.__name__ + (" or None" if optional else "")
            raise ValueError(f"training config {name!r} must be of type {want}, got {value!r} "
                             f"({type(value).__name__})")
    bad_keys = [k for k in cfg.model_kwargs if not isinstance(k, str)]
    if bad_keys:
        raise ValueError(f"model_kwargs keys must be strings (create_model argument names), got {bad_keys}")


def _check_values(cfg: TrainConfig) -> None:
    _check_model_name(cfg.model)
    _check_dataset_name(cfg.dataset)
    _require(cfg.epochs >= 1, f"epochs (the budget B) must be >= 1, got {cfg.epochs}")
    _require(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    _require(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a positive number, got {cfg.lr}")
    _require(math.isfinite(cfg.swa_lr) and cfg.swa_lr > 0, f"swa_lr must be a positive number, got {cfg.swa_lr}")
    _require(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    _require(math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0,
             f"weight_decay must be >= 0, got {cfg.weight_decay}")
    _require(cfg.seed >= 0, f"seed must be a non-negative int, got {cfg.seed}")
    _require(cfg.pad >= 0, f"pad must be >= 0 pixels, got {cfg.pad}")
    _require(cfg.swa_c >= 1, f"swa_c (average every swa_c epochs) must be >= 1, got {cfg.swa_c}")
    _require(cfg.device in DEVICES, f"device must be one of {list(DEVICES)}, got {cfg.device!r}")
    _require(not (cfg.amp and cfg.device == "cpu"),
             "amp (bf16 autocast) runs on CUDA only, but device='cpu'; set amp = false or device = 'cuda'")
    if cfg.swa_start is not None:
        _require(1 <= cfg.swa_start <= cfg.epochs,
                 f"swa_start={cfg.swa_start} is outside the budget: it must be in [1, epochs={cfg.epochs}]; "
                 f"lower swa_start (or leave it unset for 0.75*epochs = {max(1, math.floor(0.75 * cfg.epochs))}; "
                 f"CLI: --swa-start auto) or raise epochs")
    _require(math.isfinite(cfg.swa_budget) and cfg.swa_budget > 0,
             f"swa_budget must be a positive number of budgets (1, 1.25, 1.5), got {cfg.swa_budget}")
    n_avg = (cfg.swa_end_epoch - cfg.swa_start_epoch) // cfg.swa_c
    _require(n_avg >= 1,
             f"SWA would average no model: it runs from epoch swa_start={cfg.swa_start_epoch} to "
             f"swa_budget*epochs={cfg.swa_end_epoch} and averages every swa_c={cfg.swa_c} epochs; raise swa_budget "
             f"or lower swa_start or swa_c")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_model_name(name: str) -> None:
    try:
        model_input_shape(name)
    except ValueError as err:
        raise ValueError(f"training config 'model': {err}") from None


def _check_dataset_name(name: str) -> None:
    if name.startswith(IMAGEFOLDER_PREFIX) and len(name) > len(IMAGEFOLDER_PREFIX):
        return
    if name not in list_datasets():
        raise ValueError(f"training config 'dataset': unknown dataset {name!r}; valid names: {list_datasets()} "
                         f"or '{IMAGEFOLDER_PREFIX}PATH'")


# --------------------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------------------


def schedule_factor(t: float, ratio: float) -> float:
    """The paper's schedule as a multiple of the initial learning rate at training progress ``t``.

    1 for ``t <= 0.5``, then linear down to ``ratio`` at ``t = 0.9``, then constant ``ratio``.
    """
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - ratio) * (t - 0.5) / 0.4
    return ratio


def lr_at(epoch: int | float, cfg: TrainConfig, branch: str = "sgd") -> float:
    """Learning rate for the epoch that starts after ``epoch`` finished epochs (set once per epoch).

    Args:
        epoch: number of epochs already trained (>= 0).
        cfg: the run's config (``lr``, ``swa_lr``, ``epochs``, ``swa_start``).
        branch: which schedule:

            - ``'sgd'``: ``lr * factor(epoch / epochs, 0.01)`` (the paper's SGD baseline);
            - ``'swa'``: a single SWA run, ``lr * factor(epoch / swa_start, swa_lr / lr)``. As in the authors'
              ``train.py``, progress is measured against ``swa_start``, so the rate has reached ``swa_lr``
              (at 0.9 * swa_start) before averaging starts and every averaged iterate sees ``swa_lr``;
            - ``'swa_branch'``: the SWA branch of :func:`train_branches`, ``'sgd'`` before ``swa_start`` (the
              shared prefix) and the constant ``swa_lr`` from ``swa_start`` on.

        ``factor`` is :func:`schedule_factor`: 1 up to t = 0.5, linear to the ratio at t = 0.9, then constant.

    Returns:
        the learning rate (float).

    >>> cfg = TrainConfig(epochs=100, lr=0.1, swa_lr=0.05, swa_start=80)
    >>> [round(lr_at(e, cfg, "sgd"), 6) for e in (0, 70, 95)]  # 0.1, 0.1 * (1 + 0.01) / 2, 0.1 * 0.01
    [0.1, 0.0505, 0.001]
    >>> lr_at(60, cfg, "swa"), lr_at(80, cfg, "swa_branch")  # t = 60/80 -> 1 - 0.5 * 0.25/0.4; then swa_lr
    (0.06875, 0.05)
    """
    if branch not in SCHEDULES:
        raise ValueError(f"branch must be one of {list(SCHEDULES)}, got {branch!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not epoch >= 0:
        raise ValueError(f"epoch must be a number >= 0, got {epoch!r}")
    if branch == "swa_branch":
        if epoch >= cfg.swa_start_epoch:
            return cfg.swa_lr
        branch = "sgd"
    if branch == "sgd":
        return cfg.lr * schedule_factor(epoch / cfg.epochs, SGD_FINAL_RATIO)
    return cfg.lr * schedule_factor(epoch / cfg.swa_start_epoch, cfg.swa_lr / cfg.lr)


def averages_after(epoch: int, cfg: TrainConfig) -> bool:
    """Whether SWA averages the weights reached after ``epoch`` finished epochs: every ``swa_c`` epochs after
    ``swa_start`` (the first average is the iterate one epoch into the SWA phase)."""
    start = cfg.swa_start_epoch
    return epoch > start and (epoch - start) % cfg.swa_c == 0


# --------------------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------------------


def _recipe_dir():
    return resources.files("widthkit.training") / "recipes"


def list_recipes() -> list[str]:
    """Names of the bundled recipes (``widthkit/training/recipes/*.toml``), sorted."""
    return sorted(p.name[:-5] for p in _recipe_dir().iterdir() if p.name.endswith(".toml"))


def load_recipe(name_or_path: str | os.PathLike) -> TrainConfig:
    """A :class:`TrainConfig` from a bundled recipe name (see :func:`list_recipes`) or a TOML file.

    The TOML holds top-level keys named like the fields of :class:`TrainConfig` (``model_kwargs`` as a table);
    keys left out keep their defaults.

    Raises:
        ValueError: unknown recipe (lists the bundled ones), unreadable TOML, unknown key (names it), or an
            invalid value.
    """
    values, source = read_config_file(name_or_path)
    try:
        return TrainConfig.from_dict(values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def read_config_file(name_or_path: str | os.PathLike) -> tuple[dict, str]:
    """(key/value pairs, a description of the source) of a recipe name or TOML file, with every key checked
    against the fields of :class:`TrainConfig`; the values are validated only once a config is built from
    them (the CLI layers a ``--config`` file over a recipe)."""
    text, source = _recipe_text(name_or_path)
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ValueError(f"reading {source} needs tomllib (Python >= 3.11) or the 'tomli' package")
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{source} is not valid TOML: {err}") from None
    valid = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise ValueError(f"{source}: unknown training config key(s) {unknown}; valid keys: {valid}")
    return values, source


def layered_config(recipe: str | os.PathLike, config_file: str | os.PathLike | None = None,
                   overrides: dict | None = None) -> TrainConfig:
    """A recipe, then a TOML file's keys over it, then single overrides (the CLI's flags); validated once."""
    values, _ = read_config_file(recipe)
    if config_file:
        values.update(read_config_file(config_file)[0])
    values.update(overrides or {})
    return TrainConfig.from_dict(values)


def _recipe_text(name_or_path: str | os.PathLike) -> tuple[str, str]:
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ValueError(f"recipe must be a recipe name or a path to a TOML file, got {name_or_path!r}")
    raw = os.fspath(name_or_path)
    path = Path(raw).expanduser()
    if path.suffix == ".toml" or os.sep in raw or path.is_file():
        if not path.is_file():
            raise ValueError(f"recipe file {path} does not exist; bundled recipes: {list_recipes()}")
        return path.read_text(encoding="utf-8"), str(path)
    if raw not in list_recipes():
        raise ValueError(f"unknown recipe {raw!r}; bundled recipes: {list_recipes()} (or pass a path to a .toml file)")
    return (_recipe_dir() / f"{raw}.toml").read_text(encoding="utf-8"), f"recipe {raw!r}"


# --------------------------------------------------------------------------------------------------------
# Numeric core: one epoch, evaluation, batch-norm statistics
# --------------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    """A dataset resident on the training device.

    ``x_train`` float32 (N, C, H, W) normalised, ``y_train`` int64 (N,); the same for the test split
    (``None`` when the dataset has none). ``fill`` is the normalised value of a black pixel per channel.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    num_classes: int
    fill: tuple[float, ...]


def load_train_data(cfg: TrainConfig, device: torch.device) -> TrainData:
    """Load the config's dataset once, normalised, onto ``device``."""
    train = load_dataset(cfg.dataset, root=cfg.data_root, split="train")
    try:
        test = load_dataset(cfg.dataset, root=cfg.data_root, split="test")
    except FileNotFoundError:
        if not cfg.dataset.startswith(IMAGEFOLDER_PREFIX):
            raise
        test = None  # an image folder without a test split: test metrics are NaN
    fill = tuple(-m / s for m, s in zip(train.mean, train.std))
    return TrainData(
        x_train=train.normalized(device=device), y_train=train.labels.to(device),
        x_test=None if test is None else test.normalized(device=device),
        y_test=None if test is None else test.labels.to(device),
        num_classes=train.num_classes, fill=fill,
    )


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch of minibatch indices: a permutation of ``range(n)`` from the CPU ``generator``, split into
    batches of ``batch_size`` (int64 CPU tensors). A final batch of a single sample is dropped (BatchNorm
    cannot train on one sample); it is reshuffled into the next epoch."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def ordered_batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """``x`` in consecutive batches of ``batch_size`` (the last may be smaller), in dataset order."""
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, data: TrainData, cfg: TrainConfig,
                generator: torch.Generator, on_batch: Callable[[], None] | None = None) -> tuple[float, float]:
    """One pass of SGD over the training set in shuffled minibatches (augmented when ``cfg.augment``).

    Returns:
        (mean cross-entropy in nats, error in %) over the images seen, measured on the fly in train mode.
    """
    device = data.x_train.device
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for idx in shuffled_batches(len(data.y_train), cfg.batch_size, generator):
        idx = idx.to(device)
        xb, yb = data.x_train[idx], data.y_train[idx]
        if cfg.augment:
            xb = augment(xb, generator=generator, pad=cfg.pad, flip=cfg.flip, fill=data.fill)
        with autocast(device, cfg.amp):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        # accumulated on the device: no host sync per step
        loss_sum += loss.detach().double() * len(yb)
        wrong += (logits.detach().argmax(1) != yb).sum()
        seen += len(yb)
        if on_batch is not None:
            on_batch()
    return loss_sum.item() / seen, 100.0 * wrong.item() / seen


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor | None, y: torch.Tensor | None, batch_size: int,
             amp: bool = False) -> tuple[float, float]:
    """(mean cross-entropy in nats, error in %) of ``model`` in eval mode on ``(x, y)``; NaNs when ``x`` is None.

    The model's train/eval mode is restored afterwards.
    """
    if x is None:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    split_sums(model, x, y, batch_size, sums, amp)
    model.train(was_training)
    loss_sum, wrong = sums.tolist()
    return loss_sum / len(y), 100.0 * wrong / len(y)


def recompute_bn(model: nn.Module, x: torch.Tensor, batch_size: int, amp: bool = False) -> None:
    """Recompute the BatchNorm running statistics of ``model`` (in place) with one pass over ``x``.

    :func:`torch.optim.swa_utils.update_bn` over ``x`` in dataset order, in batches of ``batch_size``: the
    statistics are reset and become the equal-weight average of the per-batch mean and (unbiased) variance.
    """
    with autocast(x.device, amp):
        update_bn(ordered_batches(x, batch_size), model)


# --------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Phase:
    """A stretch of training from epoch ``start`` to ``end`` on one schedule, ending in a checkpoint."""

    name: str  # "prefix" | "sgd" | "swa": the log's phase column
    schedule: str  # the lr_at branch
    start: int
    end: int
    averaging: bool
    output: str  # checkpoint file written at the end
    role: str
    from_branch_point: bool = False  # continues from the state saved at the end of the prefix


def _plan(cfg: TrainConfig, mode: str) -> list[_Phase]:
    s, b, e = cfg.swa_start_epoch, cfg.epochs, cfg.swa_end_epoch
    if mode == "sgd":
        return [_Phase("sgd", "sgd", 0, b, False, "sgd.pt", "sgd")]
    if mode == "swa":
        return [_Phase("swa", "swa", 0, e, True, "swa.pt", "swa")]
    return [
        _Phase("prefix", "sgd", 0, s, False, "start.pt", "start"),
        _Phase("sgd", "sgd", s, b, False, "sgd.pt", "sgd"),
        _Phase("swa", "swa_branch", s, e, True, "swa.pt", "swa", from_branch_point=True),
    ]


def train(cfg: TrainConfig, out_dir: str | os.PathLike, mode: str = "sgd", *, overwrite: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Train one model: a conventional SGD run or a single SWA run.

    - ``mode='sgd'``: ``epochs`` epochs on the SGD schedule (``lr_at(.., 'sgd')``) -> ``sgd.pt``.
    - ``mode='swa'``: ``swa_budget * epochs`` epochs on the SWA schedule (``lr_at(.., 'swa')``, as in the
      authors' code), averaging the weights after every ``swa_c``-th epoch past ``swa_start``; BatchNorm
      statistics of the average recomputed on the (un-augmented) training set -> ``swa.pt``
      (+ ``swa_iter_XXX.pt`` with ``save_iterates``).

    Args:
        cfg: the run's configuration.
        out_dir: output folder (created); see the module docstring for what goes into it.
        mode: ``'sgd'`` or ``'swa'`` (for the paper's paired protocol use :func:`train_branches`).
        overwrite: delete this trainer's files in ``out_dir`` first instead of continuing / refusing.
        progress: show a tqdm bar per epoch and a line per finished epoch.

    Returns:
        dict of written paths: ``'sgd'`` or ``'swa'``, ``'iterates'`` (list), ``'log'``, ``'state'``.
    """
    if mode not in ("sgd", "swa"):
        raise ValueError(f"mode must be 'sgd' or 'swa' (use train_branches for both from one prefix), got {mode!r}")
    return _Run.execute(cfg, out_dir, mode, overwrite=overwrite, progress=progress)


def train_branches(cfg: TrainConfig, out_dir: str | os.PathLike, *, overwrite: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """The paired SGD / SWA protocol: two solutions that share their first ``swa_start`` epochs.

    1. **Prefix**: SGD with momentum on the SGD schedule (``lr`` for the first half of the budget, then linear
       decay towards 1% of ``lr`` at 90% of the budget) for ``swa_start`` epochs -> ``start.pt`` (role
       ``start``). The full training state at this point (weights, momentum buffers, RNG states) is kept in
       ``branch_state.pt``.
    2. **SGD branch**: continue the SGD schedule to the budget ``epochs`` -> ``sgd.pt`` (role ``sgd``): exactly
       the run :func:`train` with ``mode='sgd'`` makes.
    3. **SWA branch**: from the same state at ``swa_start``, SGD at the constant learning rate ``swa_lr`` (the
       SWA phase of Izmailov et al. 2018) until ``swa_budget * epochs``; after every ``swa_c``-th epoch the
       weights are added to an equal-weight :class:`~torch.optim.swa_utils.AveragedModel`. Finally the
       BatchNorm statistics of the average are recomputed with :func:`~torch.optim.swa_utils.update_bn` on the
       normalised, un-augmented training set in batches of ``batch_size`` -> ``swa.pt`` (role ``swa``; the
       averaged module's weights with clean keys), plus ``swa_iter_XXX.pt`` (role ``iterate``) for each
       averaged iterate when ``save_iterates`` is set.

    Each finished model is evaluated (eval mode) on the train and test sets; the numbers go into its
    checkpoint's ``metrics`` and ``log.csv``. Interrupted runs continue where they stopped when called again.

    Returns:
        dict of written paths: ``'start'``, ``'sgd'``, ``'swa'``, ``'iterates'`` (list), ``'log'``, ``'state'``.

    >>> paths = train_branches(load_recipe("digits"), "checkpoints/digits")
    """
    return _Run.execute(cfg, out_dir, "branches", overwrite=overwrite, progress=progress)


def resolve_device(cfg: TrainConfig) -> torch.device:
    """The device a run uses; ``ValueError`` if CUDA is asked for (or amp on) without CUDA available."""
    device = runtime_device(cfg.device)
    check_amp(device, cfg.amp)
    return device


class _Run:
    """The mutable state of one training run and the file protocol around it."""

    def __init__(self, cfg: TrainConfig, out: Path, mode: str, device: torch.device, progress: bool):
        self.cfg, self.out, self.mode, self.device, self.progress = cfg, out, mode, device, progress
        self.plan = _plan(cfg, mode)
        self.data = load_train_data(cfg, device)
        torch.manual_seed(cfg.seed)  # the model init; inside fork_rng, so the caller's RNG is left alone
        self.model = create_model(cfg.model, num_classes=self.data.num_classes, **cfg.model_kwargs).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # CPU: shuffling and augmentation
        self.averaged: AveragedModel | None = None
        self.phase = self.plan[0].name
        self.epoch = 0
        self.log: list[dict] = []
        self.iterates: list[str] = []

    # ---- entry point ----------------------------------------------------------------------------------

    @classmethod
    def execute(cls, cfg: TrainConfig, out_dir, mode: str, overwrite: bool, progress: bool) -> dict[str, Any]:
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"cfg must be a TrainConfig (see load_recipe / TrainConfig.from_dict), got "
                             f"{type(cfg).__name__}")
        device = resolve_device(cfg)
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output folder {out} is a file; pass a folder path")
        # one writer per output folder for the whole run: a second `train --out` of the same folder is refused
        with WriterLock(out):
            return cls._execute_locked(cfg, out, mode, device, overwrite, progress)

    @classmethod
    def _execute_locked(cls, cfg, out: Path, mode: str, device, overwrite: bool, progress: bool) -> dict[str, Any]:
        if overwrite and out.is_dir():
            _remove_outputs(out)
        state = _read_state(out) if out.is_dir() else None
        if out.is_dir():
            _check_same_run(state, cfg, mode, out)
        if state is not None and state["phase"] == "done":
            return _finished_paths(out, state, mode)
        cuda_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            run = cls(cfg, out, mode, device, progress)  # loads the data and builds the model: may still fail
            out.mkdir(parents=True, exist_ok=True)
            if state is not None:
                run.load_state(state)
            return run.run()

    def run(self) -> dict[str, Any]:
        names = [p.name for p in self.plan]
        for phase in self.plan[names.index(self.phase):]:
            self.train_phase(phase)
            self.finish_phase(phase)
            following = self.plan[self.plan.index(phase) + 1:]
            if following:
                self.start_phase(following[0])
        self.phase = "done"
        self.save_state()
        (self.out / BRANCH_FILE).unlink(missing_ok=True)
        return self.paths()

    # ---- phases -----------------------------------------------------------------------------------------

    def train_phase(self, phase: _Phase) -> None:
        for epoch in range(self.epoch, phase.end):
            tic = time.perf_counter()
            lr = lr_at(epoch, self.cfg, phase.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with _progress_bar(self, phase, epoch) as bar:
                train_loss, train_err = train_epoch(self.model, self.optimizer, self.data, self.cfg, self.generator,
                                                    on_batch=bar.update)
            self.epoch = epoch + 1
            test_loss, test_err = evaluate(self.model, self.data.x_test, self.data.y_test,
                                           default_batch_size(self.device), self.cfg.amp)
            self.log.append({"phase": phase.name, "epoch": self.epoch, "lr": lr, "train_loss": train_loss,
                             "train_err": train_err, "test_loss": test_loss, "test_err": test_err,
                             "time_s": time.perf_counter() - tic})
            if phase.averaging and averages_after(self.epoch, self.cfg):
                self.average()
            if self.progress:
                _print_row(self.log[-1])
            self.save_state()

    def average(self) -> None:
        if self.averaged is None:
            self.averaged = AveragedModel(self.model)
        self.averaged.update_parameters(self.model)
        if self.cfg.save_iterates:
            n = int(self.averaged.n_averaged)
            path = self.out / f"swa_iter_{n:03d}.pt"
            self._save_model(path, self.model, "iterate", self._metrics(extra_rows=[]), n_averaged=n)
            self.iterates.append(str(path))

    def finish_phase(self, phase: _Phase) -> None:
        """Write the phase's checkpoint (idempotent: a rerun after a kill writes the same file)."""
        if phase.role == "start":
            self._save_model(self.out / phase.output, self.model, "start", self._metrics([]))
            atomic_save(self.state_dict(), self.out / BRANCH_FILE)
            return
        model = self.model
        n_averaged = None
        if phase.averaging:
            model = self.averaged.module
            n_averaged = int(self.averaged.n_averaged)
            recompute_bn(model, self.data.x_train, self.cfg.batch_size, self.cfg.amp)
        final = self._final_row(phase, model)
        self.log = [r for r in self.log if r["phase"] != final["phase"]] + [final]
        if self.progress:
            _print_row(final)
        self._save_model(self.out / phase.output, model, phase.role, self._metrics([final]), n_averaged=n_averaged)
        self.save_state()

    def start_phase(self, phase: _Phase) -> None:
        if phase.from_branch_point:
            log, iterates = self.log, self.iterates
            self.load_state(safe_load(self.out / BRANCH_FILE))
            self.log, self.iterates = log, iterates
        self.phase = phase.name
        self.epoch = phase.start
        self.averaged = None
        self.save_state()

    def _final_row(self, phase: _Phase, model: nn.Module) -> dict:
        bs = default_batch_size(self.device)
        train_loss, train_err = evaluate(model, self.data.x_train, self.data.y_train, bs, self.cfg.amp)
        test_loss, test_err = evaluate(model, self.data.x_test, self.data.y_test, bs, self.cfg.amp)
        return {"phase": f"{phase.name}_final", "epoch": phase.end, "lr": math.nan, "train_loss": train_loss,
                "train_err": train_err, "test_loss": test_loss, "test_err": test_err, "time_s": math.nan}

    def _metrics(self, extra_rows: list[dict]) -> dict:
        """Per-epoch rows of the model's history (the prefix plus its own phase) and its final numbers."""
        own = {"prefix", self.phase}
        rows = [r for r in self.log if r["phase"] in own] + extra_rows
        out: dict[str, Any] = {"epochs": rows}
        if extra_rows:
            final = extra_rows[-1]
            out.update({k: final[k] for k in ("train_loss", "train_err", "test_loss", "test_err")})
            out["test_acc"] = 100.0 - final["test_err"]
        return out

    def _save_model(self, path: Path, model: nn.Module, role: str, metrics: dict,
                    n_averaged: int | None = None) -> None:
        extra = {"seed": self.cfg.seed, "epoch": self.epoch, "mode": self.mode}
        if n_averaged is not None:
            extra["n_averaged"] = n_averaged
        save_checkpoint(path, model, arch=self.cfg.model, num_classes=self.data.num_classes,
                        arch_kwargs=self.cfg.model_kwargs, dataset=self.cfg.dataset, role=role,
                        config=self.cfg.resolved(), metrics=metrics, extra=extra,
                        provenance=provenance(self.device, self.cfg.amp))

    # ---- state files ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue bit-exactly; plain tensors and containers only."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "mode": self.mode, "config": self.cfg.resolved(),
            "phase": self.phase, "epoch": self.epoch,
            "model": _cpu(self.model.state_dict()),
            "optimizer": _cpu(self.optimizer.state_dict()),
            "averaged": None if self.averaged is None else _cpu(self.averaged.state_dict()),
            "n_averaged": 0 if self.averaged is None else int(self.averaged.n_averaged),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "log": [dict(r) for r in self.log],
            "iterates": list(self.iterates),
        }

    def load_state(self, state: dict) -> None:
        self.phase, self.epoch = state["phase"], int(state["epoch"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.averaged = None
        if state["averaged"] is not None:
            self.averaged = AveragedModel(self.model)
            self.averaged.load_state_dict(state["averaged"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.log = [dict(r) for r in state["log"]]
        self.iterates = list(state["iterates"])

    def save_state(self) -> None:
        if self.phase == "done":  # drop the weights: only what a rerun needs to know it is finished
            state = {k: v for k, v in self.state_dict().items()
                     if k not in ("model", "optimizer", "averaged", "generator", "torch_rng", "cuda_rng")}
        else:
            state = self.state_dict()
        atomic_save(state, self.out / STATE_FILE)
        _write_log(self.out / LOG_FILE, self.log)

    def paths(self) -> dict[str, Any]:
        return _paths(self.out, self.mode, self.iterates)


def _progress_bar(run: _Run, phase: _Phase, epoch: int):
    from tqdm.auto import tqdm

    n = len(run.data.y_train)
    batches = n // run.cfg.batch_size + (n % run.cfg.batch_size > 1)
    return tqdm(total=batches, desc=f"{phase.name} epoch {epoch + 1}/{phase.end}", leave=False,
                disable=not run.progress, unit="batch")


def _print_row(row: dict) -> None:
    from tqdm.auto import tqdm

    losses = (f"train loss {row['train_loss']:.4f} err {row['train_err']:5.2f}%  "
              f"test loss {row['test_loss']:.4f} err {row['test_err']:5.2f}%")
    if math.isnan(row["lr"]):  # a finished model, evaluated in eval mode
        tqdm.write(f"{row['phase']:>9} after {row['epoch']:4d} epochs      {losses}")
    else:
        tqdm.write(f"{row['phase']:>9} epoch {row['epoch']:4d}  lr {row['lr']:.4g}  {losses}  ({row['time_s']:.1f} s)")


def _paths(out: Path, mode: str, iterates: list[str]) -> dict[str, Any]:
    outputs = {p.role: str(out / p.output) for p in _plan(TrainConfig(), mode)}
    return {**outputs, "iterates": list(iterates), "log": str(out / LOG_FILE), "state": str(out / STATE_FILE)}


def _finished_paths(out: Path, state: dict, mode: str) -> dict[str, Any]:
    paths = _paths(out, mode, state["iterates"])
    missing = [p for k, p in paths.items() if k not in ("iterates",) and not Path(p).is_file()]
    missing += [p for p in paths["iterates"] if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{out} holds a finished run but {missing} are gone; rerun with --overwrite "
                         "(overwrite=True) to train again")
    return paths


def _cpu(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor detached on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k])
                         for k in LOG_COLUMNS})
    atomic_write(path, buf.getvalue())


def _read_state(out: Path) -> dict | None:
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = safe_load(path)
    except Exception as err:
        raise ValueError(f"cannot read the training state {path} ({err}); pass --overwrite (overwrite=True) to "
                         "start over") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise ValueError(f"{path} is not a training state this widthkit writes (format {STATE_FORMAT!r} version "
                         f"{STATE_VERSION}); use a new --out folder or --overwrite")
    return state


def _output_files(out: Path) -> list[Path]:
    names = {p.output for mode in MODES for p in _plan(TrainConfig(), mode)} | {STATE_FILE, BRANCH_FILE, LOG_FILE}
    return sorted([p for p in out.iterdir() if p.name in names] + list(out.glob("swa_iter_*.pt")))


def _remove_outputs(out: Path) -> None:
    for path in _output_files(out):
        path.unlink()


def _check_same_run(state: dict | None, cfg: TrainConfig, mode: str, out: Path) -> None:
    fix = "use a new output folder (--out) or pass --overwrite (overwrite=True) to replace it"
    if state is None:
        found = [p.name for p in _output_files(out)]
        if found:
            raise ValueError(f"{out} already holds training outputs {found} but no {STATE_FILE} to continue from; "
                             + fix)
        return
    if state["mode"] != mode:
        raise ValueError(f"{out} holds a {state['mode']!r} run, not a {mode!r} one; " + fix)
    old, new = state["config"], cfg.resolved()
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new
               if k not in RESUME_FREE_FIELDS and old.get(k) != new[k]]
    if changed:
        raise ValueError(f"{out} holds a run with a different config ({'; '.join(changed)}); " + fix)
