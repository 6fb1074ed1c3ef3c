"""Speed levers of the evaluator: how fast points come, never what they are (beyond float rounding).

Each lever is a :class:`~widthkit.runtime.RuntimeConfig` field (not in a file's config: a file resumed with
other levers continues); each is resolved once per evaluator, and what was chosen, and why, is recorded in the
file's provenance (:meth:`Levers.describe`). The precision policy, which does change results, is applied by
:func:`widthkit.runtime.precision_policy`, not here.

- ``channels_last`` (auto: on for CUDA conv nets; on CPU only with bf16, where it was measured faster): inputs
  are handed to the model in NHWC memory order by a forward pre-hook (:class:`ChannelsLastInput`), so cuDNN
  runs its channels-last convolutions. The weights stay NCHW views of the evaluator's flat θ buffer
  (re-laying them out would break the one-``addmv`` move between points); each convolution converts its
  (small) weight on the fly. Inside stacked (vmap) calls the inputs stay in ``contiguous_format``: some CUDA
  kernels query ``is_contiguous(channels_last)`` of a channels-last activation, which vmap does not
  implement (VGG16-BN in bf16 crashed with "NYI: querying is_contiguous inside of vmap").
- ``cuda_graphs`` (auto: on CUDA): one point's forward passes (the BN subset pass, the train and test splits,
  the last partial batches included: the data are resident, so every replay runs the same shapes) are captured
  once into a CUDA graph after warm-up runs on the capture stream, and replayed per point; the point's weights
  are written into the static flat θ buffer before each replay, the sums come out of a static buffer. With
  several points per pass, the stacked call is captured with a static (K, D) weight buffer; a last group of
  fewer than K points is padded by repeating its last point. Where capture fails the evaluator falls back to
  eager evaluation with a one-line logged reason (CPU: off, with the reason).
- ``compile`` (auto: off on CPU; on CUDA on when the run's points make it pay, :func:`choose_compile`):
  ``torch.compile`` of the evaluation forward pass (the BN recompute pass stays eager: its per-batch momenta
  would recompile it), with inductor's cache in a persistent folder (:func:`compile_cache_dir`).
- ``points_in_flight`` (auto: 1 on CPU; on CUDA the fastest of 1, 4, 16 in a short measurement, K > 1 only
  when it is more than 10 % faster): K points per forward pass through ``torch.func.vmap`` over stacked
  weights (:func:`stacked_sums`); with ``bn_mode="recompute"`` every point's BatchNorm statistics are
  recomputed inside the same stacked call.
- the forward batch size (``eval_batch_size``; unset: 64 on CPU, on CUDA timed from 4,096 doubling up to
  16,384 or the memory limit, the highest images/s kept, :func:`choose_batch_size`).

CPU twins, for the tests: every body that a CUDA graph captures is the eager code itself, and
:class:`EmulatedGraphs` replays it on CPU the way a graph would (ATen ops recorded once on the same tensors,
Python state frozen at capture, nothing run by the capture, host synchronisation during capture an error).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..runtime import RuntimeConfig, autocast
from .batchnorm import bn_modules

log = logging.getLogger("widthkit")

K_CANDIDATES: tuple[int, ...] = (1, 4, 16)  # points_in_flight="auto" on CUDA measures these
# K > 1 is chosen only when at most this fraction of one-point-at-a-time's time per point (more than 10 %
# faster): on an H200, ResNet-56 bf16 took 0.081 s/point at K=1, 0.25 at K=4, 0.265 at K=16 (issue 19)
K_MARGIN = 0.9
WARMUP_RUNS = 2  # eager runs on the capture stream before a CUDA graph is captured
BATCH_START, BATCH_LIMIT = 4096, 16384  # the CUDA forward batch sizes timed when eval_batch_size is unset
# compile="auto" on CUDA: before anything is compiled, a compile is assumed to take COMPILE_PRIOR_S per distinct
# batch shape and to make the forward pass COMPILE_PRIOR_SPEEDUP times faster (an H200 measured 2.26x for
# ResNet-56 bf16 channels-last at batch 16,384, issue 19); it is tried only when the run's points would then
# save more time than the compile takes, and kept only when measured at least 10 % faster (COMPILE_MARGIN)
COMPILE_PRIOR_S = 60.0
COMPILE_PRIOR_SPEEDUP = 1.5
COMPILE_MARGIN = 0.9


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


# -- channels-last ---------------------------------------------------------------------------------------------

def resolve_channels_last(setting, model: nn.Module, device: torch.device, precision="fp32") -> tuple[bool, str]:
    """(on, why) for the ``channels_last`` setting ("auto", True, False).

    "auto" is a fixed rule, not a timing at run time: the choice changes the last bits of the results, and a
    resumed file or another torchrun rank must make the same one. On CPU (2 Xeon cores with AVX-512 bf16,
    torch 2.14, batches of 64, input-only NHWC as here) channels-last made bf16 forward passes 1.43x (VGG16-BN),
    1.57x (ResNet-20) and 2.32x (ResNet-56) faster and left the digits CNN unchanged (0.96x), but in fp32 it was
    mixed (1.20x, 1.23x and 0.83x for VGG16-BN): so on CPU it is on with bf16 only.
    """
    if setting is False:
        return False, "off (asked)"
    if not has_conv(model):
        return False, "off (no convolution in the model)"
    if setting is True:
        return True, "on (asked)"
    if torch.device(device).type == "cuda":
        return True, "on (auto: CUDA conv net)"
    if precision == "bf16":
        return True, "on (auto: CPU with bf16, measured 1.4-2.3x faster on CIFAR ResNets and VGG16-BN)"
    return False, f"off (auto: CPU with {precision}, where it was not reliably faster)"


class ChannelsLastInput:
    """Forward pre-hook: a 4-D input tensor in channels-last (NHWC) memory order, values unchanged; inside
    :meth:`paused` (the stacked vmap calls) inputs are left as they are (contiguous)."""

    def __init__(self):
        self.active = True

    def __call__(self, module: nn.Module, args: tuple):
        if self.active and args and torch.is_tensor(args[0]) and args[0].dim() == 4:
            return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
        return None

    @contextlib.contextmanager
    def paused(self):
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was


# -- several points per forward pass ---------------------------------------------------------------------------

def stacked_sums(model: nn.Module, layout, thetas: torch.Tensor, splits: Sequence[tuple[int, object]],
                 batch_size: int, out: torch.Tensor, bn_mode: str = "keep", bn_data=None,
                 precision="fp32", objective=None) -> None:
    """Raw sums of K points at once through ``torch.func.vmap`` over stacked weights.

    Args:
        model: the network whose structure (and, in ``keep`` mode, BN running statistics) is used; its own
            parameters are not read. Its modules' train/eval modes and BN momenta are restored on return.
        layout: the :class:`~widthkit.engine.space.ThetaLayout` of θ.
        thetas: (K, D) float32, one point per row.
        splits: ``(offset, EvalSet)`` per split; the objective's (sum, count) pairs for that split go to
            ``out[:, offset:offset + 2·metrics]``.
        out: (K, n) float64, added to (the last column gets ‖θ‖², set).
        bn_mode: ``"keep"`` (the model's running statistics, shared) or ``"recompute"``: each point's
            statistics recomputed from ``bn_data`` = ``(EvalSet, index or None)`` inside the same stacked calls
            (per-point (K, C) buffers, cumulative average over batches of ``batch_size``, as the one-point path
            and ``update_bn`` do).
        objective: the :class:`~widthkit.engine.objectives.Objective` (default: cross-entropy and error).

    Convolutions become grouped ones (K groups); on CPU this is slower than one point at a time.
    """
    from torch.func import functional_call, vmap

    from .objectives import Objective

    objective = objective or Objective()
    k = thetas.shape[0]
    params = {e.name: thetas[:, e.slice].view(k, *e.shape) for e in layout}
    bns = bn_modules(model)
    recompute = bn_mode == "recompute" and bool(bns)
    if recompute:
        # every point gets its own copy of every buffer, updated in place by its own BN pass
        buffers = {name: b.unsqueeze(0).repeat(k, *([1] * b.dim())) for name, b in model.named_buffers()}
        buffer_dim = 0
    else:
        buffers, buffer_dim = dict(model.named_buffers()), None

    def forward(p, b, x):
        return functional_call(model, (p, b), (x,))

    stacked = vmap(forward, in_dims=(0, buffer_dim, None))
    device = thetas.device
    if recompute:
        momenta = [m.momentum for m in bns]
        for name, b in buffers.items():  # reset_running_stats() of every point's copy
            if name.endswith("running_var"):
                b.fill_(1)
            elif name.endswith(("running_mean", "num_batches_tracked")):
                b.zero_()
        bn_set, bn_index = bn_data
        try:
            for m in bns:
                m.train()
            for i, (xb, _) in enumerate(bn_set.batches(batch_size, bn_index)):
                for m in bns:  # the cumulative average, without momentum=None's host read of the batch count
                    m.momentum = 1.0 / (i + 1)
                with autocast(device, precision):
                    stacked(params, buffers, xb)
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
                m.eval()
    width = 2 * len(objective.metrics)
    for offset, data in splits:
        for xb, yb in data.batches(batch_size):
            with autocast(device, precision):
                outputs = stacked(params, buffers, xb)  # (K, B, ...)
            for j in range(k):
                objective.accumulate(outputs[j], yb, out[j, offset:offset + width])
    out[:, -1] = thetas.double().square().sum(dim=1)


def choose_points_in_flight(seconds_per_point: Callable[[int], float], candidates: Sequence[int] = K_CANDIDATES,
                            margin: float = K_MARGIN) -> dict:
    """The fastest K of ``candidates`` by ``seconds_per_point(k)`` (inf where it cannot run); K > 1 only when
    it takes at most ``margin`` of K = 1's time. Returns ``{"points_in_flight", "chosen_by": "timing",
    "seconds_per_point": {k: s}}``."""
    seconds = {int(k): float(seconds_per_point(int(k))) for k in candidates}
    base = seconds.get(1, float("inf"))
    best = min(seconds, key=lambda k: (seconds[k], k))
    if best != 1 and not seconds[best] <= margin * base:
        best = 1
    return {"points_in_flight": best, "chosen_by": "timing", "seconds_per_point": seconds}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(run: Callable[[], object], device: torch.device, precision="fp32", repeats: int = 3) -> float:
    """Seconds of ``run()`` under ``precision``'s autocast: one untimed call (kernel selection, allocations,
    compilation), then the best of ``repeats``, synchronised; inf on out-of-memory."""
    device = torch.device(device)
    best = float("inf")
    try:
        for rep in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            with autocast(device, precision):
                run()
            _sync(device)
            if rep:
                best = min(best, time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return float("inf")
    return best


def forward_probe(model: nn.Module, layout, theta: torch.Tensor, x: torch.Tensor, precision="fp32",
                  repeats: int = 3) -> Callable[[int], float]:
    """``seconds_per_point(k)`` for :func:`choose_points_in_flight`: eval-mode forward passes over the batch
    ``x``, one point (K = 1, the model itself) or K stacked copies of ``theta`` (vmap), one untimed run then the
    best of ``repeats``, synchronised; inf on out-of-memory. A proxy for the whole point (no BN pass, no graph
    replay), cheap enough to run before every analysis."""
    from torch.func import functional_call, vmap

    buffers = dict(model.named_buffers())

    @torch.no_grad()
    def seconds_per_point(k: int) -> float:
        if k == 1:
            def run():
                return model(x)
        else:
            thetas = theta.unsqueeze(0).expand(k, -1)
            params = {e.name: thetas[:, e.slice].view(k, *e.shape) for e in layout}
            stacked = vmap(lambda p, xx: functional_call(model, (p, buffers), (xx,)), in_dims=(0, None))

            def run():
                return stacked(params, x)
        return best_seconds(run, x.device, precision, repeats) / k

    return seconds_per_point


# -- the forward batch size ------------------------------------------------------------------------------------

def choose_batch_size(seconds_for: Callable[[int], float], start: int = BATCH_START, limit: int = BATCH_LIMIT,
                      largest: int | None = None) -> dict:
    """The forward batch size with the most images per second, by measurement.

    ``seconds_for(b)`` times one forward pass of ``b`` images (inf where it does not fit in memory). Tried:
    ``start``, 2·``start``, ... up to ``limit``, stopping at the first size that does not fit and at
    ``largest`` (the largest split: a bigger batch holds the same images). The fastest in images/s is kept
    (the smaller on a tie). Returns ``{"batch_size", "chosen_by": "timing", "images_per_second": {b: rate}}``;
    when not even ``start`` fits, ``start`` with ``chosen_by`` saying so (the evaluator's out-of-memory retry
    then halves it).
    """
    rates: dict[int, float] = {}
    b = int(start)
    while True:
        size = b if largest is None else max(1, min(b, int(largest)))
        s = float(seconds_for(size))
        rates[size] = size / s if math.isfinite(s) and s > 0 else 0.0
        if rates[size] == 0.0 or size >= limit or (largest is not None and size >= largest):
            break
        b *= 2
    fitted = {k: v for k, v in rates.items() if v > 0}
    if not fitted:
        return {"batch_size": int(start), "chosen_by": f"timing: even {start} did not fit (halved on "
                                                      "out-of-memory while evaluating)", "images_per_second": rates}
    best = max(fitted, key=lambda k: (fitted[k], -k))
    return {"batch_size": best, "chosen_by": "timing", "images_per_second": rates}


def batch_probe(forward: Callable[[torch.Tensor], object], inputs: Callable[[int], torch.Tensor],
                device: torch.device, precision="fp32", repeats: int = 2) -> Callable[[int], float]:
    """``seconds_for(b)`` for :func:`choose_batch_size`: ``forward`` over the first ``b`` prepared inputs
    (``inputs(b)``), timed by :func:`best_seconds`; inf on out-of-memory (also while preparing the inputs)."""

    @torch.no_grad()
    def seconds_for(b: int) -> float:
        try:
            x = inputs(b)
        except torch.OutOfMemoryError:
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            return float("inf")
        try:
            return best_seconds(lambda: forward(x), device, precision, repeats)
        finally:
            del x

    return seconds_for


# -- torch.compile ---------------------------------------------------------------------------------------------

def compile_cache_dir() -> str:
    """Where inductor keeps compiled kernels between runs: ``$TORCHINDUCTOR_CACHE_DIR`` when the user set it,
    else ``widthkit/inductor`` in the user's cache folder (``$XDG_CACHE_HOME``, ``~/.cache``), which is then set
    for this process (a second run of the same model and shapes loads its kernels instead of compiling)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = str(Path(base) / "widthkit" / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


def compile_forward(model: nn.Module) -> Callable:
    """``torch.compile`` of ``model`` (default mode, static shapes: the evaluator's CUDA graphs, where on, are
    its own), with the persistent cache folder set first."""
    compile_cache_dir()
    return torch.compile(model, dynamic=False)


def compile_probe(model: nn.Module, x: torch.Tensor, precision="fp32", repeats: int = 3
                  ) -> Callable[[], tuple[Callable, float, float]]:
    """``compile_and_time()`` for :func:`choose_compile`: compiles ``model`` (:func:`compile_forward`), runs it
    once on ``x`` (the compile, timed) and times it as :func:`best_seconds` does; returns
    ``(compiled forward, compile seconds, seconds per batch)``."""

    @torch.no_grad()
    def compile_and_time():
        compiled = compile_forward(model)
        _sync(x.device)
        t0 = time.perf_counter()
        with autocast(x.device, precision):
            compiled(x)
        _sync(x.device)
        compile_s = time.perf_counter() - t0
        return compiled, compile_s, best_seconds(lambda: compiled(x), x.device, precision, repeats)

    return compile_and_time


def choose_compile(points: int, eager_batch_s: float, batches_per_point: int, shapes: int,
                   compile_and_time: Callable[[], tuple[Callable, float, float]],
                   prior_s: float = COMPILE_PRIOR_S, prior_speedup: float = COMPILE_PRIOR_SPEEDUP,
                   margin: float = COMPILE_MARGIN) -> dict:
    """Whether a run of ``points`` points should evaluate through a compiled forward pass.

    Args:
        points: points this process will evaluate.
        eager_batch_s: measured seconds of one eager forward batch.
        batches_per_point: forward batches per point that the compiled pass would run (the splits; the BN pass
            stays eager).
        shapes: distinct batch shapes of those batches (each is compiled once: static shapes).
        compile_and_time: ``() -> (compiled, compile seconds, seconds per batch)`` (:func:`compile_probe`);
            called only when compiling is expected to pay: the estimated saving, ``points · batches_per_point ·
            eager_batch_s · (1 - 1/prior_speedup)``, exceeds ``shapes · prior_s``.

    Returns ``{"compile": bool, "reason", "compiled": the compiled forward or None, "seconds": what was
    estimated and measured}``; kept on only when a compiled batch takes at most ``margin`` of an eager one.
    """
    eager_point = eager_batch_s * batches_per_point
    saving = points * eager_point * (1.0 - 1.0 / prior_speedup)
    cost = shapes * prior_s
    seconds = {"points": int(points), "eager_batch_s": eager_batch_s, "batches_per_point": int(batches_per_point),
               "shapes": int(shapes), "estimated_saving_s": saving, "assumed_compile_s": cost,
               "assumed_speedup": prior_speedup}
    if not saving > cost:
        return {"compile": False, "compiled": None, "seconds": seconds,
                "reason": f"off (auto: {points} point{'s' if points != 1 else ''} at {eager_point:.3g} s of eager "
                          f"forward passes each would save "
                          f"about {saving:.0f} s at an assumed {prior_speedup:g}x, less than compiling {shapes} "
                          f"batch shape(s), assumed {cost:.0f} s)"}
    compiled, compile_s, compiled_batch_s = compile_and_time()
    seconds.update(compile_s=compile_s, compiled_batch_s=compiled_batch_s)
    speedup = eager_batch_s / compiled_batch_s if compiled_batch_s > 0 else float("inf")
    if compiled_batch_s <= margin * eager_batch_s:
        return {"compile": True, "compiled": compiled, "seconds": seconds,
                "reason": f"on (auto: measured {speedup:.2f}x faster per forward batch after a {compile_s:.0f} s "
                          f"compile, over {points} points)"}
    return {"compile": False, "compiled": None, "seconds": seconds,
            "reason": f"off (auto: compiled forward measured {speedup:.2f}x of eager, not 10 % faster; the "
                      f"{compile_s:.0f} s compile is not used)"}


# -- CUDA graphs ------------------------------------------------------------------------------------------------

class CaptureFailed(RuntimeError):
    """A graph could not be captured (the evaluator then runs eagerly)."""


class CudaGraphs:
    """Capture and replay with ``torch.cuda.CUDAGraph``: warm-up and capture on one side stream (lazy library
    handles and workspaces are created per stream, so they exist before capture begins), replay on the current
    stream, so it is ordered after the weights were written and before the sums are read."""

    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = None

    def _stream(self):
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)
        return self.stream

    def warmup(self, fn: Callable[[], None], runs: int) -> None:
        s = self._stream()
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(runs):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(s)

    def capture(self, fn: Callable[[], None], mutable: Sequence[torch.Tensor]) -> Callable[[], None]:
        s = self._stream()
        graph = torch.cuda.CUDAGraph()
        first: list[BaseException] = []
        try:
            # the outer stream context puts the caller's stream back even if capture_end raises
            with torch.cuda.device(self.device), torch.cuda.stream(s):
                with torch.cuda.graph(graph, stream=s, capture_error_mode="thread_local"):
                    try:
                        fn()
                    except BaseException as e:  # keep the first error: capture_end's own is less telling
                        first.append(e)
                        raise
        except Exception as e:
            err = first[0] if first else e
            try:
                torch.cuda.synchronize(self.device)
            except RuntimeError:
                pass
            raise CaptureFailed(f"{type(err).__name__}: {_first_line(err)}") from err
        return graph.replay


class NoHostSync(torch.utils._python_dispatch.TorchDispatchMode):
    """Raise on any op that would make the host wait for the device inside a CUDA graph capture: reading a
    tensor's value (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``) or a data-dependent shape."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            raise RuntimeError(f"{name}: a host synchronisation during graph capture (a CUDA capture would fail)")
        return func(*args, **(kwargs or {}))


class EmulatedGraphs:
    """The CPU twin of :class:`CudaGraphs`, for tests: ``capture`` records the ATen ops of one call
    (``make_fx``, real tensors captured by reference, Python state frozen at capture) under :class:`NoHostSync`,
    then puts every tensor in ``mutable`` back as it was (a CUDA capture runs nothing); replay re-runs the
    recorded ops on the same tensors, so a replay sees new values written in place into its static inputs and
    nothing else, as a CUDA graph does."""

    name = "emulated"

    def __init__(self, device=None):
        self.captures = 0

    def warmup(self, fn: Callable[[], None], runs: int) -> None:
        for _ in range(runs):
            fn()

    def capture(self, fn: Callable[[], None], mutable: Sequence[torch.Tensor]) -> Callable[[], None]:
        from torch.fx.experimental.proxy_tensor import make_fx

        saved = [t.clone() for t in mutable]
        try:
            with NoHostSync():
                graph_module = make_fx(fn)()
        except Exception as e:
            raise CaptureFailed(f"{type(e).__name__}: {_first_line(e)}") from e
        finally:
            with torch.no_grad():
                for t, s in zip(mutable, saved):
                    t.copy_(s)
        self.captures += 1
        return graph_module


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else ""


class GraphedStep:
    """``body(out)`` captured once into a graph with a static ``out``; ``__call__(dest)`` replays it and copies
    the sums into ``dest``. Everything else ``body`` reads must be static too (tensors written in place)."""

    def __init__(self, body: Callable[[torch.Tensor], None], like: torch.Tensor, backend, mutable: Sequence[torch.Tensor]):
        self.out = torch.zeros_like(like)
        self.body = body

        def run():
            self.out.zero_()
            body(self.out)

        backend.warmup(run, WARMUP_RUNS)
        self.replay = backend.capture(run, [self.out, *mutable])
        if self.out.is_floating_point():
            self.out.fill_(float("nan"))  # nothing valid until the first replay

    def __call__(self, dest: torch.Tensor) -> None:
        self.replay()
        dest.copy_(self.out)


# -- the levers of one evaluator -----------------------------------------------------------------------------

class Levers:
    """The resolved levers of one evaluator and the code paths they select.

    Args:
        model: the evaluator's private model (weights bound to ``flat``); a channels-last pre-hook may be added.
        flat: the evaluator's flat θ buffer (D,), the static input of single-point graphs.
        layout: θ's layout.
        runtime: the runtime config (its lever settings).
        device: the evaluation device, resolved.
        bn_mode: the evaluation's BatchNorm mode (``batch`` evaluates one point at a time).
        eager: ``eager(compute, out)`` runs ``compute(out)`` from zeroed sums with the evaluator's
            out-of-memory retry (the path when no graph is used).
        probe_batch: a batch of inputs (the evaluator's batch size) for the points-in-flight and compile
            measurements.
        graphs: a capture backend (default: :class:`CudaGraphs` on CUDA); tests pass :class:`EmulatedGraphs`.
        streamed: the splits that are streamed from host memory (copied in by a host thread: nothing a graph
            can capture), which turns graphs off with that reason.
        point_batches: ``() -> (forward batches per point through the compiled pass, distinct batch shapes)``
            for the compile decision.
    """

    def __init__(self, model: nn.Module, flat: torch.Tensor, layout, runtime: RuntimeConfig, device: torch.device,
                 eager: Callable, probe_batch: Callable[[], torch.Tensor], graphs=None, streamed: Sequence[str] = (),
                 bn_mode: str = "keep", point_batches: Callable[[], tuple[int, int]] | None = None):
        self.model, self.flat, self.layout, self.config = model, flat, layout, runtime
        self.bn_mode = bn_mode
        self.streamed = tuple(streamed)
        self.device = torch.device(device)
        self.eager = eager
        self.probe_batch = probe_batch
        self.point_batches = point_batches or (lambda: (1, 1))
        self.channels_last, self.channels_last_reason = resolve_channels_last(
            runtime.channels_last, model, self.device, runtime.precision)
        self.cl_hook: ChannelsLastInput | None = None
        if self.channels_last:
            self.cl_hook = ChannelsLastInput()
            model.register_forward_pre_hook(self.cl_hook)
        self.forward: Callable = model
        self.expected_points: int | None = None
        self.compile_on, self.compile_seconds, self._compile_pending = False, None, False
        if runtime.compile is True:
            self.forward, self.compile_on = compile_forward(model), True
            self.compile_reason = "on (asked; compiled on first use)"
        elif runtime.compile is False:
            self.compile_reason = "off (asked)"
        else:
            self.compile_reason = self._compile_rule()
            self._compile_pending = self.compile_reason is None
            if self._compile_pending:
                self.compile_reason = "auto: decided by a measurement before the first point"
        self.backend, self.graphs_reason = self._resolve_graphs(graphs)
        if runtime.cuda_graphs is True and self.backend is None:  # asked for and not possible: say so, once
            log.warning("cuda_graphs: %s", self.graphs_reason)
        self.steps: dict = {}  # key -> GraphedStep, or None where capture failed
        self.static_thetas: dict[int, torch.Tensor] = {}
        self._k: dict | None = None
        if runtime.points_in_flight != "auto":
            self._k = {"points_in_flight": int(runtime.points_in_flight), "chosen_by": "asked"}

    def _compile_rule(self) -> str | None:
        """compile="auto": the reason it is off without measuring, or None when a measurement decides."""
        if self.device.type != "cuda":
            return (f"off (auto: compile is measured and chosen on CUDA only; on {self.device.type} pass "
                    "compile=True to use it)")
        k = self.config.points_in_flight
        if k != "auto" and int(k) > 1:
            return f"off (auto: points_in_flight {k} asked; the compiled forward pass evaluates one point at a time)"
        return None

    def _resolve_graphs(self, graphs):
        setting = self.config.cuda_graphs
        if setting is False:
            return None, "off (asked)"
        if self.streamed:
            return None, (f"off ({'asked, but ' if setting is True else 'auto: '}the {' and '.join(self.streamed)} "
                          f"split{'s are' if len(self.streamed) > 1 else ' is'} streamed from host memory, batch by "
                          "batch, by a host thread: nothing to capture)")
        if graphs is not None:
            return graphs, f"on ({graphs.name})"
        if self.device.type != "cuda":
            return None, f"off ({'asked, but ' if setting is True else 'auto: '}CUDA graphs need a CUDA device; "\
                         f"evaluating eagerly on {self.device.type})"
        if self.config.compile is True and setting == "auto":
            return None, _GRAPHS_OFF_COMPILED
        return CudaGraphs(self.device), "on (asked)" if setting is True else "on (auto: CUDA)"

    @property
    def graphs_on(self) -> bool:
        return self.backend is not None

    def _stacking(self):
        """The context of stacked (vmap) calls: inputs left contiguous (see :class:`ChannelsLastInput`)."""
        return self.cl_hook.paused() if self.cl_hook is not None else contextlib.nullcontext()

    def prepare(self, points: int | None = None) -> None:
        """Resolve what needs the data or a measurement, once: K, then compile (``"auto"``), for a run of
        ``points`` points (or :attr:`expected_points`, whichever is larger)."""
        if points:
            self.expected_points = max(self.expected_points or 0, int(points))
        self.points_in_flight  # noqa: B018 - resolves it
        if self._compile_pending:
            self._compile_pending = False
            self._choose_compile()

    # -- compile ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _choose_compile(self) -> None:
        if self.points_in_flight > 1:
            self.compile_reason = (f"off (auto: {self.points_in_flight} points in flight were measured faster; "
                                   "the compiled forward pass evaluates one point at a time)")
            return
        x = self.probe_batch()
        eager_s = best_seconds(lambda: self.model(x), self.device, self.config.precision)
        batches, shapes = self.point_batches()
        try:
            choice = choose_compile(self.expected_points or 1, eager_s, batches, shapes,
                                    compile_probe(self.model, x, self.config.precision))
        except Exception as e:  # noqa: BLE001 - an inductor failure must cost the speed-up, not the run
            self.compile_reason = f"off (auto: compiling failed, evaluating eagerly: {type(e).__name__}: {_first_line(e)})"
            log.warning("compile: %s", self.compile_reason)
            return
        self.compile_on, self.compile_reason, self.compile_seconds = choice["compile"], choice["reason"], choice["seconds"]
        if self.compile_on:
            self.forward = choice["compiled"]
            if self.config.cuda_graphs == "auto" and self.backend is not None and not self.steps:
                self.backend, self.graphs_reason = None, _GRAPHS_OFF_COMPILED
        log.info("compile: %s", self.compile_reason)

    # -- points in flight ------------------------------------------------------------------------------------
    @property
    def points_in_flight(self) -> int:
        """K, resolved on first use (a short measurement on CUDA when ``"auto"``)."""
        if self._k is None:
            self._k = self._choose_k()
            k = self._k
            if k["chosen_by"] == "timing":
                log.info("points_in_flight: %d (measured, seconds per point %s)", k["points_in_flight"],
                         {kk: f"{v:.3g}" for kk, v in k["seconds_per_point"].items()})
        return self._k["points_in_flight"]

    def _choose_k(self) -> dict:
        if self.device.type != "cuda":
            return {"points_in_flight": 1, "chosen_by": "auto: CPU (vmap's grouped convolutions are slower there)"}
        if self.bn_mode == "batch":
            return {"points_in_flight": 1, "chosen_by": "auto: bn_mode batch evaluates one point at a time"}
        if self.config.compile is True:
            return {"points_in_flight": 1, "chosen_by": "auto: compile evaluates one point at a time"}
        with torch.no_grad():
            probe = forward_probe(self.model, self.layout, self.flat.clone(), self.probe_batch(), self.config.precision)

            def seconds_per_point(k: int) -> float:
                with self._stacking() if k > 1 else contextlib.nullcontext():
                    return probe(k)

            return choose_points_in_flight(seconds_per_point)

    # -- running points --------------------------------------------------------------------------------------
    def _step(self, key, body: Callable[[torch.Tensor], None], like: torch.Tensor):
        """The graphed step for ``key`` (captured on first use), or None to run eagerly."""
        if self.backend is None:
            return None
        if key not in self.steps:
            try:
                self.steps[key] = GraphedStep(body, like, self.backend, list(self.model.buffers()))
            except (CaptureFailed, torch.OutOfMemoryError) as e:
                self.steps[key] = None
                self.graphs_reason = f"off (capture failed, evaluating eagerly: {str(e).splitlines()[0][:200]})"
                log.warning("cuda_graphs: %s", self.graphs_reason)
                self.backend = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        return self.steps[key]

    def run_point(self, point: Callable[[torch.Tensor], None], out: torch.Tensor) -> None:
        """Sums of the point in ``flat`` into ``out`` (4,): ``point(out)`` replayed from its graph, or eagerly."""
        step = self._step("point", point, out)
        if step is None:
            self.eager(point, out)
        else:
            step(out)

    def run_stacked(self, stacked: Callable[[torch.Tensor, torch.Tensor], None], thetas: torch.Tensor,
                    out: torch.Tensor) -> None:
        """Sums of the points ``thetas`` (n, D), n <= K, into ``out`` (n, 5) through ``stacked(thetas, out)``;
        graphed with a static (K, D) buffer, a short group padded by repeating its last point. Inputs stay in
        contiguous format inside the stacked calls (:class:`ChannelsLastInput`)."""
        with self._stacking():
            self._run_stacked(stacked, thetas, out)

    def _run_stacked(self, stacked, thetas: torch.Tensor, out: torch.Tensor) -> None:
        k = self.points_in_flight
        n = thetas.shape[0]
        if self.backend is not None:
            buf = self.static_thetas.get(k)
            if buf is None:
                buf = self.static_thetas[k] = thetas.new_zeros(k, thetas.shape[1])
            buf[:n].copy_(thetas)
            buf[n:].copy_(thetas[n - 1:n].expand(k - n, -1))
            full = out.new_zeros(k, out.shape[1])
            step = self._step(("stacked", k), lambda o: stacked(buf, o), full)
            if step is not None:
                step(full)
                out.copy_(full[:n])
                return
        self.eager(lambda o: stacked(thetas, o), out)

    def describe(self) -> dict:
        """What was chosen and why (recorded in provenance)."""
        k = self._k or {}
        cl_reason = self.channels_last_reason
        if self.channels_last and k.get("points_in_flight", 1) > 1:
            cl_reason += "; inputs stay contiguous inside the stacked (vmap) calls of points in flight"
        return {
            "channels_last": self.channels_last, "channels_last_reason": cl_reason,
            "cuda_graphs": self.backend is not None,  # None once a capture failed
            "cuda_graphs_reason": self.graphs_reason,
            "compile": self.compile_on, "compile_reason": self.compile_reason,
            **({"compile_seconds": self.compile_seconds} if self.compile_seconds else {}),
            **({"compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")} if self.compile_on else {}),
            "points_in_flight": k.get("points_in_flight"), "points_in_flight_chosen_by": k.get("chosen_by"),
            **({"points_in_flight_seconds": {str(a): b for a, b in k["seconds_per_point"].items()}}
               if "seconds_per_point" in k else {}),
        }


_GRAPHS_OFF_COMPILED = "off (auto: the compiled forward pass is not captured; pass cuda_graphs=True to try both)"
