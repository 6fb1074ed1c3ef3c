"""The batched evaluator: train loss and test error at many points θ₀ + Σ cᵢ·dᵢ.

The evaluator owns a private copy of the model whose parameters are views into one flat float32 buffer,
so moving to a new point is a single fused ``addmv`` (θ = origin + basisᵀ·c). The data lives on the device
as one normalised tensor per split; each point is a loop of large forward batches whose loss sums and error
counts accumulate on the device in float64, with one host synchronisation per chunk of points.

BatchNorm modes (``bn_mode``):

- ``"keep"``: the running statistics the model came with (the checkpoint's).
- ``"recompute"``: at every point, reset the statistics and recompute them from a pass over the training
  images (all of them, or a fixed random subset of ``bn_subset`` images) in train mode with cumulative
  averaging (``momentum=None``), as ``torch.optim.swa_utils.update_bn`` and the SWA authors do. Only the
  BatchNorm layers are put in train mode: dropout stays off, so the pass is deterministic.
- ``"batch"``: every evaluation batch is normalised with its own statistics (results depend on
  ``batch_size``, which is therefore recorded).

Metrics per point (keys of the returned dict): ``train_loss``, ``test_loss`` (mean cross-entropy, nats),
``train_err``, ``test_err`` (error rate, %), and with ``weight_decay > 0`` also ``train_loss_l2`` = train
cross-entropy + ½·wd·‖θ‖², the regularised objective the SWA paper plots.

>>> ev = Evaluator(model, train=EvalSet.from_dataset(tr, "cpu"), test=EvalSet.from_dataset(te, "cpu"),
...                config=EvalConfig(bn_mode="recompute", bn_subset=1000))
>>> res = ev.evaluate(theta0, directions, coords)      # coords (P, k) → res["test_err"] (P,)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..runtime import autocast, default_batch_size, precision_policy, random_subset
from .config import EvalConfig
from .levers import Levers, stacked_sums
from .objectives import L2_METRIC, SPLITS, metric_names, split_sums
from .space import ThetaLayout, bind_flat_parameters


@dataclass
class EvalSet:
    """One split as device tensors: ``x`` (N, C, H, W) float32, normalised; ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"{self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        if self.x.shape[0] == 0:
            raise ValueError("an evaluation split with no examples")
        if self.y.is_floating_point() or self.y.is_complex() or self.y.dtype == torch.bool:
            raise ValueError(f"labels must be integer class indices, got {self.y.dtype} labels (e.g. "
                             f"{self.y.flatten()[:3].tolist()}); pass y.long() if they are whole numbers")
        self.y = self.y.long()

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device) -> "EvalSet":
        return EvalSet(self.x.to(device), self.y.to(device))

    @classmethod
    def from_dataset(cls, dataset, device="cpu", limit: int | None = None) -> "EvalSet":
        """From a :class:`widthkit.data.Dataset` (normalised with its own constants)."""
        x = dataset.normalized(device=device)
        y = dataset.labels.to(device)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        return cls(x, y)

    @classmethod
    def from_any(cls, data, device="cpu") -> "EvalSet":
        """Accepts an EvalSet, a widthkit Dataset, an ``(x, y)`` pair of tensors, or an iterable of
        ``(x, y)`` batches such as a ``DataLoader`` (read once, concatenated)."""
        if isinstance(data, EvalSet):
            return data.to(device)
        if hasattr(data, "normalized") and hasattr(data, "labels"):
            return cls.from_dataset(data, device)
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
            return cls(data[0].to(device=device, dtype=torch.float32), data[1].to(device))
        if isinstance(data, Iterable):
            xs, ys = [], []
            for batch in data:
                if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                    raise ValueError("a data loader must yield (inputs, labels) batches")
                xs.append(batch[0].float())
                ys.append(batch[1])
            if not xs:
                raise ValueError("the data loader yielded no batches")
            return cls(torch.cat(xs).to(device), torch.cat(ys).to(device))
        raise TypeError(
            f"cannot use {type(data).__name__} as evaluation data: pass a widthkit Dataset, an (x, y) pair of "
            "tensors, or a DataLoader of (x, y) batches"
        )


ChunkCallback = Callable[[np.ndarray, dict], None]


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Evaluator:
    """Evaluates a model's metrics at points in weight space. The caller's model is never modified.

    Args:
        model: the network; copied, moved to ``device`` in float32, put in eval mode.
        train: training split (an :class:`EvalSet` or anything :meth:`EvalSet.from_any` takes); needed for
            train metrics and for ``bn_mode="recompute"``.
        test: test split, likewise.
        config: an :class:`EvalConfig`.
        device: where to evaluate (default: the device of ``train``/``test`` tensors, else CPU).
        graph_backend: how CUDA graphs are captured (default: CUDA's own on CUDA; the tests pass
            :class:`widthkit.engine.levers.EmulatedGraphs` to run the graph path on CPU).

    The speed levers of ``config`` (channels-last, CUDA graphs, compile, points in flight) live in
    :mod:`widthkit.engine.levers`; ``config.precision`` is applied around every :meth:`evaluate`.
    """

    def __init__(self, model: nn.Module, train=None, test=None, config: EvalConfig | None = None, device=None,
                 splits: Sequence[str] = SPLITS, graph_backend=None):
        self.config = config = config or EvalConfig()
        self.splits = tuple(splits)
        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {self.splits!r}")
        self.weight_decay = float(config.weight_decay or 0.0)
        if device is None:
            for s in (train, test):
                if isinstance(s, EvalSet):
                    device = s.device
                    break
        self.device = torch.device(device or "cpu")
        self.train = EvalSet.from_any(train, self.device) if train is not None else None
        self.test = EvalSet.from_any(test, self.device) if test is not None else None
        for split in self.splits:
            if getattr(self, split) is None:
                raise ValueError(f"the {split} split is needed (splits={self.splits}) but none was given")
        if config.bn_mode == "recompute" and self.train is None:
            raise ValueError("bn_mode='recompute' needs the training data to recompute BatchNorm statistics")

        self.model = copy.deepcopy(model).to(device=self.device, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layout = ThetaLayout.from_model(self.model)
        self.flat = torch.empty(self.layout.size, dtype=torch.float32, device=self.device)
        bind_flat_parameters(self.model, self.layout, self.flat)
        self._theta0 = self.flat.clone()
        self.bn = _bn_modules(self.model)
        self.batch_size = config.eval_batch_size or default_batch_size(self.device)
        self.bn_index = self._bn_subset_index()
        if config.bn_mode == "batch":
            for m in self.bn:
                m.momentum = 0.0  # batch statistics are used, running statistics left untouched
        self.levers = Levers(self.model, self.flat, self.layout, config, self.device, self._with_retry,
                             lambda: (self.test if self.test is not None else self.train).x[:self.batch_size],
                             graphs=graph_backend)

    @property
    def metrics(self) -> list[str]:
        """The metrics every point gets (see :func:`widthkit.engine.objectives.metric_names`)."""
        return metric_names(self.splits, self.weight_decay)

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

    # -- one point -----------------------------------------------------------------------------------
    def _recompute_bn(self) -> None:
        x = self.train.x if self.bn_index is None else self.train.x.index_select(0, self.bn_index)
        momenta = [m.momentum for m in self.bn]
        for m in self.bn:
            m.reset_running_stats()
            m.train()
        try:
            for i, start in enumerate(range(0, x.shape[0], self.batch_size)):
                # cumulative average over the pass, like update_bn's momentum=None, which computes the same
                # 1/(batches so far) but reads the batch count back from the device (no CUDA graph then)
                for m in self.bn:
                    m.momentum = 1.0 / (i + 1)
                with self._autocast():
                    self.model(x[start:start + self.batch_size])
        finally:
            for m, mom in zip(self.bn, momenta):
                m.momentum = mom
                m.eval()

    def _autocast(self):
        return autocast(self.device, self.config.precision)

    def _split_sums(self, data: EvalSet, out: torch.Tensor) -> None:
        """Accumulate (loss sum, error count) over a split into ``out`` (2,) float64, on the device."""
        split_sums(self.levers.forward, data.x, data.y, self.batch_size, out, self.config.precision)

    def _point(self, out: torch.Tensor) -> None:
        """Evaluate the point currently in ``self.flat``; write raw sums into ``out`` (4,) float64."""
        if self.config.bn_mode == "recompute" and self.bn:
            self._recompute_bn()
        if self.config.bn_mode == "batch":
            for m in self.bn:
                m.train()
        try:
            for i, split in enumerate(SPLITS):
                if split in self.splits:
                    self._split_sums(getattr(self, split), out[2 * i:2 * i + 2])
        finally:
            for m in self.bn:
                m.eval()

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
        ``out`` (K, 5)."""
        splits = [(i, getattr(self, s).x, getattr(self, s).y) for i, s in enumerate(SPLITS) if s in self.splits]
        bn_x = None
        if self.config.bn_mode == "recompute" and self.bn:
            bn_x = self.train.x if self.bn_index is None else self.train.x.index_select(0, self.bn_index)
        stacked_sums(self.model, self.layout, thetas, splits, self.batch_size, out, self.config.bn_mode, bn_x,
                     self.config.precision)

    # -- many points ---------------------------------------------------------------------------------
    @torch.no_grad()
    def levers_report(self) -> dict:
        """The speed levers as resolved for this evaluator (points in flight measured, CUDA graphs captured by
        evaluating θ₀ once where they are on): what provenance records."""
        with precision_policy(self.config.precision, self.device):
            self.levers.prepare()
        if self.levers.graphs_on and not self.levers.steps:
            self.evaluate_weights(self._theta0)
        return self.levers.describe()

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
        with precision_policy(self.config.precision, self.device):
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
        self.levers.prepare()  # once: channels-last and K resolved (measured where "auto")
        k = self.levers.points_in_flight
        cs = -(-self.config.chunk_size // k) * k  # whole groups of K points per chunk
        sizes = {"train": len(self.train) if self.train is not None else 1,
                 "test": len(self.test) if self.test is not None else 1}
        for start in range(0, len(coords), cs):
            stop = min(start + cs, len(coords))
            sums = torch.zeros(stop - start, 5, dtype=torch.float64, device=self.device)
            if k > 1:
                for j in range(start, stop, k):
                    thetas = torch.addmm(origin, coords_dev[j:min(j + k, stop)], basis)  # (K, D)
                    self.levers.run_stacked(self._stacked_sums, thetas, sums[j - start:j - start + len(thetas)])
            else:
                for j, p in enumerate(range(start, stop)):
                    # θ = origin + basisᵀ c : one fused op writing straight into the model's parameters
                    torch.addmv(origin, basis.t(), coords_dev[p], out=self.flat)
                    self.levers.run_point(self._point, sums[j, :4])
                    if L2_METRIC in metrics:
                        sums[j, 4] = self.flat.double().square().sum()
            host = sums.cpu().numpy()  # the one synchronisation per chunk
            chunk = self._finish(host, sizes, metrics)
            for m in metrics:
                results[m][start:stop] = chunk[m]
            if on_chunk is not None:
                on_chunk(ids[start:stop], chunk)
        return results

    def _finish(self, host: np.ndarray, sizes: dict, metrics: list[str]) -> dict[str, np.ndarray]:
        out = {
            "train_loss": host[:, 0] / sizes["train"],
            "train_err": 100.0 * host[:, 1] / sizes["train"],
            "test_loss": host[:, 2] / sizes["test"],
            "test_err": 100.0 * host[:, 3] / sizes["test"],
        }
        out[L2_METRIC] = out["train_loss"] + 0.5 * self.weight_decay * host[:, 4]
        return {m: out[m] for m in metrics}

    def evaluate_weights(self, theta: torch.Tensor) -> dict[str, float]:
        """Metrics at one weight vector θ (D,)."""
        res = self.evaluate(theta, torch.zeros(1, self.layout.size), np.zeros((1, 1)))
        return {m: float(v[0]) for m, v in res.items()}
