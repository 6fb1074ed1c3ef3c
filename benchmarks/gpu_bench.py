"""The prepared GPU benchmark: everything issue 14 asks of one H200, in at most 8 minutes, into one results file.

Run it through ``benchmarks/gpu.sh`` (which adds the hard time limit):

    bash benchmarks/gpu.sh                      # CUDA: writes benchmarks/results/gpu-<date>.md and .json
    bash benchmarks/gpu.sh --out /tmp/gpu.md    # elsewhere
    bash benchmarks/gpu.sh --dry-run            # the same code on CPU with tiny sizes, well under a minute

Data: random CIFAR-shaped uint8 images (values 0..255, normalised with CIFAR-10's constants), 50,000 train and
10,000 test, random labels; freshly initialised models whose BN running statistics are first set at θ₀ by one
``update_bn`` pass over the 5,000-image BN subset. The metric values mean nothing; agreements and times do.

Per model (ResNet-20, ResNet-56: widthkit's ``preresnet20/56``; VGG16-BN):

1. forward ceilings: plain eval-mode forward passes over a slice of the images at a few batch sizes, fp32 (TF32
   off), tf32, and bf16 autocast + channels-last (model and input), best batch reported;
2. full points (50,000 train + 10,000 test per point): the evaluator at ``precision="bf16"`` with every lever on
   ``auto`` and at fp32, BN keep and recompute (5,000-image subset), against the per-point loop of
   loss-landscape tools (fp32, DataLoader batch 128, ``.item()`` per batch; timed on as many batches as its
   budget allows and extrapolated to a whole point, the count stated);
3. the lever matrix on a slice (the 10,000 test images per point, plus the BN subset pass in recompute mode):
   fp32 / tf32 / bf16, points in flight 1 / 4 / 16, CUDA graphs on / off, the ``auto`` choice; the per-metric
   deviation of bf16 and tf32 from fp32; the fp32 evaluator against the loop on the same points (a check).

Then the time of a 51×51 ResNet-56 plane on the full 50,000-image train set (BN keep, as loss-landscape plots
it; and widthkit's default: BN recomputed from 5,000 images, test split too), measured on the first points of
the grid and extrapolated to 2,601 (the slice is stated).

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
from widthkit.engine.space import ThetaLayout
from widthkit.models import create_model, model_input_shape
from widthkit.runtime import autocast, precision_policy, random_subset

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MODELS = ("preresnet20", "preresnet56", "vgg16_bn")
PLANE_MODEL, PLANE_SIDE = "preresnet56", 51
TARGETS = {"eval_over_loop": 20.0, "eval_over_bf16_ceiling": 0.8, "plane_s": 300.0}


@dataclass
class Plan:
    """Sizes and budgets of one run (:func:`plan_for`)."""

    device: str
    models: tuple[str, ...] = MODELS
    n_train: int = 50_000
    n_test: int = 10_000
    bn_subset: int = 5_000
    eval_batch_size: int | None = None  # None: widthkit's default (4,096 on CUDA)
    ceiling_images: int = 16_384
    ceiling_batch_sizes: tuple[int, ...] = (1024, 4096, 8192)
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
    seed: int = 0
    dry_run: bool = False


def plan_for(dry_run: bool, device: str | None = None) -> Plan:
    if not dry_run:
        return Plan(device=device or "cuda")
    return Plan(device=device or "cpu", models=("preresnet20",), n_train=48, n_test=24, bn_subset=16,
                eval_batch_size=16, ceiling_images=32, ceiling_batch_sizes=(16, 32), ks=(1, 2), full_points=2,
                slice_points=4, loop_batch_size=16, plane_points=1, deadline_s=120.0, budget_ceilings_s=2.0,
                budget_full_s=2.0, budget_loop_s=1.0, budget_lever_s=1.0, budget_plane_s=2.0, dry_run=True)


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


def time_evaluator(ev: Evaluator, origin, basis, coords: np.ndarray, budget_s: float, max_points: int) -> dict:
    """One untimed call of K points (measurement of K, graph capture, compilation), then timed calls of K points
    over the same coordinates from the start, until ``max_points`` or the budget (at least one timed call)."""
    device = ev.device
    t0 = time.perf_counter()
    ev.levers_report()  # K measured where "auto", graphs captured (evaluating θ₀), under the precision policy
    k = ev.levers.points_in_flight
    ev.evaluate(origin, basis, coords[:k])
    sync(device)
    warm = time.perf_counter() - t0
    spent, n, parts = 0.0, 0, []
    while n + k <= min(max_points, len(coords)) and (n == 0 or spent < budget_s):
        sync(device)
        t1 = time.perf_counter()
        parts.append(ev.evaluate(origin, basis, coords[n:n + k]))
        sync(device)
        spent += time.perf_counter() - t1
        n += k
    metrics = {m: np.concatenate([p[m] for p in parts]).tolist() for m in parts[0]}
    return {"points": n, "k": k, "s_per_point": spent / n, "first_call_s": warm, "metrics": metrics,
            "levers": ev.levers.describe(), "batch_size": ev.batch_size}


def forward_images(n_eval: int, bn_mode: str, bn_subset: int) -> int:
    return n_eval + (bn_subset if bn_mode == "recompute" else 0)


# -- contestants -------------------------------------------------------------------------------------------------

def ceilings(model, x: torch.Tensor, plan: Plan, budget_s: float) -> dict:
    """Images/s of plain forward passes: {kind: {"by_batch": {b: img/s}, "best": img/s, "batch": b}}."""
    device = x.device
    out = {}
    per = budget_s / 3
    for kind in ("fp32", "tf32", "bf16-cl"):
        m = copy.deepcopy(model).eval()
        xs = x
        if kind == "bf16-cl":
            m = m.to(memory_format=torch.channels_last)
            xs = x.contiguous(memory_format=torch.channels_last)
        precision = {"fp32": "fp32", "tf32": "tf32", "bf16-cl": "bf16"}[kind]
        rates = {}
        t_kind = time.perf_counter()
        with precision_policy(precision, device), torch.no_grad():
            for b in plan.ceiling_batch_sizes:
                if rates and time.perf_counter() - t_kind > per:
                    break
                with autocast(device, precision):
                    m(xs[:b])  # first call: kernel selection, allocations
                best = math.inf
                for _ in range(2):
                    sync(device)
                    t0 = time.perf_counter()
                    with autocast(device, precision):
                        for s in range(0, xs.shape[0], b):
                            m(xs[s:s + b])
                    sync(device)
                    best = min(best, time.perf_counter() - t0)
                rates[b] = xs.shape[0] / best
        b_best = max(rates, key=rates.get)
        out[kind] = {"by_batch": {str(b): r for b, r in rates.items()}, "best": rates[b_best], "batch": b_best}
        del m
    return out


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

    def evaluator(self, name: str, splits, **cfg) -> Evaluator:
        plan, data = self.plan, self.data_for(name)
        base = dict(bn_subset=plan.bn_subset, eval_batch_size=plan.eval_batch_size, seed=plan.seed, chunk_size=64,
                    device=str(self.device))
        return Evaluator(self.subject(name).model, train=data["train"], test=data["test"],
                         config=EvalConfig(**{**base, **cfg}), device=self.device, splits=splits)

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
        sub = self.subject(name)
        x = self.data_for(name)["train"].inputs(self.plan.ceiling_images)
        self.run(f"{name} ceilings", self.model_result(name), "ceilings",
                 lambda: ceilings(sub.model, x, self.plan, self.clock.budget(self.plan.budget_ceilings_s)))

    def full(self, name: str, precision: str, bn_mode: str, **over) -> None:
        """The evaluator on whole points: every train and test image."""
        plan = self.plan

        def go():
            sub = self.subject(name)
            ev = self.evaluator(name, ("train", "test"), precision=precision, bn_mode=bn_mode, **over)
            r = time_evaluator(ev, sub.theta0, sub.basis, self.coords(max(plan.full_points, max(plan.ks))),
                               self.clock.budget(plan.budget_full_s), plan.full_points)
            r["forward_images_per_point"] = forward_images(plan.n_train + plan.n_test, bn_mode, plan.bn_subset)
            return r
        self.run(f"{name} evaluator {precision} {bn_mode}", self.model_result(name)["full"],
                 f"evaluator {precision} {bn_mode}", go)

    def loop(self, name: str, bn_mode: str) -> None:
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
        total = PLANE_SIDE ** 2
        axis = np.linspace(-1, 1, PLANE_SIDE)
        grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        res = self.results.setdefault("plane", {"model": PLANE_MODEL, "grid": f"{PLANE_SIDE}x{PLANE_SIDE}",
                                                "points_total": total, "variants": {}})

        def go():
            sub = self.subject(PLANE_MODEL)
            ev = self.evaluator(PLANE_MODEL, splits, **over)
            r = time_evaluator(ev, sub.theta0, sub.basis, grid, self.clock.budget(plan.budget_plane_s),
                               plan.plane_points)
            r["slice"] = f"grid points 0..{r['points'] - 1} of {total} (first row), every image of {'+'.join(splits)}"
            r["extrapolated_s"] = r["s_per_point"] * total
            r.pop("metrics")
            return r
        self.run(f"plane {label}", res["variants"], label, go)

    def all(self) -> None:
        """Everything, most important first: the ResNet-20 targets, the plane target, then the rest."""
        plan = self.plan
        first = plan.models[0]
        self.ceilings(first)
        self.full(first, "bf16", "keep")
        self.loop(first, "keep")
        keep_train = "train split, BN keep (as loss-landscape), bf16"
        self.plane(keep_train, ("train",), precision="bf16", bn_mode="keep")
        for name in plan.models:
            if name != first:
                self.ceilings(name)
                self.full(name, "bf16", "keep")
                self.loop(name, "keep")
            self.full(name, "bf16", "recompute")
            self.loop(name, "recompute")
            self.full(name, "fp32", "keep", points_in_flight=1)
            self.full(name, "fp32", "recompute", points_in_flight=1)
            self.levers(name, "keep")
            self.levers(name, "recompute")
            if name == PLANE_MODEL or (name == plan.models[-1] and PLANE_MODEL not in plan.models):
                self.plane("train split, BN keep, fp32", ("train",), precision="fp32", bn_mode="keep",
                           points_in_flight=1)
                self.plane(f"widthkit's default + bf16: train + test, BN recomputed from {plan.bn_subset:,}",
                           ("train", "test"), precision="bf16", bn_mode="recompute")


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


def targets(results: dict) -> list[dict]:
    """The issue's targets on one H200, checked against what was measured."""
    out = []
    r20 = results["models"].get("preresnet20", {})
    full = r20.get("full", {})
    ev, lp = full.get("evaluator bf16 keep", {}), full.get("loop fp32 keep", {})
    if "s_per_point" in ev and "s_per_point" in lp:
        ratio = lp["s_per_point"] / ev["s_per_point"]
        n = f"{results['plan']['n_train']:,} + {results['plan']['n_test']:,}"
        out.append({"target": f"ResNet-20, {n} images, BN keep: evaluator (bf16, auto levers) >= 20x "
                              "the per-point loop (fp32)", "value": ratio, "goal": TARGETS["eval_over_loop"],
                    "met": ratio >= TARGETS["eval_over_loop"]})
    ceil = r20.get("ceilings", {}).get("bf16-cl", {})
    if "s_per_point" in ev and "best" in ceil:
        ratio = ev["forward_images_per_point"] / ev["s_per_point"] / ceil["best"]
        out.append({"target": "ResNet-20: evaluator images/s >= 0.8 of the bf16 + channels-last forward ceiling",
                    "value": ratio, "goal": TARGETS["eval_over_bf16_ceiling"],
                    "met": ratio >= TARGETS["eval_over_bf16_ceiling"]})
    plane = {label: v["extrapolated_s"] for label, v in results.get("plane", {}).get("variants", {}).items()
             if "extrapolated_s" in v}
    if plane:
        label = min(plane, key=plane.get)
        out.append({"target": f"51x51 ResNet-56 plane on the full train set <= 5 minutes, seconds (fastest: {label})",
                    "value": plane[label], "goal": TARGETS["plane_s"], "met": plane[label] <= TARGETS["plane_s"]})
    return out


def _g(v) -> str:
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
                if kind in c:
                    lines.append(f"| {kind} | " + " | ".join(_g(c[kind]["by_batch"].get(str(b)))
                                                            for b in plan["ceiling_batch_sizes"])
                                 + f" | {_g(c[kind]['best'])} (b{c[kind]['batch']}) |")
            lines.append("")
        lines += [f"Full points ({plan['n_train']:,} + {plan['n_test']:,} images each; recompute adds the "
                  f"{plan['bn_subset']:,}-image BN pass):", "",
                  "| contestant | s/point | points/s | images/s | of bf16-CL ceiling | vs loop (same BN) | timed | "
                  "levers |", "|---|---|---|---|---|---|---|---|"]
        full = r.get("full", {})
        bf16_ceiling = c.get("bf16-cl", {}).get("best") if isinstance(c, dict) else None
        for key, v in full.items():
            lines.append(_row(key, v, full.get(f"loop fp32 {key.rsplit(' ', 1)[-1]}"), bf16_ceiling))
        lines += ["", f"Levers on the slice ({plan['n_test']:,} test images per point; recompute adds the BN pass):",
                  "", "| contestant / BN | s/point | points/s | images/s | of bf16-CL ceiling | first call s | timed "
                      "| levers |", "|---|---|---|---|---|---|---|---|"]
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
    return "\n".join(lines)


def _levers(v: dict) -> str:
    lv = v.get("levers") or {}
    if not lv:
        return ""
    why = str(lv.get("cuda_graphs_reason", ""))
    why = why[len("off ("):-1] if why.startswith("off (") and why.endswith(")") else why
    return (f"K={lv.get('points_in_flight')}, CL {'on' if lv.get('channels_last') else 'off'}, graphs "
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
        middle = _g(v.get("first_call_s"))
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
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    plan = plan_for(a.dry_run, a.device)
    if a.models:
        plan.models = tuple(m.strip() for m in a.models.split(",") if m.strip())
    if a.deadline:
        plan.deadline_s = a.deadline
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
