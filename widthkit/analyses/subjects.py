"""What an analysis evaluates: the models (labelled, with provenance) and the data splits; the further
weight vectors its geometry needs (iterates for principal directions and trajectories, checkpoints marked on a
plane) and directions read from files (Hessian eigenvectors)."""

from __future__ import annotations

import copy
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..engine.config import EvalConfig
from ..engine.evaluator import EvalSet
from ..engine.objectives import Objective
from ..inputs.checkpoints import Checkpoint, CheckpointError, load_checkpoint
from ..inputs.data import load_dataset, preview_dataset
from ..runtime import random_subset


@dataclass
class Subject:
    """One model to evaluate: a label for figures, a group name in the HDF5 file, provenance."""

    label: str
    model: nn.Module
    path: str | None = None
    sha256: str | None = None
    role: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def group(self) -> str:
        return re.sub(r"[^a-z0-9_]+", "_", self.label.lower()).strip("_") or "model"

    def attrs(self) -> dict:
        return {"label": self.label, "checkpoint": self.path or "", "sha256": self.sha256 or "",
                "role": self.role or "", "arch": self.meta.get("arch") or ""}


def _label_from(path: str | None, role: str | None, index: int) -> str:
    if role in ("sgd", "swa"):
        return role.upper()
    if role == "iterate" and path:  # every iterate has this role: its file name tells them apart
        return Path(path).stem
    if role:
        return role
    if path:
        return Path(path).stem
    return f"model{index}"


def as_subjects(models, arch: str | None = None, which: str | None = None) -> list[Subject]:
    """Normalise what a user passes as models into labelled :class:`Subject` s.

    Accepts a single item or a list of items, or a ``{label: item}`` dict, where an item is a checkpoint
    path, a :class:`~widthkit.checkpoints.Checkpoint`, or an ``nn.Module``.
    """
    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, (list, tuple)):
        items = [(None, m) for m in models]
    else:
        items = [(None, models)]
    if not items:
        raise ValueError("no models given: pass at least one checkpoint or nn.Module")
    subjects = []
    for i, (label, item) in enumerate(items):
        if isinstance(item, (str, os.PathLike)):
            # "file.pt#swa" / "file.pt#sgd" pick one model of a file holding both (the SWA authors' layout),
            # so both can be analysed side by side: --ckpt ckpt.pt#sgd --ckpt ckpt.pt#swa
            path, _, pick = str(item).rpartition("#") if str(item).endswith(("#swa", "#sgd")) else (str(item), "", None)
            item = load_checkpoint(path, arch=arch, which=pick or which)
        if isinstance(item, Checkpoint):
            meta = dict(item.meta)
            role = meta.get("role") or (meta.get("which") if meta.get("which") in ("sgd", "swa") else None)
            subjects.append(Subject(label or _label_from(item.path, role, i), item.model,
                                    str(item.path) if item.path else None, item.sha256, role, meta))
        elif isinstance(item, nn.Module):
            subjects.append(Subject(label or f"model{i}", item))
        else:
            raise TypeError(f"cannot analyse a {type(item).__name__}: pass a checkpoint path, a Checkpoint or an nn.Module")
    labels = [s.label for s in subjects]
    groups = [s.group for s in subjects]
    if len(set(groups)) != len(groups):
        # the same role twice (e.g. two SGD seeds): fall back to file names, then to indices
        for i, s in enumerate(subjects):
            if groups.count(s.group) > 1:
                s.label = f"{s.label} ({Path(s.path).stem})" if s.path else f"{s.label} #{i}"
        groups = [s.group for s in subjects]
        if len(set(groups)) != len(groups):
            raise ValueError(f"models need distinct labels, got {labels}; name them: --ckpt LABEL=PATH on the "
                             "command line, a dict {label: model} in Python")
    check_same_architecture(subjects)
    return subjects


def check_same_architecture(subjects: Sequence[Subject]) -> None:
    """``ValueError`` naming the differing parameters unless every subject has the first one's parameter names
    and shapes (one θ layout for all)."""
    ref = subjects[0]
    ref_shapes = {n: tuple(p.shape) for n, p in ref.model.named_parameters()}
    for s in subjects[1:]:
        shapes = {n: tuple(p.shape) for n, p in s.model.named_parameters()}
        if shapes == ref_shapes:
            continue
        only_a = sorted(set(ref_shapes) - set(shapes))[:3]
        only_b = sorted(set(shapes) - set(ref_shapes))[:3]
        differ = [f"{n}: {ref_shapes[n]} vs {shapes[n]}" for n in ref_shapes if n in shapes and shapes[n] != ref_shapes[n]][:3]
        raise ValueError(
            f"{s.label} ({s.path or 'module'}) does not share the architecture of {ref.label} "
            f"({ref.path or 'module'}): "
            + "; ".join(x for x in (f"only in {ref.label}: {only_a}" if only_a else "",
                                    f"only in {s.label}: {only_b}" if only_b else "",
                                    f"shapes differ: {differ}" if differ else "") if x)
            + ". Every model of one analysis must be the same architecture (same parameter names and shapes)."
        )


def resolve_data(data, subjects: Sequence[Subject], cfg: EvalConfig, device):
    """The evaluation splits: ``data`` (a dataset name, or ``(train, test)`` / ``{"train", "test"}`` data of the
    user's own), else ``cfg.dataset``, else the dataset the checkpoints record; subsets applied.

    Returns (train EvalSet, test EvalSet, description dict for the file's config).
    """
    if data is None or isinstance(data, str):
        name = data or cfg.dataset
        if name is None:
            recorded = {s.meta.get("dataset") for s in subjects if s.meta.get("dataset")}
            if len(recorded) > 1:
                raise ValueError(f"the checkpoints were trained on different datasets {sorted(recorded)}; pass --data")
            if not recorded:
                raise ValueError(
                    "the checkpoint does not record its dataset; pass --data (e.g. --data digits, --data cifar10 "
                    "--data-root DIR, --data imagefolder:PATH)"
                )
            name = recorded.pop()
        preview = preview_dataset(name, image_size=cfg.image_size, normalize=cfg.normalize, cache_dir=cfg.cache_dir)
        if preview is not None and subjects:  # a photo folder: the model checked on two images before decoding
            probe_train = EvalSet.from_dataset(preview[0], device)
            probe_test = probe_train if preview[1] is None else EvalSet.from_dataset(preview[1], device)
            model = copy.deepcopy(subjects[0].model).to(device=device, dtype=torch.float32).eval()
            check_model_fits_data(model, probe_train, probe_test, name, cfg.objective())
        splits, fingerprints = {}, {}
        for split, k, seed in (("train", cfg.train_subset, cfg.seed), ("test", cfg.test_subset, cfg.seed + 1)):
            # the subset is drawn before anything is decoded (an image folder decodes only those files)
            ds = load_dataset(name, root=cfg.data_root, split=split, subset=k, subset_seed=seed,
                              image_size=cfg.image_size, normalize=cfg.normalize, cache_dir=cfg.cache_dir,
                              workers=cfg.workers, download=cfg.download)
            if k is not None and k > ds.full_size:
                raise ValueError(f"--{split}-subset {k} asks for more images than the {name} split has "
                                 f"({ds.full_size}); pass at most {ds.full_size}, or leave it unset to use them all")
            splits[split] = EvalSet.from_dataset(ds, device, max_memory=cfg.max_memory)
            fingerprints[split] = ds.fingerprint
        train, test = splits["train"], splits["test"]
        desc = {"name": name, "root": str(cfg.data_root) if cfg.data_root else None}
        if None not in fingerprints.values():  # a resume on changed files is refused (report.store)
            desc["fingerprint"] = fingerprints
    else:
        if isinstance(data, Mapping):
            train_src, test_src = data.get("train"), data.get("test")
        elif isinstance(data, (tuple, list)) and len(data) == 2 and not torch.is_tensor(data[0]):
            train_src, test_src = data
        else:
            raise TypeError("data must be a dataset name, {'train': ..., 'test': ...}, or a (train, test) pair")
        if train_src is None or test_src is None:
            raise ValueError("both a train and a test split are needed")
        train = EvalSet.from_any(train_src, device, cfg.max_memory)
        test = EvalSet.from_any(test_src, device, cfg.max_memory)
        desc = {"name": "user-data", "root": None, "n_train": len(train), "n_test": len(test),
                "train_checksum": _checksum(train), "test_checksum": _checksum(test)}
        for flag, k, split in (("--train-subset", cfg.train_subset, train), ("--test-subset", cfg.test_subset, test)):
            if k is not None and k > len(split):
                raise ValueError(f"{flag} {k} asks for more examples than the {desc['name']} split has ({len(split)});"
                                 f" pass at most {len(split)}, or leave it unset to use them all")
        train = _subset(train, cfg.train_subset, cfg.seed)
        test = _subset(test, cfg.test_subset, cfg.seed + 1)
    if cfg.bn_subset is not None and cfg.bn_subset > len(train):
        raise ValueError(f"--bn-subset {cfg.bn_subset} asks for more images than the {desc['name']} split has "
                         f"({len(train)}); pass at most {len(train)}, or leave it unset to use them all")
    desc.update(train_subset=cfg.train_subset, test_subset=cfg.test_subset, n_train=len(train), n_test=len(test))
    return train, test, desc


def _checksum(es: EvalSet) -> float:
    # cheap fingerprint of user-given tensors, so a resume against different data is refused
    return float(es.x.double().sum()) + 1e-3 * float(es.y.double().sum())


def _subset(es: EvalSet, k: int | None, seed: int) -> EvalSet:
    idx = random_subset(len(es), k, seed)
    return es if idx is None else es.subset(idx)


def recorded_weight_decay(subjects: Sequence[Subject]) -> float:
    wds = set()
    for s in subjects:
        cfg = s.meta.get("config") or {}
        wd = cfg.get("weight_decay", cfg.get("wd")) if isinstance(cfg, Mapping) else None
        if wd is not None:
            wds.add(float(wd))
    return wds.pop() if len(wds) == 1 else 0.0


def check_model_fits_data(model: nn.Module, train: EvalSet, test: EvalSet, name: str, objective=None) -> None:
    """Refuse, before any file is written, data the model cannot be evaluated on: inputs it does not accept
    (wrong channels or size), outputs the objective cannot score, labels outside its classes.

    ``model`` is a private copy (the evaluator's): running it on two examples changes nothing of the user's.
    """
    objective = objective or Objective()
    with torch.no_grad():
        try:
            out = objective.output(model, train.inputs(2))
        except (RuntimeError, TypeError, KeyError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"the model cannot take the {name} inputs, shaped {tuple(train.x.shape[1:])} per "
                             f"example: {first}. Check --dataset and --arch (a model built for other images?)"
                             + (", and forward=" if objective.forward_fn is not None else "")) from None
    if not (torch.is_tensor(out) and out.dim() == 2) or train.y.is_floating_point() or train.y.dim() != 1:
        _check_scores(objective, out, train, name)  # not a (batch, classes) classifier: the objective says
        return
    classes = out.shape[1]
    for split, es in (("train", train), ("test", test)):
        lo, hi = int(es.y.min()), int(es.y.max())
        if lo < 0 or hi >= classes:
            raise ValueError(f"the {name} {split} labels run from {lo} to {hi}, but the model has {classes} outputs "
                             f"(classes 0..{classes - 1}); use a checkpoint trained on this data, or data with at "
                             f"most {classes} classes labelled 0..{classes - 1}")
    _check_scores(objective, out, train, name)


def _check_scores(objective, out, train: EvalSet, name: str) -> None:
    with torch.no_grad():
        try:
            objective.accumulate(out, train.y[:2], torch.zeros(2 * len(objective.metrics), dtype=torch.float64,
                                                             device=train.device))
        except (RuntimeError, IndexError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise ValueError(f"the metrics {objective.names} cannot score the model's output "
                             f"{tuple(getattr(out, 'shape', ()))} against the {name} labels: {first}") from None


# --------------------------------------------------------------------------------------------------------
# Weight vectors that only shape the geometry: iterates, marked checkpoints
# --------------------------------------------------------------------------------------------------------

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


@dataclass
class Source:
    """One weight vector to load: a path (``"file.pt#swa"`` picks one model of a file holding two), a
    Checkpoint or an nn.Module, with its label (None: from the checkpoint) and whether it came from a folder
    (then only checkpoints recorded as iterates are kept)."""

    item: object
    label: str | None = None
    from_folder: bool = False


def expand_sources(items, what: str) -> list[Source]:
    """The weight vectors ``items`` names, in order: each entry a path, a glob (``runs/swa_iter_*.pt``, sorted),
    a folder (its checkpoint files, sorted; only those recorded as iterates are kept when loaded), a
    Checkpoint or an nn.Module. A mapping ``{label: item}`` or ``(label, item)`` pairs give labels.

    Raises:
        ValueError: a glob that matches nothing, a folder without checkpoint files.
    """
    if items is None:
        return []
    if isinstance(items, Mapping):
        pairs = list(items.items())
    elif isinstance(items, (str, os.PathLike, nn.Module, Checkpoint)):
        pairs = [(None, items)]
    else:
        pairs = [tuple(x) if isinstance(x, tuple) and len(x) == 2 else (None, x) for x in items]
    out: list[Source] = []
    for label, item in pairs:
        if not isinstance(item, (str, os.PathLike)):
            out.append(Source(item, label))
            continue
        text = str(item)
        if os.path.isdir(text):
            files = sorted(str(f) for f in Path(text).iterdir() if f.is_file() and f.suffix in CHECKPOINT_SUFFIXES)
            if not files:
                raise ValueError(f"{what}: the folder {text} holds no checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)})")
            out += [Source(f, None, True) for f in files]
        elif glob.has_magic(text) and not os.path.exists(text):
            files = sorted(glob.glob(text))
            if not files:
                raise ValueError(f"{what}: no file matches {text!r}")
            out += [Source(f) for f in files]
        else:
            out.append(Source(text, label))
    return out


@dataclass
class Weights:
    """Loaded weight vectors: ``thetas`` (n, D) float32 on the CPU in the analysis' θ layout, with a label, a
    path and a SHA-256 each (empty for modules)."""

    labels: list[str]
    thetas: torch.Tensor
    paths: list[str]
    sha256: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def record(self) -> dict:
        """What the analysis file records of them: ``{"labels", "checkpoints", "sha256"}``."""
        return {"labels": list(self.labels), "checkpoints": list(self.paths), "sha256": list(self.sha256)}


def load_weights(sources: Sequence[Source], reference: Subject, layout, *, what: str, arch: str | None = None,
                 which: str | None = None, label_by: str = "role", cache: dict | None = None) -> Weights:
    """Load ``sources`` one at a time (only their θ is kept) and check each shares ``reference``'s architecture.

    Args:
        sources: from :func:`expand_sources`.
        reference: the analysis' first model: its parameter names and shapes are the ones every source needs.
        layout: the :class:`~widthkit.engine.space.ThetaLayout` θ is flattened in.
        what: names the sources in errors (``"--mark"``, ``"--pca"``).
        label_by: default label of an unlabelled file: ``"role"`` (SGD / SWA / the file's stem) or ``"stem"``
            (the file's stem: iterates, whose roles are all "iterate").
        cache: ``{path: (Subject, θ)}`` shared between calls, so a file given twice (``--pca`` and
            ``--trajectory``) is read once.

    Raises:
        ValueError: no sources, another architecture, a folder without iterates, a missing or unreadable file.
    """
    cache = {} if cache is None else cache
    labels, rows, paths, shas = [], [], [], []
    for i, src in enumerate(sources):
        key = str(src.item) if isinstance(src.item, (str, os.PathLike)) else None
        if key is not None and key in cache:
            subject, theta = cache[key]
        else:
            try:
                subject = as_subjects([src.item], arch=arch, which=which)[0]
            except CheckpointError:
                if src.from_folder:  # a training folder also holds the trainer's state and logs
                    continue
                raise
            if src.from_folder and subject.role != "iterate":
                continue  # a folder of a training run also holds its start, SGD and SWA checkpoints
            check_same_architecture([reference, subject])
            theta = layout.flatten(subject.model).detach().float().cpu()
            subject.model = None  # only θ is needed: do not keep every model of a long list
            if key is not None:
                cache[key] = (subject, theta)
        if src.from_folder and subject.role != "iterate":
            continue
        stem = Path(subject.path).stem if subject.path else f"{what.strip('-')}{i}"
        labels.append(src.label or (stem if label_by == "stem" else subject.label if subject.path else stem))
        rows.append(theta)
        paths.append(subject.path or "")
        shas.append(subject.sha256 or "")
    if not rows:
        folders = any(s.from_folder for s in sources)
        raise ValueError(f"{what}: no checkpoint to use" + (" (the folders hold no checkpoint recorded as an iterate: "
                                                            "train with --save-iterates, or name the files)"
                                                            if folders else ""))
    if len(set(labels)) != len(labels):
        labels = [f"{label} #{i}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]
    return Weights(labels, torch.stack(rows), paths, shas)


def hessian_directions(path, subjects: Sequence[Subject], layout, k: int) -> tuple[list[torch.Tensor], list]:
    """Each model's top ``k`` Hessian eigenvectors from a curvature file, unit-normalised over θ.

    The file holds one group per model, named like the analysis' groups (``/sgd/``, ``/swa/``: the model's
    label in lower case) or by its label, with a (K, D) float dataset ``eigenvectors`` (rows: eigenvectors,
    largest eigenvalue first) and optionally ``eigenvalues`` (K,).

    Returns:
        ``([directions (k, D) float32 per model], [eigenvalues (k,) float64 numpy array or None per model])``.

    Raises:
        ValueError: no such file, no group for a model (names the groups there), fewer than ``k`` vectors,
            vectors of another length than θ, non-finite or zero vectors.
    """
    import h5py
    import numpy as np

    if not Path(path).is_file():
        raise ValueError(f"--dirs-from hessian:{path}: no such file")
    dirs, values = [], []
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise ValueError(f"--dirs-from hessian:{path} is not a readable HDF5 file ({err})") from None
    with f:
        for s in subjects:
            name = next((n for n in (s.group, s.label) if n in f and isinstance(f[n], h5py.Group)), None)
            if name is None or "eigenvectors" not in f[name]:
                groups = sorted(n for n in f if isinstance(f[n], h5py.Group) and "eigenvectors" in f[n])
                raise ValueError(f"the curvature file {path} has no /{s.group}/eigenvectors for {s.label}; groups with "
                                 f"eigenvectors: {groups or 'none'} (label the model to match: --ckpt LABEL=PATH)")
            ds = f[name]["eigenvectors"]
            if ds.ndim != 2 or ds.shape[1] != layout.size:
                raise ValueError(f"{path}: /{name}/eigenvectors is shaped {ds.shape}, but {s.label}'s θ has "
                                 f"{layout.size} entries: expected (k, {layout.size}) (another model or θ layout?)")
            if ds.shape[0] < k:
                raise ValueError(f"{path} holds {ds.shape[0]} eigenvector(s) of {s.label}, fewer than the {k} "
                                 f"directions asked for: pass --dirs {ds.shape[0]} (or compute more)")
            vecs = torch.from_numpy(np.asarray(ds[:k], dtype=np.float64))
            norms = torch.linalg.vector_norm(vecs, dim=1, keepdim=True)
            if not bool(torch.isfinite(vecs).all()) or bool((norms == 0).any()):
                raise ValueError(f"{path}: /{name}/eigenvectors holds non-finite or zero vectors")
            dirs.append((vecs / norms).float())
            ev = f[name].get("eigenvalues")
            values.append(np.asarray(ev[:k], dtype=np.float64) if ev is not None and len(ev) >= k else None)
    return dirs, values
