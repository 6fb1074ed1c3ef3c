"""The one skeleton every analysis runs through: prepare, lay out the grid, evaluate it into its file, finish.

rays, line and plane (:mod:`widthkit.analyses.kinds`) only say which points they want: an origin, a basis and
the coordinates of every grid point, with what the coordinates mean. Everything else happens here, once:
models and data resolved (:func:`prepare`), the file opened or resumed under its writer lock, the pending
points shared out (torchrun), progress reported, the lock held over whatever the caller does with the
finished result (widths, figures), temporary files removed.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..runtime import distributed
from ..engine.config import EvalConfig
from ..engine.evaluator import Evaluator
from ..report import store
from ..runtime import RuntimeConfig, choose_threads, provenance, start
from ..settings import split_kwargs
from .result import Analysis
from .subjects import Subject, as_subjects, check_model_fits_data, recorded_weight_decay, resolve_data

# (points done, points in total); between two writes, points that take long also report the points evaluated
# so far, the current one fractionally (a float: see within_points)
ProgressFn = Callable[[float, int], None]
AfterFn = Callable[[Analysis], object]  # runs on the finished result, still under the writer lock


def configs_of(config: EvalConfig | None, runtime: RuntimeConfig | None, kwargs: dict
               ) -> tuple[EvalConfig, RuntimeConfig]:
    """The evaluation and runtime configs of an API call: ``config`` and ``runtime`` (or their defaults) with
    keyword overrides routed by field name (``bn_mode=`` to the evaluation config, ``device=`` to the runtime
    config); an unknown keyword is a ``ValueError`` listing the valid ones. Both are validated here, together,
    before any work."""
    known, rest = split_kwargs(EvalConfig, kwargs)
    how, unknown = split_kwargs(RuntimeConfig, rest)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; the evaluation settings are "
                         f"{sorted(EvalConfig.__dataclass_fields__)}, the runtime settings "
                         f"{sorted(RuntimeConfig.__dataclass_fields__)} (and the analysis' own, see its docstring)")
    cfg = (config or EvalConfig()).replace(**known) if known else (config or EvalConfig())
    rt = (runtime or RuntimeConfig()).replace(**how) if how else (runtime or RuntimeConfig())
    cfg.check_runtime(rt)
    return cfg, rt


@dataclass
class Setup:
    """Models, data and device of one analysis, resolved and checked against each other."""

    subjects: list[Subject]
    cfg: EvalConfig  # weight_decay resolved (the checkpoints' recorded value when not given)
    runtime: RuntimeConfig
    device: torch.device  # runtime.device resolved, once
    train: object
    test: object
    data_desc: dict
    _evaluators: dict = field(default_factory=dict)

    def evaluator(self, i: int = 0) -> Evaluator:
        """The evaluator of model ``i`` (built on first use: line and plane need only the first)."""
        if i not in self._evaluators:
            self._evaluators[i] = Evaluator(self.subjects[i].model, train=self.train, test=self.test,
                                            config=self.cfg, runtime=self.runtime)
        return self._evaluators[i]

    def theta(self, i: int) -> torch.Tensor:
        """θ of model ``i`` in the first evaluator's layout, on the device."""
        return self.evaluator(0).layout.flatten(self.subjects[i].model).to(self.device)


def prepare(models, data, cfg: EvalConfig, runtime: RuntimeConfig, *, arch=None, which=None,
            count: Sequence[int] | None = None, what: str = "") -> Setup:
    """Resolve the models (``count``: allowed numbers of them, ``what`` names the analysis in the error),
    the device and the data; validate everything before any file is touched."""
    subjects = as_subjects(models, arch=arch, which=which)
    if count is not None and len(subjects) not in count:
        words = {1: "one", 2: "two", 3: "three"}
        raise ValueError(f"{what} needs exactly {' or '.join(words.get(n, str(n)) for n in count)} checkpoint"
                         f"{'s' if max(count) > 1 else ''}, got {len(subjects)}")
    device = start(runtime)  # resolved once (cuda -> cuda:N); under torchrun, the process group joined for it
    if cfg.weight_decay is None:
        cfg = cfg.replace(weight_decay=recorded_weight_decay(subjects))
    train, test, desc = resolve_data(data, subjects, cfg, device)
    setup = Setup(subjects, cfg, runtime.replace(device=str(device)), device, train, test, desc)
    check_model_fits_data(setup.evaluator(0).model, train, test, desc["name"], setup.evaluator(0).objective)
    return setup


@dataclass
class Grid:
    """What one analysis evaluates and how its file describes it.

    ``axes``: root datasets ``{name: (array, dims, {"long_name", "units"})}``; ``groups``: result groups and
    their attributes; ``jobs``: ``(group, evaluator, origin (D,), basis (k, D), coords_of(flat ids) -> (P, k))``;
    ``geometry``: the analysis' own config section (e.g. ``{"rays": {...}}``); ``attrs``: extra root attributes.
    """

    kind: str
    shape: tuple[int, ...]
    axes: dict
    groups: dict
    jobs: list
    geometry: dict
    attrs: dict = field(default_factory=dict)


def file_record(setup: Setup, kind: str, geometry: dict, *, out=None, overwrite: bool = False) -> tuple[dict, dict]:
    """The ``config`` and the root attributes (θ layout, provenance) of an analysis file of ``setup``.

    On the CPU the thread count is chosen here, as for every analysis (timed, or the count a resumed file
    records) and left set: the caller restores its own afterwards.
    """
    ev0 = setup.evaluator(0)
    thread_choice = None
    if setup.device.type == "cpu":
        recorded = None if overwrite or out is None else (store.recorded_attr(out, "provenance") or {}).get("threads")
        # timed on a few forward batches, not whole points: start-up must not grow with the data
        thread_choice = choose_threads(ev0.probe_forward, setup.runtime.threads, recorded)
    config = {"kind": kind, **geometry, "eval": setup.cfg.recorded(setup.runtime), "data": setup.data_desc,
              "models": [{"label": s.label, "checkpoint": s.path, "sha256": s.sha256} for s in setup.subjects],
              "theta_size": ev0.layout.size}
    prov = {**provenance(setup.device, setup.runtime.precision),
            **({"thread_choice": thread_choice} if thread_choice else {}), "levers": ev0.levers_report()}
    return config, {"theta_layout": ev0.layout.describe(), "provenance": prov}


def evaluate(setup: Setup, grid: Grid, *, out=None, overwrite: bool = False, progress: ProgressFn | None = None,
             after: AfterFn | None = None) -> Analysis | None:
    """Evaluate every pending point of ``grid`` into ``out`` (a temporary file when None) and return the
    :class:`Analysis` (None on torchrun ranks that do not write). ``after(result)`` runs before the writer
    lock is released, so nothing else can write the file between the grid and, say, its widths."""
    ev0 = setup.evaluator(0)
    threads_before = torch.get_num_threads()  # the caller's setting, restored at the end
    for job in grid.jobs:  # compile="auto" weighs its cost against this process's share of the points
        job[1].expect_points(int(np.prod(grid.shape)) // distributed.world_size())
    config, attrs = file_record(setup, grid.kind, grid.geometry, out=out, overwrite=overwrite)
    attrs.update(grid.attrs)
    tmpdir = tempfile.mkdtemp(prefix="widthkit-") if out is None else None
    path = Path(out) if out is not None else Path(tmpdir) / f"{grid.kind}.h5"
    try:
        if distributed.is_writer():
            af = store.open_analysis(path, grid.kind, config, grid.axes, grid.groups, grid.shape, ev0.metrics,
                                     attrs=attrs, overwrite=overwrite)
        else:
            af = store.AnalysisFile(path, None, list(grid.groups), ev0.metrics, grid.shape)
        distributed.barrier()
        try:
            _run(af, grid.jobs, progress)
            if not distributed.is_writer():
                return None
            result = Analysis(path, tmpdir=tmpdir)
            if after is not None:
                after(result)
            return result
        finally:
            af.close()
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)


def _run(af: store.AnalysisFile, jobs, progress: ProgressFn | None) -> None:
    """Evaluate every pending point of every group; under torchrun the points are shared out between ranks
    (see :mod:`widthkit.runtime.distributed`)."""
    total = af.n_points
    done = af.n_done() if distributed.is_writer() else 0
    if progress and distributed.is_writer():
        progress(done, total)
    for group, ev, origin, basis, coords_of in jobs:
        pending = distributed.broadcast_object(af.pending(group) if distributed.is_writer() else None)
        if len(pending) == 0:
            continue

        def on_results(ids, values, group=group):
            nonlocal done
            af.write(group, ids, values)
            done += len(ids)
            if progress:
                progress(done, total)

        if progress and distributed.world_size() == 1:  # long points: progress within them too
            ev.on_progress = within_points(progress, done, total)
        try:
            distributed.evaluate_shared(ev, origin, basis, coords_of, pending, on_results)
        finally:
            ev.on_progress = None


def within_points(progress: ProgressFn, base: int, total: int, every_s: float = 2.0,
                  clock: Callable[[], float] | None = None) -> Callable[[float], None]:
    """An evaluator's ``on_progress(points done in the call, fractional)`` as ``progress(base + points, total)``,
    at most every ``every_s`` seconds (so points faster than that move the bar only when written), rounded down
    to a tenth of a point (never a whole point that is not finished). ``clock``: default ``time.monotonic``."""
    clock = clock or time.monotonic
    last = [clock()]

    def on_progress(points: float) -> None:
        now = clock()
        if now - last[0] >= every_s:
            last[0] = now
            progress(math.floor(10 * (base + points)) / 10, total)

    return on_progress
