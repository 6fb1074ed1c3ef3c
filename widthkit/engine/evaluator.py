"""The batched evaluator: train loss and test error at many points θ₀ + Σ cᵢ·dᵢ.

The evaluator owns a private copy of the model whose parameters are views into one flat float32 buffer,
so moving to a new point is a single fused ``addmv`` (θ = origin + basisᵀ·c). The data lives on the device
as uint8 (normalised batch by batch) when it fits its memory budget, else it is streamed in a fixed order
(:class:`EvalSet`); each point is a loop of large forward batches whose metric sums and counts (the
:class:`~widthkit.engine.objectives.Objective`) accumulate on the device in float64, with one host
synchronisation per chunk of points.

BatchNorm modes (``bn_mode``):

- ``"keep"``: the running statistics the model came with (the checkpoint's).
- ``"recompute"``: at every point, reset the statistics and recompute them from a pass over the training
  images (all of them, or a fixed random subset of ``bn_subset`` images) in train mode with cumulative
  averaging (``momentum=None``), as ``torch.optim.swa_utils.update_bn`` and the SWA authors do. Only the
  BatchNorm layers are put in train mode: dropout stays off, so the pass is deterministic.
- ``"batch"``: every evaluation batch is normalised with its own statistics (results depend on
  ``batch_size``, which is therefore recorded).

Metrics per point (keys of the returned dict), by default: ``train_loss``, ``test_loss`` (mean cross-entropy,
nats), ``train_err``, ``test_err`` (error rate, %), and with ``weight_decay > 0`` also ``train_loss_l2`` =
train loss + ½·wd·‖θ‖², the regularised objective the SWA paper plots; ``loss=``/``metrics=``/``forward=``
(:class:`EvalConfig` fields) change what is measured (e.g. ``test_top5_err``).

>>> ev = Evaluator(model, train=EvalSet.from_dataset(tr, "cpu"), test=EvalSet.from_dataset(te, "cpu"),
...                config=EvalConfig(bn_mode="recompute", bn_subset=1000))
>>> res = ev.evaluate(theta0, directions, coords)      # coords (P, k) → res["test_err"] (P,)
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..runtime import (RuntimeConfig, autocast, canonical, default_batch_size, memory_budget, precision_policy,
                       random_subset, same_device)
from .batchnorm import bn_modules, recompute_bn_statistics
from .config import EvalConfig
from .levers import Levers, batch_probe, choose_batch_size, stacked_sums
from .objectives import L2_METRIC, SPLITS
from .space import ThetaLayout, bind_flat_parameters

log = logging.getLogger("widthkit")


class EvalSet:
    """One split: inputs ``x`` (N, ...) and targets ``y`` (N, ...), evaluated on ``device``.

    ``x`` is kept as given and converted batch by batch on the device:

    - uint8 images with ``mean``/``std`` (per channel, in [0, 1] pixel units): ``(x / 255 - mean) / std`` in
      float32, the same arithmetic as :meth:`widthkit.data.Dataset.normalized` (4x less memory than keeping
      the floats); uint8 without them: ``x / 255``;
    - floating inputs: used as they are (float32);
    - integer inputs (token ids): used as they are.

    **Resident or streamed.** When ``x`` lives on ``device`` the split is *resident*. Otherwise (``x`` in host
    memory or memory-mapped from the decoded cache while the model runs on a GPU, or a memory-mapped cache on
    the CPU) it is *streamed*: a background thread reads the batches in a fixed order into reused (pinned, on
    CUDA) buffers while the previous batch computes, so the numbers equal the resident ones.
    :meth:`from_dataset` chooses by the split's size against its memory budget. Targets always live on
    ``device``.
    """

    def __init__(self, x, y, mean=None, std=None, device=None, streamed: bool = False):
        if not torch.is_tensor(x) or not torch.is_tensor(y):
            raise TypeError(f"EvalSet needs tensors x and y, got {type(x).__name__} and {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise ValueError("an evaluation split with no examples")
        if (mean is None) != (std is None):
            raise ValueError("pass both mean and std (per channel), or neither")
        if mean is not None and x.dtype != torch.uint8:
            raise ValueError(f"mean/std normalise uint8 images; these inputs are {x.dtype}")
        # compared by what they are: data on cuda:0 is resident for device "cuda" (torch.device("cuda") !=
        # torch.device("cuda:0")), and on the CPU for device "cpu:0"
        self.device = canonical(device if device is not None else x.device)
        on_device = same_device(x.device, self.device)
        if x.is_floating_point() and x.dtype != torch.float32 and on_device:
            x = x.float()
        self.x = x
        self.y = y.to(self.device)
        if not (self.y.is_floating_point() or self.y.is_complex() or self.y.dtype == torch.bool):
            self.y = self.y.long()
        self.mean = tuple(float(m) for m in mean) if mean is not None else None
        self.std = tuple(float(s) for s in std) if std is not None else None
        self._norm = None
        self._ring = None  # the streamed path's read-ahead buffers, kept between passes
        self._streamed = bool(streamed) or not on_device

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def resident(self) -> bool:
        """Whether the inputs are kept on the evaluation device (else they are streamed batch by batch)."""
        return not self._streamed

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def describe(self) -> str:
        how = "resident on" if self.resident else f"streamed from {self.x.device.type} memory (or its cache) to"
        return f"{len(self)} examples, {self.nbytes / 1e6:.1f} MB {str(self.x.dtype).replace('torch.', '')}, {how} {self.device}"

    def to(self, device) -> "EvalSet":
        """The same split resident on ``device``."""
        return EvalSet(self.x.to(device), self.y, self.mean, self.std, device)

    def streamed_to(self, device) -> "EvalSet":
        """The same split, inputs left where they are, streamed to ``device``."""
        return EvalSet(self.x, self.y, self.mean, self.std, device, streamed=True)

    def subset(self, index: torch.Tensor) -> "EvalSet":
        """The examples at ``index`` (int64 indices), resident or streamed as this split."""
        x = self.x.index_select(0, index.to(self.x.device))
        return EvalSet(x, self.y.index_select(0, index.to(self.device)), self.mean, self.std, self.device,
                       streamed=self._streamed)

    # -- batches ---------------------------------------------------------------------------------------
    def _prepare(self, xb: torch.Tensor) -> torch.Tensor:
        """One batch, on the device, as the model takes it."""
        # one memory layout whatever the source's strides (a kernel may pick another path for another layout)
        if xb.dtype != torch.uint8:
            return xb.to(torch.float32, memory_format=torch.contiguous_format) if xb.is_floating_point() else xb
        x = xb.to(torch.float32, memory_format=torch.contiguous_format)  # always a copy
        if self.mean is None:
            return x.div_(255.0)
        if self._norm is None or self._norm[0].device != x.device:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            self._norm = (torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape),
                          torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape))
        mean, std = self._norm
        return x.div_(255.0).sub_(mean).div_(std)

    def inputs(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs, prepared, on the device."""
        return self._prepare(self.x[:n].to(self.device))

    def batches(self, batch_size: int, index: torch.Tensor | None = None):
        """``(inputs, targets)`` batches on the device, in order: all examples, or those at ``index``."""
        n = len(self) if index is None else int(index.numel())
        if self.resident:
            for start in range(0, n, batch_size):
                if index is None:
                    xb, yb = self.x[start:start + batch_size], self.y[start:start + batch_size]
                else:
                    idx = index[start:start + batch_size]
                    xb, yb = self.x.index_select(0, idx), self.y.index_select(0, idx)
                yield self._prepare(xb), yb
            return
        host_index = None if index is None else index.to(self.x.device)
        dev_index = None if index is None else index.to(self.device)
        shape = (batch_size,) + tuple(self.x.shape[1:])  # one shape for every pass (BN subset and splits alike)
        ring, self._ring = self._ring, None  # taken while this pass runs (a nested pass would allocate its own)
        if ring is None or ring[0].shape != shape:
            ring = _ring_buffers(shape, self.x.dtype, self.device)
        try:
            for start, xb in _prefetch(self.x, batch_size, n, host_index, self.device, ring):
                yb = (self.y[start:start + len(xb)] if dev_index is None
                      else self.y.index_select(0, dev_index[start:start + len(xb)]))
                yield self._prepare(xb), yb
        finally:
            self._ring = ring  # reused by the next pass: pinned buffers are costly to allocate at every point

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def from_dataset(cls, dataset, device="cpu", limit: int | None = None, max_memory=None) -> "EvalSet":
        """From a :class:`widthkit.data.Dataset`: uint8 pixels normalised per batch with the dataset's
        constants; resident on ``device`` when the split fits its budget (``max_memory``, default half the
        free memory), else streamed."""
        x, y = dataset.images, dataset.labels
        if limit is not None:
            x, y = x[:limit], y[:limit]
        es = cls(x, y, dataset.mean, dataset.std, device, streamed=True)
        if es.nbytes <= memory_budget(device, max_memory):
            if not same_device(x.device, device) or getattr(dataset, "cache", None):
                x = x.to(canonical(device)) if not same_device(x.device, device) else x.clone()  # into memory once
            return cls(x, y, dataset.mean, dataset.std, device)
        return es

    @classmethod
    def from_any(cls, data, device="cpu", max_memory=None) -> "EvalSet":
        """Accepts an EvalSet, a widthkit Dataset, an ``(x, y)`` pair of tensors, or an iterable of
        ``(x, y)`` batches such as a ``DataLoader`` (read once, concatenated)."""
        if isinstance(data, EvalSet):
            return data.to(device) if data.resident else data.streamed_to(device)
        if hasattr(data, "images") and hasattr(data, "labels") and hasattr(data, "mean"):
            return cls.from_dataset(data, device, max_memory=max_memory)
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
            return cls(data[0].to(device), data[1], device=device)
        if isinstance(data, Iterable):
            xs, ys = [], []
            for batch in data:
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise ValueError("a data loader must yield (inputs, labels) batches")
                xs.append(batch[0])
                ys.append(batch[1])
            if not xs:
                raise ValueError("the data loader yielded no batches")
            return cls(torch.cat(xs).to(device), torch.cat(ys), device=device)
        raise TypeError(
            f"cannot use {type(data).__name__} as evaluation data: pass a widthkit Dataset, an (x, y) pair of "
            "tensors, or a DataLoader of (x, y) batches"
        )


_RING_DEPTH = 3


def _ring_buffers(shape: tuple, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The read-ahead buffers of a streamed split: pinned when the device is CUDA (asynchronous copies)."""
    return [torch.empty(shape, dtype=dtype, pin_memory=device.type == "cuda") for _ in range(_RING_DEPTH)]


def _prefetch(x: torch.Tensor, batch_size: int, n: int, index: torch.Tensor | None, device: torch.device,
              ring: list[torch.Tensor]):
    """Yield ``(start, batch)`` of ``x`` (or of ``x[index]``) on ``device``, read ahead by a background thread
    into ``ring`` (reused buffers of one batch each)."""
    import queue
    import threading

    cuda = device.type == "cuda"
    free: queue.Queue = queue.Queue()
    for i in range(len(ring)):
        free.put((i, None))
    ready: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce():
        try:
            for start in range(0, n, batch_size):
                stop_at = min(start + batch_size, n)
                while True:
                    if stop.is_set():
                        return
                    try:
                        slot, event = free.get(timeout=0.1)
                        break
                    except queue.Empty:
                        continue
                if event is not None:
                    event.synchronize()  # the device has finished copying out of this buffer
                buf = ring[slot][:stop_at - start]
                src = x[start:stop_at] if index is None else x.index_select(0, index[start:stop_at])
                buf.copy_(src)
                ready.put((start, slot, buf))
            ready.put(None)
        except BaseException as err:  # handed to the consumer, raised there
            ready.put(err)

    thread = threading.Thread(target=produce, name="widthkit-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            start, slot, buf = item
            if cuda:
                xb = buf.to(device, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                xb, event = buf.clone(), None
            free.put((slot, event))
            yield start, xb
    finally:
        stop.set()
        thread.join()
        while True:  # the buffers go back to the caller for the next pass: no copy out of them may be pending
            try:
                _, event = free.get_nowait()
            except queue.Empty:
                break
            if event is not None:
                event.synchronize()


ChunkCallback = Callable[[np.ndarray, dict], None]


class Evaluator:
    """Evaluates a model's metrics at points in weight space. The caller's model is never modified.

    Args:
        model: the network; copied, moved to ``device`` in float32, put in eval mode.
        train: training split (an :class:`EvalSet` or anything :meth:`EvalSet.from_any` takes); needed for
            train metrics and for ``bn_mode="recompute"``.
        test: test split, likewise.
        config: an :class:`EvalConfig` (what is measured, and how BatchNorm is treated).
        runtime: a :class:`~widthkit.runtime.RuntimeConfig` (where and how: device, precision, batch size,
            speed levers; default ``RuntimeConfig()``, i.e. the GPU where there is one). Tests of exact CPU
            arithmetic pass ``RuntimeConfig(device="cpu")``.
        graph_backend: how CUDA graphs are captured (default: CUDA's own on CUDA; the tests pass
            :class:`widthkit.engine.levers.EmulatedGraphs` to run the graph path on CPU).

    The speed levers of ``runtime`` (channels-last, CUDA graphs, compile, points in flight) live in
    :mod:`widthkit.engine.levers`; ``runtime.precision`` is applied around every :meth:`evaluate`.
    """

    def __init__(self, model: nn.Module, train=None, test=None, config: EvalConfig | None = None,
                 runtime: RuntimeConfig | None = None, splits: Sequence[str] = SPLITS, graph_backend=None):
        self.config = config = config or EvalConfig()
        self.runtime = runtime = runtime or RuntimeConfig()
        config.check_runtime(runtime)
        self.splits = tuple(splits)
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {self.splits!r}")
        self.weight_decay = float(config.weight_decay or 0.0)
        self.device = runtime.resolved_device()
        self.objective = config.objective()
        if runtime.points_in_flight != 1 and self.objective.forward_fn is not None:
            if runtime.points_in_flight != "auto":
                raise ValueError("points_in_flight > 1 calls the model through torch.func and cannot use a forward= "
                                 "adapter; use points_in_flight=1 with forward=")
            runtime = self.runtime = runtime.replace(points_in_flight=1)
        self.train = EvalSet.from_any(train, self.device, config.max_memory) if train is not None else None
        self.test = EvalSet.from_any(test, self.device, config.max_memory) if test is not None else None
        for split in self.splits:
            if getattr(self, split) is None:
                raise ValueError(f"the {split} split is needed (splits={self.splits}) but none was given")
            self.objective.check_targets(getattr(self, split).y, split)
        if config.bn_mode == "recompute" and self.train is None:
            raise ValueError("bn_mode='recompute' needs the training data to recompute BatchNorm statistics")

        self.model = copy.deepcopy(model).to(device=self.device, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layout = ThetaLayout.from_model(self.model)
        self.flat = torch.empty(self.layout.size, dtype=torch.float32, device=self.device)
        bind_flat_parameters(self.model, self.layout, self.flat)
        self._theta0 = self.flat.clone()
        self.bn = bn_modules(self.model)
        self.batch_size = runtime.eval_batch_size or default_batch_size(self.device)
        self.bn_index = self._bn_subset_index()
        if config.bn_mode == "batch":
            for m in self.bn:
                m.momentum = 0.0  # batch statistics are used, running statistics left untouched
        self.batch_choice: dict | None = None  # how batch_size was chosen (prepare)
        streamed = [s for s in self.splits if not getattr(self, s).resident]
        self.levers = Levers(self.model, self.flat, self.layout, runtime, self.device, self._with_retry,
                             lambda: self._probe_split().inputs(self.batch_size),
                             graphs=graph_backend, streamed=streamed, bn_mode=config.bn_mode,
                             point_batches=self._split_batches)
        self.on_progress: Callable[[float], None] | None = None
        """Called during :meth:`evaluate` after every forward batch of a point evaluated eagerly (not on CUDA graph
        replays, nor with points in flight), with the points of that call done so far, the current one
        fractionally (< 1): progress within points that take long."""
        self._ticks: list | None = None  # [points done in the call, batches done in this point, batches per point]

    @property
    def metrics(self) -> list[str]:
        """The metrics every point gets (see :meth:`widthkit.engine.objectives.Objective.metric_names`)."""
        return self.objective.metric_names(self.splits, self.weight_decay)

    @property
    def n_sums(self) -> int:
        """Raw sums per point: (sum, count) per metric and split, and ‖θ‖²."""
        return 2 * len(self.objective.metrics) * len(SPLITS) + 1

    # -- set-up --------------------------------------------------------------------------------------
    def _bn_subset_index(self) -> torch.Tensor | None:
        """Indices of the training images used to recompute BN statistics (fixed for the whole run)."""
        if self.config.bn_mode != "recompute" or not self.bn:
            return None
        idx = random_subset(len(self.train), self.config.bn_subset, self.config.seed)
        return None if idx is None else idx.to(self.device)

    @property
    def theta0(self) -> torch.Tensor:
        """θ of the model as given (a copy)."""
        return self._theta0.clone()

    def _probe_split(self) -> EvalSet:
        """The split the measurements run on: the test split where there is one, else the training split."""
        return self.test if self.test is not None and "test" in self.splits else self.train

    def _bn_batches(self) -> int:
        return -(-self._bn_count() // self.batch_size)

    def _bn_count(self) -> int:
        return (len(self.train) if self.bn_index is None else int(self.bn_index.numel())) \
            if self.config.bn_mode == "recompute" and self.bn else 0

    def _split_batches(self) -> tuple[int, int]:
        """(forward batches of the splits per point, distinct batch shapes among them) at the current batch size."""
        b, n, shapes = self.batch_size, 0, set()
        for split in self.splits:
            size = len(getattr(self, split))
            n += -(-size // b)
            shapes.add(min(b, size))
            if size > b and size % b:
                shapes.add(size % b)
        return n, len(shapes)

    def expect_points(self, n: int) -> None:
        """Tell the evaluator how many points this process will evaluate (for the ``compile="auto"`` decision,
        which weighs compile time against the run's length); :meth:`evaluate` also counts its own points."""
        self.levers.expected_points = max(self.levers.expected_points or 0, int(n))

    def prepare(self, points: int | None = None) -> None:
        """Resolve, once, the levers that need the data or a measurement: the forward batch size, points in
        flight, compile (for a run of ``points`` points). :meth:`evaluate` calls it; call it (under the precision
        policy) to measure before the first point."""
        if self.batch_choice is None:
            self.batch_choice = self._choose_batch_size()
            self.batch_size = self.batch_choice["batch_size"]
        self.levers.prepare(points)

    @torch.no_grad()
    def _choose_batch_size(self) -> dict:
        """``runtime.eval_batch_size`` when given; else 64 on CPU, and on CUDA the fastest of 4096, 8192, 16384
        images per forward pass (:func:`~widthkit.engine.levers.choose_batch_size`), timed on the probe split's
        first images, stopping where memory runs out."""
        if self.runtime.eval_batch_size is not None:
            return {"batch_size": self.batch_size, "chosen_by": "asked"}
        if self.device.type != "cuda":
            return {"batch_size": self.batch_size, "chosen_by": f"default on {self.device.type} (batches of 64 were "
                    "at or near the fastest on 2 cores, benchmarks/RESULTS.md)"}
        if self.config.bn_mode == "batch":
            return {"batch_size": self.batch_size, "chosen_by": "default: bn_mode batch normalises every batch with "
                    "its own statistics, so the batch size is part of the result and not timed"}
        data = self._probe_split()
        largest = max([len(getattr(self, s)) for s in self.splits] + [self._bn_count()])
        probe = batch_probe(self.model, data.inputs, self.device, self.runtime.precision)
        choice = choose_batch_size(probe, largest=largest)
        log.info("eval_batch_size: %d (measured, images/s %s)", choice["batch_size"],
                 {b: f"{r:.4g}" for b, r in choice["images_per_second"].items()})
        return choice

    @torch.no_grad()
    def probe_forward(self, batches: int = 2) -> None:
        """Forward passes of the first ``batches`` batches of the test split (else the training split), as every
        point runs them, under the precision policy: a few batches are what the CPU thread count is timed on
        (:func:`widthkit.runtime.choose_threads`), so the start-up cost does not grow with the data."""
        data = self._probe_split()
        with precision_policy(self.runtime.precision, self.device):
            for i, (xb, _) in enumerate(data.batches(self.batch_size)):
                if i >= batches:
                    break
                with self._autocast():
                    self.objective.output(self.model, xb)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- one point -----------------------------------------------------------------------------------
    def _tick(self) -> None:
        """One forward batch of the current point done: report the call's progress (see :attr:`on_progress`)."""
        t = self._ticks
        if t is not None:
            t[1] += 1
            self.on_progress(t[0] + min(t[1] / t[2], 0.99))

    def _recompute_bn(self) -> None:
        def inputs():
            for xb, _ in self.train.batches(self.batch_size, self.bn_index):
                yield xb
                self._tick()

        recompute_bn_statistics(self.model, inputs(), self._bn_forward, self.bn)

    def _bn_forward(self, xb: torch.Tensor) -> None:
        with self._autocast():
            self.objective.output(self.model, xb)

    def _autocast(self):
        return autocast(self.device, self.runtime.precision)

    def _split_sums(self, data: EvalSet, out: torch.Tensor) -> None:
        """Accumulate each metric's (sum, count) over a split into ``out`` (2·metrics,) float64, on the device."""
        for xb, yb in data.batches(self.batch_size):
            with self._autocast():
                output = self.objective.output(self.levers.forward, xb)
            self.objective.accumulate(output, yb, out)
            self._tick()

    @contextlib.contextmanager
    def _bn_at_point(self):
        """BatchNorm set up for the point in ``self.flat`` (statistics recomputed, or batch mode), eval after."""
        if self.config.bn_mode == "recompute" and self.bn:
            self._recompute_bn()
        if self.config.bn_mode == "batch":
            for m in self.bn:
                m.train()
        try:
            yield
        finally:
            for m in self.bn:
                m.eval()

    def _point(self, out: torch.Tensor) -> None:
        """Evaluate the point currently in ``self.flat``; write raw sums into ``out`` (n_sums - 1,) float64."""
        with self._bn_at_point():
            width = 2 * len(self.objective.metrics)
            for i, split in enumerate(SPLITS):
                if split in self.splits:
                    self._split_sums(getattr(self, split), out[width * i:width * (i + 1)])

    def _with_retry(self, compute: Callable[[torch.Tensor], None], out: torch.Tensor) -> None:
        """``compute(out)`` from zeroed sums; on an out-of-memory error halve the batch size and try again
        (the batch size only changes how the sums are split, not what they are)."""
        while True:
            try:
                out.zero_()
                compute(out)
                return
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    # -- several points per forward pass -------------------------------------------------------------
    def _stacked_sums(self, thetas: torch.Tensor, out: torch.Tensor) -> None:
        """K points at once (``thetas`` (K, D)) through ``torch.func.vmap``, BN statistics kept or recomputed
        per point inside the stacked calls (:func:`widthkit.engine.levers.stacked_sums`); raw sums into
        ``out`` (K, n_sums)."""
        width = 2 * len(self.objective.metrics)
        splits = [(width * i, getattr(self, s)) for i, s in enumerate(SPLITS) if s in self.splits]
        bn_data = (self.train, self.bn_index) if self.config.bn_mode == "recompute" and self.bn else None
        stacked_sums(self.model, self.layout, thetas, splits, self.batch_size, out, self.config.bn_mode, bn_data,
                     self.runtime.precision, self.objective)

    # -- many points ---------------------------------------------------------------------------------
    @torch.no_grad()
    def levers_report(self) -> dict:
        """The speed levers as resolved for this evaluator (batch size, points in flight and compile measured
        where "auto", CUDA graphs captured by evaluating θ₀ once where they are on): what provenance records."""
        with precision_policy(self.runtime.precision, self.device):
            self.prepare()
        if self.levers.graphs_on and not self.levers.steps:
            self.evaluate_weights(self._theta0)
        choice = self.batch_choice or {}
        return {**self.levers.describe(), "eval_batch_size": self.batch_size,
                "eval_batch_size_chosen_by": choice.get("chosen_by"),
                **({"eval_batch_size_images_per_second": {str(b): r for b, r in choice["images_per_second"].items()}}
                   if "images_per_second" in choice else {})}

    @torch.no_grad()
    def evaluate(
        self,
        origin: torch.Tensor,
        basis: torch.Tensor,
        coords,
        ids: Sequence[int] | np.ndarray | None = None,
        on_chunk: ChunkCallback | None = None,
    ) -> dict[str, np.ndarray]:
        """Metrics at the points ``origin + coords[p] @ basis``.

        Args:
            origin: θ₀, (D,).
            basis: directions, (k, D); coordinates are in units of these vectors.
            coords: (P, k) coordinates of the points (float64 numbers; the point is formed in float32).
            ids: (P,) labels of the points passed to ``on_chunk`` (default ``arange(P)``), e.g. flat grid indices.
            on_chunk: called as ``on_chunk(ids_chunk, {metric: values_chunk})`` after every chunk of
                ``config.chunk_size`` points, with numpy float64 arrays.

        Returns:
            ``{metric: (P,) float64 array}``: losses in nats, errors in %.
        """
        with precision_policy(self.runtime.precision, self.device):
            return self._evaluate(origin, basis, coords, ids, on_chunk)

    def _evaluate(self, origin, basis, coords, ids, on_chunk) -> dict[str, np.ndarray]:
        self.layout.check(origin)
        origin = origin.to(device=self.device, dtype=torch.float32)
        basis = basis.to(device=self.device, dtype=torch.float32)
        if basis.dim() != 2 or basis.shape[1] != self.layout.size:
            raise ValueError(f"basis must be (k, {self.layout.size}), got {tuple(basis.shape)}")
        if not bool(torch.isfinite(origin).all()):
            bad = [e.name for e in self.layout if not bool(torch.isfinite(origin[e.slice]).all())]
            raise ValueError(f"the weights contain NaN or Inf values in {bad[:5]}: nothing can be evaluated from them")
        coords = torch.as_tensor(np.asarray(coords, dtype=np.float64))
        if coords.dim() == 1:
            coords = coords.unsqueeze(1)
        if coords.shape[1] != basis.shape[0]:
            raise ValueError(f"coords have {coords.shape[1]} columns but the basis has {basis.shape[0]} vectors")
        ids = np.arange(len(coords)) if ids is None else np.asarray(ids)
        if len(ids) != len(coords):
            raise ValueError(f"{len(ids)} ids for {len(coords)} points")
        coords_dev = coords.to(device=self.device, dtype=torch.float32)
        metrics = self.metrics
        results = {m: np.full(len(coords), np.nan) for m in metrics}
        self.prepare(len(coords))  # once: batch size, K and compile resolved (measured where "auto")
        k = self.levers.points_in_flight
        cs = -(-self.config.chunk_size // k) * k  # whole groups of K points per chunk
        for start in range(0, len(coords), cs):
            stop = min(start + cs, len(coords))
            sums = torch.zeros(stop - start, self.n_sums, dtype=torch.float64, device=self.device)
            if k > 1:
                for j in range(start, stop, k):
                    thetas = torch.addmm(origin, coords_dev[j:min(j + k, stop)], basis)  # (K, D)
                    self.levers.run_stacked(self._stacked_sums, thetas, sums[j - start:j - start + len(thetas)])
            else:
                for j, p in enumerate(range(start, stop)):
                    # θ = origin + basisᵀ c : one fused op writing straight into the model's parameters
                    torch.addmv(origin, basis.t(), coords_dev[p], out=self.flat)
                    if self.on_progress is not None and not self.levers.graphs_on:
                        self._ticks = [p, 0, max(1, self._split_batches()[0] + self._bn_batches())]
                    try:
                        self.levers.run_point(self._point, sums[j, :-1])
                    finally:
                        self._ticks = None
                    if L2_METRIC in metrics:
                        sums[j, -1] = self.flat.double().square().sum()
            host = sums.cpu().numpy()  # the one synchronisation per chunk
            chunk = self._finish(host, metrics)
            for m in metrics:
                results[m][start:stop] = chunk[m]
            if on_chunk is not None:
                on_chunk(ids[start:stop], chunk)
        return results

    def _finish(self, host: np.ndarray, metrics: list[str]) -> dict[str, np.ndarray]:
        """Means from the raw (sum, count) pairs: errors in %, a metric with no counted example NaN."""
        out = {}
        width = 2 * len(self.objective.metrics)
        for i, split in enumerate(SPLITS):
            for j, metric in enumerate(self.objective.metrics):
                total, count = host[:, width * i + 2 * j], host[:, width * i + 2 * j + 1]
                with np.errstate(invalid="ignore", divide="ignore"):
                    value = np.where(count > 0, total / np.where(count > 0, count, 1.0), np.nan)
                out[f"{split}_{metric.name}"] = 100.0 * value if metric.error else value
        if L2_METRIC in metrics:
            out[L2_METRIC] = out["train_loss"] + 0.5 * self.weight_decay * host[:, -1]
        return {m: out[m] for m in metrics}

    @torch.no_grad()
    def outputs(self, theta: torch.Tensor, split: str = "test",
                buffers: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The model's outputs at θ for every example of ``split``, in order: (N, ...) float32 on the device.

        BatchNorm as in :meth:`evaluate` (kept, recomputed at θ, or per batch); ``buffers`` (e.g. another
        checkpoint's BatchNorm statistics, by buffer name) replace the evaluator's own for this call, which are
        put back afterwards. What an ensemble averages (:mod:`widthkit.engine.ensemble`): per-example predictions
        rather than the metric sums of :meth:`evaluate`.
        """
        data = getattr(self, split, None) if split in SPLITS else None
        if data is None:
            raise ValueError(f"no {split!r} split to predict on; this evaluator holds "
                             f"{[s for s in SPLITS if getattr(self, s) is not None]}")
        self.layout.check(theta)
        own = dict(self.model.named_buffers())
        unknown = sorted(set(buffers or {}) - set(own))
        if unknown:
            raise ValueError(f"buffers {unknown[:3]} are not buffers of the evaluated model")
        kept = {k: own[k].clone() for k in buffers} if buffers else {}
        try:
            for k, v in (buffers or {}).items():
                own[k].copy_(v)
            with precision_policy(self.runtime.precision, self.device):
                self.flat.copy_(theta.to(device=self.device, dtype=torch.float32))
                with self._bn_at_point():
                    outs = []
                    for xb, _ in data.batches(self.batch_size):
                        with self._autocast():
                            outs.append(self.objective.output(self.model, xb).float())
            return torch.cat(outs)
        finally:
            for k, v in kept.items():
                own[k].copy_(v)

    def evaluate_weights(self, theta: torch.Tensor) -> dict[str, float]:
        """Metrics at one weight vector θ (D,)."""
        res = self.evaluate(theta, torch.zeros(1, self.layout.size), np.zeros((1, 1)))
        return {m: float(v[0]) for m, v in res.items()}
