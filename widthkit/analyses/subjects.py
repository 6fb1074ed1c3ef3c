"""What an analysis evaluates: the models (labelled, with provenance) and the data splits."""

from __future__ import annotations

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
from ..inputs.checkpoints import Checkpoint, load_checkpoint
from ..inputs.data import load_dataset
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
    _check_same_architecture(subjects)
    return subjects


def _check_same_architecture(subjects: Sequence[Subject]) -> None:
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
        splits = {}
        for split, k, seed in (("train", cfg.train_subset, cfg.seed), ("test", cfg.test_subset, cfg.seed + 1)):
            # the subset is drawn before anything is decoded (an image folder decodes only those files)
            ds = load_dataset(name, root=cfg.data_root, split=split, subset=k, subset_seed=seed,
                              image_size=cfg.image_size, normalize=cfg.normalize, cache_dir=cfg.cache_dir,
                              workers=cfg.workers)
            if k is not None and k > ds.full_size:
                raise ValueError(f"--{split}-subset {k} asks for more images than the {name} split has "
                                 f"({ds.full_size}); pass at most {ds.full_size}, or leave it unset to use them all")
            splits[split] = EvalSet.from_dataset(ds, device, max_memory=cfg.max_memory)
        train, test = splits["train"], splits["test"]
        desc = {"name": name, "root": str(cfg.data_root) if cfg.data_root else None}
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
