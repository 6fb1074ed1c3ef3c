"""How fast does widthkit evaluate a point in weight space, against what and against which limit?

For each model and BatchNorm mode this script times, in ONE process and interleaved round by round (so that
machine noise, e.g. other jobs on a shared CPU, hits every contestant alike):

(a) ``evaluator``  widthkit's :class:`~widthkit.evaluator.Evaluator` over P points θ₀ + c·D (D: two
    filter-normalised random directions, biases and BN affine excluded, Li et al. 2018);
(b) ``loop``       the per-point loop existing loss-landscape tools run: copy the weights into the model's
    parameters tensor by tensor, ``DataLoader(TensorDataset, batch_size=128)``, ``model.eval()``,
    ``no_grad``, ``.item()`` per batch for the loss and the correct count; in ``recompute`` mode first
    ``torch.optim.swa_utils.update_bn`` over a loader of the BN subset;
(c) ``ceiling``    plain batched forward passes of the same model over the same images, fp32, at each of a
    few batch sizes (the best is reported); on CUDA (or with ``--bf16-ceiling``) also bf16 autocast +
    channels-last.

Points/s of (a), (b) and the ceiling, and the ratios evaluator/loop and evaluator/ceiling, go to stdout as a
Markdown table and, with ``--out``, to a Markdown file plus a JSON file next to it. The ceiling for a BN mode
is the forward work that mode needs per point: N images, plus the BN subset in ``recompute`` mode.

Correctness is checked in the same run: at every timed point the evaluator's loss and error must equal the
loop's (same BN subset, same BN batch size: ``update_bn``'s cumulative average depends on the partition into
batches). On CUDA the script also measures the bf16 ``RuntimeConfig(precision="bf16")`` deviation from fp32 and, where
both modes are run, the recompute-vs-keep time ratio and metric differences.

Data are random CIFAR-shaped images (standard normal, already "normalised") and random labels; the models
are freshly initialised, with their BN running statistics first set at θ₀ by one ``update_bn`` pass (as a
trained checkpoint would carry them). Every point evaluates one split of N images; the BN subset is drawn
from the same images.

    python benchmarks/bench_eval.py --quick                 # smoke run, < 30 s on 2 CPU cores
    python benchmarks/bench_eval.py                         # CPU defaults: N=1024, P=2, 2 rounds
    python benchmarks/bench_eval.py --device cuda           # GPU defaults: N=50,000, P=4, BN subset 5,000
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from widthkit.runtime import tune_allocator
from widthkit.engine.directions import random_directions
from widthkit import EvalConfig, EvalSet, Evaluator
from widthkit.runtime import RuntimeConfig
from widthkit.models import create_model, model_input_shape
from widthkit.engine.space import ThetaLayout

BENCH_BN_MODES = ("keep", "recompute")
DEFAULT_MODELS = ("preresnet20", "preresnet56", "vgg16_bn")
N_DIRECTIONS = 2
# agreement required between evaluator and loop (TF32 convolutions, on by default in cuDNN, pick
# batch-size-dependent kernels, so CUDA gets a looser loss tolerance)
LOSS_RTOL = {"cpu": 1e-4, "cuda": 1e-3}
ERR_ATOL_IMAGES = 1  # error counts may differ by one image per point (an argmax tie broken differently)


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """One benchmark run. ``None`` fields are resolved from the device by :func:`resolve`."""

    device: str = "cpu"  # "cpu" | "cuda"
    models: tuple[str, ...] = DEFAULT_MODELS
    bn_modes: tuple[str, ...] = BENCH_BN_MODES
    n_images: int | None = None  # images per point (CPU 1024, CUDA 50,000)
    points: int | None = None  # P, points per timed evaluation (CPU 2, CUDA 4)
    rounds: int | None = None  # timed rounds; the median over rounds is reported (CPU 2, CUDA 2)
    warmup_rounds: int | None = None  # untimed full rounds first (CPU 0, CUDA 1)
    bn_subset: int | None = None  # images for BN recomputation (N // 10, capped at 5,000)
    eval_batch_size: int | None = None  # evaluator batch (None: widthkit's default, 256 CPU / 4096 CUDA)
    extra_eval_batch_sizes: tuple[int, ...] = ()  # more evaluator contestants at these batch sizes (timing only)
    points_in_flight: tuple[int, ...] = ()  # BN keep: evaluator contestants with K points per forward pass (vmap)
    loop_batch_size: int = 128  # the reference loop's DataLoader batch
    ceiling_batch_sizes: tuple[int, ...] | None = None  # CPU 64,128,256; CUDA 512..8192
    radius: float = 0.2  # point coordinates drawn uniformly from [-radius, radius]² (filter-normalised units)
    seed: int = 0
    amp_check: bool | None = None  # time and compare RuntimeConfig(precision="bf16") (default on for CUDA)
    bf16_ceiling: bool | None = None  # also time a bf16 autocast + channels-last ceiling (default: CUDA only)
    cudnn_benchmark: bool = False
    threads: int | None = None  # torch.set_num_threads (CPU)
    tune_malloc: bool = False  # glibc mallopt: keep freed activation buffers instead of unmapping them (CPU)
    quick: bool = False


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Fill device-dependent defaults and validate; returns a new config."""
    cfg = copy.deepcopy(cfg)
    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {cfg.device!r}; valid choices: cpu, cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    cuda = cfg.device == "cuda"
    bad = [m for m in cfg.bn_modes if m not in BENCH_BN_MODES]
    if bad or not cfg.bn_modes:
        raise ValueError(f"--bn takes a comma list of {', '.join(BENCH_BN_MODES)}, got {','.join(cfg.bn_modes)!r}")
    if not cfg.models:
        raise ValueError("--models needs at least one model name")
    quick = {"n_images": 64, "points": 2, "rounds": 1, "warmup_rounds": 0,
             "eval_batch_size": 48,  # < N, so evaluator and loop partition the images differently
             "ceiling_batch_sizes": (32, 64), "bn_subset": 24}
    full = {"n_images": 50_000 if cuda else 1024, "points": 4 if cuda else 2, "rounds": 2,
            "warmup_rounds": 1 if cuda else 0,
            "ceiling_batch_sizes": (512, 1024, 2048, 4096, 8192) if cuda else (64, 128, 256),
            "amp_check": cuda, "bf16_ceiling": cuda}
    for name, value in {**full, **(quick if cfg.quick else {})}.items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if cfg.bn_subset is None:
        cfg.bn_subset = max(1, min(5000, cfg.n_images // 10))
    cfg.ceiling_batch_sizes = tuple(cfg.ceiling_batch_sizes)
    for name in ("n_images", "points", "rounds", "bn_subset", "loop_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_batch_size", "threads"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1 (or left unset), got {getattr(cfg, name)}")
    if cfg.warmup_rounds < 0:
        raise ValueError(f"warmup_rounds must be >= 0, got {cfg.warmup_rounds}")
    for what in ("ceiling_batch_sizes", "extra_eval_batch_sizes", "points_in_flight"):
        if any(b < 1 for b in getattr(cfg, what)):
            raise ValueError(f"{what} must all be >= 1, got {getattr(cfg, what)}")
    if not cfg.radius > 0:
        raise ValueError(f"radius must be > 0, got {cfg.radius}")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Contestant:
    """One thing that is timed: ``run()`` does ``points`` points' worth of work and returns metrics or None."""

    key: str  # e.g. "evaluator/keep", "loop/recompute", "ceiling/fp32/b256"
    run: Callable[[], dict | None]
    points: int  # points (or passes over the N images, for ceilings) one run covers
    wall: list[float] = field(default_factory=list)  # seconds per run, one per timed round
    cpu: list[float] = field(default_factory=list)  # process CPU seconds (all threads) per run
    result: dict | None = None  # metrics of the first timed run

    def s_per_point(self) -> float:
        return statistics.median(self.wall) / self.points

    def spread(self) -> float:
        """(max − min) / median of the per-round times."""
        return (max(self.wall) - min(self.wall)) / statistics.median(self.wall)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(contestants: list[Contestant], rounds: int, warmup_rounds: int, device: torch.device,
                log: Callable[[str], None]) -> None:
    """Run every contestant once per round, the order rotated each round; record wall and CPU time."""
    n = len(contestants)
    for r in range(warmup_rounds + rounds):
        timed = r >= warmup_rounds
        for i in range(n):
            c = contestants[(i + r) % n]
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            out = c.run()
            _sync(device)
            w1, c1 = time.perf_counter(), time.process_time()
            if timed:
                c.wall.append(w1 - w0)
                c.cpu.append(c1 - c0)
                if c.result is None:
                    c.result = out
        log(f"  {'round' if timed else 'warm-up round'} {r + 1 - warmup_rounds if timed else r + 1} done")


# ----------------------------------------------------------------------------------------------------------
# The three contestants
# ----------------------------------------------------------------------------------------------------------


def make_evaluator_run(ev: Evaluator, origin: torch.Tensor, basis: torch.Tensor, coords: np.ndarray):
    def run() -> dict:
        res = ev.evaluate(origin, basis, coords)
        return {"loss": res["test_loss"], "err": res["test_err"]}
    return run


def make_loop_run(model: nn.Module, layout: ThetaLayout, origin: torch.Tensor, basis: torch.Tensor,
                  coords: np.ndarray, loader: DataLoader, bn_loader: DataLoader | None, device: torch.device):
    """The reference loop of loss-landscape tools (see the module docstring). ``model`` is a private copy."""
    params = dict(model.named_parameters())
    targets = [(params[e.name], origin[e.slice].view(e.shape), [d[e.slice].view(e.shape) for d in basis])
               for e in layout]
    n = len(loader.dataset)

    @torch.no_grad()
    def run() -> dict:
        losses, errs = [], []
        for c in coords:
            for p, w, ds in targets:  # write θ = θ₀ + Σ cᵢ dᵢ into the parameters, tensor by tensor
                new = w.clone()
                for ci, d in zip(c, ds):
                    new.add_(d, alpha=float(ci))
                p.copy_(new)
            if bn_loader is not None:
                update_bn(bn_loader, model, device=device)
            model.eval()
            total_loss, correct = 0.0, 0
            for inputs, labels in loader:
                inputs, labels = inputs.to(device), labels.to(device)
                outputs = model(inputs)
                total_loss += F.cross_entropy(outputs, labels).item() * len(labels)
                correct += outputs.argmax(1).eq(labels).sum().item()
            losses.append(total_loss / n)
            errs.append(100.0 * (n - correct) / n)
        return {"loss": np.array(losses), "err": np.array(errs)}

    return run


def make_ceiling_run(model: nn.Module, x: torch.Tensor, batch_size: int, bf16: bool = False):
    """Plain forward passes over ``x`` at ``batch_size``; bf16: autocast + channels-last (``model`` is then
    converted in place: pass a private copy)."""
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def run() -> None:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, x.shape[0], batch_size):
                model(x[start:start + batch_size])
        return None

    return run


# ----------------------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------------------


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _warm_up(model: nn.Module, x: torch.Tensor, batch_sizes) -> None:
    """One forward batch per batch size: first-call allocations and kernel selection, kept out of timings."""
    with torch.no_grad():
        for b in sorted(set(batch_sizes)):
            model(x[:b])


def compare(a: dict, b: dict, n: int) -> dict:
    """Largest disagreement between two results {"loss": (P,), "err": (P,) %} over N images each."""
    loss_rel = np.abs(a["loss"] - b["loss"]) / np.maximum(np.abs(b["loss"]), 1e-12)
    err_pp = np.abs(a["err"] - b["err"])
    return {"loss_rel": float(loss_rel.max()), "err_pp": float(err_pp.max()),
            "err_images": int(round(float(err_pp.max()) * n / 100.0))}


def bench_model(name: str, cfg: BenchConfig, log: Callable[[str], None]) -> dict:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = create_model(name, num_classes=10)
    shape = model_input_shape(name)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_cpu = torch.randn(cfg.n_images, *shape, generator=gen)
    y_cpu = torch.randint(0, 10, (cfg.n_images,), generator=gen)
    x_dev, y_dev = x_cpu.to(device), y_cpu.to(device)
    data = EvalSet(x_dev, y_dev)

    model = model.to(device)
    has_bn = _has_bn(model)
    if has_bn:  # running statistics at θ₀, as a trained checkpoint carries them
        update_bn(DataLoader(TensorDataset(x_cpu[:cfg.bn_subset]), batch_size=cfg.loop_batch_size), model,
                  device=device)
    model.eval()
    layout = ThetaLayout.from_model(model)
    theta0 = layout.flatten(model).to(device)
    basis = random_directions(layout, theta0, N_DIRECTIONS, seed=cfg.seed, norm="filter", exclude="biasbn")
    rng = np.random.default_rng(cfg.seed)
    coords = rng.uniform(-cfg.radius, cfg.radius, size=(cfg.points, N_DIRECTIONS))

    modes = [m for m in cfg.bn_modes if has_bn or m == "keep"]
    skipped = [m for m in cfg.bn_modes if m not in modes]
    if skipped:
        log(f"  {name} has no BatchNorm: skipping bn mode(s) {skipped} (identical to keep)")
    if not modes:
        modes = ["keep"]
    loader = DataLoader(TensorDataset(x_cpu, y_cpu), batch_size=cfg.loop_batch_size)
    contestants: list[Contestant] = []
    evaluators: dict[str, Evaluator] = {}
    for mode in modes:
        ecfg = EvalConfig(bn_mode=mode, bn_subset=cfg.bn_subset, seed=cfg.seed, chunk_size=cfg.points)
        rt = RuntimeConfig(device=cfg.device, eval_batch_size=cfg.eval_batch_size)
        ev = Evaluator(model, train=data if mode == "recompute" else None, test=data, config=ecfg, runtime=rt,
                       splits=("test",))
        evaluators[mode] = ev
        contestants.append(Contestant(f"evaluator/{mode}", make_evaluator_run(ev, theta0, basis, coords),
                                      cfg.points))
        bn_loader = None
        if mode == "recompute":  # the evaluator's subset and BN batch size: update_bn depends on both
            idx = ev.bn_index.cpu() if ev.bn_index is not None else torch.arange(cfg.n_images)
            bn_loader = DataLoader(TensorDataset(x_cpu[idx]), batch_size=ev.batch_size)
        loop_model = copy.deepcopy(model)
        contestants.append(Contestant(f"loop/{mode}", make_loop_run(loop_model, layout, theta0, basis, coords,
                                                                   loader, bn_loader, device), cfg.points))
        for b in cfg.extra_eval_batch_sizes:  # same BN pass, other evaluation batch: what batch size costs
            xev = Evaluator(model, train=data if mode == "recompute" else None, test=data, config=ecfg,
                            runtime=rt.replace(eval_batch_size=b), splits=("test",))
            contestants.append(Contestant(f"evaluator/{mode}/b{b}", make_evaluator_run(xev, theta0, basis, coords),
                                          cfg.points))
            if not cfg.quick:
                _warm_up(xev.model, x_dev, [b])
        for k in cfg.points_in_flight if mode == "keep" else ():  # several points per pass: measure, then choose
            kev = Evaluator(model, test=data, config=ecfg, runtime=rt.replace(points_in_flight=k), splits=("test",))
            contestants.append(Contestant(f"evaluator/keep/k{k}", make_evaluator_run(kev, theta0, basis, coords),
                                          cfg.points))
        if not cfg.quick:
            _warm_up(ev.model, x_dev, [ev.batch_size])
            _warm_up(loop_model, x_dev, [cfg.loop_batch_size])
        if cfg.amp_check:
            aev = Evaluator(model, train=data if mode == "recompute" else None, test=data,
                            config=ecfg, runtime=rt.replace(precision="bf16"), splits=("test",))
            contestants.append(Contestant(f"evaluator-amp/{mode}", make_evaluator_run(aev, theta0, basis, coords),
                                          cfg.points))
    ceiling_model = copy.deepcopy(model).eval()
    for b in cfg.ceiling_batch_sizes:
        contestants.append(Contestant(f"ceiling/fp32/b{b}", make_ceiling_run(ceiling_model, x_dev, b), 1))
    if not cfg.quick:
        _warm_up(ceiling_model, x_dev, cfg.ceiling_batch_sizes)
    if cfg.bf16_ceiling:
        bf16_model = copy.deepcopy(model).eval()
        for b in cfg.ceiling_batch_sizes:
            contestants.append(Contestant(f"ceiling/bf16-cl/b{b}", make_ceiling_run(bf16_model, x_dev, b, True), 1))

    log(f"{name}: D={layout.size:,}, {len(contestants)} contestants, modes {modes}")
    time_rounds(contestants, cfg.rounds, cfg.warmup_rounds, device, log)
    return summarise_model(name, layout.size, modes, evaluators, contestants, cfg)


def _best_ceiling(by_key: dict[str, Contestant], kind: str) -> tuple[float, int] | None:
    """(passes over the N images per second, batch size) of the fastest ceiling of this kind, or None."""
    rates = [(1 / c.s_per_point(), int(k.rsplit("/b", 1)[1]))
             for k, c in by_key.items() if k.startswith(f"ceiling/{kind}/")]
    return max(rates) if rates else None


def summarise_model(name: str, D: int, modes: list[str], evaluators: dict, contestants: list[Contestant],
                    cfg: BenchConfig) -> dict:
    by_key = {c.key: c for c in contestants}
    N = cfg.n_images
    out = {"model": name, "D": D, "modes": {}, "timings": {}, "ceilings": {}}
    for c in contestants:
        out["timings"][c.key] = {"points_per_run": c.points, "wall_s": c.wall, "cpu_s": c.cpu,
                                 "s_per_point": c.s_per_point(), "spread": c.spread()}
    for kind in ("fp32", "bf16-cl"):
        best = _best_ceiling(by_key, kind)
        if best is not None:
            out["ceilings"][kind] = {"images_per_s": best[0] * N, "batch_size": best[1],
                                     "by_batch": {k.rsplit("/b", 1)[1]: N / c.s_per_point()
                                                  for k, c in by_key.items() if k.startswith(f"ceiling/{kind}/")}}
    tol = LOSS_RTOL[cfg.device]
    for mode in modes:
        ev = evaluators[mode]
        e, lp = by_key[f"evaluator/{mode}"], by_key[f"loop/{mode}"]
        work = N + (min(cfg.bn_subset, N) if mode == "recompute" else 0)  # forward images per point
        row = {
            "evaluator_pts_s": 1 / e.s_per_point(),
            "loop_pts_s": 1 / lp.s_per_point(),
            "eval_batch_size": ev.batch_size,
            "forward_images_per_point": work,
            "check": compare(e.result, lp.result, N),
            "evaluator_metrics": {k: v.tolist() for k, v in e.result.items()},
            "loop_metrics": {k: v.tolist() for k, v in lp.result.items()},
        }
        row["check"]["ok"] = bool(row["check"]["loss_rel"] <= tol and row["check"]["err_images"] <= ERR_ATOL_IMAGES)
        row["eval_over_loop"] = row["evaluator_pts_s"] / row["loop_pts_s"]
        for kind in out["ceilings"]:
            ceil_pts = out["ceilings"][kind]["images_per_s"] / work
            row[f"ceiling_{kind}_pts_s"] = ceil_pts
            row[f"eval_over_ceiling_{kind}"] = row["evaluator_pts_s"] / ceil_pts
        amp = by_key.get(f"evaluator-amp/{mode}")
        if amp is not None:
            row["amp"] = {"pts_s": 1 / amp.s_per_point(), "speedup": e.s_per_point() / amp.s_per_point(),
                          **compare(amp.result, e.result, N)}
            if "bf16-cl" in out["ceilings"]:
                row["amp"]["over_ceiling_bf16-cl"] = row["amp"]["pts_s"] / row["ceiling_bf16-cl_pts_s"]
        out["modes"][mode] = row
    if "keep" in out["modes"] and "recompute" in out["modes"]:
        k, r = by_key["evaluator/keep"], by_key["evaluator/recompute"]
        out["recompute_vs_keep"] = {"time_ratio": r.s_per_point() / k.s_per_point(),
                                    "loss_rel": compare(r.result, k.result, N)["loss_rel"],
                                    "err_pp": compare(r.result, k.result, N)["err_pp"]}
    return out


# ----------------------------------------------------------------------------------------------------------
# Machine and report
# ----------------------------------------------------------------------------------------------------------


def environment(cfg: BenchConfig) -> dict:
    if cfg.device == "cuda":
        dev = torch.cuda.get_device_name(0)
    else:
        dev = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    dev = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except (OSError, AttributeError):
        load = "n/a"
    return {
        "device": cfg.device, "device_name": dev, "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit, "load_average_at_start": load, "malloc_tuned": cfg.tune_malloc,
        "cudnn_tf32": bool(torch.backends.cudnn.allow_tf32) if cfg.device == "cuda" else None,
        "cudnn_benchmark": cfg.cudnn_benchmark if cfg.device == "cuda" else None,
    }


def _f(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:,.0f}"


def markdown(env: dict, cfg: BenchConfig, results: list[dict], elapsed: float) -> str:
    N = cfg.n_images
    facts = [f"torch {env['torch']}", f"{env['threads']} threads", f"commit `{env['commit']}`",
             f"load average at start {env['load_average_at_start']}"]
    if env["malloc_tuned"]:
        facts.append("glibc malloc tuned (mmap threshold 32 MiB, trim 1 GiB)")
    if cfg.device == "cuda":
        facts += [f"cuDNN TF32 {env['cudnn_tf32']}", f"cudnn.benchmark {env['cudnn_benchmark']}"]
    lines = [
        f"## {env['device_name']} ({env['device']}), {env['date']}",
        "",
        ", ".join(facts) + ".",
        f"N = {N:,} images per point, P = {cfg.points} points × {cfg.rounds} timed rounds "
        f"(+{cfg.warmup_rounds} warm-up), median reported; BN subset {min(cfg.bn_subset, N):,} images; "
        f"loop batch {cfg.loop_batch_size}; whole run {elapsed:.0f} s.",
        "",
        "| model | BN | evaluator pts/s | loop pts/s | fp32 ceiling pts/s (batch) | eval/loop | eval/ceiling "
        "| evaluator img/s (batch) | check: loss rel diff, err diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        fp32 = res["ceilings"]["fp32"]
        for mode, row in res["modes"].items():
            chk = row["check"]
            lines.append(
                f"| {res['model']} | {mode} | {_f(row['evaluator_pts_s'])} | {_f(row['loop_pts_s'])} "
                f"| {_f(row['ceiling_fp32_pts_s'])} (b{fp32['batch_size']}) | {row['eval_over_loop']:.2f} "
                f"| {row['eval_over_ceiling_fp32']:.2f} "
                f"| {_f(row['evaluator_pts_s'] * row['forward_images_per_point'])} (b{row['eval_batch_size']}) "
                f"| {chk['loss_rel']:.1e}, {chk['err_images']} img "
                f"{'OK' if chk['ok'] else 'MISMATCH'} |")
    lines += ["", "Ceiling, images/s by batch size (forward only, eval mode, `no_grad`):", "",
              "| model | precision | " + " | ".join(f"b{b}" for b in cfg.ceiling_batch_sizes) + " |",
              "|---|---|" + "---|" * len(cfg.ceiling_batch_sizes)]
    for res in results:
        for kind, c in res["ceilings"].items():
            lines.append(f"| {res['model']} | {kind} | " + " | ".join(
                _f(c["by_batch"][str(b)]) for b in cfg.ceiling_batch_sizes) + " |")
    extra = [r for r in results if "recompute_vs_keep" in r or any("amp" in m for m in r["modes"].values())]
    if extra:
        lines += ["", "| model | recompute/keep time | recompute vs keep: loss rel, err pp | bf16 amp (per mode): "
                      "speed-up over fp32, amp/bf16-ceiling, loss rel diff, err diff |", "|---|---|---|---|"]
        for res in extra:
            rk = res.get("recompute_vs_keep")
            amp = "; ".join(
                f"{m}: ×{row['amp']['speedup']:.2f}, {row['amp'].get('over_ceiling_bf16-cl', float('nan')):.2f}, "
                f"{row['amp']['loss_rel']:.1e}, {row['amp']['err_pp']:.2f} pp"
                for m, row in res["modes"].items() if "amp" in row)
            lines.append(f"| {res['model']} | {rk['time_ratio']:.2f} | {rk['loss_rel']:.1e}, {rk['err_pp']:.2f} pp |"
                         f" {amp or '—'} |" if rk else f"| {res['model']} | — | — | {amp or '—'} |")
    lines += ["", "Every contestant: median wall seconds per point (ceilings: per pass over the N images), "
                  "process CPU seconds (all threads) per point, spread (max−min)/median of the per-round wall "
                  "times:", "", "| model | contestant | wall s/point | CPU s/point | spread |", "|---|---|---|---|---|"]
    for res in results:
        for k, t in res["timings"].items():
            cpu = statistics.median(t["cpu_s"]) / t["points_per_run"]
            spread = f"{t['spread']:.0%}" if len(t["wall_s"]) > 1 else "—"
            lines.append(f"| {res['model']} | {k} | {t['s_per_point']:.3g} | {cpu:.3g} | {spread} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------


def _csv(kind):
    def parse(s: str):
        return tuple(kind(v) for v in s.split(",") if v.strip())
    return parse


def parse_args(argv=None) -> tuple[BenchConfig, str | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--models", type=_csv(str), default=None,
                   help=f"comma list of widthkit model names (default {','.join(DEFAULT_MODELS)}; "
                        "--quick: preresnet20)")
    p.add_argument("--bn", type=_csv(str), default=BENCH_BN_MODES, help="comma list of keep,recompute")
    p.add_argument("--n-images", type=int, help="images per point (default CPU 1024, CUDA 50000)")
    p.add_argument("--points", type=int, help="points per timed evaluation (default CPU 2, CUDA 4)")
    p.add_argument("--rounds", type=int, help="timed rounds, median reported (default 2)")
    p.add_argument("--warmup-rounds", type=int, help="untimed rounds first (default CPU 0, CUDA 1)")
    p.add_argument("--bn-subset", type=int, help="images for BN recomputation (default N/10, at most 5000)")
    p.add_argument("--eval-batch-size", type=int, help="evaluator batch (default: widthkit's, 256 CPU/4096 CUDA)")
    p.add_argument("--extra-eval-batch-sizes", type=_csv(int), default=(),
                   help="comma list: also time the evaluator at these batch sizes (detail table only)")
    p.add_argument("--points-in-flight", type=_csv(int), default=(),
                   help="comma list K: BN keep only, also time the evaluator with K points per forward pass "
                        "(torch.func.vmap over stacked weights; detail table only). Use --points >= K")
    p.add_argument("--loop-batch-size", type=int, default=128)
    p.add_argument("--ceiling-batch-sizes", type=_csv(int),
                   help="comma list (default CPU 64,128,256; CUDA 512,1024,2048,4096,8192)")
    p.add_argument("--radius", type=float, default=0.2, help="coordinates uniform in [-r, r] (default 0.2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp-check", action=argparse.BooleanOptionalAction, default=None,
                   help="time and compare RuntimeConfig(precision='bf16') (default on for CUDA; bf16 autocast on CPU otherwise)")
    p.add_argument("--bf16-ceiling", action=argparse.BooleanOptionalAction, default=None,
                   help="also time a bf16 autocast + channels-last ceiling (default on for CUDA only)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--tune-malloc", action="store_true",
                   help="glibc mallopt (mmap threshold 32 MiB, trim threshold 1 GiB) before timing: removes the "
                        "page-fault cost of large CPU batches")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (N=64, P=2, 1 round, preresnet20; "
                   "exercises every path, its figures mean nothing)")
    p.add_argument("--out", help="Markdown file to write (a .json with the same stem is written too); default "
                                 "benchmarks/results-<device>-<date>.md, none with --quick; '-' for none")
    a = p.parse_args(argv)
    models = a.models or (("preresnet20",) if a.quick else DEFAULT_MODELS)
    cfg = BenchConfig(device=a.device, models=models, bn_modes=a.bn, n_images=a.n_images, points=a.points,
                      rounds=a.rounds, warmup_rounds=a.warmup_rounds, bn_subset=a.bn_subset,
                      eval_batch_size=a.eval_batch_size, extra_eval_batch_sizes=a.extra_eval_batch_sizes,
                      points_in_flight=a.points_in_flight,
                      loop_batch_size=a.loop_batch_size,
                      ceiling_batch_sizes=a.ceiling_batch_sizes, radius=a.radius, seed=a.seed,
                      amp_check=a.amp_check, bf16_ceiling=a.bf16_ceiling, cudnn_benchmark=a.cudnn_benchmark,
                      threads=a.threads, tune_malloc=a.tune_malloc, quick=a.quick)
    out = a.out
    if out is None and not a.quick:
        out = str(Path(__file__).resolve().parent / f"results-{a.device}-{_dt.date.today().isoformat()}.md")
    return cfg, (None if out == "-" else out)


def main(argv=None) -> int:
    cfg, out = parse_args(argv)
    try:
        cfg = resolve(cfg)
        for m in cfg.models:  # fail on a bad name before any timing
            model_input_shape(m)
    except ValueError as e:
        print(f"bench_eval: {e}", file=sys.stderr)
        return 2
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.tune_malloc and not tune_allocator():
        print("bench_eval: --tune-malloc: glibc mallopt is not available here", file=sys.stderr)
        return 2
    if cfg.device == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    env = environment(cfg)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    results = [bench_model(m, cfg, log) for m in cfg.models]
    elapsed = time.perf_counter() - t0
    md = markdown(env, cfg, results, elapsed)
    print(md)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)
        path.with_suffix(".json").write_text(json.dumps(
            {"environment": env, "config": asdict(cfg), "elapsed_s": elapsed, "results": results}, indent=1))
        log(f"wrote {path} and {path.with_suffix('.json')}")
    ok = all(row["check"]["ok"] for r in results for row in r["modes"].values())
    if not ok:
        log("evaluator and loop DISAGREE (see the check column)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
