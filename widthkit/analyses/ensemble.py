"""Ensembles of checkpoints: the averaged softmax of snapshots, FGE members or independent runs, beside the
members themselves and single models such as SWA (Garipov et al. 2018, https://arxiv.org/abs/1802.10026;
Izmailov et al. 2018, https://arxiv.org/abs/1803.05407).

>>> res = widthkit.ensemble(sorted(glob("checkpoints/digits/swa_iter_*.pt")), swa="checkpoints/digits/swa.pt")
>>> print(res.table())
>>> res.plot()                                      # test error as members are added, SWA as a line

One evaluator (:class:`~widthkit.engine.evaluator.Evaluator`) predicts the test split at every member's weights,
with BatchNorm as ``bn_mode`` says (``recompute``: at each member's weights; ``keep``: each member's own
statistics); :class:`~widthkit.engine.ensemble.EnsembleAccumulator` averages the softmax outputs. The numbers go
into one HDF5 file of kind ``ensemble`` (:mod:`widthkit.report.store`): the metrics shaped (members,) in two
groups, ``members`` (member k alone) and ``ensemble`` (the first k together), the pairwise disagreement, and the
single models compared, each with its forward passes per prediction.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engine.config import EvalConfig
from ..engine.ensemble import EnsembleAccumulator, nll_and_error
from ..engine.evaluator import Evaluator
from ..engine.space import ThetaLayout
from ..inputs.checkpoints import CheckpointError
from ..report import store
from ..runtime import RuntimeConfig
from .grid import AfterFn, ProgressFn, configs_of, file_record, prepare
from .result import Analysis
from ..settings import option
from .subjects import Source, Subject, as_subjects, check_same_architecture, expand_sources

KIND = "ensemble"
SPLIT = "test"
METRICS = ["test_loss", "test_err"]  # the NLL (nats) and top-1 error (%) of the averaged softmax
GROUPS = ("members", "ensemble")
METRIC_UNITS = {"test_loss": "nats (NLL of the averaged softmax)", "test_err": "% (top-1 error)",
                "disagreement": "% of the test examples"}


@dataclass
class EnsembleConfig:
    """Which models an ensemble command evaluates besides its ``--ckpt`` members (each field a flag)."""

    iterates: tuple[str, ...] = option((), "further members: a training run's folder (its snapshots: the iterates SWA "
                                           "averaged or FGE collected), globs or files, in sorted order", nargs="+",
                                       metavar="PATH")
    swa: str | None = option(None, "the SWA model (the average of the same snapshots), evaluated alone beside the "
                                   "ensemble", metavar="PATH")
    compare: tuple[str, ...] = option((), "a further single model evaluated alone, e.g. SGD=sgd.pt; repeat the flag "
                                          "for several", action="append", metavar="LABEL=PATH")

    def __post_init__(self):
        for name in ("iterates", "compare"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value or ())
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"{name} must be a list of paths (LABEL=PATH for compare), got {value!r}; in Python "
                                 f"pass the models themselves to widthkit.ensemble({name}=...)")
            setattr(self, name, value)
        for spec in self.compare:
            label, sep, path = spec.partition("=")
            if not sep or not label or not path:
                raise ValueError(f"--compare {spec!r}: expected LABEL=PATH, e.g. SGD=checkpoints/digits/sgd.pt")


@dataclass
class Member:
    """One loaded model of an ensemble: θ in the evaluator's layout (on the CPU) and its buffers."""

    label: str
    theta: torch.Tensor
    buffers: dict
    path: str
    sha256: str

    def record(self) -> dict:
        return {"label": self.label, "checkpoint": self.path, "sha256": self.sha256}


class EnsembleResult(Analysis):
    """An ensemble's numbers, backed by its HDF5 file (kind ``ensemble``).

    Besides :class:`~widthkit.analyses.result.Analysis` (``.data``, ``.path``, ``.save(path)``): :meth:`numbers`,
    :meth:`table`, :meth:`plot`; a result computed in this process also holds ``probabilities`` ((N, C)
    float64, the ensemble's predictive distribution on the test split, in its order) and ``labels`` (N,).
    """

    def __init__(self, path, data: dict | None = None, tmpdir: str | None = None):
        super().__init__(path, data, tmpdir)
        if self.kind != KIND:
            raise ValueError(f"{self.path} holds a {self.kind!r} analysis, not an ensemble")
        self.probabilities: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    def numbers(self) -> dict:
        """``{"members": [{"label", "test_loss", "test_err"}], "ensemble": {"test_loss", "test_err"} of all of them,
        "by_size": {"test_loss": (M,), "test_err": (M,)} (the first k), "compare": {label: {"test_loss",
        "test_err"}}, "forward_passes": {name: passes per prediction}, "disagreement": (M, M) %}``;
        losses in nats, errors in %."""
        attrs = self.data["attrs"]
        m, e = self.models["members"]["metrics"], self.models["ensemble"]["metrics"]
        labels = list(attrs.get("member_labels") or [])
        compare = attrs.get("compare") or {}
        return {"members": [{"label": lab, **{k: float(m[k][i]) for k in METRICS}} for i, lab in enumerate(labels)],
                "ensemble": {k: float(e[k][-1]) for k in METRICS},
                "by_size": {k: np.asarray(e[k], dtype=np.float64) for k in METRICS},
                "compare": {lab: {k: float(compare.get(lab, {}).get(k, np.nan)) for k in METRICS}
                            for lab in attrs.get("compare_labels") or []},
                "forward_passes": dict(attrs.get("forward_passes") or {}),
                "disagreement": np.asarray(attrs.get("disagreement", np.full((len(labels),) * 2, np.nan)),
                                           dtype=np.float64)}

    def table(self) -> str:
        """A printable table: the ensemble, each single model compared and each member, with test accuracy,
        NLL and forward passes per prediction; then the mean pairwise disagreement."""
        n = self.numbers()
        rows = [(f"ensemble of {len(n['members'])}", n["ensemble"], n["forward_passes"].get("ensemble", len(n["members"])))]
        rows += [(lab, v, n["forward_passes"].get(lab, 1)) for lab, v in n["compare"].items()]
        rows += [(f"  member {m['label']}", m, 1) for m in n["members"]]
        width = max(12, *(len(r[0]) for r in rows))
        lines = [f"{'model':<{width}}  {'test acc %':>10}  {'test NLL':>9}  {'passes':>6}"]
        lines += [f"{name:<{width}}  {100 - v['test_err']:>10.2f}  {v['test_loss']:>9.4f}  {passes:>6}"
                  for name, v, passes in rows]
        d = n["disagreement"]
        off = d[~np.eye(len(d), dtype=bool)]
        if off.size:
            lines.append(f"members disagree on {off.mean():.2f}% of the test examples on average "
                         f"(pairs: {off.min():.2f}% to {off.max():.2f}%)")
        if not self.complete():
            lines.append("PARTIAL: the run that wrote this file was interrupted; run the same command again")
        return "\n".join(lines)

    def plot(self, ax=None, metric: str | None = None):
        """Test error (or ``metric``: ``test_loss``) of the ensemble of the first k members against k, each member
        alone as a dot and the compared single models as lines (the FGE paper's figure); returns the Axes."""
        from ..report.family_figures import plot_ensemble

        metric = metric or "test_err"
        if metric not in METRICS:
            raise ValueError(f"an ensemble file holds {METRICS}, not {metric!r}")
        n = self.numbers()
        return plot_ensemble(self.data["axes"]["ensemble_size"], n["by_size"][metric],
                             [m[metric] for m in n["members"]], {k: v[metric] for k, v in n["compare"].items()},
                             ax=ax, metric=metric)


def load_ensemble(path) -> EnsembleResult:
    """Open an ensemble file written by :func:`ensemble`."""
    return EnsembleResult(path)


def ensemble(members=None, data=None, *, iterates=None, compare=None, swa=None, config: EvalConfig | None = None,
             runtime: RuntimeConfig | None = None, out=None, overwrite: bool = False, progress: ProgressFn | None = None, arch: str | None = None,
             which: str | None = None, after: AfterFn | None = None, **kwargs) -> EnsembleResult:
    """Evaluate the ensemble of ``members`` (their averaged softmax) on the test split, beside each member alone
    and beside single models (``swa``, ``compare``).

    Args:
        members: checkpoint paths, Checkpoints or nn.Modules (a list, or ``{label: item}``), in the order they
            join the ensemble.
        data: dataset name or ``(train, test)`` data of your own (None: the checkpoints' recorded dataset).
        iterates: further members: folders (their checkpoints recorded as snapshots, i.e. the iterates SWA
            averaged or FGE collected), globs or files, appended in sorted order.
        compare: ``{label: model}`` single models evaluated alone (one forward pass per prediction), e.g. the
            SGD solution at the same budget.
        swa: the SWA model (the average of the same snapshots), compared under the label ``SWA``.
        config, **kwargs: :class:`EvalConfig` and its fields (``bn_mode`` ``recompute``: statistics at every
            member's weights from the training data; ``keep``: each model's own).
        runtime: a :class:`~widthkit.runtime.RuntimeConfig` (device, precision, ...); its fields also as keywords.
        out: the HDF5 file (None: a temporary file removed with the result); ``overwrite`` starts afresh.
        progress: ``progress(done, total)`` after every model; ``after(result)`` runs under the writer lock.

    Returns:
        An :class:`EnsembleResult` (losses in nats, errors in %).

    Raises:
        ValueError: fewer than two members, members or compared models of another architecture, outputs that are
            not (N, classes), a loss or metrics other than the ensemble's (before anything is computed).
    """
    cfg, rt = configs_of(config, runtime, kwargs)
    if cfg.loss != "cross_entropy" or cfg.metrics:
        raise ValueError("an ensemble is scored by the NLL and the error of its averaged softmax; drop loss= and "
                         "metrics= (--loss, --metrics)")
    sources = expand_sources(members, "members") + expand_sources(_listed(iterates), "--iterates")
    if len(sources) < 2 and not any(s.from_folder for s in sources):
        raise ValueError(f"an ensemble needs at least two members, got {len(sources)}: pass more checkpoints "
                         "(--ckpt A --ckpt B ..., or --iterates FOLDER)")
    compare = _labelled(compare)
    if swa is not None:
        if "SWA" in compare:
            raise ValueError("swa= and compare={'SWA': ...} name the same model twice; pass one of them")
        compare = {"SWA": swa, **compare}
    members, reference = _load_members(sources, arch, which)
    singles = as_subjects(compare, arch=arch, which=which) if compare else []
    if singles:
        check_same_architecture([reference, *singles])
    setup = prepare([_reference_item(reference)], data, cfg, rt, arch=arch, which=which)
    ev = setup.evaluator(0)  # predicts every member (their θ written into its private model in turn)
    others = [Member(s.label, ev.layout.flatten(s.model).cpu(), _buffers(s.model), s.path or "", s.sha256 or "")
              for s in singles]
    threads_before = torch.get_num_threads()
    config_rec, attrs = file_record(setup, KIND, {KIND: {"members": len(members), "compare": [o.label for o in others]}},
                                    out=out, overwrite=overwrite)
    config_rec["models"] = [m.record() for m in members + others]
    n = len(members)
    attrs.update(member_labels=[m.label for m in members], member_source=_source(members),
                 compare_labels=[o.label for o in others], compare_source=_source(others), split=SPLIT,
                 forward_passes={"ensemble": n, **{o.label: 1 for o in others}}, metric_units=METRIC_UNITS)
    axes = {"ensemble_size": (np.arange(1, n + 1), ["member"], {"long_name": "members in the ensemble (the first k, in "
                                                          "order)", "units": "members"})}
    groups = {"members": {"label": "each member alone"}, "ensemble": {"label": "ensemble of the first k members"}}
    tmpdir = tempfile.mkdtemp(prefix="widthkit-") if out is None else None
    path = Path(out) if out is not None else Path(tmpdir) / f"{KIND}.h5"
    try:
        af = store.open_analysis(path, KIND, config_rec, axes, groups, (n,), METRICS, attrs=attrs, overwrite=overwrite)
        try:
            computed = None
            if not af.complete():
                computed = _compute(ev, members, others, progress)
                _write(path, af, computed, others)
            result = EnsembleResult(path, tmpdir=tmpdir)
            if computed is not None:
                result.probabilities, result.labels = computed["probabilities"], computed["labels"]
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


def _labelled(compare) -> dict:
    """``{label: model}`` from a dict, or from ``LABEL=PATH`` texts (the command line)."""
    if compare is None or isinstance(compare, dict):
        return dict(compare or {})
    items = [compare] if isinstance(compare, (str, os.PathLike)) else list(compare)
    out = {}
    for item in items:
        label, sep, path = str(item).partition("=")
        if not sep or not label or not path:
            raise ValueError(f"compare {item!r}: expected LABEL=PATH (or a dict {{label: model}} in Python)")
        out[label] = path
    return out


def _listed(items):
    return [items] if isinstance(items, (str, Path)) else items


def _reference_item(reference: Subject):
    """What :func:`~widthkit.analyses.grid.prepare` resolves the device and the data with: the first member's
    file (its recorded dataset), else the module itself."""
    return reference.path or reference.model


def _buffers(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.named_buffers()}


def _source(members: list[Member]) -> dict:
    return {"labels": [m.label for m in members], "checkpoints": [m.path for m in members],
            "sha256": [m.sha256 for m in members]}


def _load_members(sources: list[Source], arch, which) -> tuple[list[Member], Subject]:
    """Each member's θ and buffers, loaded one model at a time and checked against the first; files from folders
    only when recorded as snapshots (the iterates SWA averaged or FGE collected). Returns the members and the
    first one's Subject (what the evaluator is built from)."""
    members, reference, layout = [], None, None
    for i, src in enumerate(sources):
        try:
            subject = as_subjects([src.item], arch=arch, which=which)[0]
        except CheckpointError:
            if src.from_folder:  # a training folder also holds the trainer's state and logs
                continue
            raise
        if src.from_folder and not is_snapshot(subject):
            continue
        if reference is None:
            reference, layout = subject, ThetaLayout.from_model(subject.model)
        else:
            check_same_architecture([reference, subject])
        label = src.label or (Path(subject.path).stem if subject.path else f"member{i}")
        members.append(Member(label, layout.flatten(subject.model).cpu(), _buffers(subject.model),
                              subject.path or "", subject.sha256 or ""))
    if len(members) < 2:
        folders = sorted({str(Path(str(s.item)).parent) for s in sources if s.from_folder})
        raise ValueError(f"an ensemble needs at least two members, got {len(members)}"
                         + (f" (the folders {folders} hold {len(members)} snapshot checkpoint(s): train with "
                            "--save-iterates, or --mode fge)" if folders else ": pass more checkpoints"))
    labels = [m.label for m in members]
    for i, m in enumerate(members):
        if labels.count(m.label) > 1:
            m.label = f"{m.label} #{i}"
    return members, reference


def is_snapshot(subject: Subject) -> bool:
    """Whether a checkpoint is one of a run's snapshots: an iterate SWA averaged or FGE collected (recorded with
    ``extra["snapshot"]``, or a ``swa_iter_*`` / ``fge_*`` iterate of an older run)."""
    if subject.role != "iterate":
        return False
    extra = subject.meta.get("extra") or {}
    stem = Path(subject.path or "").stem
    return "snapshot" in extra or stem.startswith(("swa_iter_", "fge_"))


def _compute(ev: Evaluator, members: list[Member], others: list[Member], progress) -> dict:
    """Every member's and compared model's test predictions, one model at a time; the running ensemble."""
    keep = ev.config.bn_mode == "keep"
    labels = ev.test.y
    acc = EnsembleAccumulator(labels)
    total = len(members) + len(others)
    by_member = {k: np.full(len(members), np.nan) for k in METRICS}
    by_size = {k: np.full(len(members), np.nan) for k in METRICS}
    for i, m in enumerate(members):
        logits = ev.outputs(m.theta, SPLIT, buffers=m.buffers if keep else None)
        own, together = acc.add(logits)
        for k, a, b in zip(METRICS, own, together):
            by_member[k][i], by_size[k][i] = a, b
        if progress:
            progress(i + 1, total)
    single = {k: np.full(len(others), np.nan) for k in METRICS}
    for j, o in enumerate(others):
        logits = ev.outputs(o.theta, SPLIT, buffers=o.buffers if keep else None)
        values = nll_and_error(torch.log_softmax(logits.double(), dim=1), labels.long())
        for k, v in zip(METRICS, values):
            single[k][j] = v
        if progress:
            progress(len(members) + j + 1, total)
    return {"members": by_member, "ensemble": by_size, "compare": single, "disagreement": acc.disagreement(),
            "probabilities": acc.probabilities(), "labels": labels}


def _write(path: Path, af, computed: dict, others: list[Member]) -> None:
    """The disagreement and the compared models' numbers as root attributes first (a fresh copy of the file,
    swapped in), then the metric grids, whose ``done`` flags say the file is complete."""
    store.update_attrs(path, {
        "disagreement": computed["disagreement"].tolist(),
        "compare": {o.label: {k: float(computed["compare"][k][j]) for k in METRICS} for j, o in enumerate(others)}})
    ids = np.arange(len(computed["members"]["test_loss"]))
    for group in GROUPS:
        af.write(group, ids, computed[group])
