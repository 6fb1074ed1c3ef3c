"""The Hessian of the training loss as one fixed operator, and what is read off it.

* :class:`HessianOperator`: H·v for L(θ) = (1/N) Σₙ CE(f(xₙ; θ), yₙ) [+ ½·wd·‖θ‖²] at a fixed θ₀, over a fixed
  set of N training examples (the whole train split or a fixed seeded subset, 4,096 by default), with BatchNorm
  in eval mode (the statistics the model came with, or recomputed once at θ₀). Weights and activations are
  float32, every sum over examples is float64, TF32 is off. The examples are cut into batches with fixed
  boundaries and the per-batch float64 results are added in a fixed binary tree over the batch index, so the
  operator returns the same bits on every call; under ``torchrun`` each rank takes whole subtrees of that tree
  and the partial sums are combined in the same tree order, so two ranks return the bits one process does.
  Two ways of computing H·v are implemented — double backward (reverse over reverse) and forward over reverse
  (``torch.func.jvp`` of ``torch.func.grad``) — and the faster on the first batch is chosen and recorded.
* :func:`lanczos`: the top-k eigenpairs and λ_min by Lanczos with full reorthogonalisation, stopped when the
  Ritz residual estimates are below ``tol``·max|λ| (Golub & Van Loan, ch. 10); the residuals ‖Hy − λy‖ it
  reports are then measured, one more product per pair.
* :func:`hutchpp`: the trace by Hutch++ (Meyer, Musco, Musco & Woodruff 2021), with a standard error.
* :func:`slq_probe`, :func:`spectral_density`, :func:`log_spectral_density`, :func:`effective_dimension`: the
  spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao 2019; Yao et al. 2020,
  PyHessian), Gaussian-smoothed, on a linear and on a log |λ| scale; effective dimension Σλ/(λ+α) (MacKay
  1992; Maddox, Benton & Wilson 2020).

>>> op = HessianOperator(model, x, y, bn_mode="keep")
>>> top = lanczos(op.hvp, op.dim, k=5, tol=1e-4, seed=0, device=op.device)
>>> top.eigenvalues, top.lambda_min
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import default_batch_size, free_memory, precision_policy
from ..settings import check_choice, check_int, check_number, choices_of, field_types, option
from ..runtime import distributed
from .batchnorm import bn_modules, recompute_bn_statistics
from .space import ThetaLayout

HvpMethod = Literal["auto", "double-backward", "forward-over-reverse"]
HVP_METHODS = ("double-backward", "forward-over-reverse")
MatVec = Callable[[torch.Tensor], torch.Tensor]
# Random streams of the estimators: (seed, stream, index) -> one CPU generator, the same on every device
STREAM_LANCZOS, STREAM_HUTCHPP, STREAM_SLQ, STREAM_SHARPNESS = 1, 2, 3, 4


# --------------------------------------------------------------------------------------------- configs


@dataclass
class LossConfig:
    """Which training loss curvature and sharpness are measured on (shared by both commands)."""

    loss_subset: int = option(4096, "training examples the loss is taken over: a fixed random subset of N (drawn "
                                     "with --seed); 0: the whole train split", metavar="N")
    l2: bool = option(False, "add ½·wd·‖θ‖² to the loss (wd: --weight-decay or the checkpoint's); shifts every "
                             "Hessian eigenvalue by wd")

    def __post_init__(self):
        check_int("loss_subset", self.loss_subset, minimum=0, optional=False)


@dataclass
class CurvatureConfig:
    """What is read off the Hessian: top of the spectrum, trace, spectral density, effective dimension."""

    top_k: int = option(5, "top Hessian eigenpairs by Lanczos (λ_min comes with them)")
    lanczos_tol: float = option(1e-4, "stop Lanczos when its estimate of every wanted residual ‖Hy − λy‖ is "
                                       "≤ tol·max|λ| (the residuals stored are then measured)")
    lanczos_max_iter: int = option(100, "most Lanczos steps (Hessian-vector products) for the top eigenpairs")
    trace_hvps: int = option(99, "Hessian-vector products of the Hutch++ trace (a multiple of 3; 0: no trace)")
    # 4 probes (measured on the digits checkpoints, 16 probes' spread): the standard error over probes is 2.5-5 %
    # of the effective dimension at α ≤ 0.1, ~14 % at α = 1 and ~25 % of the density's trace (Hutch++: 0.3 %);
    # 8 probes would double the costliest estimator for a factor √2, and fewer steps bias the quadrature
    slq_probes: int = option(4, "random probes of the stochastic Lanczos quadrature density (0: no density)")
    slq_steps: int = option(64, "Lanczos steps per density probe")
    density_points: int = option(512, "grid points of the smoothed densities")
    density_sigma: float = option(0.01, "Gaussian smoothing of the density, as a fraction of the spectrum's range")
    log_density_sigma: float = option(0.05, "Gaussian smoothing of the log-|λ| density, in decades")
    eff_dim_alpha: tuple[float, ...] = option((0.01, 0.1, 1.0), "α of the effective dimension Σ λ/(λ+α), "
                                              "one or more", nargs="+", type=float, metavar="ALPHA")
    hvp: HvpMethod = option("auto", "how H·v is computed (auto: the faster on the first batch, recorded)")

    def __post_init__(self):
        check_int("top_k", self.top_k, optional=False)
        check_int("lanczos_max_iter", self.lanczos_max_iter, optional=False)
        check_number("lanczos_tol", self.lanczos_tol, positive=True, optional=False)
        check_int("trace_hvps", self.trace_hvps, minimum=0, optional=False)
        if self.trace_hvps % 3:
            raise ValueError(f"trace_hvps must be a multiple of 3 (Hutch++ spends a third on the sketch, a third on "
                             f"its trace, a third on the rest), got {self.trace_hvps}; e.g. {3 * round(self.trace_hvps / 3) or 3}")
        check_int("slq_probes", self.slq_probes, minimum=0, optional=False)
        check_int("slq_steps", self.slq_steps, minimum=2, optional=False)
        check_int("density_points", self.density_points, minimum=8, optional=False)
        check_number("density_sigma", self.density_sigma, positive=True, optional=False)
        check_number("log_density_sigma", self.log_density_sigma, positive=True, optional=False)
        alphas = self.eff_dim_alpha if isinstance(self.eff_dim_alpha, (tuple, list)) else (self.eff_dim_alpha,)
        self.eff_dim_alpha = tuple(float(a) for a in alphas)
        if not self.eff_dim_alpha:
            raise ValueError("eff_dim_alpha needs at least one α > 0, e.g. 1.0")
        for a in self.eff_dim_alpha:
            check_number("eff_dim_alpha", a, positive=True, optional=False)
        check_choice("hvp", self.hvp, choices_of(field_types(CurvatureConfig)["hvp"]))
        if self.top_k > self.lanczos_max_iter:
            raise ValueError(f"top_k {self.top_k} eigenpairs need at least as many Lanczos steps, but lanczos_max_iter "
                             f"is {self.lanczos_max_iter}: lower --top-k, or raise --lanczos-max-iter to "
                             f"{self.top_k} or more (about 2·top_k + 20 for them to converge)")

    def check_dim(self, dim: int, what: str = "the model") -> None:
        """Refuse a ``top_k`` above the parameter count D (a model has only D eigenpairs; the file would hold
        top_k × D floats for them)."""
        if self.top_k > dim:
            raise ValueError(f"top_k {self.top_k} is more than the {dim} parameters of {what} (it has only {dim} "
                             f"Hessian eigenpairs): use --top-k {dim} or fewer")


def generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    """A CPU generator for draw ``index`` of estimator ``stream`` (device-independent, reproducible)."""
    return torch.Generator(device="cpu").manual_seed(int(seed) * 1_000_003 + int(stream) * 10_007 + int(index))


def standard_error(samples, axis: int = 0) -> np.ndarray | float:
    """Standard error of the mean of independent estimates along ``axis``: sample std (n − 1) / √n; inf with
    fewer than two (one estimate says nothing about its own spread)."""
    s = np.asarray(samples, dtype=np.float64)
    n = s.shape[axis]
    se = s.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(np.delete(s.shape, axis), math.inf)
    return float(se) if np.ndim(se) == 0 else se


def rademacher(dim: int, gen: torch.Generator, device) -> torch.Tensor:
    """A (dim,) float64 vector of independent ±1."""
    return (torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int8).double() * 2 - 1).to(device)


# --------------------------------------------------------------------------------------------- the operator


def tree_nodes(lo: int, hi: int, depth: int) -> list[tuple[int, int]]:
    """The 2^depth nodes at ``depth`` of the binary tree over batch indices [lo, hi) (split at the midpoint)."""
    if depth == 0:
        return [(lo, hi)]
    mid = (lo + hi) // 2
    return tree_nodes(lo, mid, depth - 1) + tree_nodes(mid, hi, depth - 1)


def tree_sum(fn: Callable[[int], torch.Tensor], lo: int, hi: int) -> torch.Tensor | None:
    """Σ fn(b) over b in [lo, hi), added pairwise along the same binary tree as :func:`tree_nodes` (None if empty)."""
    if hi <= lo:
        return None
    if hi - lo == 1:
        return fn(lo)
    mid = (lo + hi) // 2
    return combine(tree_sum(fn, lo, mid), tree_sum(fn, mid, hi))


def combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


class HessianOperator:
    """The training loss of a model at a fixed θ₀, its gradient and its Hessian-vector products.

    L(θ) = (1/N) Σₙ CE(f(xₙ; θ), yₙ) + ½·wd·‖θ‖², over the N examples ``(x, y)`` given (already the fixed subset),
    with BatchNorm in eval mode: ``bn_mode="keep"`` uses the statistics the model came with, ``"recompute"``
    recomputes them once at θ₀ from ``bn_x`` and keeps them for every product. The caller's model is not
    modified (a private float32 copy is used through ``torch.func.functional_call``).

    Args:
        model: the network.
        x, y: (N, ...) inputs, already normalised, and (N,) integer labels, on the device to compute on.
        weight_decay: wd of the ½·wd·‖θ‖² term (0: cross-entropy only).
        bn_mode: ``"keep"`` or ``"recompute"``.
        bn_x: inputs for ``"recompute"`` (default ``x``).
        batch_size: examples per batch (default: 64 on CPU, 4096 on CUDA); the batch boundaries are fixed.
        method: ``"double-backward"``, ``"forward-over-reverse"`` or ``"auto"`` (timed on the first batch;
            under torchrun rank 0's choice is used by every rank).
        shard: under torchrun, share the batches of every product out over the ranks (default True).
        cache_graphs: keep each batch's gradient graph at θ₀ between products (double backward then costs one
            backward pass per product); None: when they fit in a quarter of the free memory (measured on the
            first batch with saved-tensor hooks).

    Attributes: ``dim`` (D), ``layout``, ``theta0`` (D,) float32, ``method``, ``method_seconds`` (the timing
    that chose it), ``hvp_count`` (products computed so far), ``n_examples``, ``batch_size``.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, weight_decay: float = 0.0,
                 bn_mode: str = "keep", bn_x: torch.Tensor | None = None, batch_size: int | None = None,
                 method: str = "auto", shard: bool = True, cache_graphs: bool | None = None):
        check_choice("bn_mode", bn_mode, ("keep", "recompute"))
        check_choice("hvp", method, ("auto",) + HVP_METHODS)
        check_number("weight_decay", weight_decay, minimum=0, optional=False)
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"need as many labels as inputs, at least one: got {x.shape[0]} inputs, {y.shape[0]} labels")
        self.device = x.device
        self.x, self.y = x.float(), y.long()
        self.weight_decay = float(weight_decay)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layout = ThetaLayout.from_model(self.model)
        self.theta0 = self.layout.flatten(self.model).to(self.device)
        self.batch_size = int(batch_size or default_batch_size(self.device))
        check_int("batch_size", self.batch_size, optional=False)
        if bn_mode == "recompute" and bn_modules(self.model):
            xs = (x if bn_x is None else bn_x).float()
            recompute_bn_statistics(self.model, xs.split(self.batch_size))
        self.bn_mode = bn_mode
        self.buffers = {k: v.detach() for k, v in self.model.named_buffers()}
        self.n_examples = int(x.shape[0])
        self.n_batches = -(-self.n_examples // self.batch_size)
        self.shard = shard
        self.hvp_count = 0
        self._graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graph_bytes = None
        self.cache_graphs = False
        self.cache_graphs = self._choose_caching(cache_graphs)
        self.method_seconds: dict[str, float] = {}
        self.method = method if method != "auto" else self.choose_method()

    @property
    def dim(self) -> int:
        return self.layout.size

    # -- per batch ----------------------------------------------------------------------------------
    def _batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = b * self.batch_size
        return self.x[s:s + self.batch_size], self.y[s:s + self.batch_size]

    def _logits(self, theta: torch.Tensor | dict, xb: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call

        params = theta if isinstance(theta, dict) else self.layout.unflatten(theta)
        return functional_call(self.model, (params, self.buffers), (xb,)).float()

    def _loss_sum(self, theta: torch.Tensor | dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(theta, xb), yb, reduction="sum")

    def _leaves(self, theta: torch.Tensor) -> list[torch.Tensor]:
        # one leaf per parameter tensor (views of θ's storage): autograd then accumulates no slices of a flat
        # vector (about 10% faster on CPU than differentiating w.r.t. θ itself, the same bits)
        return [t.detach().requires_grad_(True) for t in self.layout.unflatten(theta).values()]

    def _gradient_graph(self, b: int, theta: torch.Tensor) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """(parameter leaves, ∇ of batch b's loss sum with its graph); at θ₀ kept for later products when caching."""
        if theta is self.theta0 and b in self._graphs:
            return self._graphs[b]
        xb, yb = self._batch(b)
        with torch.enable_grad():
            leaves = self._leaves(theta)
            loss = self._loss_sum(dict(zip(self.layout.names, leaves)), xb, yb)
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
        if theta is self.theta0 and self.cache_graphs:
            self._graphs[b] = (leaves, grads)
        return leaves, grads

    def _batch_hvp(self, b: int, theta: torch.Tensor, v32: torch.Tensor, method: str) -> torch.Tensor:
        if method == "forward-over-reverse":
            from torch.func import grad, jvp

            xb, yb = self._batch(b)
            with warnings.catch_warnings():  # torch.func's forward mode uses torch.jit.script inside torch
                warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
                _, hv = jvp(grad(lambda th: self._loss_sum(th, xb, yb)), (theta,), (v32,))
            return hv.double()
        leaves, grads = self._gradient_graph(b, theta)
        with torch.enable_grad():
            hv = torch.autograd.grad(grads, leaves, grad_outputs=list(self.layout.unflatten(v32).values()),
                                     retain_graph=b in self._graphs)
        return torch.cat([h.reshape(-1) for h in hv]).double()

    def _batch_loss_grad(self, b: int, theta: torch.Tensor) -> torch.Tensor:
        xb, yb = self._batch(b)
        with torch.enable_grad():
            leaves = self._leaves(theta)
            loss = self._loss_sum(dict(zip(self.layout.names, leaves)), xb, yb)
            grads = torch.autograd.grad(loss, leaves)
        return torch.cat([loss.detach().double().reshape(1)] + [g.reshape(-1).double() for g in grads])

    @torch.no_grad()
    def _batch_loss_err(self, b: int, theta: torch.Tensor) -> torch.Tensor:
        xb, yb = self._batch(b)
        logits = self._logits(theta, xb)
        return torch.stack([F.cross_entropy(logits, yb, reduction="sum").double(),
                            (logits.argmax(dim=1) != yb).sum().double()])

    def _graph_bytes(self) -> int:
        """Bytes autograd saves for the first batch's gradient graph (measured with saved-tensor hooks)."""
        seen = {}

        def pack(t):
            try:
                key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            except (RuntimeError, NotImplementedError):
                key = (id(t), t.numel() * t.element_size())
            seen[key] = key[1]
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            leaves, grads = self._gradient_graph(0, self.theta0.clone())
            del leaves, grads
        return sum(seen.values())

    def _choose_caching(self, cache: bool | None) -> bool:
        """Keep every batch's gradient graph at θ₀ (a product then costs one backward pass instead of three
        passes) when they fit in a quarter of the free memory, or as ``cache`` says."""
        if cache is not None:
            return bool(cache)
        need = self._graph_bytes() * (-(-self.n_batches // max(distributed.world_size() if self.shard else 1, 1)))
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0] / 2
        else:
            free = free_memory(self.device) / 4
        self.graph_bytes = need
        return need <= free

    # -- the sum over batches -----------------------------------------------------------------------
    def _sum(self, fn: Callable[[int], torch.Tensor], size: int) -> torch.Tensor:
        """Σ_b fn(b) (float64, shape (size,)) in the fixed tree order; under torchrun each rank sums its own
        subtrees and the 2^k subtree sums are combined in tree order on every rank (bit-identical to one process)."""
        with precision_policy("fp32", self.device):
            return self._tree(fn, size)

    def _tree(self, fn: Callable[[int], torch.Tensor], size: int) -> torch.Tensor:
        world = distributed.world_size() if self.shard else 1
        if world == 1:
            out = tree_sum(fn, 0, self.n_batches)
            return out if out is not None else torch.zeros(size, dtype=torch.float64, device=self.device)
        import torch.distributed as dist

        depth = math.ceil(math.log2(world))
        nodes = tree_nodes(0, self.n_batches, depth)
        rank = distributed.rank()
        parts = torch.zeros(len(nodes), size, dtype=torch.float64, device=self.device)
        for j, (lo, hi) in enumerate(nodes):
            if j * world // len(nodes) == rank:
                value = tree_sum(fn, lo, hi)
                if value is not None:
                    parts[j] = value
        dist.all_reduce(parts)  # one contributor per row, zeros elsewhere: x + 0 = x, exactly
        level = [parts[j] if hi > lo else None for j, (lo, hi) in enumerate(nodes)]
        while len(level) > 1:
            level = [combine(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        return level[0] if level[0] is not None else torch.zeros(size, dtype=torch.float64, device=self.device)

    # -- public -------------------------------------------------------------------------------------
    def hvp(self, v: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        """H·v at θ₀ (or at ``theta``), (D,) float64, for the mean loss (+ wd·v for the L2 term)."""
        self.layout.check(v)
        theta = self.theta0 if theta is None else theta.to(self.device, torch.float32)
        v64 = v.to(self.device, torch.float64)
        v32 = v64.float()
        hv = self._sum(lambda b: self._batch_hvp(b, theta, v32, self.method), self.dim) / self.n_examples
        self.hvp_count += 1
        return hv + self.weight_decay * v64 if self.weight_decay else hv

    def loss_and_grad(self, theta: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
        """(L(θ), ∇L(θ) (D,) float64) at θ₀ or ``theta``."""
        theta = self.theta0 if theta is None else theta.to(self.device, torch.float32)
        out = self._sum(lambda b: self._batch_loss_grad(b, theta), self.dim + 1) / self.n_examples
        loss, grad = float(out[0]), out[1:]
        if self.weight_decay:
            t64 = theta.double()
            loss += 0.5 * self.weight_decay * float(t64.square().sum())
            grad = grad + self.weight_decay * t64
        return loss, grad

    def loss_and_error(self, theta: torch.Tensor | None = None) -> tuple[float, float]:
        """(L(θ), train error as a fraction in [0, 1]) at θ₀ or ``theta``; forward passes only."""
        theta = self.theta0 if theta is None else theta.to(self.device, torch.float32)
        out = self._sum(lambda b: self._batch_loss_err(b, theta), 2) / self.n_examples
        loss = float(out[0])
        if self.weight_decay:
            loss += 0.5 * self.weight_decay * float(theta.double().square().sum())
        return loss, float(out[1])

    def time_batch(self, method: str | None = None) -> None:
        """One product on the first batch, as every later product computes it (what the thread and method
        choices time; with cached graphs the first call builds the graph)."""
        v = torch.ones(self.dim, dtype=torch.float32, device=self.device)
        with precision_policy("fp32", self.device):
            self._batch_hvp(0, self.theta0, v, method or self.method)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def choose_method(self, repeats: int = 2) -> str:
        """Time both ways of computing H·v on the first batch (alternately, best of ``repeats``), keep the faster;
        under torchrun every rank takes rank 0's choice. The timings go to ``method_seconds``."""
        seconds = {m: math.inf for m in HVP_METHODS}
        for m in HVP_METHODS:
            self.time_batch(m)  # warm-up (first-call overheads, allocator)
        for _ in range(repeats):
            for m in HVP_METHODS:
                t0 = time.perf_counter()
                self.time_batch(m)
                seconds[m] = min(seconds[m], time.perf_counter() - t0)
        best = min(HVP_METHODS, key=lambda m: seconds[m])
        best, self.method_seconds = distributed.broadcast_object((best, seconds))
        return best

    def describe(self) -> dict:
        """What the operator is (recorded in every file)."""
        return {"n_examples": self.n_examples, "batch_size": self.batch_size, "n_batches": self.n_batches,
                "bn_mode": self.bn_mode, "weight_decay_term": self.weight_decay, "hvp_method": self.method,
                "hvp_method_seconds": self.method_seconds,
                "graph_cache": self.cache_graphs, "dtype": "float32 weights, float64 sums", "tf32": False,
                "theta_size": self.dim}


# --------------------------------------------------------------------------------------------- Lanczos


@dataclass
class LanczosResult:
    """Top of the spectrum (descending) and its bottom, with the residuals ‖Hy − λy‖ of each pair.

    ``residuals`` / ``lambda_min_residual`` are measured: one more product H·y per pair, so they include what the
    operator's own rounding does (float32 products: ~1e-6 relative). ``ritz_residuals`` /
    ``lambda_min_ritz_residual`` are Lanczos' estimates |β_m·s_m| that decide when to stop: exact in exact
    arithmetic, they fall far below what the products can resolve (1e-26 and 0 are common) once a pair has
    converged, so they say when to stop, not how accurate a pair is. Not measured (``measure_residuals=False``):
    NaN.
    """

    eigenvalues: np.ndarray  # (k,) float64, descending
    eigenvectors: torch.Tensor  # (k, D) float64, unit norm, largest-magnitude entry positive
    residuals: np.ndarray  # (k,) measured ‖Hy − λy‖
    lambda_min: float
    lambda_min_vector: torch.Tensor  # (D,)
    lambda_min_residual: float  # measured
    iterations: int  # Lanczos steps (products), not counting the residual products
    converged: bool
    ritz_residuals: np.ndarray  # (k,) Lanczos' estimates
    lambda_min_ritz_residual: float


def _tridiagonal_eig(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    from scipy.linalg import eigh_tridiagonal

    a = np.asarray(alphas, dtype=np.float64)
    if len(a) == 1:
        return a.copy(), np.ones((1, 1))
    return eigh_tridiagonal(a, np.asarray(betas[:len(a) - 1], dtype=np.float64))


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the rows of ``basis`` (orthonormal), twice (classical Gram–Schmidt, repeated)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


def _lanczos_step(matvec: MatVec, Q: torch.Tensor, j: int, q: torch.Tensor, device,
                  on_step: Callable[[int], None] | None) -> tuple[float, torch.Tensor]:
    """Step j of Lanczos (top-k and SLQ alike): q becomes basis row j; returns (α_j = qᵀHq, Hq in float64)."""
    Q[j] = q
    w = matvec(q).to(device=device, dtype=torch.float64)
    if on_step is not None:
        on_step(j + 1)
    return float(torch.dot(q, w)), w


def _canonical_sign(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its largest-magnitude entry is positive (eigenvectors are defined up to sign)."""
    idx = vectors.abs().argmax(dim=1)
    signs = torch.sign(vectors.gather(1, idx[:, None]))
    signs[signs == 0] = 1
    return vectors * signs


def measured_residual(matvec: MatVec, vector: torch.Tensor, value: float) -> float:
    """‖H y − λ y‖ of a pair, with one product H·y."""
    return float(torch.linalg.vector_norm(matvec(vector).to(vector) - value * vector))


def lanczos(matvec: MatVec, dim: int, *, k: int = 1, tol: float = 1e-4, max_iter: int = 100, seed: int = 0,
            device="cpu", on_step: Callable[[int], None] | None = None,
            measure_residuals: bool = True) -> LanczosResult:
    """Top-``k`` eigenpairs and the smallest eigenpair of a symmetric operator, by Lanczos with full
    reorthogonalisation.

    Starts from a seeded Gaussian vector; every new Lanczos vector is orthogonalised against all previous ones
    (twice), so the Ritz residual of a pair (λ, y = Q s) is |β_{m+1}·s_m| (in exact arithmetic). Stops when these of
    the
    top ``k`` pairs and of the smallest are all ≤ ``tol``·max|λ|, or after ``max_iter`` steps (``converged``
    False), or when the Krylov space is invariant (β = 0: the Ritz pairs are exact; with fewer Ritz values than
    needed a fresh random vector continues it).

    Args:
        matvec: v (D,) float64 -> H·v (D,) float64.
        dim: D.
        k: how many of the largest eigenvalues (clamped to D; more than ``max_iter`` is refused).
        tol: relative residual tolerance.
        max_iter: most Lanczos steps (clamped to D).
        seed: start vector seed.
        on_step: called with the step count after every product (progress), the residual products included.
        measure_residuals: measure ‖Hy − λy‖ of the k pairs and of λ_min (k + 1 more products).

    Returns:
        :class:`LanczosResult`. Memory: the Lanczos basis, (steps, D) float64, lives on ``device``.
    """
    check_int("k", k, optional=False)
    check_int("max_iter", max_iter, optional=False)
    k = min(k, dim)
    m_max = min(max_iter, dim)
    if k > m_max:
        raise ValueError(f"{k} eigenpairs need at least {k} Lanczos steps, but max_iter is {max_iter}")
    gen = generator(seed, STREAM_LANCZOS)
    Q = torch.zeros(m_max, dim, dtype=torch.float64, device=device)
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(device)
    q = q / torch.linalg.vector_norm(q)
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    j = 0
    for j in range(m_max):
        a, w = _lanczos_step(matvec, Q, j, q, device, on_step)
        w = _orthogonalise(w - a * q, Q[:j + 1])
        b = float(torch.linalg.vector_norm(w))
        alphas.append(a)
        theta, S = _tridiagonal_eig(alphas, betas)
        scale = max(float(np.abs(theta).max()), 1e-300)
        n = len(theta)
        breakdown = b <= 1e-12 * scale
        if not breakdown or j + 1 == m_max:
            res = np.abs(b * S[-1, :])
            wanted = list(range(n - 1, max(n - 1 - k, -1), -1)) + [0]
            if n >= min(k + 1, dim) and res[wanted].max() <= tol * scale:
                converged = True
                break
        if j + 1 == m_max:
            break
        if breakdown:
            # the Krylov space is invariant (its Ritz pairs are exact), but a start vector can miss eigenvectors
            # (e.g. the second copy of a repeated eigenvalue): carry on with a fresh direction orthogonal to it
            r = _orthogonalise(torch.randn(dim, generator=gen, dtype=torch.float64).to(device), Q[:j + 1])
            q = r / torch.linalg.vector_norm(r)
            betas.append(0.0)
        else:
            betas.append(b)
            q = w / b
    m = len(alphas)
    theta, S = _tridiagonal_eig(alphas, betas)
    b_last = b
    res = np.abs(b_last * S[-1, :])
    order = np.argsort(theta)[::-1][:k]
    Sk = torch.as_tensor(S[:, order].copy(), dtype=torch.float64, device=device)
    vectors = _canonical_sign(Sk.T @ Q[:m])
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    i_min = int(np.argmin(theta))
    vmin = torch.as_tensor(S[:, i_min].copy(), dtype=torch.float64, device=device) @ Q[:m]
    vmin = _canonical_sign(vmin[None])[0]
    vmin = vmin / torch.linalg.vector_norm(vmin)
    values = theta[order].copy()
    measured, measured_min = np.full(len(order), np.nan), math.nan
    if measure_residuals:
        for i in range(len(order)):
            measured[i] = measured_residual(matvec, vectors[i], float(values[i]))
            if on_step is not None:
                on_step(m + i + 1)
        measured_min = measured_residual(matvec, vmin, float(theta[i_min]))
        if on_step is not None:
            on_step(m + len(order) + 1)
    return LanczosResult(values, vectors, measured, float(theta[i_min]), vmin, measured_min, m, converged,
                         res[order].copy(), float(res[i_min]))


# --------------------------------------------------------------------------------------------- trace


@dataclass
class TraceEstimate:
    """Hutch++: ``trace`` = ``low_rank`` (exact trace of QᵀHQ) + mean of the residual samples; ``stderr`` is the
    residual samples' standard error (the low-rank part has none given Q)."""

    trace: float
    stderr: float
    low_rank: float
    samples: np.ndarray  # (m/3,) g'ᵀHg' of the deflated Rademacher probes
    hvps: int


def hutchpp(matvec: MatVec, dim: int, hvps: int = 99, *, seed: int = 0, device="cpu",
            on_step: Callable[[int], None] | None = None) -> TraceEstimate:
    """tr(H) by Hutch++ (Meyer et al. 2021, "Hutch++: Optimal Stochastic Trace Estimation", Algorithm 1).

    With n = hvps/3: S, G (D, n) Rademacher; Q = orth(H S); tr ≈ tr(QᵀHQ) + (1/n) Σᵢ gᵢ'ᵀ H gᵢ' with
    g' = (I − QQᵀ) g. Unbiased; the standard error is that of the mean of the n residual samples.
    """
    check_int("hvps", hvps, minimum=3, optional=False)
    n = hvps // 3
    count = [0]

    def mv(v):
        out = matvec(v)
        count[0] += 1
        if on_step is not None:
            on_step(count[0])
        return out.to(device=device, dtype=torch.float64)

    gen = generator(seed, STREAM_HUTCHPP)
    S = torch.stack([rademacher(dim, gen, device) for _ in range(n)], dim=1)  # (D, n)
    HS = torch.stack([mv(S[:, i]) for i in range(n)], dim=1)
    Q, _ = torch.linalg.qr(HS)  # (D, n) orthonormal columns
    low_rank = sum(float(torch.dot(Q[:, i], mv(Q[:, i]))) for i in range(Q.shape[1]))
    samples = []
    for _ in range(n):
        g = rademacher(dim, gen, device)
        g = g - Q @ (Q.T @ g)
        samples.append(float(torch.dot(g, mv(g))))
    s = np.asarray(samples)
    return TraceEstimate(low_rank + float(s.mean()), standard_error(s), low_rank, s, count[0])


# --------------------------------------------------------------------------------------------- density


def slq_probe(matvec: MatVec, dim: int, steps: int, *, seed: int = 0, index: int = 0,
              device="cpu", on_step: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One probe of stochastic Lanczos quadrature: Lanczos (full reorthogonalisation) from a normalised
    Rademacher vector v; the eigenvalues θᵢ of the tridiagonal T and the squared first components wᵢ of its
    eigenvectors are the nodes and weights of the Gauss quadrature Σ wᵢ f(θᵢ) ≈ vᵀf(H)v / vᵀv (exact for
    polynomials of degree < 2·steps). Returns ``(nodes, weights)``, each (steps,); a Krylov space that is
    invariant before ``steps`` ends the probe early (exact), the unused entries get weight 0."""
    steps = min(steps, dim)
    gen = generator(seed, STREAM_SLQ, index)
    q = rademacher(dim, gen, device) / math.sqrt(dim)
    Q = torch.zeros(steps, dim, dtype=torch.float64, device=device)
    alphas, betas = [], []
    for j in range(steps):
        a, w = _lanczos_step(matvec, Q, j, q, device, on_step)
        alphas.append(a)
        if j + 1 == steps:
            break
        w = _orthogonalise(w - a * q, Q[:j + 1])
        b = float(torch.linalg.vector_norm(w))
        if b <= 1e-12 * max(abs(x) for x in alphas + betas + [1e-300]):
            break
        betas.append(b)
        q = w / b
    theta, S = _tridiagonal_eig(alphas, betas)
    nodes = np.zeros(steps)
    weights = np.zeros(steps)
    nodes[:len(theta)] = theta
    weights[:len(theta)] = S[0, :] ** 2
    return nodes, weights


def _gaussian_mixture(grid: np.ndarray, centres: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    z = (grid[:, None] - centres[None, :]) / sigma
    return (np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))) @ weights


def spectral_density(nodes: np.ndarray, weights: np.ndarray, *, points: int = 512, sigma: float = 0.01,
                     grid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The Gaussian-smoothed spectral density ρ(λ) = (1/P) Σ_p Σᵢ w_pi N(λ; θ_pi, σ²) of SLQ probes.

    Args:
        nodes, weights: (P, steps) from :func:`slq_probe` (each probe's weights sum to 1).
        points: grid size; the grid spans [min θ − 5σ, max θ + 5σ], so ∫ρ = 1 up to ~1e-6.
        sigma: smoothing as a fraction of the spectrum's range (max θ − min θ).
        grid: a grid of your own instead (e.g. to draw several models on one axis).

    Returns:
        (grid (G,), density (G,), σ in eigenvalue units). The density integrates to 1 over the real line.
    """
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    used = weights > 0
    lo, hi = float(nodes[used].min()), float(nodes[used].max())
    width = hi - lo if hi > lo else max(abs(hi), 1.0)
    s = sigma * width
    if grid is None:
        grid = np.linspace(lo - 5 * s, hi + 5 * s, points)
    density = _gaussian_mixture(grid, nodes[used], weights[used], s) / nodes.shape[0]
    return grid, density, s


def log_spectral_density(nodes: np.ndarray, weights: np.ndarray, *, points: int = 512, sigma: float = 0.05,
                         floor: float = 1e-4) -> dict:
    """The SLQ density on a log scale: densities of log10 λ (positive nodes) and of log10(−λ) (negative nodes),
    Gaussian-smoothed with ``sigma`` decades, on one grid of log10 |λ|.

    Nodes with |λ| ≤ ``floor``·max|λ| (the bulk at 0, whose Gauss nodes stand for many near-zero eigenvalues at
    no meaningful magnitude) are left off the log axis; their mass is returned as ``excluded``.
    ``∫ positive + ∫ negative + excluded = 1``.

    Returns: ``{"grid" (G,) log10|λ|, "positive" (G,), "negative" (G,), "positive_mass", "negative_mass",
    "excluded", "sigma"}``.
    """
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    p = nodes.shape[0]
    top = float(np.abs(nodes[weights > 0]).max()) if (weights > 0).any() else 1.0
    cut = floor * max(top, 1e-300)
    pos = (weights > 0) & (nodes > cut)
    neg = (weights > 0) & (nodes < -cut)
    mags = np.log10(np.abs(nodes[pos | neg])) if (pos | neg).any() else np.array([0.0])
    grid = np.linspace(mags.min() - 5 * sigma, mags.max() + 5 * sigma, points)
    out = {"grid": grid, "sigma": sigma}
    for name, mask in (("positive", pos), ("negative", neg)):
        if mask.any():
            out[name] = _gaussian_mixture(grid, np.log10(np.abs(nodes[mask])), weights[mask], sigma) / p
        else:
            out[name] = np.zeros_like(grid)
        out[f"{name}_mass"] = float(weights[mask].sum() / p)
    out["excluded"] = float(weights[(weights > 0) & ~pos & ~neg].sum() / p)
    return out


def density_moments(nodes: np.ndarray, weights: np.ndarray, orders=(1, 2)) -> dict[int, float]:
    """E_ρ[λ^p] of the (unsmoothed) SLQ density: (1/P) Σ_p Σᵢ w_pi θ_pi^p ≈ tr(H^p) / D."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    return {o: float((weights * nodes ** o).sum() / nodes.shape[0]) for o in orders}


def effective_dimension(nodes: np.ndarray, weights: np.ndarray, dim: int, alphas) -> np.ndarray:
    """Σⱼ max(λⱼ, 0) / (max(λⱼ, 0) + α) over the whole spectrum, estimated as D·E_ρ[·] from the SLQ probes
    (Maddox et al. 2020; negative eigenvalues count as 0). One value per α."""
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    lam = np.maximum(nodes, 0.0)
    return np.array([dim * float((weights * lam / (lam + a)).sum() / nodes.shape[0]) for a in alphas])


def slq_uncertainty(nodes: np.ndarray, weights: np.ndarray, dim: int, alphas) -> dict:
    """Standard errors of the SLQ estimates over their probes: each probe (one Rademacher start vector) is an
    estimate of its own, unbiased for tr(H^p)/D and for the effective dimension; the reported values are their
    means, so their standard error is :func:`standard_error` over the probes (inf with one probe).

    Returns ``{"trace" (D·E_ρ[λ], the trace the density implies), "trace_stderr", "spectral_moments_stderr" (2,)
    of E_ρ[λ], E_ρ[λ²], "effective_dimension_stderr" (A,), "probes"}``.
    """
    nodes, weights = np.atleast_2d(nodes), np.atleast_2d(weights)
    moments = np.stack([(weights * nodes ** o).sum(axis=1) for o in (1, 2)], axis=1)  # (P, 2)
    lam = np.maximum(nodes, 0.0)
    eff = np.stack([dim * (weights * lam / (lam + a)).sum(axis=1) for a in alphas], axis=1)  # (P, A)
    return {"trace": dim * float(moments[:, 0].mean()), "trace_stderr": dim * float(standard_error(moments[:, 0])),
            "spectral_moments_stderr": np.atleast_1d(standard_error(moments)),
            "effective_dimension_stderr": np.atleast_1d(standard_error(eff)), "probes": int(nodes.shape[0])}


def exact_effective_dimension(eigenvalues: np.ndarray, alphas) -> np.ndarray:
    """Σⱼ max(λⱼ, 0)/(max(λⱼ, 0) + α) from a full list of eigenvalues (a reference for small models)."""
    lam = np.maximum(np.asarray(eigenvalues, dtype=np.float64), 0.0)
    return np.array([float((lam / (lam + a)).sum()) for a in alphas])
