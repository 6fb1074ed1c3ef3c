"""The prepared GPU benchmark: everything issues 14 and 19 ask of one H200, in at most 8 minutes, into one file.

Run it through ``benchmarks/gpu.sh`` (which adds the hard time limit):

    bash benchmarks/gpu.sh                      # CUDA: writes benchmarks/results/gpu-<date>.md and .json
    bash benchmarks/gpu.sh --out /tmp/gpu.md    # elsewhere
    bash benchmarks/gpu.sh --dry-run            # the same code on CPU with tiny sizes, well under a minute

Data: random CIFAR-shaped uint8 images (values 0..255, normalised with CIFAR-10's constants), 50,000 train and
10,000 test, random labels; freshly initialised models whose BN running statistics are first set at θ₀ by one
``update_bn`` pass over the 5,000-image BN subset. The metric values mean nothing; agreements and times do.

In priority order (the targets first; each measurement has its own budget and the run a deadline):

1. ResNet-20 forward ceilings: plain eval-mode forward passes at batch 1,024 ... 16,384, fp32 (TF32 off), tf32,
   bf16 autocast + channels-last;
2. full points (50,000 train + 10,000 test per point): the evaluator at ``precision="bf16"`` with every lever
   on ``auto`` (its batch size timed up to 16,384, K, compile for a 2,601-point run, CUDA graphs), against the
   per-point loop of loss-landscape tools (fp32, DataLoader batch 128, ``.item()`` per batch);
3. ``python -m pytest -m gpu`` (the GPU tests against CPU references), before anything compiles for minutes;
4. the 51×51 ResNet-56 plane on the full train set (BN keep, as loss-landscape plots it; later widthkit's
   default: BN recomputed from 5,000 images, test split too), its first points timed, extrapolated to 2,601
   with the one-off start (measurements, compile, graph capture) added; then ResNet-20's bf16 + channels-last
   ceiling through ``torch.compile`` (compile time recorded);
5. the trainer's images/s on PreResNet-110 (the recipe's batch 128, augmentation, fp32 / bf16) and what the
   recipe's whole branch protocol (prefix, SGD branch, SWA branch) then takes on this GPU;
6. Hessian-vector products on ResNet-20: widthkit's operator against a plain double-backward loop over the
   same batches (and PyHessian where it is installed), with their agreement;
7. VGG16-BN: ceilings and the bf16 evaluator (points in flight and channels-last included in the matrix);
8. then the rest: BN recompute and fp32 full points, and the lever matrix on a slice (the 10,000 test images per
   point, plus the BN pass in recompute mode): fp32 / tf32 / bf16, points in flight 1 / 4 / 16, CUDA graphs
   on / off, compile on (with and without graphs); the per-metric deviation of bf16 and tf32 from fp32; the fp32
   evaluator against the loop on the same points (a check).

Every measurement has its own time budget (a timed loop stops when it is spent, after at least one timed call)
and the whole run a deadline; what did not fit is marked skipped, an error is recorded and the run goes on.
The results file is rewritten after every section, so a run killed by the outer limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

from widthkit import EvalConfig, EvalSet, Evaluator
from widthkit.engine.directions import random_directions
from widthkit.engine.levers import compile_forward
from widthkit.engine.space import ThetaLayout
from widthkit.models import create_model, model_input_shape
from widthkit.runtime import RuntimeConfig, autocast, precision_policy, random_subset
from widthkit.settings import split_kwargs

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MODELS = ("preresnet20", "preresnet56", "vgg16_bn")
PLANE_MODEL, PLANE_SIDE = "preresnet56", 51
PLANE_POINTS = PLANE_SIDE ** 2
TARGETS = {"eval_over_loop": 20.0, "eval_over_ceiling": 0.9, "plane_keep_s": 300.0, "plane_default_s": 420.0,
           "vgg_over_ceiling": 0.8, "hvp_over_loop": 1.5}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Plan:
    """Sizes and budgets of one run (:func:`plan_for`)."""

    device: str
    models: tuple[str, ...] = MODELS
    n_train: int = 50_000
    n_test: int = 10_000
    bn_subset: int = 5_000
    eval_batch_size: int | None = None  # None: widthkit's default (on CUDA timed, 4,096 up to 16,384)
    ceiling_images: int = 32_768
    ceiling_batch_sizes: tuple[int, ...] = (1024, 4096, 8192, 16384)
    ks: tuple[int, ...] = (1, 4, 16)
    full_points: int = 4  # timed points per full-size contestant (at most; the budget may stop it first)
    slice_points: int = 32  # coordinates available to the lever matrix (K=16 needs 16 per call)
    loop_batch_size: int = 128
    plane_points: int = 32  # at most, from the start of the 51x51 grid
    deadline_s: float = 450.0
    budget_ceilings_s: float = 20.0
    budget_full_s: float = 25.0
    budget_loop_s: float = 20.0
    budget_lever_s: float = 10.0
    budget_plane_s: float = 30.0
    budget_compile_s: float = 20.0  # timing of a compiled ceiling, after its compile
    pytest_s: float = 200.0  # `pytest -m gpu`: killed past this (its own goal: under 240 s)
    trainer_model: str = "preresnet110"
    trainer_recipe: str = "preresnet110-cifar10"
    trainer_images: int = 8_192
    trainer_steps: int = 20  # timed SGD steps per precision (after 3 untimed)
    budget_trainer_s: float = 20.0
    hvp_model: str = "preresnet20"
    hvp_examples: int = 4_096
    hvp_batch_size: int = 1_024
    hvp_products: int = 5
    budget_hvp_s: float = 25.0
    run_pytest: bool = True
    run_plane: bool = True
    seed: int = 0
    dry_run: bool = False


def plan_for(dry_run: bool, device: str | None = None) -> Plan:
    if not dry_run:
        return Plan(device=device or "cuda")
    return Plan(device=device or "cpu", models=("preresnet20",), n_train=48, n_test=24, bn_subset=16,
                eval_batch_size=16, ceiling_images=32, ceiling_batch_sizes=(16, 32), ks=(1, 2), full_points=2,
                slice_points=4, loop_batch_size=16, plane_points=1, deadline_s=120.0, budget_ceilings_s=2.0,
                budget_full_s=2.0, budget_loop_s=1.0, budget_lever_s=1.0, budget_plane_s=2.0,
                budget_compile_s=1.0, pytest_s=90.0, trainer_model="preresnet20", trainer_images=32,
                trainer_steps=2, budget_trainer_s=2.0, hvp_examples=32, hvp_batch_size=16, hvp_products=1,
                budget_hvp_s=2.0, dry_run=True)


# -- timing -----------------------------------------------------------------------------------------------------

class Clock:
    """The run's deadline and each measurement's own budget."""

    def __init__(self, deadline_s: float):
        self.t0 = time.perf_counter()
        self.deadline_s = deadline_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def budget(self, own: float) -> float:
        """A measurement's budget: its own, cut to what is left of the run."""
        return max(0.0, min(own, self.left()))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def guarded(name: str, fn, clock: Clock, min_left: float = 1.0, log=print) -> dict:
    """``fn()`` unless the run's deadline is too close; an exception is recorded, not raised."""
    if clock.left() < min_left:
        log(f"  {name}: skipped (run deadline)")
        return {"skipped": "run deadline reached"}
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # one failing part must not cost the rest of a one-shot GPU run
        log(f"  {name}: ERROR {type(e).__name__}: {e}")
        out = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
               "traceback": traceback.format_exc(limit=6)}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    out["wall_s"] = time.perf_counter() - t0
    return out


def time_evaluator(ev: Evaluator, origin, basis, coords: np.ndarray, budget_s: float, max_points: int,
                   expect: int | None = None) -> dict:
    """The evaluator's start (``levers_report``: batch size, K and compile decided for a run of ``expect`` points,
    CUDA graphs captured; ``setup_s``), one untimed call of K points (``first_call_s``: remaining compiles and
    captures), then timed calls of K points over the same coordinates from the start, until ``max_points`` or
    the budget (at least one timed call)."""
    device = ev.device
    if expect:
        ev.expect_points(expect)
    t0 = time.perf_counter()
    report = ev.levers_report()
    sync(device)
    setup = time.perf_counter() - t0
    k = ev.levers.points_in_flight
    t0 = time.perf_counter()
    ev.evaluate(origin, basis, coords[:k])
    sync(device)
    first = time.perf_counter() - t0
    spent, n, parts = 0.0, 0, []
    while n + k <= min(max_points, len(coords)) and (n == 0 or spent < budget_s):
        sync(device)
        t1 = time.perf_counter()
        parts.append(ev.evaluate(origin, basis, coords[n:n + k]))
        sync(device)
        spent += time.perf_counter() - t1
        n += k
    metrics = {m: np.concatenate([p[m] for p in parts]).tolist() for m in parts[0]}
    return {"points": n, "k": k, "s_per_point": spent / n, "setup_s": setup, "first_call_s": first,
            "metrics": metrics, "levers": {**report, **ev.levers.describe(), "eval_batch_size": ev.batch_size},
            "batch_size": ev.batch_size}


def forward_images(n_eval: int, bn_mode: str, bn_subset: int) -> int:
    return n_eval + (bn_subset if bn_mode == "recompute" else 0)


# -- contestants -------------------------------------------------------------------------------------------------

def _forward_rates(m, xs: torch.Tensor, batch_sizes, precision: str, budget_s: float) -> dict:
    """{batch: images/s} of ``m`` over ``xs`` (one untimed pass per batch size, then the best of two)."""
    device = xs.device
    rates = {}
    t0 = time.perf_counter()
    with precision_policy(precision, device), torch.no_grad():
        for b in batch_sizes:
            if b > xs.shape[0] or (rates and time.perf_counter() - t0 > budget_s):
                break
            try:
                with autocast(device, precision):
                    m(xs[:b])  # first call: kernel selection, allocations (and a compile)
                best = math.inf
                for _ in range(2):
                    sync(device)
                    t1 = time.perf_counter()
                    with autocast(device, precision):
                        for s in range(0, xs.shape[0] - b + 1, b):
                            m(xs[s:s + b])
                    sync(device)
                    best = min(best, time.perf_counter() - t1)
                rates[b] = (xs.shape[0] // b) * b / best
            except torch.OutOfMemoryError:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break
    return rates


def ceilings(model, x: torch.Tensor, plan: Plan, budget_s: float) -> dict:
    """Images/s of plain forward passes: {kind: {"by_batch": {b: img/s}, "best": img/s, "batch": b}} for fp32,
    tf32 and bf16 + channels-last (model and input), at the plan's batch sizes up to 16,384."""
    out = {}
    for kind in ("fp32", "tf32", "bf16-cl"):
        m = copy.deepcopy(model).eval()
        xs = x
        if kind == "bf16-cl":
            m = m.to(memory_format=torch.channels_last)
            xs = x.contiguous(memory_format=torch.channels_last)
        precision = {"fp32": "fp32", "tf32": "tf32", "bf16-cl": "bf16"}[kind]
        rates = _forward_rates(m, xs, plan.ceiling_batch_sizes, precision, budget_s / 3)
        b_best = max(rates, key=rates.get)
        out[kind] = {"by_batch": {str(b): r for b, r in rates.items()}, "best": rates[b_best], "batch": b_best}
        del m
    return out


def compiled_ceiling(model, x: torch.Tensor, batch: int, budget_s: float) -> dict:
    """bf16 + channels-last forward passes through ``torch.compile`` (widthkit's persistent inductor cache) at
    one batch size: {"best": img/s, "batch", "compile_s"}."""
    m = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    xs = x.contiguous(memory_format=torch.channels_last)[:max(batch, (x.shape[0] // batch) * batch)]
    compiled = compile_forward(m)
    t0 = time.perf_counter()
    with precision_policy("bf16", x.device), torch.no_grad(), autocast(x.device, "bf16"):
        compiled(xs[:batch])
    sync(x.device)
    compile_s = time.perf_counter() - t0
    rates = _forward_rates(compiled, xs, (batch,), "bf16", budget_s)
    return {"best": rates[batch], "batch": batch, "compile_s": compile_s}


def loop_point(model, layout, theta: torch.Tensor, x_cpu: torch.Tensor, y_cpu: torch.Tensor, bn_x_cpu,
               batch_size: int, device: torch.device, budget_s: float) -> dict:
    """The per-point loop of loss-landscape tools, fp32: copy θ into the parameters tensor by tensor,
    (``update_bn`` over the BN subset), ``DataLoader(TensorDataset, batch_size)``, ``.to(device)`` and
    ``.item()`` per batch. Stops when the budget is spent; the time of a whole point is extrapolated from the
    images done (stated)."""
    params = dict(model.named_parameters())
    t0 = time.perf_counter()
    with torch.no_grad(), precision_policy("fp32", device):
        for e in layout:
            params[e.name].copy_(theta[e.slice].view(e.shape))
        if bn_x_cpu is not None:
            update_bn(DataLoader(TensorDataset(bn_x_cpu), batch_size=batch_size), model, device=device)
        model.eval()
        bn_s = time.perf_counter() - t0
        loss, correct, seen = 0.0, 0, 0
        t1 = time.perf_counter()
        for xb, yb in DataLoader(TensorDataset(x_cpu, y_cpu), batch_size=batch_size):
            xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            loss += F.cross_entropy(logits, yb).item() * len(yb)
            correct += logits.argmax(1).eq(yb).sum().item()
            seen += len(yb)
            if time.perf_counter() - t0 > budget_s:
                break
        eval_s = time.perf_counter() - t1
    n = len(y_cpu)
    s_point = bn_s + eval_s * n / seen
    res = {"images_timed": seen, "images_per_point": n, "s_per_point": s_point, "extrapolated": seen < n}
    if seen == n:
        res["metrics"] = {"loss": loss / n, "err": 100.0 * (n - correct) / n}
    return res


def deviation(a: dict, b: dict) -> dict:
    """Largest difference per metric between two contestants' metrics over their common points: losses
    relative, errors in percentage points."""
    out = {}
    for m in a["metrics"]:
        if m not in b["metrics"]:
            continue
        n = min(len(a["metrics"][m]), len(b["metrics"][m]))
        va, vb = np.asarray(a["metrics"][m][:n]), np.asarray(b["metrics"][m][:n])
        if m.endswith("_err"):
            out[m] = {"abs_pp": float(np.abs(va - vb).max())}
        else:
            out[m] = {"rel": float((np.abs(va - vb) / np.maximum(np.abs(vb), 1e-12)).max())}
    return out


# -- the run -----------------------------------------------------------------------------------------------------

@dataclass
class Subject:
    """One model at θ₀ with its directions, the data resident on the device."""

    model: torch.nn.Module
    layout: ThetaLayout
    theta0: torch.Tensor
    basis: torch.Tensor  # (2, D) filter-normalised random directions, biases and BN excluded


def make_data(plan: Plan, shape, device: torch.device) -> dict:
    """Random uint8 CIFAR-shaped images normalised like CIFAR-10 and random labels: EvalSets on the device and
    the CPU tensors (for the loop); the BN subset indices are the evaluator's own (same seed)."""
    g = torch.Generator().manual_seed(plan.seed)
    mean = torch.tensor(CIFAR_MEAN[:shape[0]]).view(1, -1, 1, 1)
    std = torch.tensor(CIFAR_STD[:shape[0]]).view(1, -1, 1, 1)

    def split(n):
        u8 = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        return u8, (u8.float() / 255 - mean) / std, torch.randint(0, 10, (n,), generator=g)

    tr, te = split(plan.n_train), split(plan.n_test)
    idx = random_subset(plan.n_train, plan.bn_subset, plan.seed)
    m, s = CIFAR_MEAN[:shape[0]], CIFAR_STD[:shape[0]]
    # the evaluator keeps uint8 pixels resident and normalises per batch; the loop gets the same floats
    return {"train": EvalSet(tr[0].to(device), tr[2], m, s, device), "test": EvalSet(te[0].to(device), te[2], m, s, device),
            "train_cpu": (tr[1], tr[2]), "test_cpu": (te[1], te[2]), "bn_x_cpu": tr[1] if idx is None else tr[1][idx]}


LEVERS_KEEP = (("fp32 K1", dict(precision="fp32", points_in_flight=1)),
               ("tf32 K1", dict(precision="tf32", points_in_flight=1)),
               ("bf16 K1", dict(precision="bf16", points_in_flight=1)),
               ("bf16 K1, no graphs", dict(precision="bf16", points_in_flight=1, cuda_graphs=False)),
               ("bf16 K1, no graphs, no channels-last", dict(precision="bf16", points_in_flight=1, cuda_graphs=False,
                                                            channels_last=False)))
LEVERS_COMPILE = (("bf16 K1, compile", dict(precision="bf16", points_in_flight=1, compile=True)),
                  ("bf16 K1, compile + graphs", dict(precision="bf16", points_in_flight=1, compile=True,
                                                     cuda_graphs=True)))
LEVERS_RECOMPUTE = (("fp32 K1", dict(precision="fp32", points_in_flight=1)),
                    ("bf16 K1", dict(precision="bf16", points_in_flight=1)),
                    ("bf16 K1, no graphs", dict(precision="bf16", points_in_flight=1, cuda_graphs=False)))


class Bench:
    """The measurements, in priority order (the targets first), each guarded; the file rewritten after each."""

    def __init__(self, plan: Plan, device: torch.device, clock: Clock, results: dict, out: Path | None, log):
        self.plan, self.device, self.clock, self.results, self.out, self.log = plan, device, clock, results, out, log
        self.subjects: dict[str, Subject] = {}
        self.data: dict[tuple, dict] = {}

    # -- set-up -----------------------------------------------------------------------------------------------
    def data_for(self, name: str) -> dict:
        shape = tuple(model_input_shape(name))
        if shape not in self.data:
            self.data[shape] = make_data(self.plan, shape, self.device)
        return self.data[shape]

    def subject(self, name: str) -> Subject:
        if name not in self.subjects:
            torch.manual_seed(self.plan.seed)
            model = create_model(name, num_classes=10).to(self.device)
            update_bn(DataLoader(TensorDataset(self.data_for(name)["bn_x_cpu"]), batch_size=256), model,
                      device=self.device)  # running statistics at θ₀, as a trained checkpoint carries them
            model.eval()
            layout = ThetaLayout.from_model(model)
            theta0 = layout.flatten(model).to(self.device)
            basis = random_directions(layout, theta0, 2, seed=self.plan.seed, norm="filter", exclude="biasbn")
            self.subjects[name] = Subject(model, layout, theta0, basis)
            self.model_result(name)["D"] = layout.size
            self.log(f"{name}: D = {layout.size:,}")
        return self.subjects[name]

    def model_result(self, name: str) -> dict:
        return self.results["models"].setdefault(name, {"model": name, "ceilings": {}, "full": {}, "levers": {},
                                                        "deviation": {}})

    def coords(self, n: int) -> np.ndarray:
        return np.random.default_rng(self.plan.seed).uniform(-0.2, 0.2, size=(n, 2))

    def evaluator(self, name: str, splits, **settings) -> Evaluator:
        """An evaluator of ``name`` on the resident splits; ``settings`` are evaluation and runtime fields."""
        plan, data = self.plan, self.data_for(name)
        how, what = split_kwargs(RuntimeConfig, {"eval_batch_size": plan.eval_batch_size, **settings})
        config = EvalConfig(**{"bn_subset": plan.bn_subset, "seed": plan.seed, "chunk_size": 64, **what})
        return Evaluator(self.subject(name).model, train=data["train"], test=data["test"], config=config,
                         runtime=RuntimeConfig(**{**how, "device": str(self.device)}), splits=splits)

    def save(self) -> None:
        self.results["elapsed_s"] = self.clock.elapsed()
        self.results["targets"] = targets(self.results)
        if self.out is not None:
            write(self.results, self.out)

    def run(self, label: str, where: dict, key: str, fn, min_left: float = 3.0) -> None:
        where[key] = guarded(label, fn, self.clock, min_left=min_left, log=self.log)
        _log_rate(self.log, label, where[key])
        gc.collect()  # an evaluator and its levers refer to each other: free its graphs' memory now
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.save()

    # -- measurements ---------------------------------------------------------------------------------------
    def ceilings(self, name: str) -> None:
        if self.model_result(name).get("ceilings"):
            return
        sub = self.subject(name)
        x = self.data_for(name)["train"].inputs(self.plan.ceiling_images)
        self.run(f"{name} ceilings", self.model_result(name), "ceilings",
                 lambda: ceilings(sub.model, x, self.plan, self.clock.budget(self.plan.budget_ceilings_s)))

    def compiled_ceiling(self, name: str) -> None:
        """bf16 + channels-last through torch.compile, at the batch where the eager bf16 ceiling peaked."""
        res = self.model_result(name)
        eager = res.get("ceilings", {}).get("bf16-cl", {})
        if "batch" not in eager or "bf16-cl-compiled" in res["ceilings"]:
            return
        sub = self.subject(name)
        x = self.data_for(name)["train"].inputs(self.plan.ceiling_images)
        self.run(f"{name} compiled ceiling", res["ceilings"], "bf16-cl-compiled",
                 lambda: compiled_ceiling(sub.model, x, eager["batch"], self.clock.budget(self.plan.budget_compile_s)),
                 min_left=60.0 if not self.plan.dry_run else 1.0)

    def full(self, name: str, precision: str, bn_mode: str, **over) -> None:
        """The evaluator on whole points: every train and test image; levers decided for a plane's points."""
        plan = self.plan
        if f"evaluator {precision} {bn_mode}" in self.model_result(name)["full"]:
            return

        def go():
            sub = self.subject(name)
            ev = self.evaluator(name, ("train", "test"), precision=precision, bn_mode=bn_mode, **over)
            r = time_evaluator(ev, sub.theta0, sub.basis, self.coords(max(plan.full_points, max(plan.ks))),
                               self.clock.budget(plan.budget_full_s), plan.full_points, expect=PLANE_POINTS)
            r["forward_images_per_point"] = forward_images(plan.n_train + plan.n_test, bn_mode, plan.bn_subset)
            return r
        self.run(f"{name} evaluator {precision} {bn_mode}", self.model_result(name)["full"],
                 f"evaluator {precision} {bn_mode}", go)

    def loop(self, name: str, bn_mode: str) -> None:
        if f"loop fp32 {bn_mode}" in self.model_result(name)["full"]:
            return

        def go():
            sub, data = self.subject(name), self.data_for(name)
            x = torch.cat([data["train_cpu"][0], data["test_cpu"][0]])
            y = torch.cat([data["train_cpu"][1], data["test_cpu"][1]])
            bn_x = data["bn_x_cpu"] if bn_mode == "recompute" else None
            return loop_point(copy.deepcopy(sub.model), sub.layout, sub.theta0, x, y, bn_x, self.plan.loop_batch_size,
                              self.device, self.clock.budget(self.plan.budget_loop_s))
        self.run(f"{name} loop fp32 {bn_mode}", self.model_result(name)["full"], f"loop fp32 {bn_mode}", go)

    def levers(self, name: str, bn_mode: str) -> None:
        """The lever matrix on the slice (the test split, + the BN pass), deviations from fp32, the loop check."""
        plan, res = self.plan, self.model_result(name)
        entries = list(LEVERS_KEEP if bn_mode == "keep" else LEVERS_RECOMPUTE)
        entries += [(f"bf16 K{k}", dict(precision="bf16", points_in_flight=k)) for k in plan.ks if k > 1]
        if not plan.dry_run:  # compiling on a CPU takes minutes; tests/test_levers.py covers the compile path there
            entries += list(LEVERS_COMPILE)
        for label, over in entries:
            def go(over=over):
                sub = self.subject(name)
                ev = self.evaluator(name, ("test",), bn_mode=bn_mode, **over)
                k = int(over["points_in_flight"])
                r = time_evaluator(ev, sub.theta0, sub.basis, self.coords(plan.slice_points),
                                   self.clock.budget(plan.budget_lever_s), max(2 * k, min(16, plan.slice_points)))
                r["forward_images_per_point"] = forward_images(plan.n_test, bn_mode, plan.bn_subset)
                return r
            self.run(f"{name} {label} / {bn_mode}", res["levers"], f"{label} / {bn_mode}", go)
        ref = res["levers"].get(f"fp32 K1 / {bn_mode}", {})
        if "metrics" not in ref:
            return
        for key, r in res["levers"].items():
            if key.endswith(f"/ {bn_mode}") and "metrics" in r and not key.startswith("fp32 K1 "):
                res["deviation"][key] = deviation(r, ref)

        def check():  # the fp32 evaluator against the loop, on the first point, at the evaluator's batch size
            sub, data = self.subject(name), self.data_for(name)
            theta = sub.theta0 + torch.as_tensor(self.coords(1)[0], dtype=torch.float32, device=self.device) @ sub.basis
            bn_x = data["bn_x_cpu"] if bn_mode == "recompute" else None
            lp = loop_point(copy.deepcopy(sub.model), sub.layout, theta, *data["test_cpu"], bn_x, ref["batch_size"],
                            self.device, math.inf)
            ev = {"loss": ref["metrics"]["test_loss"][0], "err": ref["metrics"]["test_err"][0]}
            rel = abs(ev["loss"] - lp["metrics"]["loss"]) / max(abs(lp["metrics"]["loss"]), 1e-12)
            images = round(abs(ev["err"] - lp["metrics"]["err"]) * plan.n_test / 100)
            return {"loop": lp["metrics"], "evaluator": ev, "loss_rel": rel, "err_images": images,
                    "ok": rel <= 1e-4 and images <= 1}
        self.run(f"{name} check vs loop / {bn_mode}", res["deviation"], f"loop vs fp32 K1 / {bn_mode}", check)

    def plane(self, label: str, splits, **over) -> None:
        """A 51x51 plane around θ₀ on the full splits: the first points of the grid, timed, extrapolated."""
        plan = self.plan
        if not plan.run_plane or label in self.results.get("plane", {}).get("variants", {}):
            return
        total = PLANE_SIDE ** 2
        axis = np.linspace(-1, 1, PLANE_SIDE)
        grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        res = self.results.setdefault("plane", {"model": PLANE_MODEL, "grid": f"{PLANE_SIDE}x{PLANE_SIDE}",
                                                "points_total": total, "variants": {}})

        def go():
            sub = self.subject(PLANE_MODEL)
            ev = self.evaluator(PLANE_MODEL, splits, **over)
            r = time_evaluator(ev, sub.theta0, sub.basis, grid, self.clock.budget(plan.budget_plane_s),
                               plan.plane_points, expect=total)
            r["slice"] = f"grid points 0..{r['points'] - 1} of {total} (first row), every image of {'+'.join(splits)}"
            # the one-off start (measurements, compile, capture, the first K points) + the remaining points
            r["extrapolated_s"] = r["setup_s"] + r["first_call_s"] + r["s_per_point"] * (total - r["k"])
            r.pop("metrics")
            return r
        self.run(f"plane {label}", res["variants"], label, go)

    # -- beyond the evaluator ---------------------------------------------------------------------------------
    def pytest(self) -> None:
        """``python -m pytest -m gpu`` in a child process (the GPU tests against CPU references)."""
        plan = self.plan
        if not plan.run_pytest:
            return

        def go():
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            limit = max(10.0, min(plan.pytest_s, self.clock.left() - 5))
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                   "--continue-on-collection-errors"]  # a module that fails to import must not hide the rest
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
                code, out = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as e:
                code, out = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
                    else (e.stdout or "")
            lines = [ln for ln in out.strip().splitlines() if ln.strip()]
            summary = next((ln for ln in reversed(lines) if " in " in ln and ("passed" in ln or "skipped" in ln
                                                                            or "failed" in ln or "error" in ln)),
                           lines[-1] if lines else "")
            counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
            return {"command": "python -m pytest -m gpu", "exit_code": code, "seconds": time.perf_counter() - t0,
                    "summary": summary.strip("= ") if code is not None else f"killed after {limit:.0f} s",
                    "counts": counts, "tail": "\n".join(lines[-40:]),
                    "passed": code == 0 and counts.get("passed", 0) > 0}
        self.run("pytest -m gpu", self.results, "pytest", go, min_left=15.0)

    def trainer(self) -> None:
        """The trainer's own SGD epoch function (the recipe's batch, momentum, weight decay, augmentation) on
        CIFAR-shaped data: images/s per precision, and the recipe's whole branch protocol at that rate."""
        plan = self.plan

        def go():
            from widthkit.training.recipes import load_recipe
            from widthkit.training.trainer import TrainData, train_epoch

            cfg = load_recipe(plan.trainer_recipe)
            if plan.dry_run:
                cfg = cfg.replace(batch_size=8)
            g = torch.Generator().manual_seed(plan.seed)
            n = max(plan.trainer_images, cfg.batch_size * (plan.trainer_steps + 3))
            mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
            x = ((torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255 - mean) / std).to(self.device)
            y = torch.randint(0, 10, (n,), generator=g).to(self.device)
            fill = tuple((-m / s) for m, s in zip(CIFAR_MEAN, CIFAR_STD))
            out = {"model": plan.trainer_model, "recipe": plan.trainer_recipe, "batch_size": cfg.batch_size,
                   "augment": cfg.augment, "by_precision": {}}
            for precision in ("fp32", "bf16"):
                torch.manual_seed(plan.seed)
                model = create_model(plan.trainer_model, num_classes=10).to(self.device)
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                      weight_decay=cfg.weight_decay)
                warm = TrainData(x[:3 * cfg.batch_size], y[:3 * cfg.batch_size], None, None, 10, fill)
                timed = TrainData(x[:(plan.trainer_steps + 1) * cfg.batch_size],
                                  y[:(plan.trainer_steps + 1) * cfg.batch_size], None, None, 10, fill)
                with precision_policy(precision, self.device):
                    train_epoch(model, opt, warm, cfg, torch.Generator().manual_seed(1), precision=precision)
                    sync(self.device)
                    t0 = time.perf_counter()
                    train_epoch(model, opt, timed, cfg, torch.Generator().manual_seed(2), precision=precision)
                    sync(self.device)
                    secs = time.perf_counter() - t0
                    test = x[:min(len(x), 4 * cfg.batch_size)]
                    eval_rate = _forward_rates(model.eval(), test, (len(test),), precision, 5.0)
                out["by_precision"][precision] = {"images_per_s": len(timed.y_train) / secs,
                                                  "eval_images_per_s": next(iter(eval_rate.values()), float("nan"))}
            # the branch protocol: prefix to swa_start, SGD branch to the budget, SWA branch to swa_budget x budget,
            # every epoch over the 50,000 training images and evaluated on the 10,000 test images
            prefix = cfg.swa_start_epoch
            epochs = prefix + (cfg.epochs - prefix) + (cfg.swa_end_epoch - prefix)
            out["protocol"] = {"epochs": epochs, "prefix": prefix, "sgd_branch": cfg.epochs - prefix,
                               "swa_branch": cfg.swa_end_epoch - prefix}
            for precision, r in out["by_precision"].items():
                r["protocol_hours"] = epochs * (50_000 / r["images_per_s"] + 10_000 / r["eval_images_per_s"]) / 3600
            return out
        self.run(f"trainer {plan.trainer_model}", self.results, "trainer", go)

    def hvp(self) -> None:
        """H·v on ResNet-20: widthkit's operator against the plain double-backward loop over the same batches
        (benchmarks/bench_hvp.py's), and PyHessian's where it is installed; agreement and products per second."""
        plan = self.plan

        def go():
            import importlib.util

            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_hvp import plain_loop
            from widthkit.engine.curvature import HessianOperator

            sub = self.subject(plan.hvp_model)
            data = self.data_for(plan.hvp_model)
            x = data["train"].inputs(plan.hvp_examples)
            y = data["train"].y[:plan.hvp_examples]
            model = copy.deepcopy(sub.model).eval()
            op = HessianOperator(model, x, y, batch_size=plan.hvp_batch_size)
            batches = [(x[i:i + plan.hvp_batch_size], y[i:i + plan.hvp_batch_size])
                       for i in range(0, len(y), plan.hvp_batch_size)]
            loop_model = copy.deepcopy(model)
            for p in loop_model.parameters():
                p.requires_grad_(True)
            loop = plain_loop(loop_model, batches)
            contestants = {"widthkit": op.hvp, "double-backward loop": lambda v: loop(v)}
            if importlib.util.find_spec("pyhessian") is not None:  # never installed here: no network on the GPU
                from pyhessian import hessian as pyh_hessian

                ph = pyh_hessian(copy.deepcopy(loop_model), torch.nn.CrossEntropyLoss(), dataloader=batches,
                                 cuda=self.device.type == "cuda")

                def ph_hvp(v):
                    chunks, o = [], 0
                    for q in ph.params:
                        chunks.append(v[o:o + q.numel()].view_as(q).float())
                        o += q.numel()
                    return torch.cat([h.reshape(-1) for h in ph.dataloader_hv_product(chunks)[1]]).double()

                contestants["pyhessian"] = ph_hvp
            v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(self.device)
            out = {"model": plan.hvp_model, "examples": int(len(y)), "batch_size": plan.hvp_batch_size,
                   "method": op.method, "method_seconds": op.method_seconds, "graph_cache": op.cache_graphs,
                   "pyhessian": "pyhessian" in contestants, "contestants": {}}
            budget = self.clock.budget(plan.budget_hvp_s) / len(contestants)
            ref = None
            with precision_policy("fp32", self.device):  # every contestant in float32 (TF32 off)
                for name, fn in contestants.items():
                    first = fn(v)  # warm-up (graph caches, allocations)
                    ref = first if ref is None else ref
                    times = []
                    while len(times) < plan.hvp_products and (not times or sum(times) < budget):
                        sync(self.device)
                        t0 = time.perf_counter()
                        fn(v)
                        sync(self.device)
                        times.append(time.perf_counter() - t0)
                    err = float(torch.linalg.vector_norm(first.to(ref) - ref) / torch.linalg.vector_norm(ref))
                    out["contestants"][name] = {"s_per_hvp": min(times), "products": len(times),
                                                "rel_diff_to_widthkit": err}
            w = out["contestants"]["widthkit"]["s_per_hvp"]
            for r in out["contestants"].values():
                r["widthkit_speedup"] = r["s_per_hvp"] / w
            return out
        self.run(f"hvp {plan.hvp_model}", self.results, "hvp", go)

    def all(self) -> None:
        """Everything, most important first: the ResNet-20 targets, the GPU tests, the plane, the compiled
        ceiling, the trainer and H·v rates, VGG16-BN, then the rest."""
        plan = self.plan
        first = plan.models[0]
        self.ceilings(first)
        self.full(first, "bf16", "keep")
        self.loop(first, "keep")
        self.pytest()  # before anything compiles for minutes: the GPU tests get their whole slot
        self.plane(KEEP_TRAIN, ("train",), precision="bf16", bn_mode="keep")
        if not plan.dry_run:  # compiling on a CPU takes minutes; tests/test_levers.py covers it there
            self.compiled_ceiling(first)
        self.trainer()
        self.hvp()
        if "vgg16_bn" in plan.models:
            self.ceilings("vgg16_bn")
            self.full("vgg16_bn", "bf16", "keep")
        self.plane(DEFAULT_PLANE.format(n=plan.bn_subset), ("train", "test"), precision="bf16", bn_mode="recompute")
        for name in plan.models:
            self.ceilings(name)
            self.full(name, "bf16", "keep")
            self.loop(name, "keep")
            self.full(name, "bf16", "recompute")
            self.loop(name, "recompute")
            self.full(name, "fp32", "keep", points_in_flight=1)
            self.full(name, "fp32", "recompute", points_in_flight=1)
            self.levers(name, "keep")
            self.levers(name, "recompute")
        self.plane("train split, BN keep, fp32", ("train",), precision="fp32", bn_mode="keep", points_in_flight=1)


KEEP_TRAIN = "train split, BN keep (as loss-landscape), bf16"
DEFAULT_PLANE = "widthkit's default + bf16: train + test, BN recomputed from {n:,}"


def _log_rate(log, key, r):
    if "s_per_point" in r:
        log(f"  {key}: {r['s_per_point']:.3g} s/point ({r.get('points', r.get('images_timed'))} "
            f"{'points' if 'points' in r else 'images'} timed)")


# -- environment, targets, report --------------------------------------------------------------------------------

def environment(device: torch.device, commit: str | None) -> dict:
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    env = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": commit or "unknown (no git here)",
           "torch": torch.__version__, "cuda": torch.version.cuda or "", "python": platform.python_version(),
           "device": str(device), "threads": torch.get_num_threads(), "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device_name=p.name, memory_gib=round(p.total_memory / 2 ** 30, 1),
                   capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version(),
                   cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        env["device_name"] = name
    return env


def _evaluator_rate(r: dict) -> float | None:
    """Forward images per second of a timed evaluator contestant."""
    return r["forward_images_per_point"] / r["s_per_point"] if "s_per_point" in r and "forward_images_per_point" in r \
        else None


def best_ceiling(ceilings: dict) -> tuple[float | None, str]:
    """The highest forward ceiling measured (eager bf16 + channels-last, or compiled) and its name."""
    kinds = {k: v["best"] for k, v in ceilings.items() if isinstance(v, dict) and "best" in v}
    if not kinds:
        return None, ""
    kind = max(kinds, key=kinds.get)
    return kinds[kind], kind


def targets(results: dict) -> list[dict]:
    """The issues' targets on one H200, checked against what was measured (those not measured are left out)."""
    out = []

    def add(target, value, goal, met):
        out.append({"target": target, "value": value, "goal": goal, "met": bool(met)})

    r20 = results["models"].get("preresnet20", {})
    full = r20.get("full", {})
    ev, lp = full.get("evaluator bf16 keep", {}), full.get("loop fp32 keep", {})
    n = f"{results['plan']['n_train']:,} + {results['plan']['n_test']:,}"
    if "s_per_point" in ev and "s_per_point" in lp:
        ratio = lp["s_per_point"] / ev["s_per_point"]
        add(f"ResNet-20, {n} images, BN keep: evaluator (bf16, auto levers) >= 20x the per-point loop (fp32)",
            ratio, TARGETS["eval_over_loop"], ratio >= TARGETS["eval_over_loop"])
    ceiling, kind = best_ceiling(r20.get("ceilings", {}))
    if _evaluator_rate(ev) and ceiling:
        ratio = _evaluator_rate(ev) / ceiling
        add(f"ResNet-20: evaluator images/s >= 0.9 of the best forward ceiling ({kind})", ratio,
            TARGETS["eval_over_ceiling"], ratio >= TARGETS["eval_over_ceiling"])
    variants = results.get("plane", {}).get("variants", {})
    for label, key, what in ((KEEP_TRAIN, "plane_keep_s", "BN keep"),
                             (DEFAULT_PLANE.format(n=results["plan"]["bn_subset"]), "plane_default_s",
                              "widthkit's default (BN recomputed, test split too)")):
        if "extrapolated_s" in variants.get(label, {}):
            v = variants[label]["extrapolated_s"]
            add(f"51x51 ResNet-56 plane on the full train set, {what}: seconds", v, TARGETS[key], v <= TARGETS[key])
    vgg = results["models"].get("vgg16_bn", {})
    vev = vgg.get("full", {}).get("evaluator bf16 keep", {})
    vceil, vkind = best_ceiling(vgg.get("ceilings", {}))
    if vev:
        ratio = _evaluator_rate(vev) / vceil if _evaluator_rate(vev) and vceil else None
        add(f"VGG16-BN: the bf16 evaluator works and reaches >= 0.8 of its ceiling ({vkind or 'not measured'})",
            ratio, TARGETS["vgg_over_ceiling"], ratio is not None and ratio >= TARGETS["vgg_over_ceiling"])
    hvp = results.get("hvp", {}).get("contestants", {})
    if "widthkit" in hvp and "double-backward loop" in hvp:
        ratio = hvp["double-backward loop"]["s_per_hvp"] / hvp["widthkit"]["s_per_hvp"]
        add("HVP on ResNet-20: >= 1.5x a plain double-backward loop", ratio, TARGETS["hvp_over_loop"],
            ratio >= TARGETS["hvp_over_loop"])
    pt = results.get("pytest", {})
    if "passed" in pt:
        add("python -m pytest -m gpu passes", pt.get("summary", ""), "all pass", pt["passed"])
    return out


def _g(v) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def markdown(results: dict) -> str:
    env, plan = results["environment"], results["plan"]
    lines = [f"# GPU benchmark: {env.get('device_name', env['device'])} ({env['device']}), {env['date']}", "",
             f"widthkit commit `{env['commit']}`, torch {env['torch']}, CUDA {env['cuda'] or '—'}"
             + (f", cuDNN {env['cudnn']}, {env['memory_gib']} GiB, compute capability {env['capability']}"
                if "cudnn" in env else f", {env['threads']} CPU threads")
             + f"; whole run {results.get('elapsed_s', 0):.0f} s" + (" — DRY RUN: tiny sizes on CPU, the figures "
                                                                    "mean nothing" if plan["dry_run"] else "") + ".",
             f"Data: random uint8 CIFAR-shaped images, {plan['n_train']:,} train / {plan['n_test']:,} test, BN subset "
             f"{plan['bn_subset']:,}; evaluator batch {plan['eval_batch_size'] or 'default'}; loop batch "
             f"{plan['loop_batch_size']}.", ""]
    if results.get("targets"):
        lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {_g(t['value'])} | {_g(t['goal'])} | {'yes' if t['met'] else 'NO'} |")
        lines.append("")
    for name, r in results["models"].items():
        lines += [f"## {name} (D = {r.get('D', 0):,})", ""]
        if not any(r.get(k) for k in ("ceilings", "full", "levers")):
            lines += ["Only the plane's model in this run.", ""]
            continue
        c = r.get("ceilings", {})
        if "error" in c or "skipped" in c:
            lines += [f"Ceilings: {c.get('error') or c.get('skipped')}", ""]
        elif c:
            lines += ["Forward ceilings, images/s (eval mode, `no_grad`) by batch size:", "",
                      "| kind | " + " | ".join(f"b{b}" for b in plan["ceiling_batch_sizes"]) + " | best |",
                      "|---|" + "---|" * (len(plan["ceiling_batch_sizes"]) + 1)]
            for kind in ("fp32", "tf32", "bf16-cl"):
                if kind in c and "by_batch" in c[kind]:
                    lines.append(f"| {kind} | " + " | ".join(_g(c[kind]["by_batch"].get(str(b)))
                                                            for b in plan["ceiling_batch_sizes"])
                                 + f" | {_g(c[kind]['best'])} (b{c[kind]['batch']}) |")
            comp = c.get("bf16-cl-compiled")
            if comp:
                cells = {str(comp["batch"]): _g(comp["best"])} if "best" in comp else {}
                lines.append("| bf16-cl, torch.compile | " + " | ".join(cells.get(str(b), "")
                                                                        for b in plan["ceiling_batch_sizes"])
                             + (f" | {_g(comp['best'])} (b{comp['batch']}; compile {comp['compile_s']:.0f} s) |"
                                if "best" in comp else f" | {comp.get('error') or comp.get('skipped')} |"))
            lines.append("")
        lines += [f"Full points ({plan['n_train']:,} + {plan['n_test']:,} images each; recompute adds the "
                  f"{plan['bn_subset']:,}-image BN pass):", "",
                  "| contestant | s/point | points/s | images/s | of best ceiling | vs loop (same BN) | timed | "
                  "levers |", "|---|---|---|---|---|---|---|---|"]
        full = r.get("full", {})
        bf16_ceiling = best_ceiling(c)[0] if isinstance(c, dict) else None
        for key, v in full.items():
            lines.append(_row(key, v, full.get(f"loop fp32 {key.rsplit(' ', 1)[-1]}"), bf16_ceiling))
        decided = [(key, v["levers"]) for key, v in full.items() if v.get("levers")]
        if decided:
            lines += ["", "What the evaluator decided at its start (for a run of 2,601 points), and its start-up time:", ""]
            for key, lv in decided:
                sweep = lv.get("eval_batch_size_images_per_second")
                ks = lv.get("points_in_flight_seconds")
                lines.append(
                    f"- {key} (start {_g(full[key].get('setup_s'))} s + first call {_g(full[key].get('first_call_s'))} s): "
                    f"batch {lv.get('eval_batch_size')} ({lv.get('eval_batch_size_chosen_by')}"
                    + (": images/s " + ", ".join(f"b{b} {_g(r)}" for b, r in sweep.items()) if sweep else "") + "); "
                    f"K={lv.get('points_in_flight')} ({lv.get('points_in_flight_chosen_by')}"
                    + (": s/point " + ", ".join(f"K{k} {_g(t)}" for k, t in ks.items()) if ks else "") + "); "
                    f"compile {lv.get('compile_reason')}; graphs {lv.get('cuda_graphs_reason')}")
        lines += ["", f"Levers on the slice ({plan['n_test']:,} test images per point; recompute adds the BN pass):",
                  "", "| contestant / BN | s/point | points/s | images/s | of best ceiling | start + first call s | "
                      "timed | levers |", "|---|---|---|---|---|---|---|---|"]
        for key, v in r.get("levers", {}).items():
            lines.append(_row(key, v, None, bf16_ceiling, first=True))
        dev = r.get("deviation", {})
        if dev:
            lines += ["", "Deviation from the fp32 evaluator (same points): losses relative, errors in percentage "
                          "points; and the fp32 evaluator against the loop:", "",
                      "| contestant / BN | train loss | train err | test loss | test err |", "|---|---|---|---|---|"]
            for key, d in dev.items():
                if key.startswith("loop vs"):
                    if "loop" in d:
                        lines.append(f"| {key} ({'agree' if d['ok'] else 'DISAGREE'}) | — | — | {d['loss_rel']:.1e} "
                                     f"(loop {d['loop']['loss']:.6g}, evaluator {d['evaluator']['loss']:.6g}) | "
                                     f"{d['err_images']} images differ |")
                    else:
                        lines.append(f"| {key} | {d.get('error') or d.get('skipped')} | | | |")
                    continue
                cell = {m: (f"{v['rel']:.1e}" if "rel" in v else f"{v['abs_pp']:.2f} pp") for m, v in d.items()}
                lines.append(f"| {key} | {cell.get('train_loss', '—')} | {cell.get('train_err', '—')} | "
                             f"{cell.get('test_loss', '—')} | {cell.get('test_err', '—')} |")
        lines.append("")
    plane = results.get("plane")
    if plane:
        lines += [f"## {plane.get('grid', '')} plane, {plane.get('model', '')}: extrapolated from a slice", "",
                  "| variant | s/point | extrapolated to all points | slice | levers |", "|---|---|---|---|---|"]
        for label, v in plane.get("variants", {}).items():
            if "extrapolated_s" in v:
                lines.append(f"| {label} | {_g(v['s_per_point'])} | {_g(v['extrapolated_s'])} s "
                             f"({v['extrapolated_s'] / 60:.1f} min) | {v['slice']} | {_levers(v)} |")
            else:
                lines.append(f"| {label} | {v.get('error') or v.get('skipped')} | | | |")
        lines.append("")
    lines += ["loss-landscape's published figure for this plane: about 60 minutes on four GTX 1080 Ti.", ""]
    lines += _extra_sections(results)
    return "\n".join(lines)


def _extra_sections(results: dict) -> list[str]:
    """The GPU tests, the trainer and the Hessian-vector products."""
    lines = []
    pt = results.get("pytest")
    if pt:
        lines += ["## python -m pytest -m gpu", ""]
        if "summary" in pt:
            lines += [f"{'PASSED' if pt['passed'] else 'NOT PASSED'}: {pt['summary']} (exit code {pt['exit_code']}, "
                      f"{pt['seconds']:.0f} s)", "", "```", pt.get("tail", ""), "```", ""]
        else:
            lines += [f"{pt.get('error') or pt.get('skipped')}", ""]
    tr = results.get("trainer")
    if tr:
        lines += [f"## Trainer: {tr.get('model', '')} on CIFAR-shaped data", ""]
        if "by_precision" in tr:
            p = tr["protocol"]
            lines += [f"The recipe `{tr['recipe']}` (batch {tr['batch_size']}, augmentation {'on' if tr['augment'] else 'off'}): "
                      f"its branch protocol trains {p['epochs']} epochs of 50,000 images ({p['prefix']} prefix + "
                      f"{p['sgd_branch']} SGD branch + {p['swa_branch']} SWA branch), each evaluated on 10,000 test "
                      "images. The seed's replication took 3-4 hours per model on a GTX 1080 Ti.", "",
                      "| precision | train images/s | eval images/s | whole protocol on this GPU |", "|---|---|---|---|"]
            for precision, r in tr["by_precision"].items():
                lines.append(f"| {precision} | {_g(r['images_per_s'])} | {_g(r['eval_images_per_s'])} | "
                             f"{r['protocol_hours']:.2f} h ({r['protocol_hours'] * 60:.0f} min) |")
            lines.append("")
        else:
            lines += [f"{tr.get('error') or tr.get('skipped')}", ""]
    hv = results.get("hvp")
    if hv:
        lines += [f"## Hessian-vector products: {hv.get('model', '')}", ""]
        if "contestants" in hv:
            lines += [f"{hv['examples']:,} examples in batches of {hv['batch_size']:,}, float32 (TF32 off); widthkit's "
                      f"method {hv['method']} (graph cache {hv['graph_cache']}); PyHessian "
                      f"{'measured' if hv['pyhessian'] else 'not installed here'}.", "",
                      "| contestant | s per H·v | H·v per s | widthkit speed-up | ‖Hv − Hv_widthkit‖/‖Hv‖ |",
                      "|---|---|---|---|---|"]
            for name, r in hv["contestants"].items():
                lines.append(f"| {name} | {_g(r['s_per_hvp'])} | {_g(1 / r['s_per_hvp'])} | "
                             f"{r['widthkit_speedup']:.2f}x | {r['rel_diff_to_widthkit']:.1e} |")
            lines.append("")
        else:
            lines += [f"{hv.get('error') or hv.get('skipped')}", ""]
    return lines


def _levers(v: dict) -> str:
    lv = v.get("levers") or {}
    if not lv:
        return ""
    why = str(lv.get("cuda_graphs_reason", ""))
    why = why[len("off ("):-1] if why.startswith("off (") and why.endswith(")") else why
    return (f"K={lv.get('points_in_flight')}, b{lv.get('eval_batch_size', '?')}, CL "
            f"{'on' if lv.get('channels_last') else 'off'}, compile {'on' if lv.get('compile') else 'off'}, graphs "
            + ("on" if lv.get("cuda_graphs") else f"off ({why})"))


def _row(key: str, v: dict, loop: dict | None, bf16_ceiling, first: bool = False) -> str:
    if "s_per_point" not in v:
        return f"| {key} | {v.get('error') or v.get('skipped')} | | | | | | |"
    img_s = v["forward_images_per_point"] / v["s_per_point"] if "forward_images_per_point" in v \
        else v["images_per_point"] / v["s_per_point"]
    of_ceiling = _g(img_s / bf16_ceiling) if bf16_ceiling else "—"
    timed = f"{v['points']} pts" if "points" in v else \
        f"{v['images_timed']:,} img{' (extrapolated)' if v.get('extrapolated') else ''}"
    if first:
        middle = _g(v.get("setup_s", 0.0) + v.get("first_call_s", 0.0))
    else:
        middle = _g(loop["s_per_point"] / v["s_per_point"]) if loop and "s_per_point" in loop and "points" in v else "—"
    return (f"| {key} | {_g(v['s_per_point'])} | {_g(1 / v['s_per_point'])} | {_g(img_s)} | {of_ceiling} | {middle} "
            f"| {timed} | {_levers(v)} |")


def write(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_md, tmp_js = out.with_suffix(".md.tmp"), out.with_suffix(".json.tmp")
    tmp_js.write_text(json.dumps(results, indent=1, default=str))
    tmp_md.write_text(markdown(results))
    os.replace(tmp_js, out.with_suffix(".json"))
    os.replace(tmp_md, out)


# -- command ------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same code on CPU with tiny sizes (for the tests)")
    p.add_argument("--out", help="Markdown results file (a .json beside it); default "
                                 "benchmarks/results/gpu-<date>.md (dry run: gpu-dry-run-<date>.md)")
    p.add_argument("--device", help="default: cuda (dry run: cpu)")
    p.add_argument("--models", help=f"comma list (default {','.join(MODELS)})")
    p.add_argument("--deadline", type=float, help="seconds for the whole run (default 450; dry run 120)")
    p.add_argument("--no-plane", action="store_true", help="skip the 51x51 plane extrapolation")
    p.add_argument("--commit", help="the widthkit commit to record (default: git rev-parse, where git is there)")
    p.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    p.add_argument("--no-pytest", action="store_true", help="skip `python -m pytest -m gpu`")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    plan = plan_for(a.dry_run, a.device)
    if a.models:
        plan.models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    if a.deadline:
        plan.deadline_s = a.deadline
    plan.run_pytest, plan.run_plane = not a.no_pytest, not a.no_plane
    device = torch.device(plan.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; use --dry-run (CPU, tiny sizes) or --device cpu", file=sys.stderr)
        return 2
    for m in plan.models:
        model_input_shape(m)  # a bad name fails before any timing
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = a.cudnn_benchmark
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / \
        f"gpu-{'dry-run-' if a.dry_run else ''}{_dt.date.today().isoformat()}.md"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    clock = Clock(plan.deadline_s)
    results = {"environment": environment(device, a.commit), "plan": asdict(plan), "models": {}, "targets": []}
    log(f"gpu_bench: {results['environment'].get('device_name')} ({device}), deadline {plan.deadline_s:.0f} s, "
        f"results -> {out}")
    bench = Bench(plan, device, clock, results, out, log)
    bench.save()
    try:
        bench.all()
    finally:
        bench.save()
    log(f"gpu_bench: wrote {out} and {out.with_suffix('.json')} ({clock.elapsed():.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
