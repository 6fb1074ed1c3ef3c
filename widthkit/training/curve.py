"""Training a curve between two fixed solutions (Garipov et al. 2018, section 3; the authors' train.py with
``--curve --fix_start --fix_end``), with the trainer's pieces: :func:`~widthkit.training.trainer.train_epoch`
(shuffled batches, augmentation, one t ~ U(0, 1) per batch drawn by the
:class:`~widthkit.engine.curves.CurveModel`, the L2 term ½·wd·‖φ(t)‖² as its penalty), the paper's SGD schedule
(:func:`~widthkit.training.schedule.schedule_factor`: the rate constant for the first half of the epochs, linear to
1% at 90%, then constant; the authors' learning-rate schedule for curves), atomic saves and the writer lock.

Files beside the curve's evaluation (``X.h5``):

- ``X.curve.pt``: the trained curve: its control points (start, bends, end, θ layout order), kind, the settings,
  the endpoints' checkpoints and SHA-256, the per-epoch log; ``torch.load(weights_only=True)`` reads it;
- ``X.curve-state.pt`` while it trains: everything needed to continue after the last finished epoch (the bends,
  the momentum buffers, the shuffling and t generators, torch's RNG state); after a kill the same call continues
  from there, bit-identically on the CPU, and removes it when done.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.curves import CurveModel
from ..fileio import WriterLock
from ..inputs.checkpoints import atomic_save, safe_load
from ..runtime import precision_policy, provenance
from .schedule import SGD_FINAL_RATIO, schedule_factor
from .trainer import TrainData, cpu_copy, train_epoch

CURVE_FORMAT = "widthkit-curve"
STATE_FORMAT = "widthkit-curve-state"
VERSION = 1


@dataclass
class CurveTraining:
    """The resolved settings of one curve's training (recorded in its checkpoint; a different one is refused on
    resume). ``batch_size``, ``augment``, ``pad``, ``flip`` are what
    :func:`~widthkit.training.trainer.train_epoch` reads; ``precision`` is the runtime policy it trains under."""

    kind: str
    bends: int
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    augment: bool
    seed: int
    pad: int = 4
    flip: bool = True
    precision: str = "fp32"

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"the curve needs at least one epoch of training, got epochs={self.epochs}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the curve's learning rate must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lr_at(self, epoch: int) -> float:
        """The rate of the epoch after ``epoch`` finished ones: lr·factor(epoch / epochs, 0.01)."""
        return self.lr * schedule_factor(epoch / self.epochs, SGD_FINAL_RATIO)


def state_path(path: Path) -> Path:
    """Where the training state of the curve checkpoint ``path`` lives while it trains."""
    return path.with_name(path.name[:-3] + "-state.pt" if path.name.endswith(".pt") else path.name + "-state")


def train_curve(curve: CurveModel, data: TrainData, settings: CurveTraining, path, *, identity: dict,
                overwrite: bool = False, progress: bool = True) -> list[dict]:
    """Train (or load, or continue training) the bends of ``curve`` and save the curve as ``path``.

    Args:
        curve: the curve model (its bends are set to the trained ones on return).
        data: the training split on the curve's device (``x_train``, ``y_train``, ``fill``).
        settings: the training settings.
        path: the curve checkpoint (``.pt``).
        identity: what else must match for a finished or interrupted curve to be reused (endpoints' checkpoints and
            SHA-256, θ size, the data).
        overwrite: train afresh even when ``path`` or its state exists.
        progress: a bar per epoch and a line per finished epoch.

    Returns:
        The per-epoch log: ``{"epoch", "lr", "train_loss" (cross-entropy at the sampled t, nats), "train_err"
        (%), "time_s"}``.

    Raises:
        ValueError: ``path`` (or its state) holds another curve (names what differs).
    """
    path = Path(path)
    record = {"settings": settings.to_dict(), **identity}
    with WriterLock(path):
        spath = state_path(path)
        if overwrite:
            path.unlink(missing_ok=True)
            spath.unlink(missing_ok=True)
        if path.exists():
            done = _read(path, CURVE_FORMAT, record)
            with torch.no_grad():
                curve.bends.copy_(done["bends"].to(curve.bends))
            return list(done["log"])
        state = _read(spath, STATE_FORMAT, record) if spath.exists() else None
        optimizer = torch.optim.SGD([curve.bends], lr=settings.lr, momentum=settings.momentum, weight_decay=0.0)
        shuffle = torch.Generator().manual_seed(settings.seed)
        curve.generator.manual_seed(settings.seed + 1)
        device = curve.bends.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        # the caller's RNG is left as it was; the runtime precision policy applied, as in the trainer
        with torch.random.fork_rng(devices=cuda), precision_policy(settings.precision, device):
            torch.manual_seed(settings.seed)  # dropout, where the network has it
            epoch, log = 0, []
            if state is not None:
                epoch, log = int(state["epoch"]), list(state["log"])
                with torch.no_grad():
                    curve.bends.copy_(state["bends"].to(curve.bends))
                optimizer.load_state_dict(state["optimizer"])
                shuffle.set_state(state["shuffle"])
                curve.generator.set_state(state["t_generator"])
                torch.set_rng_state(state["torch_rng"])
                if cuda and state["cuda_rng"]:
                    torch.cuda.set_rng_state_all(state["cuda_rng"])
            for epoch in range(epoch, settings.epochs):
                log.append(_epoch(curve, optimizer, data, settings, shuffle, epoch, progress))
                atomic_save({"format": STATE_FORMAT, "version": VERSION, "record": record, "epoch": epoch + 1,
                             "log": log, "bends": curve.bends.detach().cpu().clone(),
                             "optimizer": cpu_copy(optimizer.state_dict()), "shuffle": shuffle.get_state(),
                             "t_generator": curve.generator.get_state(), "torch_rng": torch.get_rng_state(),
                             "cuda_rng": torch.cuda.get_rng_state_all() if cuda else []}, spath)
        atomic_save({"format": CURVE_FORMAT, "version": VERSION, "record": record, "kind": settings.kind,
                     "start": curve.start.cpu().clone(), "bends": curve.bends.detach().cpu().clone(),
                     "end": curve.end.cpu().clone(), "log": log, "provenance": provenance(device, settings.precision)}, path)
        spath.unlink(missing_ok=True)
        return log


def _epoch(curve, optimizer, data, settings: CurveTraining, shuffle, epoch: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    lr = settings.lr_at(epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr
    tic = time.perf_counter()
    steps = -(-len(data.y_train) // settings.batch_size)
    with tqdm(total=steps, desc=f"curve epoch {epoch + 1}/{settings.epochs}", leave=False, disable=not progress,
              unit="batch") as bar:
        loss, err = train_epoch(curve, optimizer, data, settings, shuffle, on_batch=bar.update, penalty=curve.penalty,
                                precision=settings.precision)
    row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss, "train_err": err, "time_s": time.perf_counter() - tic}
    if progress:
        tqdm.write(f"    curve epoch {epoch + 1:4d}  lr {lr:.4g}  train loss {loss:.4f} err {err:5.2f}% at random t  "
                   f"({row['time_s']:.1f} s)")
    return row


def _read(path: Path, fmt: str, record: dict) -> dict:
    """A curve checkpoint or state made with ``record``, else a ``ValueError`` saying what differs."""
    try:
        obj = safe_load(path)
    except Exception as err:
        raise ValueError(f"cannot read {path} ({err}); pass --overwrite (overwrite=True) to train the curve again") \
            from None
    if not isinstance(obj, dict) or obj.get("format") != fmt or obj.get("version") != VERSION:
        raise ValueError(f"{path} is not a curve file this widthkit writes; move it away or pass --overwrite")
    old = obj["record"]
    differ = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k))
    if "settings" in differ:
        differ.remove("settings")
        differ += [f"settings.{k}" for k in sorted(set(old["settings"]) | set(record["settings"]))
                   if old["settings"].get(k) != record["settings"].get(k)]
    if differ:
        raise ValueError(f"{path} holds a curve trained with other settings or endpoints ({', '.join(differ)}); "
                         "use another --out, or pass --overwrite to train it again")
    return obj
