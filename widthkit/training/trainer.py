"""SGD and SWA training with the learning-rate schedules of the SWA paper, resumable, bit-exact on the CPU.

Izmailov, Podoprikhin, Garipov, Vetrov, Wilson (2018), "Averaging Weights Leads to Wider Optima and Better
Generalization", https://arxiv.org/abs/1803.05407 (reference code: github.com/timgaripov/swa). The trainer
produces the checkpoints the width analyses compare: an SGD solution and an SWA solution that share their
first ``swa_start`` epochs (:func:`train_branches`), either one on its own (:func:`train`), or an SWA phase
started from given weights (``init``, the paper's ImageNet protocol).

Averaging uses :class:`torch.optim.swa_utils.AveragedModel` (equal weights) at the end of every cycle of
``swa_c`` epochs (or steps), with a constant or a cyclic learning rate (:mod:`widthkit.training.schedule`);
the BatchNorm statistics of the averaged weights are recomputed with :func:`torch.optim.swa_utils.update_bn`.
During the run the average is also evaluated at the budgets ``swa_evals`` (the paper's 1, 1.25 and 1.5), each
time on a copy whose BatchNorm statistics are recomputed, so the running average itself is never disturbed.

What a run writes into its output folder:

- ``start.pt`` / ``sgd.pt`` / ``swa.pt``: widthkit checkpoints (see
  :func:`widthkit.inputs.checkpoints.save_checkpoint`) with roles ``start`` / ``sgd`` / ``swa``, the resolved
  config, the per-epoch metrics and, for ``sgd``/``swa``, the final train/test loss and error. ``swa.pt`` is
  the average at the end of the run (``swa_budget``, 1.5 budgets in the paper recipes): the model the width
  analyses compare with SGD, as before budgets were evaluated. With ``init``, ``start.pt`` holds the given
  weights (evaluated as they are);
- ``swa_budget<B>.pt`` (role ``swa``, ``extra["budget"] = B``): the average at each other ``swa_evals`` budget;
- ``swa_iter_XXX.pt`` / ``sgd_iter_EEE.pt`` (role ``iterate``, with ``save_iterates``): each iterate SWA
  averaged (XXX = its number in the average), and the SGD branch's iterate after every epoch EEE; each with
  ``extra["epoch"]`` (fractional when it is averaged mid-epoch, ``swa_c_unit = 'steps'``); the averaged ones
  are snapshots: ``extra["snapshot"]`` records their number, the cycle (length, unit, steps) and the rate pair;
- ``fge_XXX.pt`` (``mode='fge'``, always): FGE's snapshots, the ensemble's members, recorded likewise; ``swa.pt``
  is then the average of exactly these;
- ``log.csv``: one row per epoch and per evaluation of an average, columns ``phase, weights, epoch, budget, lr,
  train_loss, train_err, test_loss, test_err, time_s``. ``weights`` says what a row measured: ``iterate`` (the
  SGD iterate, its train numbers measured on the fly during the epoch), ``average`` (the SWA average, BN
  recomputed, evaluated in eval mode) or ``ensemble`` (``mode='fge'``: the averaged softmax of the snapshots so
  far); ``budget`` = epoch / epochs (the mark itself for the budget evaluations); ``<phase>_final`` rows hold each
  finished model (``ensemble_final``: FGE's whole ensemble); losses in nats, errors in %;
- ``train_state.pt``: everything needed to continue after the last finished epoch (written atomically after
  every epoch; plain tensors and containers, readable with ``torch.load(weights_only=True)``);
- ``branch_state.pt`` (branch protocol only, until both branches are done): the training state at
  ``swa_start`` that both branches continue from.

Running the same call (or CLI command) again continues from the last finished epoch and skips finished
phases; on the CPU the result is bit-identical to an uninterrupted run. A folder that holds a run with a
different configuration is refused (use a new folder or ``overwrite=True`` / ``--overwrite``).

>>> cfg = load_recipe("digits")
>>> paths = train_branches(cfg, "checkpoints/digits")
>>> paths["sgd"], paths["swa"], paths["budgets"][1.25]
('checkpoints/digits/sgd.pt', 'checkpoints/digits/swa.pt', 'checkpoints/digits/swa_budget1.25.pt')
"""

from __future__ import annotations

import copy
import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from ..engine.ensemble import EnsembleAccumulator, nll_and_error
from ..engine.objectives import split_sums
from ..fileio import WriterLock, atomic_write, check_writable
from ..inputs.checkpoints import TRAINER_NAMES, atomic_save, load_checkpoint, safe_load, save_checkpoint
from ..inputs.data import IMAGEFOLDER_PREFIX, augment, load_dataset
from ..models import create_model
from ..settings import split_kwargs
from ..runtime import RuntimeConfig, autocast, choose_threads, default_batch_size, precision_policy, provenance
from .config import TrainConfig, budget_marks
from .recipes import layered_config, list_recipes, load_recipe, read_config_file, recipe_info
from .schedule import SCHEDULES, averages_at, cycle_steps, fge_cycle_steps, fge_snapshot_at, fge_step_lr, lr_at, \
    steps_per_epoch, swa_step_lr

__all__ = [
    "TrainConfig",
    "lr_at",
    "list_recipes",
    "load_recipe",
    "layered_config",
    "read_config_file",
    "recipe_info",
    "train",
    "train_branches",
    "read_log",
    "MODES",
    "SCHEDULES",
    "LOG_COLUMNS",
]

MODES = ("branches", "sgd", "swa", "fge")  # the CLI's --mode; train() takes the last three
LOG_COLUMNS = ("phase", "weights", "epoch", "budget", "lr", "train_loss", "train_err", "test_loss", "test_err",
               "time_s")

STATE_FILE = "train_state.pt"
BRANCH_FILE = "branch_state.pt"
LOG_FILE = "log.csv"
STATE_FORMAT = "widthkit-train-state"
STATE_VERSION = 2
# config fields that may change between a run and its continuation (they do not change the numbers)
RESUME_FREE_FIELDS = ("data_root",)  # (device, threads, precision are the runtime config's: not in it)
OUTPUT_GLOBS = ("swa_iter_*.pt", "sgd_iter_*.pt", "swa_budget*.pt", "fge_*.pt")


def budget_file(budget: float) -> str:
    """File name of the average at ``budget`` budgets (other than the run's end, which is ``swa.pt``)."""
    return f"swa_budget{budget:g}.pt"


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
                generator: torch.Generator, on_batch: Callable[[], None] | None = None,
                lr_for_step: Callable[[int], float] | None = None,
                after_step: Callable[[int], None] | None = None, precision: str = "fp32",
                penalty: Callable[[], torch.Tensor] | None = None) -> tuple[float, float]:
    """One pass of SGD over the training set in shuffled minibatches (augmented when ``cfg.augment``).

    Args:
        cfg: the run's settings: ``batch_size``, ``augment``, ``pad``, ``flip``, ``amp`` (a :class:`TrainConfig`,
            or a curve's :class:`~widthkit.training.curve.CurveTraining`).
        lr_for_step: ``lr_for_step(k)`` is the learning rate of the epoch's step ``k`` (from 0), set before
            the step (the cyclic schedule); None keeps the optimizer's rate.
        after_step: called with ``k`` after step ``k`` (SWA averages there).
        precision: the runtime precision policy's name; ``"bf16"`` runs the forward passes under bf16 autocast
            (the caller applies the policy's TF32 flags, :func:`widthkit.runtime.precision_policy`).
        penalty: a term added to each step's loss after the forward pass (a curve's ½·wd·‖φ(t)‖²); the returned
            loss is the cross-entropy alone.

    Returns:
        (mean cross-entropy in nats, error in %) over the images seen, measured on the fly in train mode.
    """
    device = data.x_train.device
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for k, idx in enumerate(shuffled_batches(len(data.y_train), cfg.batch_size, generator)):
        idx = idx.to(device)
        xb, yb = data.x_train[idx], data.y_train[idx]
        if cfg.augment:
            xb = augment(xb, generator=generator, pad=cfg.pad, flip=cfg.flip, fill=data.fill)
        with autocast(device, precision):
            logits = model(xb)
        loss = F.cross_entropy(logits.float(), yb)
        optimizer.zero_grad(set_to_none=True)
        (loss if penalty is None else loss + penalty()).backward()
        if lr_for_step is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_for_step(k)
        optimizer.step()
        if after_step is not None:
            after_step(k)
        # accumulated on the device: no host sync per step
        loss_sum += loss.detach().double() * len(yb)
        wrong += (logits.detach().argmax(1) != yb).sum()
        seen += len(yb)
        if on_batch is not None:
            on_batch()
    return loss_sum.item() / seen, 100.0 * wrong.item() / seen


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor | None, y: torch.Tensor | None, batch_size: int,
             precision: str = "fp32") -> tuple[float, float]:
    """(mean cross-entropy in nats, error in %) of ``model`` in eval mode on ``(x, y)``; NaNs when ``x`` is None.

    The model's train/eval mode is restored afterwards.
    """
    if x is None:
        return math.nan, math.nan
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    split_sums(model, x, y, batch_size, sums, precision)
    model.train(was_training)
    loss_sum, wrong = sums.tolist()
    return loss_sum / len(y), 100.0 * wrong / len(y)


def recompute_bn(model: nn.Module, x: torch.Tensor, batch_size: int, precision: str = "fp32") -> None:
    """Recompute the BatchNorm running statistics of ``model`` (in place) with one pass over ``x``.

    :func:`torch.optim.swa_utils.update_bn` over ``x`` in dataset order, in batches of ``batch_size``: the
    statistics are reset and become the equal-weight average of the per-batch mean and (unbiased) variance.
    """
    with autocast(x.device, precision):
        update_bn(ordered_batches(x, batch_size), model)


@torch.no_grad()
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int, precision: str = "fp32") -> torch.Tensor:
    """``model``'s outputs (N, C) float32 on ``x`` in eval mode, in batches."""
    out = []
    for xb in ordered_batches(x, batch_size):
        with autocast(x.device, precision):
            out.append(model(xb).float())
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Phase:
    """A stretch of training from epoch ``start`` to ``end`` on one schedule, ending in a checkpoint."""

    name: str  # "prefix" | "init" | "sgd" | "swa": the log's phase column
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
    if mode in ("swa", "fge") and cfg.init:
        return [_Phase("init", "swa_branch", 0, 0, False, "start.pt", "start"),
                _Phase(mode, "swa_branch", 0, e, True, "swa.pt", "swa")]
    if mode == "fge":  # the SGD schedule up to swa_start, then FGE's cycles
        return [_Phase("fge", "swa_branch", 0, e, True, "swa.pt", "swa")]
    if mode == "swa":
        return [_Phase("swa", "swa", 0, e, True, "swa.pt", "swa")]
    return [
        _Phase("prefix", "sgd", 0, s, False, "start.pt", "start"),
        _Phase("sgd", "sgd", s, b, False, "sgd.pt", "sgd"),
        _Phase("swa", "swa_branch", s, e, True, "swa.pt", "swa", from_branch_point=True),
    ]


def train(cfg: TrainConfig, out_dir: str | os.PathLike, mode: str = "sgd", *, runtime: RuntimeConfig | None = None,
          overwrite: bool = False, progress: bool = True, **runtime_fields) -> dict[str, Any]:
    """Train one model: a conventional SGD run or a single SWA run (from scratch, or from ``cfg.init``).

    - ``mode='sgd'``: ``epochs`` epochs on the SGD schedule (``lr_at(.., 'sgd')``) -> ``sgd.pt``
      (+ ``sgd_iter_EEE.pt`` after every epoch with ``save_iterates``).
    - ``mode='swa'``: ``swa_budget * epochs`` epochs on the SWA schedule (``lr_at(.., 'swa')``, as in the
      authors' code, then the constant or cyclic SWA rate from ``swa_start``), averaging the weights at the end
      of every cycle of ``swa_c`` epochs (or steps) past ``swa_start``; the average is evaluated at the
      ``swa_evals`` budgets (``swa_budget<B>.pt``) and, BatchNorm statistics recomputed on the (un-augmented)
      training set, saved as ``swa.pt`` at the end (+ ``swa_iter_XXX.pt`` with ``save_iterates``).
    - ``mode='fge'``: Fast Geometric Ensembling (Garipov et al. 2018) and SWA of the same snapshots in one run:
      the SGD schedule up to ``swa_start``, then FGE's triangular cyclic rate (:func:`~widthkit.training.schedule.
      fge_lr`: ``fge_lr_max`` down to ``fge_lr`` and back over every cycle of ``fge_c`` epochs or steps) to
      ``swa_budget * epochs``; at the middle of every cycle (the rate at ``fge_lr``) the weights are saved as a
      snapshot ``fge_XXX.pt`` (the ensemble's members, role ``iterate``, ``extra["snapshot"]`` records the cycle)
      and added to the equal-weight average, saved as ``swa.pt`` as in ``mode='swa'``. At each ``swa_evals``
      budget and at the end the log also holds the ensemble of the snapshots so far (``weights = ensemble``: the
      averaged softmax of the snapshots, each with the BatchNorm statistics it was saved with, as FGE evaluates
      them). With ``cfg.init`` the run starts from the given weights (FGE from a pre-trained solution).
    - ``mode='swa'`` with ``cfg.init``: the paper's fine-tuning protocol. The given weights (any format
      :func:`~widthkit.inputs.checkpoints.load_checkpoint` reads, e.g. a torchvision ``state_dict`` with
      ``model = 'torchvision:resnet50'``) are evaluated and saved as ``start.pt``; then the SWA phase alone
      runs from epoch 0 to ``swa_budget * epochs`` at the constant or cyclic SWA rate.

    Args:
        cfg: the run's configuration.
        out_dir: output folder (created); see the module docstring for what goes into it.
        mode: ``'sgd'``, ``'swa'`` or ``'fge'`` (for the paper's paired protocol use :func:`train_branches`).
        runtime: where and how it runs (:class:`~widthkit.runtime.RuntimeConfig`: device, precision policy,
            CPU threads, the evaluations' batch size); default ``RuntimeConfig()``. Its fields may also be
            passed as keywords (``device="cpu"``, ``precision="bf16"``).
        overwrite: delete this trainer's files in ``out_dir`` first instead of continuing / refusing.
        progress: show a tqdm bar per epoch and a line per finished epoch.

    Returns:
        dict of written paths: ``'sgd'`` or ``'swa'`` (and ``'start'`` with ``init``), ``'budgets'`` ({budget:
        path} of the averages evaluated, ``swa.pt`` for the last), ``'iterates'`` and ``'sgd_iterates'``
        (lists), ``'log'``, ``'state'``.
    """
    if mode not in ("sgd", "swa", "fge"):
        raise ValueError(f"mode must be 'sgd' or 'swa' (or 'fge'; use train_branches for SGD and SWA from one "
                         f"prefix), got {mode!r}")
    if cfg.init and mode == "sgd":
        raise ValueError(f"init={cfg.init!r} starts an SWA (or FGE) phase from given weights: use mode='swa' or 'fge' "
                         "(CLI: --mode swa, the default with --init)")
    return _Run.execute(cfg, out_dir, mode, _runtime(runtime, runtime_fields), overwrite=overwrite, progress=progress)


def train_branches(cfg: TrainConfig, out_dir: str | os.PathLike, *, runtime: RuntimeConfig | None = None,
                   overwrite: bool = False, progress: bool = True, **runtime_fields) -> dict[str, Any]:
    """The paired SGD / SWA protocol: two solutions that share their first ``swa_start`` epochs.

    1. **Prefix**: SGD with momentum on the SGD schedule (``lr`` for the first half of the budget, then linear
       decay towards 1% of ``lr`` at 90% of the budget) for ``swa_start`` epochs -> ``start.pt`` (role
       ``start``). The full training state at this point (weights, momentum buffers, RNG states) is kept in
       ``branch_state.pt``.
    2. **SGD branch**: continue the SGD schedule to the budget ``epochs`` -> ``sgd.pt`` (role ``sgd``): exactly
       the run :func:`train` with ``mode='sgd'`` makes (+ ``sgd_iter_EEE.pt`` after every epoch with
       ``save_iterates``).
    3. **SWA branch**: from the same state at ``swa_start``, SGD at the SWA rate (constant ``swa_lr``, or cyclic
       from ``swa_lr_max`` down to ``swa_lr`` in each cycle) until ``swa_budget * epochs``; at the end of every
       cycle of ``swa_c`` epochs (or steps) the weights are added to an equal-weight
       :class:`~torch.optim.swa_utils.AveragedModel`. At each ``swa_evals`` budget a copy of the average gets
       its BatchNorm statistics recomputed, is evaluated (``log.csv`` rows with ``weights = average``) and saved
       (``swa_budget<B>.pt``). Finally the BatchNorm statistics of the average are recomputed with
       :func:`~torch.optim.swa_utils.update_bn` on the normalised, un-augmented training set in batches of
       ``batch_size`` -> ``swa.pt`` (role ``swa``; the averaged module's weights with clean keys), plus
       ``swa_iter_XXX.pt`` (role ``iterate``) for each averaged iterate when ``save_iterates`` is set.

    The SWA learning rate does not depend on where the run ends, so the average at 1 or 1.25 budgets is the one
    a shorter run would end with: one run gives every column of the paper's Table 1.

    Each finished model is evaluated (eval mode) on the train and test sets; the numbers go into its
    checkpoint's ``metrics`` and ``log.csv``. Interrupted runs continue where they stopped when called again.

    Returns:
        dict of written paths: ``'start'``, ``'sgd'``, ``'swa'``, ``'budgets'`` ({budget: path}),
        ``'iterates'`` and ``'sgd_iterates'`` (lists), ``'log'``, ``'state'``.

    >>> paths = train_branches(load_recipe("digits"), "checkpoints/digits")
    """
    if cfg.init:
        raise ValueError(f"init={cfg.init!r} runs the SWA phase alone from given weights, without an SGD branch: "
                         "use train(cfg, out, 'swa') (CLI: --mode swa, the default with --init)")
    return _Run.execute(cfg, out_dir, "branches", _runtime(runtime, runtime_fields), overwrite=overwrite,
                        progress=progress)


def _runtime(runtime: RuntimeConfig | None, fields: dict) -> RuntimeConfig:
    """``runtime`` (or the defaults) with keyword overrides; an unknown keyword is a ``ValueError``."""
    if runtime is not None and not isinstance(runtime, RuntimeConfig):
        raise ValueError(f"runtime must be a RuntimeConfig, got {type(runtime).__name__}")
    known, unknown = split_kwargs(RuntimeConfig, fields)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; the runtime settings are "
                         f"{sorted(RuntimeConfig.__dataclass_fields__)}; training settings go into the TrainConfig")
    return (runtime or RuntimeConfig()).replace(**known)


class _Run:
    """The mutable state of one training run and the file protocol around it."""

    def __init__(self, cfg: TrainConfig, out: Path, mode: str, runtime: RuntimeConfig, device: torch.device,
                 progress: bool):
        self.cfg, self.out, self.mode, self.device, self.progress = cfg, out, mode, device, progress
        self.runtime = runtime
        self.precision = runtime.precision
        self.eval_batch_size = runtime.eval_batch_size or default_batch_size(device)
        self.plan = _plan(cfg, mode)
        self.data = load_train_data(cfg, device)
        self.steps_per_epoch = steps_per_epoch(len(self.data.y_train), cfg.batch_size)
        self.marks = _check_marks(cfg, mode, self.steps_per_epoch)  # [(budget, epoch)]: before any file
        torch.manual_seed(cfg.seed)  # the model init; inside fork_rng, so the caller's RNG is left alone
        self.model = create_model(cfg.model, num_classes=self.data.num_classes, **cfg.model_kwargs).to(device)
        self.init_sha256 = None
        self.threads = torch.get_num_threads()  # until choose_threads
        if cfg.init:
            given = load_checkpoint(cfg.init, arch=cfg.model, num_classes=self.data.num_classes,
                                    arch_kwargs=cfg.model_kwargs or None, names=TRAINER_NAMES)
            self.model.load_state_dict(given.model.state_dict())
            self.init_sha256 = given.sha256
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # CPU: shuffling and augmentation
        self.averaged: AveragedModel | None = None
        self.phase = self.plan[0].name
        self.epoch = 0
        self.log: list[dict] = []
        self.iterates: list[str] = []
        self.sgd_iterates: list[str] = []
        self.budgets: list[tuple[float, str]] = []

    # ---- entry point ----------------------------------------------------------------------------------

    @classmethod
    def execute(cls, cfg: TrainConfig, out_dir, mode: str, runtime: RuntimeConfig, overwrite: bool,
                progress: bool) -> dict[str, Any]:
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"cfg must be a TrainConfig (see load_recipe / TrainConfig.from_dict), got "
                             f"{type(cfg).__name__}")
        device = runtime.resolved_device()  # once: cuda -> cuda:N
        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"output folder {out} is a file; pass a folder path")
        check_writable(out, create=False)  # a read-only place: one line naming it, before the lock or any data
        # one writer per output folder for the whole run: a second `train --out` of the same folder is refused
        with WriterLock(out):
            return cls._execute_locked(cfg, out, mode, runtime, device, overwrite, progress)

    @classmethod
    def _execute_locked(cls, cfg, out: Path, mode: str, runtime: RuntimeConfig, device, overwrite: bool,
                        progress: bool) -> dict[str, Any]:
        if overwrite and out.is_dir():
            _remove_outputs(out)
        state = _read_state(out) if out.is_dir() else None
        if out.is_dir():
            _check_same_run(state, cfg, mode, out)
        if state is not None and state["phase"] == "done":
            return _finished_paths(out, state, cfg, mode)
        cuda_devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        threads_before = torch.get_num_threads()  # the caller's setting, restored at the end
        try:
            # the analyses' precision policy, TF32 explicit (on for "tf32" only), for the whole run
            with torch.random.fork_rng(devices=cuda_devices), precision_policy(runtime.precision, device):
                run = cls(cfg, out, mode, runtime, device, progress)  # loads the data and builds the model: may still fail
                if state is not None:
                    run.load_state(state)
                out.mkdir(parents=True, exist_ok=True)
                run.choose_threads(None if state is None else state.get("threads"))
                return run.run()
        finally:
            torch.set_num_threads(threads_before)

    def choose_threads(self, recorded: int | None) -> None:
        """The CPU thread count of the whole run: ``runtime.threads``, else the count a resumed run started with
        (bit-identical continuation), else the faster of torch's default and one thread on a few SGD steps of a
        copy of the model. Beside other busy processes torch's default can be ten times slower for small models
        (digits, 2 cores: 237 s with 2 threads, 18 s with one)."""
        if self.device.type != "cpu":  # the GPU does the work: nothing to time
            if self.runtime.threads is not None:
                torch.set_num_threads(self.runtime.threads)
            self.threads = torch.get_num_threads()
            return
        self.threads = choose_threads(self._timed_steps, self.runtime.threads, recorded)["threads"]

    def _timed_steps(self) -> None:
        """Two forward/backward passes of one batch through a copy of the model (no state of the run changes)."""
        with torch.random.fork_rng(devices=[]):
            model = copy.deepcopy(self.model).train()
            xb, yb = self.data.x_train[:self.cfg.batch_size], self.data.y_train[:self.cfg.batch_size]
            for _ in range(2):
                F.cross_entropy(model(xb), yb).backward()

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
        cfg, spe = self.cfg, self.steps_per_epoch
        marks = {e: b for b, e in self.marks}
        for epoch in range(self.epoch, phase.end):
            tic = time.perf_counter()
            in_swa = phase.averaging and epoch >= cfg.swa_start_epoch
            first_step = (epoch - cfg.swa_start_epoch) * spe  # steps of the SWA phase before this epoch
            if in_swa and self.mode == "fge":
                lr_for_step = lambda k, first=first_step: fge_step_lr(first + k + 1, cfg, spe)  # noqa: E731
            elif in_swa and cfg.swa_schedule == "cyclic":
                lr_for_step = _cyclic_steps(cfg, first_step, spe)
            else:
                lr_for_step = None
            lr = lr_for_step(0) if lr_for_step else lr_at(epoch, cfg, phase.schedule)  # cyclic: the first step's
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            collects = fge_snapshot_at if self.mode == "fge" else averages_at

            def after_step(k, epoch=epoch, first_step=first_step):
                # the end of a cycle (Algorithm 1), or the middle of an FGE cycle
                if collects(first_step + k + 1, cfg, spe):
                    self.average(epoch + (k + 1) / spe)

            with _progress_bar(self, phase, epoch) as bar:
                train_loss, train_err = train_epoch(self.model, self.optimizer, self.data, cfg, self.generator,
                                                    on_batch=bar.update, lr_for_step=lr_for_step,
                                                    after_step=after_step if in_swa else None,
                                                    precision=self.precision)
            self.epoch = epoch + 1
            test_loss, test_err = evaluate(self.model, self.data.x_test, self.data.y_test, self.eval_batch_size,
                                           self.precision)
            self.log.append({"phase": phase.name, "weights": "iterate", "epoch": self.epoch,
                             "budget": self.epoch / cfg.epochs, "lr": lr, "train_loss": train_loss,
                             "train_err": train_err, "test_loss": test_loss, "test_err": test_err,
                             "time_s": time.perf_counter() - tic})
            if self.progress:
                _print_row(self.log[-1])
            if phase.name == "sgd" and cfg.save_iterates:
                self._save_sgd_iterate()
            if phase.averaging and self.epoch in marks and self.epoch < phase.end:
                self.evaluate_average(phase, marks[self.epoch])
            self.save_state()

    def average(self, at_epoch: float) -> None:
        if self.averaged is None:
            self.averaged = AveragedModel(self.model)
        self.averaged.update_parameters(self.model)
        if self.cfg.save_iterates or self.mode == "fge":  # FGE's snapshots are its ensemble: always kept
            n = int(self.averaged.n_averaged)
            path = self.out / (f"fge_{n:03d}.pt" if self.mode == "fge" else f"swa_iter_{n:03d}.pt")
            self._save_model(path, self.model, "iterate", self._metrics(extra_rows=[]), n_averaged=n,
                             epoch=_plain_epoch(at_epoch), snapshot=self._snapshot_record(n))
            if str(path) not in self.iterates:
                self.iterates.append(str(path))

    def _snapshot_record(self, n: int) -> dict:
        """What a snapshot's checkpoint records of the schedule it was taken on: its number, the cycle (length and
        unit) and the learning-rate pair (or the constant rate)."""
        cfg = self.cfg
        if self.mode == "fge":
            return {"index": n, "schedule": "fge", "cycle": cfg.fge_c, "cycle_unit": cfg.fge_c_unit,
                    "cycle_steps": fge_cycle_steps(cfg, self.steps_per_epoch), "lr_max": cfg.fge_lr_max,
                    "lr_min": cfg.fge_lr, "taken": "middle of the cycle"}
        cyclic = cfg.swa_schedule == "cyclic"
        return {"index": n, "schedule": cfg.swa_schedule, "cycle": cfg.swa_c, "cycle_unit": cfg.swa_c_unit,
                "cycle_steps": cycle_steps(cfg, self.steps_per_epoch),
                "lr_max": cfg.cycle_lr_max if cyclic else cfg.swa_lr, "lr_min": cfg.swa_lr, "taken": "end of the cycle"}

    def evaluate_ensemble(self, phase: str, epoch: int, budget: float) -> None:
        """FGE: the ensemble of the snapshots so far (their averaged softmax, each with its own BatchNorm
        statistics), logged with ``weights = ensemble``."""
        bs = self.eval_batch_size
        models = [load_checkpoint(p).model.to(self.device).eval() for p in self.iterates]
        row = {"phase": phase, "weights": "ensemble", "epoch": epoch, "budget": budget, "lr": math.nan,
               "time_s": math.nan}
        for split, x, y in (("train", self.data.x_train, self.data.y_train), ("test", self.data.x_test, self.data.y_test)):
            if x is None:
                row[f"{split}_loss"] = row[f"{split}_err"] = math.nan
                continue
            acc = EnsembleAccumulator(y)
            for model in models:
                acc.add(_logits(model, x, bs, self.precision))
            row[f"{split}_loss"], row[f"{split}_err"] = nll_and_error(acc.log_probabilities(), y)
        self.log = [r for r in self.log if not (r["phase"] == phase and r["weights"] == "ensemble"
                                                and r["budget"] == budget)] + [row]
        if self.progress:
            _print_row(row)

    def evaluate_average(self, phase: _Phase, budget: float) -> None:
        """The average at a ``swa_evals`` budget: a copy with its BatchNorm statistics recomputed (the running
        average keeps its own), evaluated, logged and saved as ``swa_budget<B>.pt``."""
        model = copy.deepcopy(self.averaged.module)
        recompute_bn(model, self.data.x_train, self.cfg.batch_size, self.precision)
        row = self._eval_row(phase.name, model, self.epoch, "average", budget)
        self.log.append(row)
        if self.progress:
            _print_row(row)
        path = self.out / budget_file(budget)
        self._save_model(path, model, "swa", self._metrics([row]), n_averaged=int(self.averaged.n_averaged),
                         budget=budget)
        self.budgets = [(b, p) for b, p in self.budgets if b != budget] + [(budget, str(path))]
        if self.mode == "fge":
            self.evaluate_ensemble(phase.name, self.epoch, budget)

    def finish_phase(self, phase: _Phase) -> None:
        """Write the phase's checkpoint (idempotent: a rerun after a kill writes the same file)."""
        if phase.name == "init":  # the given weights as they are: the baseline of the fine-tuning protocol
            row = self._eval_row("init", self.model, 0, "iterate", 0.0)
            self.log = [r for r in self.log if r["phase"] != "init"] + [row]
            if self.progress:
                _print_row(row)
            self._save_model(self.out / phase.output, self.model, "start", self._metrics([row]))
            return
        if phase.role == "start":
            self._save_model(self.out / phase.output, self.model, "start", self._metrics([]))
            atomic_save(self.state_dict(), self.out / BRANCH_FILE)
            return
        model, n_averaged, budget, weights = self.model, None, None, "iterate"
        if phase.averaging:
            model, weights = self.averaged.module, "average"
            n_averaged = int(self.averaged.n_averaged)
            budget = next((b for b, e in self.marks if e == phase.end), self.cfg.swa_budget)
            # the run is over: the average's own statistics are recomputed (update_bn resets them first, so a
            # rerun after a kill gives the same numbers)
            recompute_bn(model, self.data.x_train, self.cfg.batch_size, self.precision)
            self.budgets = [(b, p) for b, p in self.budgets if b != budget] + [(budget, str(self.out / phase.output))]
        final = self._eval_row(f"{phase.name}_final", model, phase.end, weights,
                               budget if budget is not None else phase.end / self.cfg.epochs)
        self.log = [r for r in self.log if r["phase"] != final["phase"]] + [final]
        if self.progress:
            _print_row(final)
        self._save_model(self.out / phase.output, model, phase.role, self._metrics([final]), n_averaged=n_averaged,
                         budget=budget)
        if self.mode == "fge" and phase.averaging:
            self.evaluate_ensemble("ensemble_final", phase.end, budget)
        self.save_state()

    def start_phase(self, phase: _Phase) -> None:
        if phase.from_branch_point:
            kept = self.log, self.iterates, self.sgd_iterates, self.budgets
            self.load_state(safe_load(self.out / BRANCH_FILE))
            self.log, self.iterates, self.sgd_iterates, self.budgets = kept
        self.phase = phase.name
        self.epoch = phase.start
        self.averaged = None
        self.save_state()

    def _save_sgd_iterate(self) -> None:
        path = self.out / f"sgd_iter_{self.epoch:03d}.pt"
        self._save_model(path, self.model, "iterate", self._metrics(extra_rows=[]))
        if str(path) not in self.sgd_iterates:
            self.sgd_iterates.append(str(path))

    def _eval_row(self, phase: str, model: nn.Module, epoch: int, weights: str, budget: float) -> dict:
        bs = self.eval_batch_size
        train_loss, train_err = evaluate(model, self.data.x_train, self.data.y_train, bs, self.precision)
        test_loss, test_err = evaluate(model, self.data.x_test, self.data.y_test, bs, self.precision)
        return {"phase": phase, "weights": weights, "epoch": epoch, "budget": budget, "lr": math.nan,
                "train_loss": train_loss, "train_err": train_err, "test_loss": test_loss, "test_err": test_err,
                "time_s": math.nan}

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

    def _save_model(self, path: Path, model: nn.Module, role: str, metrics: dict, n_averaged: int | None = None,
                    budget: float | None = None, epoch: float | None = None, snapshot: dict | None = None) -> None:
        extra = {"seed": self.cfg.seed, "epoch": self.epoch if epoch is None else epoch, "mode": self.mode}
        if snapshot is not None:
            extra["snapshot"] = snapshot
        if n_averaged is not None:
            extra["n_averaged"] = n_averaged
        if budget is not None:
            extra["budget"] = budget
        if self.init_sha256 is not None:
            extra["init_sha256"] = self.init_sha256
        save_checkpoint(path, model, arch=self.cfg.model, num_classes=self.data.num_classes,
                        arch_kwargs=self.cfg.model_kwargs, dataset=self.cfg.dataset, role=role,
                        config=self.cfg.resolved(), metrics=metrics, extra=extra,
                        provenance=provenance(self.device, self.precision))

    # ---- state files ------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue bit-exactly; plain tensors and containers only."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "mode": self.mode, "config": self.cfg.resolved(),
            "init_sha256": self.init_sha256, "threads": self.threads,
            "phase": self.phase, "epoch": self.epoch,
            "model": cpu_copy(self.model.state_dict()),
            "optimizer": cpu_copy(self.optimizer.state_dict()),
            "averaged": None if self.averaged is None else cpu_copy(self.averaged.state_dict()),
            "n_averaged": 0 if self.averaged is None else int(self.averaged.n_averaged),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "log": [dict(r) for r in self.log],
            "iterates": list(self.iterates),
            "sgd_iterates": list(self.sgd_iterates),
            "budgets": [[b, p] for b, p in self.budgets],
        }

    def load_state(self, state: dict) -> None:
        if state.get("init_sha256") != self.init_sha256:
            raise ValueError(f"{self.out} continues from init weights that have changed since it started "
                             f"({self.cfg.init}: SHA-256 {state.get('init_sha256')} -> {self.init_sha256}); use a new "
                             "output folder (--out) or pass --overwrite (overwrite=True)")
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
        self.sgd_iterates = list(state["sgd_iterates"])
        self.budgets = [(float(b), p) for b, p in state["budgets"]]

    def save_state(self) -> None:
        if self.phase == "done":  # drop the weights: only what a rerun needs to know it is finished
            state = {k: v for k, v in self.state_dict().items()
                     if k not in ("model", "optimizer", "averaged", "generator", "torch_rng", "cuda_rng")}
        else:
            state = self.state_dict()
        atomic_save(state, self.out / STATE_FILE)
        _write_log(self.out / LOG_FILE, self.log)

    def paths(self) -> dict[str, Any]:
        return _paths(self.out, self.cfg, self.mode, self.state_dict())


def _check_marks(cfg: TrainConfig, mode: str, n_steps_per_epoch: int) -> list[tuple[float, int]]:
    """The (budget, epoch) evaluations of the average, checked against the data's step count; [] for SGD."""
    if mode == "sgd":
        return []
    start, end = cfg.swa_start_epoch, cfg.swa_end_epoch
    if mode == "fge":
        c = fge_cycle_steps(cfg, n_steps_per_epoch)
        phase = (end - start) * n_steps_per_epoch
        if c > phase:
            raise ValueError(f"the FGE cycle (fge_c={cfg.fge_c} {cfg.fge_c_unit}, {c} steps) is longer than the FGE "
                             f"phase (epochs {start} to {end}: {phase} steps of {n_steps_per_epoch}); lower fge_c or "
                             "swa_start, or raise swa_budget")
        if c % 2:
            raise ValueError(f"the FGE cycle must be an even number of steps (its snapshot sits at the middle), got "
                             f"fge_c={cfg.fge_c} {cfg.fge_c_unit} = {c} steps of {n_steps_per_epoch} per epoch; use an "
                             "even fge_c")
        return budget_marks(cfg, n_steps_per_epoch, first_average=c // 2)
    if cfg.swa_c_unit == "steps" and (end - start) * n_steps_per_epoch < cfg.swa_c:
        raise ValueError(f"SWA would average no model: its {end - start} epochs of {n_steps_per_epoch} steps are "
                         f"fewer than one cycle of swa_c={cfg.swa_c} steps; lower swa_c or raise swa_budget")
    return budget_marks(cfg, n_steps_per_epoch)


def _cyclic_steps(cfg: TrainConfig, first_step: int, n_steps_per_epoch: int) -> Callable[[int], float]:
    """Step k of an epoch -> its cyclic learning rate (eq. 2), ``first_step`` SWA steps having gone before."""
    return lambda k: swa_step_lr(first_step + k + 1, cfg, n_steps_per_epoch)


def _plain_epoch(epoch: float) -> int | float:
    return int(epoch) if float(epoch).is_integer() else float(epoch)


def _progress_bar(run: _Run, phase: _Phase, epoch: int):
    from tqdm.auto import tqdm

    return tqdm(total=run.steps_per_epoch, desc=f"{phase.name} epoch {epoch + 1}/{phase.end}", leave=False,
                disable=not run.progress, unit="batch")


def _print_row(row: dict) -> None:
    from tqdm.auto import tqdm

    losses = (f"train loss {row['train_loss']:.4f} err {row['train_err']:5.2f}%  "
              f"test loss {row['test_loss']:.4f} err {row['test_err']:5.2f}%")
    if row["weights"] == "ensemble":
        tqdm.write(f"  FGE ensemble after {row['epoch']:4d} epochs ({row['budget']:g} budgets, snapshots' own BN)  "
                   f"{losses}")
    elif row["weights"] == "average" and not row["phase"].endswith("_final"):
        tqdm.write(f"  average after {row['epoch']:4d} epochs ({row['budget']:g} budgets, BN recomputed)  {losses}")
    elif math.isnan(row["lr"]):  # a finished model, evaluated in eval mode
        tqdm.write(f"{row['phase']:>9} after {row['epoch']:4d} epochs      {losses}")
    else:
        tqdm.write(f"{row['phase']:>9} epoch {row['epoch']:4d}  lr {row['lr']:.4g}  {losses}  ({row['time_s']:.1f} s)")


def _paths(out: Path, cfg: TrainConfig, mode: str, state: dict) -> dict[str, Any]:
    outputs = {p.role: str(out / p.output) for p in _plan(cfg, mode)}
    return {**outputs, "budgets": {float(b): p for b, p in state["budgets"]}, "iterates": list(state["iterates"]),
            "sgd_iterates": list(state["sgd_iterates"]), "log": str(out / LOG_FILE), "state": str(out / STATE_FILE)}


def _finished_paths(out: Path, state: dict, cfg: TrainConfig, mode: str) -> dict[str, Any]:
    paths = _paths(out, cfg, mode, state)
    missing = [p for k, p in paths.items() if isinstance(p, str) and not Path(p).is_file()]
    missing += [p for p in [*paths["iterates"], *paths["sgd_iterates"], *paths["budgets"].values()]
                if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{out} holds a finished run but {missing} are gone; rerun with --overwrite "
                         "(overwrite=True) to train again")
    return paths


def cpu_copy(obj: Any) -> Any:
    """A copy of a (nested) state dict with every tensor detached on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(row[k], float) and math.isnan(row[k]) else row[k])
                         for k in LOG_COLUMNS})
    atomic_write(path, buf.getvalue())


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a run's ``log.csv`` as dicts: ``phase`` and ``weights`` as text, every other column a float
    (NaN where empty)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    text = ("phase", "weights")
    return [{k: (v if k in text else (float(v) if v not in ("", None) else math.nan)) for k, v in r.items()}
            for r in rows]


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
    names = {STATE_FILE, BRANCH_FILE, LOG_FILE, "start.pt", "sgd.pt", "swa.pt"}
    return sorted([p for p in out.iterdir() if p.name in names] + [p for g in OUTPUT_GLOBS for p in out.glob(g)])


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
    defaults = TrainConfig().resolved()  # a field added since the run started counts as its default
    changed = [f"{k}: {old.get(k, defaults.get(k))!r} -> {new[k]!r}" for k in new
               if k not in RESUME_FREE_FIELDS and old.get(k, defaults.get(k)) != new[k]]
    if changed:
        raise ValueError(f"{out} holds a run with a different config ({'; '.join(changed)}); " + fix)
