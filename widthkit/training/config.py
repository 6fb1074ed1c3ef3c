"""The training configuration: one typed dataclass, validated once, the same names in API, CLI, TOML and outputs.

Izmailov, Podoprikhin, Garipov, Vetrov, Wilson (2018), "Averaging Weights Leads to Wider Optima and Better
Generalization", https://arxiv.org/abs/1803.05407. The budget B (``epochs``) is the length of a conventional SGD
run; the SWA phase starts at ``swa_start`` and ends at ``swa_budget * epochs``; the averaged model is evaluated
at the budgets ``swa_evals`` (the paper's Table 1 reports 1, 1.25 and 1.5 budgets).
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass
from typing import Literal

from ..inputs.data import IMAGEFOLDER_PREFIX, list_datasets
from ..models import model_input_shape
from ..runtime import RUNTIME_FIELDS
from ..settings import base_type, check_choice, choices_of, field_types, from_dict, option

__all__ = ["TrainConfig", "SWA_SCHEDULES", "CYCLE_UNITS", "PAPER_BUDGETS", "budget_epoch", "budget_marks"]

SWA_SCHEDULES = ("constant", "cyclic")
CYCLE_UNITS = ("epochs", "steps")
PAPER_BUDGETS = (1.0, 1.25, 1.5)  # the SWA columns of the paper's Table 1


@dataclass
class TrainConfig:
    """Everything that determines a training run; the defaults are the bundled ``digits`` recipe.

    Epoch counts are whole epochs; ``epochs`` is the budget B of the paper (the length of a conventional SGD
    run). Learning rates are per SGD step, weight decay is the L2 coefficient of ``torch.optim.SGD``.
    Construction validates every value and raises ``ValueError`` saying what to change.
    """

    model: str = option("digits_cnn", "architecture: a name from widthkit.models.list_models() or 'torchvision:NAME'")
    model_kwargs: dict = option({}, "extra create_model arguments, e.g. {\"depth\": 56} (CLI: JSON)")
    dataset: str = option("digits", "dataset: a name from widthkit.data.list_datasets() or 'imagefolder:PATH'",
                          flag="--data", old=("--dataset",))
    data_root: str | None = option(None, "folder holding the CIFAR folders (default: $WIDTHKIT_DATA or ./data)")
    epochs: int = option(20, "budget B: epochs of the SGD run")
    batch_size: int = option(64, "images per SGD step")
    lr: float = option(0.1, "initial learning rate (constant for the first half of the budget)")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(5e-4, "L2 weight decay of torch.optim.SGD")
    swa_schedule: Literal["constant", "cyclic"] = option(
        "constant", "learning rate of the SWA phase: constant swa_lr, or cyclic: linear from swa_lr_max down to "
                    "swa_lr within each cycle of swa_c epochs/steps (Izmailov et al. 2018, eq. 2)")
    swa_lr: float = option(0.05, "constant learning rate of the SWA phase (cyclic: alpha2, the rate at each "
                                 "cycle's end)")
    swa_lr_max: float | None = option(None, "cyclic schedule: alpha1, the rate at the start of each cycle "
                                            "(default: lr)")
    swa_start: int | None = option(None, "epoch at which SWA branches off / starts averaging (default: 0.75*epochs; "
                                         "0 with init)")
    swa_budget: float = option(1.5, "SWA ends after swa_budget*epochs epochs (the paper: 1, 1.25 or 1.5)")
    swa_c: int = option(1, "cycle length c: average every c epochs (or steps, see swa_c_unit); the period of the "
                           "cyclic schedule")
    swa_c_unit: Literal["epochs", "steps"] = option("epochs", "unit of swa_c")
    swa_evals: tuple[float, ...] | None = option(
        None, "budgets at which the running average is evaluated (BatchNorm recomputed, on a copy) and saved "
              "(default: the paper's 1, 1.25, 1.5 that fall within the SWA phase)", nargs="+", type=float,
        metavar="BUDGET")
    init: str | None = option(None, "start from these weights (any format load_checkpoint reads, torchvision "
                                    "state dicts included) and run the SWA phase only", metavar="FILE")
    seed: int = option(0, "seed of the model init, the shuffling and the augmentation")
    augment: bool = option(False, "random crop (zero-padded by `pad`, black pixels) and flip of training images")
    pad: int = option(4, "padding of the random crop, pixels per side")
    flip: bool = option(True, "random horizontal flips when augment is on")
    fge_c: int = option(2, "FGE (--mode fge) cycle length c, in fge_c_unit: the rate falls linearly from fge_lr_max "
                           "to fge_lr over the first half of each cycle, where a snapshot is taken, and rises back "
                           "over the second (Garipov et al. 2018); an even number of steps")
    fge_c_unit: Literal["epochs", "steps"] = option("epochs", "unit of fge_c")
    fge_lr_max: float = option(0.05, "FGE: alpha1, the rate at each cycle's start and end")
    fge_lr: float = option(5e-4, "FGE: alpha2, the rate at each cycle's middle, where the snapshot is taken")
    save_iterates: bool = option(False, "also save the SGD iterates: each one SWA averages (swa_iter_XXX.pt) and "
                                        "every epoch's of the SGD branch (sgd_iter_EEE.pt), with their epoch")

    def __post_init__(self) -> None:
        self.model_kwargs = dict(self.model_kwargs) if isinstance(self.model_kwargs, dict) else self.model_kwargs
        if isinstance(self.swa_evals, list):  # a TOML array
            self.swa_evals = tuple(self.swa_evals)
        _check_types(self)
        _check_values(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build a config from a plain dict (a TOML table, a checkpoint's recorded config).

        Raises:
            ValueError: a key that is not a field (the message lists the valid ones) or an invalid value.
        """
        moved = [k for k in RUNTIME_FIELDS if k in values]
        if moved:
            raise ValueError(f"{', '.join(moved)} {'is a runtime setting' if len(moved) == 1 else 'are runtime settings'}"
                             f", not part of the training config: pass --{moved[0].replace('_', '-')} on the command "
                             f"line (in Python: runtime=RuntimeConfig({moved[0]}=...))")
        return from_dict(cls, values, "training config")

    def to_dict(self) -> dict:
        """The fields as a plain dict (``model_kwargs`` copied)."""
        return asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with some fields changed (unknown names raise ``ValueError``)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @property
    def swa_start_epoch(self) -> int:
        """``swa_start`` with its default filled in: ``floor(0.75 * epochs)``, at least 1; 0 with ``init``."""
        if self.swa_start is not None:
            return self.swa_start
        return 0 if self.init else max(1, math.floor(0.75 * self.epochs))

    @property
    def swa_end_epoch(self) -> int:
        """Epoch at which the SWA run ends: ``swa_budget * epochs`` rounded half up."""
        return budget_epoch(self.swa_budget, self.epochs)

    @property
    def cycle_lr_max(self) -> float:
        """alpha1 of the cyclic schedule: ``swa_lr_max``, default ``lr``."""
        return self.swa_lr_max if self.swa_lr_max is not None else self.lr

    def resolved(self) -> dict:
        """The config as saved into outputs: a dict with ``swa_start`` filled in."""
        return {**self.to_dict(), "swa_start": self.swa_start_epoch}


def budget_epoch(budget: float, epochs: int) -> int:
    """The epoch that ends ``budget`` budgets of ``epochs`` epochs: ``budget * epochs`` rounded half up."""
    return math.floor(budget * epochs + 0.5)


def _check_types(cfg: TrainConfig) -> None:
    for name, hint in field_types(TrainConfig).items():
        value = getattr(cfg, name)
        kind, optional = base_type(hint)
        if value is None and optional:
            continue
        choices = choices_of(hint)
        if choices:
            check_choice(name, value, choices)
            continue
        if typing.get_origin(kind) is tuple:
            ok = isinstance(value, tuple) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            if not ok:
                raise ValueError(f"training config {name!r} must be a list of numbers, got {value!r}")
            setattr(cfg, name, tuple(float(v) for v in value))
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
    _require(cfg.swa_c >= 1, f"swa_c (the cycle length, in {cfg.swa_c_unit}) must be >= 1, got {cfg.swa_c}")
    _check_cyclic(cfg)
    _require(cfg.fge_c >= 1, f"fge_c (the FGE cycle length, in {cfg.fge_c_unit}) must be >= 1, got {cfg.fge_c}")
    _require(math.isfinite(cfg.fge_lr) and cfg.fge_lr > 0, f"fge_lr (alpha2) must be a positive number, got {cfg.fge_lr}")
    _require(math.isfinite(cfg.fge_lr_max) and cfg.fge_lr_max >= cfg.fge_lr,
             f"fge_lr_max (alpha1, the rate at each FGE cycle's start) must be a number >= fge_lr (alpha2, its "
             f"middle) = {cfg.fge_lr}, got {cfg.fge_lr_max}")
    if cfg.init is not None:
        _require(cfg.init.strip() != "", "init must name a checkpoint file, got an empty string")
        _require(cfg.swa_start is None,
                 f"with init the run is the SWA phase alone, from epoch 0; leave swa_start unset (got "
                 f"{cfg.swa_start}; CLI: --swa-start auto)")
    elif cfg.swa_start is not None:
        _require(1 <= cfg.swa_start <= cfg.epochs,
                 f"swa_start={cfg.swa_start} is outside the budget: it must be in [1, epochs={cfg.epochs}]; "
                 f"lower swa_start (or leave it unset for 0.75*epochs = {max(1, math.floor(0.75 * cfg.epochs))}; "
                 f"CLI: --swa-start auto) or raise epochs")
    _require(math.isfinite(cfg.swa_budget) and cfg.swa_budget > 0,
             f"swa_budget must be a positive number of budgets (1, 1.25, 1.5), got {cfg.swa_budget}")
    start, end = cfg.swa_start_epoch, cfg.swa_end_epoch
    _require(end > start,
             f"SWA would average no model: it runs from epoch swa_start={start} to swa_budget*epochs={end}; raise "
             f"swa_budget or lower swa_start")
    if cfg.swa_c_unit == "epochs":  # with steps, the step count per epoch (the data) decides: checked at the start
        _require((end - start) // cfg.swa_c >= 1,
                 f"SWA would average no model: it runs from epoch swa_start={start} to swa_budget*epochs={end} and "
                 f"averages every swa_c={cfg.swa_c} epochs; raise swa_budget or lower swa_start or swa_c")
        budget_marks(cfg, steps_per_epoch=1)  # explicit swa_evals checked now
    elif cfg.swa_evals is not None:
        for b in cfg.swa_evals:
            _check_mark_range(cfg, b)


def _check_cyclic(cfg: TrainConfig) -> None:
    if cfg.swa_lr_max is None:
        return
    _require(cfg.swa_schedule == "cyclic",
             f"swa_lr_max={cfg.swa_lr_max} is the cyclic schedule's alpha1, but swa_schedule='constant'; set "
             f"swa_schedule = 'cyclic' (CLI: --swa-schedule cyclic) or leave swa_lr_max out")
    _require(math.isfinite(cfg.swa_lr_max) and cfg.swa_lr_max >= cfg.swa_lr,
             f"swa_lr_max (alpha1, the rate at each cycle's start) must be a number >= swa_lr (alpha2, the rate at "
             f"its end) = {cfg.swa_lr}, got {cfg.swa_lr_max}")


def _check_mark_range(cfg: TrainConfig, budget: float) -> int:
    _require(math.isfinite(budget) and budget > 0, f"swa_evals marks must be positive numbers of budgets, got {budget}")
    epoch = budget_epoch(budget, cfg.epochs)
    _require(epoch <= cfg.swa_end_epoch,
             f"swa_evals mark {budget:g} (epoch {epoch}) lies beyond the end of SWA (swa_budget={cfg.swa_budget:g}, "
             f"epoch {cfg.swa_end_epoch}); drop it or raise swa_budget")
    _require(epoch > cfg.swa_start_epoch,
             f"swa_evals mark {budget:g} (epoch {epoch}) is not after the start of SWA (epoch "
             f"{cfg.swa_start_epoch}): there is no average to evaluate yet; drop it or lower swa_start")
    return epoch


def budget_marks(cfg: TrainConfig, steps_per_epoch: int, first_average: int | None = None) -> list[tuple[float, int]]:
    """(budget, epoch) of each evaluation of the running average, in order of epoch.

    ``swa_evals`` given: every mark must lie within the SWA phase, after its first average, and no two marks
    may fall on the same epoch (``ValueError`` otherwise). ``swa_evals`` unset: the paper's 1, 1.25 and 1.5
    budgets that satisfy this; of marks that round to the same epoch (short runs) the one nearest its true
    budget, epoch / epochs, is kept.

    Args:
        cfg: the run's config.
        steps_per_epoch: SGD steps per epoch (decides when the first average exists for ``swa_c_unit='steps'``).
        first_average: the SWA phase's step after which the first model is averaged (default: one cycle of
            ``swa_c``; FGE: half of one of its cycles).
    """
    start = cfg.swa_start_epoch
    cycle = cfg.swa_c * (steps_per_epoch if cfg.swa_c_unit == "epochs" else 1) if first_average is None \
        else first_average

    def averaged(epoch: int) -> bool:  # at least one average by the end of this epoch
        return (epoch - start) * steps_per_epoch >= cycle

    out: list[tuple[float, int]] = []
    if cfg.swa_evals is None:
        by_epoch: dict[int, float] = {}
        for b in PAPER_BUDGETS:
            e = budget_epoch(b, cfg.epochs)
            # marks that round to one epoch (short runs): the one nearest that epoch's true budget
            if start < e <= cfg.swa_end_epoch and averaged(e) and (
                    e not in by_epoch or abs(b - e / cfg.epochs) <= abs(by_epoch[e] - e / cfg.epochs)):
                by_epoch[e] = b
        return [(b, e) for e, b in sorted(by_epoch.items())]
    for b in cfg.swa_evals:
        e = _check_mark_range(cfg, b)
        _require(averaged(e), f"swa_evals mark {b:g} (epoch {e}) comes before the first average (after {cycle} "
                              f"steps of SWA); drop it or lower swa_c (fge_c)")
        clash = [x for x, ex in out if ex == e]
        if clash:
            raise ValueError(f"swa_evals marks {clash[0]:g} and {b:g} both fall on epoch {e} (epochs={cfg.epochs}); "
                             "keep one of them")
        out.append((b, e))
    return sorted(out, key=lambda m: m[1])


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_model_name(name: str) -> None:
    try:
        model_input_shape(name)
    except ValueError as err:
        raise ValueError(f"training config 'model': {err}") from None


def _check_dataset_name(name: str) -> None:
    if name == IMAGEFOLDER_PREFIX:
        raise ValueError(f"training config 'dataset' is {IMAGEFOLDER_PREFIX!r} without a folder: pass your data "
                         f"folder, e.g. --dataset {IMAGEFOLDER_PREFIX}/data/imagenet (class sub-folders under "
                         "train/ and test/)")
    if name.startswith(IMAGEFOLDER_PREFIX):
        return
    if name not in list_datasets():
        raise ValueError(f"training config 'dataset': unknown dataset {name!r}; valid names: {list_datasets()} "
                         f"or '{IMAGEFOLDER_PREFIX}PATH'")
