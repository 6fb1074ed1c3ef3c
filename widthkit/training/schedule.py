"""Learning-rate schedules and averaging times of the SWA paper, as small functions of the step or epoch.

Izmailov et al. 2018, https://arxiv.org/abs/1803.05407: section 3.1 (the SGD baseline schedule and the switch
to a constant rate), eq. 2 (the cyclic schedule) and Algorithm 1 (averaging at the end of each cycle). Garipov
et al. 2018, https://arxiv.org/abs/1802.10026, section 5: FGE's triangular cyclic rate and its snapshots at the
middle of each cycle (:func:`fge_lr`, :func:`fge_snapshot_at`).
"""

from __future__ import annotations

from .config import TrainConfig

__all__ = ["SCHEDULES", "SGD_FINAL_RATIO", "schedule_factor", "lr_at", "cyclic_lr", "steps_per_epoch",
           "cycle_steps", "swa_step_lr", "averages_at", "fge_lr", "fge_cycle_steps", "fge_step_lr",
           "fge_snapshot_at"]

SCHEDULES = ("sgd", "swa", "swa_branch")  # the `branch` argument of lr_at
SGD_FINAL_RATIO = 0.01  # the SGD schedule ends at 1% of the initial learning rate


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
            - ``'swa_branch'``: the SWA branch of :func:`~widthkit.training.trainer.train_branches`, ``'sgd'``
              before ``swa_start`` (the shared prefix) and the constant ``swa_lr`` from ``swa_start`` on.

        ``factor`` is :func:`schedule_factor`: 1 up to t = 0.5, linear to the ratio at t = 0.9, then constant.
        With ``swa_schedule='cyclic'`` the SWA phase sets its rate per step instead (:func:`swa_step_lr`).

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


def cyclic_lr(i: int, c: int, lr_max: float, lr_min: float) -> float:
    """The cyclic learning rate of Izmailov et al. 2018, eq. 2, at SGD iteration ``i`` (1, 2, ...).

    ``t(i) = (((i - 1) mod c) + 1) / c`` and ``alpha(i) = (1 - t(i)) * alpha1 + t(i) * alpha2``: within each
    cycle of ``c`` iterations the rate falls linearly and reaches ``alpha2 = lr_min`` at the cycle's last
    iteration, whose weights SWA averages.

    >>> [round(cyclic_lr(i, 4, 0.05, 0.01), 4) for i in range(1, 6)]
    [0.04, 0.03, 0.02, 0.01, 0.04]
    """
    if isinstance(i, bool) or not isinstance(i, int) or i < 1:
        raise ValueError(f"the iteration i counts from 1, got {i!r}")
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"the cycle length c must be an int >= 1, got {c!r}")
    t = ((i - 1) % c + 1) / c
    return (1 - t) * lr_max + t * lr_min


def steps_per_epoch(n: int, batch_size: int) -> int:
    """SGD steps in one epoch over ``n`` images: one per batch, a final batch of a single image dropped (see
    :func:`~widthkit.training.trainer.shuffled_batches`)."""
    return max(1, n // batch_size + (n % batch_size > 1))


def cycle_steps(cfg: TrainConfig, n_steps_per_epoch: int) -> int:
    """The cycle length c in SGD steps: ``swa_c`` epochs or steps (``swa_c_unit``)."""
    return cfg.swa_c * (n_steps_per_epoch if cfg.swa_c_unit == "epochs" else 1)


def swa_step_lr(i: int, cfg: TrainConfig, n_steps_per_epoch: int) -> float:
    """Learning rate of the ``i``-th SGD step (from 1) of the SWA phase: ``swa_lr`` (constant schedule) or
    :func:`cyclic_lr` from ``swa_lr_max`` to ``swa_lr`` over cycles of :func:`cycle_steps` steps."""
    if cfg.swa_schedule == "constant":
        return cfg.swa_lr
    return cyclic_lr(i, cycle_steps(cfg, n_steps_per_epoch), cfg.cycle_lr_max, cfg.swa_lr)


def averages_at(i: int, cfg: TrainConfig, n_steps_per_epoch: int) -> bool:
    """Whether SWA adds the weights after the ``i``-th SGD step (from 1) of the SWA phase to its average: at the
    end of every cycle (Algorithm 1), i.e. every ``swa_c`` epochs (or steps) from ``swa_start`` on."""
    return i % cycle_steps(cfg, n_steps_per_epoch) == 0


def fge_lr(i: int, c: int, lr_max: float, lr_min: float) -> float:
    """FGE's cyclic learning rate (Garipov et al. 2018, section 5) at SGD iteration ``i`` (1, 2, ...) over cycles
    of ``c`` iterations: with ``t(i) = (((i - 1) mod c) + 1) / c``, ``alpha = (1 - 2t)·alpha1 + 2t·alpha2`` for
    t <= 1/2 and ``(2 - 2t)·alpha2 + (2t - 1)·alpha1`` after: down from alpha1 to alpha2 = ``lr_min`` at the
    cycle's middle (where FGE takes its snapshot), back up to alpha1 = ``lr_max`` at its end.

    >>> [round(fge_lr(i, 4, 0.05, 0.01), 4) for i in range(1, 6)]
    [0.03, 0.01, 0.03, 0.05, 0.03]
    """
    if isinstance(i, bool) or not isinstance(i, int) or i < 1:
        raise ValueError(f"the iteration i counts from 1, got {i!r}")
    if isinstance(c, bool) or not isinstance(c, int) or c < 2 or c % 2:
        raise ValueError(f"the FGE cycle length c must be an even int >= 2 (its snapshot sits at the middle), got {c!r}")
    t = ((i - 1) % c + 1) / c
    if t <= 0.5:
        return (1 - 2 * t) * lr_max + 2 * t * lr_min
    return (2 - 2 * t) * lr_min + (2 * t - 1) * lr_max


def fge_cycle_steps(cfg: TrainConfig, n_steps_per_epoch: int) -> int:
    """The FGE cycle length in SGD steps: ``fge_c`` epochs or steps (``fge_c_unit``)."""
    return cfg.fge_c * (n_steps_per_epoch if cfg.fge_c_unit == "epochs" else 1)


def fge_step_lr(i: int, cfg: TrainConfig, n_steps_per_epoch: int) -> float:
    """Learning rate of the ``i``-th SGD step (from 1) of the FGE phase (:func:`fge_lr` with the config's pair)."""
    return fge_lr(i, fge_cycle_steps(cfg, n_steps_per_epoch), cfg.fge_lr_max, cfg.fge_lr)


def fge_snapshot_at(i: int, cfg: TrainConfig, n_steps_per_epoch: int) -> bool:
    """Whether FGE takes a snapshot after the ``i``-th SGD step (from 1) of its phase: at the middle of every cycle,
    where the rate reaches alpha2."""
    c = fge_cycle_steps(cfg, n_steps_per_epoch)
    return i % c == c // 2
