"""Curvature and sharpness beside width, as plain Python calls: the Hessian spectrum, trace and density, the
sharpness measures papers report, and λ_max/λ_min at points of a ray or plane file.

Models and data are resolved exactly as for :func:`widthkit.rays` (:func:`widthkit.analyses.grid.prepare`):
checkpoint paths, :class:`~widthkit.inputs.checkpoints.Checkpoint` objects or ``nn.Module`` s, labelled
``SGD``/``SWA``/... with file groups ``sgd``/``swa``/...; a dataset name or data of your own. Keyword arguments
are fields of :class:`~widthkit.engine.curvature.CurvatureConfig` (or
:class:`~widthkit.engine.sharpness.SharpnessConfig`), :class:`~widthkit.engine.curvature.LossConfig` and
:class:`~widthkit.engine.config.EvalConfig`: the names of the command-line flags.

>>> res = widthkit.curvature({"SGD": "sgd.pt", "SWA": "swa.pt"}, top_k=5, out="analyses/curvature.h5")
>>> res["models"]["swa"]["values"]["eigenvalues"], res["models"]["swa"]["values"]["trace"]
>>> widthkit.sharpness(["sgd.pt", "swa.pt"], kinds=("worst_l2_adaptive",), rho_l2=(0.1, 0.2))
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..runtime import distributed
from ..engine.config import EvalConfig
from ..engine.curvature import (
    CurvatureConfig,
    HessianOperator,
    LossConfig,
    effective_dimension,
    hutchpp,
    lanczos,
    log_spectral_density,
    slq_probe,
    slq_uncertainty,
    spectral_density,
)
from ..engine.sharpness import KINDS as SHARPNESS_KINDS
from ..engine.sharpness import AVERAGE, PAC_BAYES, RADII, WORST, SharpnessConfig, sharpness_of
from ..engine.space import ThetaLayout
from ..report import curvature_store, store
from ..runtime import RuntimeConfig, choose_threads, provenance, random_subset
from ..settings import split_kwargs
from .grid import Setup, configs_of, prepare

ProgressFn = Callable[[int, int], None]
# Evaluation and runtime settings that do not apply to curvature and sharpness (no flags in those commands;
# given in Python they must keep their defaults)
EVAL_SKIP = ("train_subset", "test_subset", "chunk_size", "loss", "metrics", "forward", "max_memory")
RUNTIME_SKIP = ("amp", "precision", "points_in_flight", "channels_last", "cuda_graphs", "compile")


def _configs(cls, kwargs: dict, config: EvalConfig | None, runtime: RuntimeConfig | None):
    own, rest = split_kwargs(cls, kwargs)
    loss, rest = split_kwargs(LossConfig, rest)
    cfg, rt = configs_of(config, runtime, rest)
    if cfg.bn_mode == "batch":
        raise ValueError("bn_mode 'batch' normalises every batch with its own statistics, which is not the model the "
                         "checkpoint holds; use bn_mode 'keep' (the checkpoint's statistics) or 'recompute' (once at θ₀)")
    if rt.precision != "fp32":
        raise ValueError("curvature and sharpness are computed with float32 weights and float64 sums, TF32 off; "
                         f"drop precision {rt.precision!r} (--precision, --amp)")
    default = RuntimeConfig()
    levers = [name for name in RUNTIME_SKIP[2:] if getattr(rt, name) != getattr(default, name)]
    if levers:
        raise ValueError(f"{', '.join(levers)} do not apply to curvature and sharpness (they are the evaluator's "
                         "speed levers); leave them at their defaults")
    if cfg.loss != "cross_entropy" or cfg.forward is not None:
        raise ValueError("curvature and sharpness take the cross-entropy of the model's own output; loss= and "
                         "forward= are not supported here yet")
    if cfg.train_subset is not None or cfg.test_subset is not None:
        raise ValueError("train_subset/test_subset do not apply here: the loss is taken over loss_subset training "
                         "examples (--loss-subset N, 0 for the whole split)")
    return cls(**own), LossConfig(**loss), cfg, rt


@dataclasses.dataclass
class Operators:
    """The training loss of each model as a :class:`HessianOperator`, over the same examples."""

    setup: Setup
    loss: LossConfig
    method: str
    x: torch.Tensor
    y: torch.Tensor
    bn_x: torch.Tensor
    threads: dict | None = None
    _ops: dict = dataclasses.field(default_factory=dict)

    @property
    def weight_decay(self) -> float:
        return float(self.setup.cfg.weight_decay or 0.0) if self.loss.l2 else 0.0

    def __call__(self, i: int) -> HessianOperator:
        if i not in self._ops:
            self._ops.clear()  # one model's operator at a time: each holds a copy of the model
            self._ops[i] = HessianOperator(self.setup.subjects[i].model, self.x, self.y, weight_decay=self.weight_decay,
                                           bn_mode=self.setup.cfg.bn_mode, bn_x=self.bn_x,
                                           batch_size=self.setup.runtime.eval_batch_size, method=self.method)
        return self._ops[i]

    def for_model(self, model) -> HessianOperator:
        return HessianOperator(model, self.x, self.y, weight_decay=self.weight_decay, bn_mode=self.setup.cfg.bn_mode,
                               bn_x=self.bn_x, batch_size=self.setup.runtime.eval_batch_size, method=self.method)


def operators(setup: Setup, loss: LossConfig, method: str = "auto", recorded: dict | None = None) -> Operators:
    """The loss examples (a fixed subset drawn with ``setup.cfg.seed``), the BN examples (``bn_subset``, as the
    evaluator draws them) and the H·v method and CPU thread count: ``recorded`` ones (a resumed file) are kept,
    else both are timed on the first model (``--threads`` fixes the count)."""
    train = setup.train
    idx = random_subset(len(train), loss.loss_subset or None, setup.cfg.seed)
    # the examples as the model takes them (uint8 splits normalised; the operator holds its fixed inputs)
    loss_set = train if idx is None else train.subset(idx)
    x, y = loss_set.inputs(len(loss_set)), loss_set.y
    bn_idx = random_subset(len(train), setup.cfg.bn_subset, setup.cfg.seed)
    bn_set = train if bn_idx is None else train.subset(bn_idx)
    bn_x = bn_set.inputs(len(bn_set))
    recorded = recorded or {}
    method = recorded.get("hvp_method") or method
    ops = Operators(setup, loss, method if method != "auto" else "double-backward", x, y, bn_x)
    op0 = ops(0)
    if setup.device.type == "cpu":
        ops.threads = choose_threads(op0.time_batch, setup.runtime.threads, recorded.get("threads"))
        ops.threads = distributed.broadcast_object(ops.threads)
        torch.set_num_threads(ops.threads["threads"])
    if method == "auto":
        ops.method = op0.method = op0.choose_method()
    return ops


def _data_desc(setup: Setup, ops: Operators) -> dict:
    return {**setup.data_desc, "loss_examples": int(ops.x.shape[0]), "bn_examples": int(ops.bn_x.shape[0])}


def _run_file(kind: str, setup: Setup, ops: Operators, geometry: dict, groups: dict, axes: dict, out,
              overwrite: bool, body: Callable) -> dict | None:
    """Open (or resume) the file on the writing rank, run ``body(rf)`` (``rf`` None on the other ranks), return
    what the file holds (None on the other ranks). Without ``out`` the file lives in a temporary folder."""
    op0 = ops(0)
    config = {"kind": kind, **geometry, "loss": dataclasses.asdict(ops.loss), "eval": setup.cfg.recorded(setup.runtime),
              "data": _data_desc(setup, ops), "theta_size": op0.dim,
              "models": [{"label": s.label, "checkpoint": s.path, "sha256": s.sha256} for s in setup.subjects]}
    prov = {**provenance(setup.device, setup.runtime.precision), **({"thread_choice": ops.threads} if ops.threads else {})}
    operator = {**op0.describe(), "hvp_method": ops.method}
    attrs = {"provenance": prov, "operator": operator, "theta_layout": op0.layout.describe()}
    tmpdir = tempfile.mkdtemp(prefix="widthkit-") if out is None else None
    path = Path(out) if out is not None else Path(tmpdir) / f"{kind}.h5"
    try:
        rf = None
        if distributed.is_writer():
            rf = curvature_store.open_results(path, kind, config, groups, axes, attrs=attrs, overwrite=overwrite)
        distributed.barrier()
        try:
            body(rf)
        finally:
            if rf is not None:
                rf.close()
        if not distributed.is_writer():
            return None
        return curvature_store.read_curvature(path)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _recorded(out, overwrite: bool) -> dict:
    """The H·v method and thread count a file being resumed was started with."""
    if out is None or overwrite:
        return {}
    operator = store.recorded_attr(out, "operator") or {}
    threads = (store.recorded_attr(out, "provenance") or {}).get("threads")
    return {"hvp_method": operator.get("hvp_method"), "threads": threads}


def _subject_attrs(s) -> dict:
    return s.attrs()


class _Progress:
    """progress(done, total) in Hessian-vector products (and loss evaluations), writer rank only."""

    def __init__(self, fn: ProgressFn | None, total: int):
        self.fn = fn if distributed.is_writer() else None
        self.total = total
        self.done = 0
        self.tick(0)

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.fn is not None:
            self.fn(min(self.done, self.total), self.total)


# --------------------------------------------------------------------------------------------- curvature


def _curvature_units(spec: CurvatureConfig) -> list[str]:
    return ["point", "lanczos"] + (["hutchpp"] if spec.trace_hvps else []) + (["slq"] if spec.slq_probes else [])


def _lanczos_products(spec: CurvatureConfig, dim: int) -> int:
    """The most products Lanczos takes: its steps, then one per measured residual (top k and λ_min)."""
    return min(spec.lanczos_max_iter, dim) + min(spec.top_k, dim) + 1


MEASURED = "‖Hy − λy‖ measured: one more Hessian-vector product per eigenvector"
ESTIMATED = ("Lanczos' estimate |β·s| of ‖Hy − λy‖ (what stops it; far below what the products resolve once "
             "converged, not a measurement)")


def _curvature_datasets(spec: CurvatureConfig, dim: int) -> dict:
    k = min(spec.top_k, dim)
    units = _curvature_units(spec)
    n_t, p, m, g, a = spec.trace_hvps // 3, spec.slq_probes, min(spec.slq_steps, dim), spec.density_points, len(spec.eff_dim_alpha)
    f8, f4 = np.float64, np.float32
    ds = {
        "loss": ((), f8, {"units": "nats"}), "train_error": ((), f8, {"units": "fraction"}), "grad_norm": ((), f8),
        "eigenvalues": ((k,), f8), "eigenvectors": ((k, dim), f4, {"dims": ["eigenpair", "theta"]}),
        "eigen_residuals": ((k,), f8, {"what": MEASURED}), "eigen_residuals_lanczos": ((k,), f8, {"what": ESTIMATED}),
        "lambda_min": ((), f8), "lambda_min_vector": ((dim,), f4),
        "lambda_min_residual": ((), f8, {"what": MEASURED}),
        "lambda_min_residual_lanczos": ((), f8, {"what": ESTIMATED}),
        "lanczos_iterations": ((), f8), "lanczos_converged": ((), np.uint8),
        "seconds": ((len(units),), f8, {"units": "s", "estimators": list(units)}), "hvps": ((len(units),), f8),
    }
    if spec.trace_hvps:
        ds.update({"trace": ((), f8), "trace_stderr": ((), f8), "trace_low_rank": ((), f8),
                   "trace_samples": ((n_t,), f8)})
    if spec.slq_probes:
        ds.update({"slq_nodes": ((p, m), f8), "slq_weights": ((p, m), f8), "slq_done": ((p,), np.uint8),
                   "density_grid": ((g,), f8, {"units": "eigenvalue"}), "density": ((g,), f8),
                   "density_sigma": ((), f8), "log_density_grid": ((g,), f8, {"units": "log10 |eigenvalue|"}),
                   "log_density_positive": ((g,), f8), "log_density_negative": ((g,), f8),
                   "log_density_excluded": ((), f8), "spectral_moments": ((2,), f8),
                   "spectral_moments_stderr": ((2,), f8, {"over": "SLQ probes"}),
                   "slq_trace": ((), f8, {"what": "D times the density's mean"}),
                   "slq_trace_stderr": ((), f8, {"over": "SLQ probes"}),
                   "effective_dimension": ((a,), f8, {"dims": ["eff_dim_alpha"]}),
                   "effective_dimension_stderr": ((a,), f8, {"dims": ["eff_dim_alpha"], "over": "SLQ probes"})})
    return ds


def curvature(models, data=None, *, config: EvalConfig | None = None,
              runtime: RuntimeConfig | None = None, out=None, overwrite: bool = False,
              progress: ProgressFn | None = None, arch: str | None = None, which: str | None = None,
              **kwargs) -> dict | None:
    """Top-k Hessian eigenpairs and λ_min (Lanczos), trace (Hutch++), spectral density (SLQ) and effective
    dimension of the training loss of every model, into one HDF5 file.

    Args:
        models: checkpoint path(s), Checkpoint(s), nn.Module(s), or ``{label: item}`` (as :func:`widthkit.rays`).
        data: dataset name, ``(train, test)`` data of your own, or None (the checkpoint's recorded dataset).
        config: an :class:`EvalConfig` (``bn_mode`` keep/recompute, ``bn_subset``, ``weight_decay``, ``dataset``,
            ``seed``, ``device``, ``eval_batch_size`` = the fixed batch size, ``threads``).
        out: the HDF5 file; an existing one made with the same settings is resumed (``overwrite``: start afresh).
        progress: ``progress(done, total)`` in Hessian-vector products.
        **kwargs: :class:`CurvatureConfig`, :class:`LossConfig` and :class:`EvalConfig` fields.

    Returns:
        :func:`~widthkit.report.curvature_store.read_curvature` of the file (None on torchrun ranks that do not
        write): per group ``values["eigenvalues"]`` (k,), ``["eigenvectors"]`` (k, D), ``["lambda_min"]``,
        ``["trace"]``, ``["trace_stderr"]``, ``["density_grid"]``, ``["density"]``, ``["effective_dimension"]``, ...
    """
    spec, loss, cfg, rt = _configs(CurvatureConfig, kwargs, config, runtime)
    setup = prepare(models, data, cfg, rt, arch=arch, which=which, what="curvature")
    for s in setup.subjects:  # before any product or file
        spec.check_dim(ThetaLayout.from_model(s.model).size, s.label)
    threads_before = torch.get_num_threads()
    try:
        ops = operators(setup, loss, spec.hvp, _recorded(out, overwrite))
        dim = ops(0).dim
        units = _curvature_units(spec)
        groups = {s.group: {"attrs": _subject_attrs(s), "units": units, "datasets": _curvature_datasets(spec, dim)}
                  for s in setup.subjects}
        axes = {"eff_dim_alpha": (np.array(spec.eff_dim_alpha), ["eff_dim_alpha"],
                                  {"long_name": "α of Σ λ/(λ+α)", "units": "eigenvalue"})}
        per_model = 2 + _lanczos_products(spec, dim) + spec.trace_hvps + spec.slq_probes * spec.slq_steps
        bar = _Progress(progress, per_model * len(setup.subjects))

        def body(rf):
            for i, s in enumerate(setup.subjects):
                _curvature_of(i, s.group, ops, spec, setup.cfg.seed, rf, units, bar, per_model)

        return _run_file("curvature", setup, ops, {"curvature": dataclasses.asdict(spec)}, groups, axes, out,
                         overwrite, body)
    finally:
        torch.set_num_threads(threads_before)


def _curvature_of(i: int, group: str, ops: Operators, spec: CurvatureConfig, seed: int, rf, units, bar: _Progress,
                  per_model: int) -> None:
    done = distributed.broadcast_object(rf.done(group) if rf is not None else None)
    start = bar.done
    if all(done.values()):
        bar.tick(per_model)
        return
    op = ops(i)
    dev = op.device

    def write(values, unit, seconds, hvps, flags=None):
        if rf is not None:
            k = units.index(unit)
            rf.write(group, {**values, "seconds": (k, seconds), "hvps": (k, hvps)}, flags, done=[unit])

    if not done["point"]:
        t0 = time.perf_counter()
        loss, grad = op.loss_and_grad()
        _, err = op.loss_and_error()
        write({"loss": loss, "train_error": err, "grad_norm": float(torch.linalg.vector_norm(grad))}, "point",
              time.perf_counter() - t0, 0)
    bar.tick(2)
    if not done["lanczos"]:
        t0, n0 = time.perf_counter(), op.hvp_count
        r = lanczos(op.hvp, op.dim, k=spec.top_k, tol=spec.lanczos_tol, max_iter=spec.lanczos_max_iter, seed=seed,
                    device=dev, on_step=lambda j: bar.tick())
        write({"eigenvalues": r.eigenvalues, "eigenvectors": r.eigenvectors.float().cpu().numpy(),
               "eigen_residuals": r.residuals, "eigen_residuals_lanczos": r.ritz_residuals, "lambda_min": r.lambda_min,
               "lambda_min_vector": r.lambda_min_vector.float().cpu().numpy(),
               "lambda_min_residual": r.lambda_min_residual, "lambda_min_residual_lanczos": r.lambda_min_ritz_residual,
               "lanczos_iterations": r.iterations,
               "lanczos_converged": int(r.converged)}, "lanczos", time.perf_counter() - t0, op.hvp_count - n0)
    bar.done = start + 2 + _lanczos_products(spec, op.dim)
    bar.tick(0)
    if "hutchpp" in units and not done["hutchpp"]:
        t0, n0 = time.perf_counter(), op.hvp_count
        t = hutchpp(op.hvp, op.dim, spec.trace_hvps, seed=seed, device=dev, on_step=lambda j: bar.tick())
        write({"trace": t.trace, "trace_stderr": t.stderr, "trace_low_rank": t.low_rank, "trace_samples": t.samples},
              "hutchpp", time.perf_counter() - t0, op.hvp_count - n0)
    bar.done = start + 2 + _lanczos_products(spec, op.dim) + spec.trace_hvps
    bar.tick(0)
    if "slq" in units and not done["slq"]:
        _density_of(group, op, spec, seed, rf, units, bar)
    bar.done = start + per_model
    bar.tick(0)


def _density_of(group, op: HessianOperator, spec: CurvatureConfig, seed: int, rf, units, bar: _Progress) -> None:
    """SLQ probes one by one (each saved as it finishes), then the densities from all of them."""
    probe_done = distributed.broadcast_object(rf.read(group, "slq_done").astype(bool) if rf is not None else None)
    t0, n0 = time.perf_counter(), op.hvp_count
    for p in range(spec.slq_probes):
        if probe_done[p]:
            bar.tick(spec.slq_steps)
            continue
        nodes, weights = slq_probe(op.hvp, op.dim, spec.slq_steps, seed=seed, index=p, device=op.device,
                                   on_step=lambda j: bar.tick())
        if rf is not None:
            rf.write(group, {"slq_nodes": (p, nodes), "slq_weights": (p, weights)}, {"slq_done": (p, 1)})
    if rf is None:
        return
    nodes, weights = rf.read(group, "slq_nodes"), rf.read(group, "slq_weights")
    grid, dens, sigma = spectral_density(nodes, weights, points=spec.density_points, sigma=spec.density_sigma)
    logd = log_spectral_density(nodes, weights, points=spec.density_points, sigma=spec.log_density_sigma)
    moments = [float((weights * nodes ** o).sum() / nodes.shape[0]) for o in (1, 2)]
    spread = slq_uncertainty(nodes, weights, op.dim, spec.eff_dim_alpha)
    k = units.index("slq")
    rf.write(group, {"density_grid": grid, "density": dens, "density_sigma": sigma, "log_density_grid": logd["grid"],
                     "log_density_positive": logd["positive"], "log_density_negative": logd["negative"],
                     "log_density_excluded": logd["excluded"], "spectral_moments": moments,
                     "spectral_moments_stderr": spread["spectral_moments_stderr"], "slq_trace": spread["trace"],
                     "slq_trace_stderr": spread["trace_stderr"],
                     "effective_dimension": effective_dimension(nodes, weights, op.dim, spec.eff_dim_alpha),
                     "effective_dimension_stderr": spread["effective_dimension_stderr"],
                     "seconds": (k, time.perf_counter() - t0), "hvps": (k, op.hvp_count - n0)}, done=["slq"])


# --------------------------------------------------------------------------------------------- sharpness


def _sharpness_datasets(spec: SharpnessConfig) -> dict:
    f8 = np.float64
    units = ["point", *spec.kinds]
    ds = {"loss": ((), f8, {"units": "nats"}), "train_error": ((), f8, {"units": "fraction"}),
          "seconds": ((len(units),), f8)}
    for kind in spec.kinds:
        if kind in PAC_BAYES:
            ds.update({kind: ((), f8), f"{kind}_sigma": ((), f8), f"{kind}_evaluations": ((), f8),
                       f"{kind}_error": ((), f8, {"units": "fraction", "what": "expected train error at σ'"}),
                       f"{kind}_error_stderr": ((), f8, {"units": "fraction", "over": "pac_samples draws"})})
        else:
            ds[kind] = ((len(spec.radii(kind)),), f8)
            if kind in AVERAGE:
                ds[f"{kind}_stderr"] = ((len(spec.radii(kind)),), f8, {"over": "samples draws"})
            if kind in WORST:
                ds[f"{kind}_eps_norm"] = ((len(spec.radii(kind)),), f8)
    return ds


def sharpness(models, data=None, *, config: EvalConfig | None = None,
              runtime: RuntimeConfig | None = None, out=None, overwrite: bool = False,
              progress: ProgressFn | None = None, arch: str | None = None, which: str | None = None,
              **kwargs) -> dict | None:
    """Average-case, worst-case (ℓ2, ℓ∞; plain and adaptive), Keskar ε- and PAC-Bayes sharpness of every model's
    training loss (the same loss, examples and BN handling as :func:`curvature`), into one HDF5 file.

    Keywords: :class:`SharpnessConfig` (``kinds``, ``rho_avg``, ``rho_l2``, ``rho_linf``, ``keskar_eps``, ...),
    :class:`LossConfig` and :class:`EvalConfig` fields; the rest as for :func:`curvature`. ``progress`` counts
    measures. Returns :func:`~widthkit.report.curvature_store.read_curvature` of the file: per group
    ``values[kind]`` ((R,) over that measure's radii, a scalar 1/σ'² for PAC-Bayes), radii at ``axes``.
    """
    spec, loss, cfg, rt = _configs(SharpnessConfig, kwargs, config, runtime)
    setup = prepare(models, data, cfg, rt, arch=arch, which=which, what="sharpness")
    threads_before = torch.get_num_threads()
    try:
        ops = operators(setup, loss, "double-backward", _recorded(out, overwrite))
        units = ["point", *spec.kinds]
        groups = {s.group: {"attrs": _subject_attrs(s), "units": units, "datasets": _sharpness_datasets(spec)}
                  for s in setup.subjects}
        axes = {name: (np.array(getattr(spec, name)), [name], {"long_name": "radius ρ" if name != "keskar_eps" else "ε",
                                                              "used_by": list(kinds)})
                for name, kinds in RADII.items() if any(k in spec.kinds for k in kinds)}
        bar = _Progress(progress, len(units) * len(setup.subjects))

        def body(rf):
            for i, s in enumerate(setup.subjects):
                done = distributed.broadcast_object(rf.done(s.group) if rf is not None else None)
                if all(done.values()):
                    bar.tick(len(units))
                    continue
                op = ops(i)
                for j, unit in enumerate(units):
                    if not done[unit]:
                        t0 = time.perf_counter()
                        values = _measure(unit, op, spec, setup.cfg.seed)
                        if rf is not None:
                            rf.write(s.group, {**values, "seconds": (j, time.perf_counter() - t0)}, done=[unit])
                    bar.tick()

        return _run_file("sharpness", setup, ops, {"sharpness": dataclasses.asdict(spec)}, groups, axes, out,
                         overwrite, body)
    finally:
        torch.set_num_threads(threads_before)


def _measure(unit: str, op: HessianOperator, spec: SharpnessConfig, seed: int) -> dict:
    if unit == "point":
        loss, err = op.loss_and_error()
        return {"loss": loss, "train_error": err}
    res = sharpness_of(unit, op, spec, seed=seed)
    if unit in PAC_BAYES:
        return {unit: res["flatness"], f"{unit}_sigma": res["sigma"], f"{unit}_evaluations": res["evaluations"],
                f"{unit}_error": res["error"], f"{unit}_error_stderr": res["error_stderr"]}
    out = {unit: res["values"]}
    if unit in AVERAGE:
        out[f"{unit}_stderr"] = res["stderr"]
    if unit in WORST:
        out[f"{unit}_eps_norm"] = res["eps_norms"]
    return out


# --------------------------------------------------------------------------------------------- along surfaces


def surface_points(data: dict, group: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every grid point of a rays/line/plane analysis dict (:func:`widthkit.report.store.read`) as
    ``(grid indices (P, ndim), coordinates (P, k))`` in the file's basis."""
    axes, kind = data["axes"], data["kind"]
    if kind == "rays":
        d = axes["distances"]
        n = (axes.get("directions") if "directions" in axes else np.empty(axes["directions_shape"])).shape[0]
        idx = np.array([(i, j) for i in range(n) for j in range(len(d))])
        coords = np.zeros((len(idx), n))
        coords[np.arange(len(idx)), idx[:, 0]] = d[idx[:, 1]]
        return idx, coords
    if kind == "line":
        idx = np.arange(len(axes["t"]))[:, None]
        return idx, axes["t"][idx]
    x, y = axes["x"], axes["y"]
    idx = np.array([(i, j) for i in range(len(x)) for j in range(len(y))])
    return idx, np.stack([x[idx[:, 0]], y[idx[:, 1]]], axis=1)


def surface_curvature(path, points=None, *, coords=None, group: str | None = None, models=None, data=None,
                      config: EvalConfig | None = None,
                      runtime: RuntimeConfig | None = None, progress: ProgressFn | None = None, arch=None, which=None,
                      **kwargs) -> dict:
    """λ_max and λ_min of the training-loss Hessian at points origin + coords·basis of a rays, line or plane file
    (the λ_min/λ_max convexity maps of Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets").

    Args:
        path: the analysis file (its basis or directions are read from it).
        points: grid indices, ``[(direction, step), ...]`` for rays, ``[(ix, iy), ...]`` for a plane, ``[(step,)]``
            for a line; None (and no ``coords``): every grid point.
        coords: (P, k) coordinates in the file's basis instead of grid indices.
        group: rays only: which model's rays (default: the first group).
        models: the model the origin comes from, if not the checkpoint the file records (rays: of ``group``;
            line/plane: the first one).
        data, config, arch, which: as for :func:`curvature`; **kwargs: ``lanczos_tol``, ``lanczos_max_iter``,
            ``hvp`` and :class:`LossConfig` / :class:`EvalConfig` fields. With ``bn_mode="recompute"`` the BN
            statistics are recomputed at every point.

    Returns:
        ``{"points" (P, ndim) or None, "coords" (P, k), "lambda_max" (P,), "lambda_min" (P,), "ratio"
        (|λ_min|/λ_max, Li et al.'s convexity measure), "residuals" (P, 2) (measured ‖Hy − λy‖ of λ_max and
        λ_min), "iterations" (P,)}``.
    """
    surface = store.read(path, load_large=True)
    kind = surface["kind"]
    groups = list(surface["models"])
    if kind == "rays":
        group = group or groups[0]
        if group not in surface["models"]:
            raise ValueError(f"{path} has no rays from {group!r}; its groups are {groups}")
        basis = surface["axes"].get(f"directions_{group}", surface["axes"]["directions"])
        origin_ckpt = surface["models"][group]["attrs"].get("checkpoint")
    else:
        basis = surface["axes"]["basis"]
        origin_ckpt = (surface["config"].get("models") or [{}])[0].get("checkpoint")
    if models is None:
        if not origin_ckpt:
            raise ValueError(f"{path} does not record the checkpoint of its origin; pass models= (the model it was "
                             "computed from)")
        models = origin_ckpt
    allowed = {f.name for f in dataclasses.fields(CurvatureConfig)} & {"lanczos_tol", "lanczos_max_iter", "hvp"}
    extra = {k for k in kwargs if k in {f.name for f in dataclasses.fields(CurvatureConfig)} - allowed}
    if extra:
        raise ValueError(f"{sorted(extra)} do not apply along a surface (only λ_max and λ_min are computed there)")
    spec, loss, cfg, rt = _configs(CurvatureConfig, {**kwargs, "top_k": 1}, config, runtime)  # λ_max only
    setup = prepare(models, data, cfg, rt, arch=arch, which=which, count=(1,), what="curvature along a surface")
    if coords is None:
        all_idx, all_coords = surface_points(surface, group)
        if points is None:
            idx, coords = all_idx, all_coords
        else:
            idx = np.atleast_2d(np.asarray(points, dtype=int))
            if idx.shape[1] != all_idx.shape[1]:
                raise ValueError(f"points of a {kind} file are {all_idx.shape[1]} grid indices each, got {idx.shape[1]}")
            lookup = {tuple(r): k for k, r in enumerate(all_idx.tolist())}
            missing = [tuple(r) for r in idx.tolist() if tuple(r) not in lookup]
            if missing:
                raise ValueError(f"grid indices {missing[:3]} are outside the {kind} grid of {path}")
            coords = all_coords[[lookup[tuple(r)] for r in idx.tolist()]]
    else:
        idx = None
        coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
        if coords.shape[1] != basis.shape[0]:
            raise ValueError(f"coords need {basis.shape[0]} columns (the file's basis), got {coords.shape[1]}")
    threads_before = torch.get_num_threads()
    try:
        ops = operators(setup, loss, spec.hvp)
        base = ops(0)
        origin = base.theta0.double().cpu()
        basis_t = torch.as_tensor(basis, dtype=torch.float64)
        n = len(coords)
        lmax, lmin, res, iters = np.zeros(n), np.zeros(n), np.zeros((n, 2)), np.zeros(n)
        for p in range(n):
            theta = (origin + torch.as_tensor(coords[p], dtype=torch.float64) @ basis_t).float()
            model = base.model
            torch.nn.utils.vector_to_parameters(theta.to(base.device), model.parameters())  # a private copy
            op = ops.for_model(model)
            r = lanczos(op.hvp, op.dim, k=1, tol=spec.lanczos_tol, max_iter=spec.lanczos_max_iter,
                        seed=setup.cfg.seed, device=op.device)
            lmax[p], lmin[p] = r.eigenvalues[0], r.lambda_min
            res[p] = (r.residuals[0], r.lambda_min_residual)
            iters[p] = r.iterations
            if progress is not None:
                progress(p + 1, n)
    finally:
        torch.set_num_threads(threads_before)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(lmin) / lmax
    return {"points": idx, "coords": coords, "lambda_max": lmax, "lambda_min": lmin, "ratio": ratio,
            "residuals": res, "iterations": iters, "kind": kind, "group": group, "path": str(path)}


__all__ = ["EVAL_SKIP", "Operators", "SHARPNESS_KINDS", "curvature", "operators", "sharpness", "surface_curvature",
           "surface_points"]
