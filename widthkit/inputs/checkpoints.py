"""Checkpoint files: read the common PyTorch layouts into a registered model; write widthkit's own format.

Every file is read with ``torch.load(path, map_location="cpu", weights_only=True)``: a checkpoint is data,
never code. Format detection lives in :func:`extract_state_dict` and prefix cleaning in
:func:`clean_state_dict`; nothing else in widthkit looks inside a checkpoint.

Layouts understood (``meta["format"]`` names the one found; see :func:`extract_state_dict`):

- widthkit's own file, written by :func:`save_checkpoint` (architecture, role and config recorded);
- a bare ``model.state_dict()``;
- ``torch.optim.swa_utils.AveragedModel`` state dicts (``module.`` prefix plus an ``n_averaged`` buffer);
- ``nn.DataParallel`` / DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes, nested either way;
- dicts holding the weights under ``state_dict``, ``model``, ``model_state``, ``model_state_dict`` or ``net``,
  including PyTorch Lightning checkpoints (``state_dict`` with the LightningModule's ``model.`` prefix);
- the SWA authors' training checkpoints ``{'epoch', 'state_dict', 'swa_state_dict', 'swa_n', 'optimizer'}``
  (Izmailov et al. 2018, https://github.com/timgaripov/swa), choose one with ``which='swa'`` or ``'sgd'``.

>>> save_checkpoint("runs/swa.pt", model, arch="preresnet20", num_classes=10, role="swa")
>>> ckpt = load_checkpoint("runs/swa.pt")
>>> ckpt.model, ckpt.meta["role"], ckpt.sha256
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fileio import atomic_write
from ..runtime import provenance as runtime_provenance
from .safe_pickle import CheckpointError, is_safetensors, safe_load

__all__ = ["ArchNames", "ANALYSIS_NAMES", "TRAINER_NAMES", "Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint", "extract_state_dict",
           "clean_state_dict", "file_sha256", "safe_load", "atomic_save"]

FORMAT_VERSION = 1  # value of the "widthkit_checkpoint" key; bump when the layout changes
ROLES = ("sgd", "swa", "iterate", "start")  # or None
WHICH = ("swa", "sgd")  # or None
STATE_DICT_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net")  # searched in this order
_SWA_AUTHORS_KEYS = {"swa": "swa_state_dict", "sgd": "state_dict"}
_LIGHTNING_KEY = "pytorch-lightning_version"
_LIGHTNING_PREFIXES = ("model.", "net.", "network.")  # only "model." outside Lightning files
_FEW = 5  # how many keys an error message lists


@dataclass(frozen=True)
class ArchNames:
    """How the caller's model arguments are spelled in messages: an analysis passes ``arch=`` (CLI ``--arch``,
    optional: the architecture can be detected from the weights); the trainer ``model=`` (CLI ``--model``,
    always set by its config)."""

    keyword: str = "arch"
    flag: str = "--arch"
    kwargs_keyword: str = "arch_kwargs"
    kwargs_flag: str | None = None  # None: a Python argument only
    optional: bool = True

    def pass_arch(self, name: str) -> str:
        return f"pass {self.keyword}={name!r} (CLI: {self.flag} {name})"

    def arch(self) -> str:
        return f"{self.keyword}= (CLI: {self.flag})"

    def kwargs(self) -> str:
        return f"{self.kwargs_keyword}= " + (f"(CLI: {self.kwargs_flag})" if self.kwargs_flag else "(Python only)")


ANALYSIS_NAMES = ArchNames()
TRAINER_NAMES = ArchNames("model", "--model", "model_kwargs", "--model-kwargs", optional=False)


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        model: the registered architecture with the weights loaded strictly, in eval mode, on the CPU.
        state_dict: the weights as found in the file, with clean keys (no wrapper prefixes).
        meta: ``arch``, ``arch_kwargs``, ``num_classes``, ``dataset``, ``role``, ``config``, ``metrics``,
            ``extra``, ``format`` (the layout detected), ``which`` (the model picked from a file that holds
            both SGD and SWA weights), ``n_averaged`` (models averaged, when the file says), ``epoch``.
        path: the file it came from.
        sha256: hex SHA-256 of the file's bytes.
    """

    model: nn.Module
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None


# --------------------------------------------------------------------------------------------------------
# Cleaning and detection: the one place that knows checkpoint layouts
# --------------------------------------------------------------------------------------------------------


def clean_state_dict(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Strip wrapper prefixes from a state dict's keys; returns a new dict (``sd`` is left as it was).

    Removes ``_orig_mod.`` (``torch.compile``) wherever it occurs, a ``module.`` prefix shared by every key
    (``nn.DataParallel`` / DDP / ``AveragedModel``) as often as it is nested, the ``n_averaged`` buffer of an
    ``AveragedModel`` and a ``model.`` prefix shared by every key (PyTorch Lightning's LightningModule).

    >>> clean_state_dict({"n_averaged": t0, "module._orig_mod.fc.weight": w})
    {'fc.weight': w}
    """
    return _strip_wrappers(sd)[0]


def _strip_wrappers(sd: Mapping[str, Any], lightning: bool = False) -> tuple[dict[str, Any], list[str], int | None]:
    """Clean ``sd``'s keys; also say which wrappers were found (outermost first) and ``n_averaged``.

    ``lightning=True`` (the file is a Lightning checkpoint) also strips ``net.`` / ``network.``.
    """
    wrappers: list[str] = []
    n_averaged = None
    out = {_drop_component(k, "_orig_mod"): v for k, v in sd.items()}
    if list(out) != list(sd):
        wrappers.append("compiled")
    model_prefix_done = False
    while out:
        keys = list(out)
        weights = [k for k in keys if k != "n_averaged"]
        if "n_averaged" in out and weights and _all_start(weights, "module."):
            n_averaged = int(torch.as_tensor(out["n_averaged"]).item())
            out = {k[len("module."):]: out[k] for k in weights}
            wrappers.append("averaged_model")
        elif _all_start(keys, "module."):
            out = {k[len("module."):]: v for k, v in out.items()}
            wrappers.append("data_parallel")
        elif not model_prefix_done and (prefix := _lightning_prefix(keys, lightning)):
            out = {k[len(prefix):]: v for k, v in out.items()}
            wrappers.append("lightning")
            model_prefix_done = True
        else:
            break
    return out, wrappers, n_averaged


def _drop_component(key: str, component: str) -> str:
    return ".".join(part for part in key.split(".") if part != component)


def _all_start(keys: list[str], prefix: str) -> bool:
    return bool(keys) and all(k.startswith(prefix) and len(k) > len(prefix) for k in keys)


def _lightning_prefix(keys: list[str], lightning: bool) -> str | None:
    """``model.`` when every key starts with it; in a Lightning file also ``net.`` or ``network.`` (the usual
    names of the LightningModule's network attribute)."""
    for prefix in _LIGHTNING_PREFIXES if lightning else _LIGHTNING_PREFIXES[:1]:
        if _all_start(keys, prefix):
            return prefix
    return None


def extract_state_dict(obj: Any, which: str | None = None, source: str = "checkpoint") -> tuple[dict, dict]:
    """Find the model weights in an object returned by ``torch.load``; returns ``(state_dict, info)``.

    Args:
        obj: what ``torch.load(path, weights_only=True)`` returned.
        which: ``'swa'`` or ``'sgd'``: the model to take from a file that holds both (the SWA authors'
            training checkpoints); ``None`` when the file holds one model.
        source: the file name, for error messages.

    Returns:
        ``state_dict`` with clean keys (see :func:`clean_state_dict`) and ``info`` with ``format`` (container,
        then the wrappers stripped, joined by ``+``: e.g. ``"state_dict+averaged_model"``,
        ``"dict:model+data_parallel"``, ``"lightning"``, ``"swa_authors"``, ``"widthkit"``), ``which``,
        ``n_averaged``, ``epoch`` and, for widthkit files, ``recorded`` (the file's metadata).

    Raises:
        CheckpointError: ``obj`` is not a checkpoint, or ``which`` is missing, invalid or not in the file.
    """
    _check_which(which)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} is not a model checkpoint: it holds {_describe(obj)}; {_EXPECTED}")
    if "widthkit_checkpoint" in obj:
        raw, info = _from_widthkit(obj, which, source)
    elif "swa_state_dict" in obj or "swa_n" in obj:
        raw, info = _from_swa_authors(obj, which, source)
    elif _is_state_dict(obj):
        raw, info = obj, {"format": "state_dict"}
    else:
        raw, info = _from_dict(obj, source)
    if which is not None and info.get("which") is None:
        raise CheckpointError(
            f"{source} holds one model ({info['format']}), so which={which!r} has nothing to choose from: "
            f"'which' picks between the SGD and SWA weights of the SWA authors' training checkpoints; for this "
            f"file leave out which= (CLI: --which, and the #swa/#sgd suffix of --ckpt)"
        )
    lightning = info["format"] == "lightning"
    sd, wrappers, n_averaged = _strip_wrappers(raw, lightning=lightning)
    wrappers = [w for w in wrappers if not (lightning and w == "lightning")]
    info["format"] = "+".join([info["format"], *wrappers])
    if n_averaged is not None:
        info["n_averaged"] = n_averaged
    info.setdefault("which", None)
    info.setdefault("n_averaged", None)
    return sd, info


_EXPECTED = (
    "expected a state dict (parameter name -> tensor, as written by torch.save(model.state_dict(), path)) "
    "or a dict holding one under " + ", ".join(repr(k) for k in STATE_DICT_KEYS)
)


def _check_which(which: str | None) -> None:
    if which is not None and which not in WHICH:
        raise CheckpointError(
            f"which must be one of {list(WHICH)} or None, got {which!r}; pass which='swa' or which='sgd' "
            f"(CLI: --which swa / --which sgd) for a file holding both models, or leave it out"
        )


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _from_widthkit(obj: Mapping, which: str | None, source: str) -> tuple[Mapping, dict]:
    version = obj["widthkit_checkpoint"]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{source} is a widthkit checkpoint of format version {version!r}; this widthkit reads version "
            f"{FORMAT_VERSION}; load it with the widthkit release that wrote it"
        )
    if not _is_state_dict(obj.get("state_dict")):
        raise CheckpointError(f"{source} is a widthkit checkpoint without weights: its 'state_dict' is empty")
    recorded = {k: obj.get(k) for k in ("arch", "arch_kwargs", "num_classes", "dataset", "role", "config",
                                        "metrics", "extra", "provenance")}
    role = recorded["role"]
    if which is not None and role is not None and which != role:
        raise CheckpointError(
            f"{source} holds the {role!r} model but which={which!r} was asked for; leave out which= (CLI: "
            f"--which, and the #{which} suffix of --ckpt) or pass the {which!r} checkpoint"
        )
    return obj["state_dict"], {"format": "widthkit", "recorded": recorded, "which": which if role else None}


def _from_swa_authors(obj: Mapping, which: str | None, source: str) -> tuple[Mapping, dict]:
    present = [w for w in WHICH if _is_state_dict(obj.get(_SWA_AUTHORS_KEYS[w]))]
    if not present:
        raise CheckpointError(
            f"{source} looks like an SWA training checkpoint (it has 'swa_state_dict'/'swa_n') but holds no "
            f"weights under 'state_dict' or 'swa_state_dict'"
        )
    if which is None:
        if len(present) > 1:
            raise CheckpointError(
                f"{source} holds both SGD weights ('state_dict') and SWA weights ('swa_state_dict'); pass "
                f"which='swa' or which='sgd' (CLI: --which swa / --which sgd, or --ckpt {source}#swa) to pick "
                f"one"
            )
        which = present[0]
    elif which not in present:
        raise CheckpointError(
            f"{source} has no {which.upper()} weights ({_SWA_AUTHORS_KEYS[which]!r} is missing or empty); it "
            f"holds only {present[0].upper()} weights: pass which={present[0]!r} (CLI: --which {present[0]}) "
            f"or leave out which= (CLI: --which, and the #{which} suffix of --ckpt)"
        )
    info = {"format": "swa_authors", "which": which, "epoch": _plain_int(obj.get("epoch"))}
    if which == "swa":
        info["n_averaged"] = _plain_int(obj.get("swa_n"))
    return obj[_SWA_AUTHORS_KEYS[which]], info


def _from_dict(obj: Mapping, source: str) -> tuple[Mapping, dict]:
    for key in STATE_DICT_KEYS:
        if _is_state_dict(obj.get(key)):
            fmt = "lightning" if _LIGHTNING_KEY in obj else f"dict:{key}"
            return obj[key], {"format": fmt, "epoch": _plain_int(obj.get("epoch"))}
    keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
    if not _holds_tensors(obj):
        raise CheckpointError(
            f"{source} is not a model checkpoint: it holds a dict with keys [{keys}] and no tensors; {_EXPECTED}"
        )
    raise CheckpointError(
        f"{source}: cannot find the model weights in a dict with keys [{keys}]: it mixes tensors with other "
        f"values and has no state dict under any of {list(STATE_DICT_KEYS)}; re-save the weights alone with "
        f"torch.save(model.state_dict(), path)"
    )


def _holds_tensors(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensors(v) for v in obj)
    return False


def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    if isinstance(obj, Mapping) and not obj:
        return "an empty dict"
    return f"a {type(obj).__name__}"


def _plain_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(torch.as_tensor(value).item())
    except (TypeError, ValueError, RuntimeError):
        return None


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike,
    arch: str | None = None,
    which: str | None = None,
    num_classes: int | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    *,
    allow_nonfinite: bool = False,
    names: ArchNames = ANALYSIS_NAMES,
) -> Checkpoint:
    """Load a checkpoint file into a registered model (CPU, eval mode, weights loaded strictly).

    Args:
        path: the file (any layout listed in this module's docstring).
        arch: registered model name (see ``widthkit.models.list_models()``). widthkit files record it (an
            ``arch`` that disagrees is an error); for other files ``None`` tries every registered model and
            takes the single one whose parameter names and shapes match.
        which: ``'swa'`` or ``'sgd'`` for files holding both (the SWA authors' training checkpoints).
        num_classes: classifier outputs; ``None`` reads it from the file (recorded, or the final layer's shape).
        arch_kwargs: extra ``create_model`` arguments (e.g. ``depth``); for widthkit files they update the
            recorded ones.
        allow_nonfinite: load weights holding NaN/Inf instead of refusing them, to inspect them (Python only:
            no analysis can use such weights, and the command line has no flag for it).
        names: how messages spell ``arch``/``arch_kwargs`` for the caller (:data:`TRAINER_NAMES` for the
            trainer's ``model``/``--model``).

    Returns:
        a :class:`Checkpoint`.

    Raises:
        CheckpointError: missing, corrupt or unsafe file; not a checkpoint; weights that do not fit the
            architecture (names the keys and shapes); NaN/Inf weights; bad ``which``.

    >>> ckpt = load_checkpoint("swa_authors/checkpoint-300.pt", arch="preresnet164", which="swa")
    """
    _check_which(which)
    path = os.fspath(path)
    obj = safe_load(path)
    sd, info = extract_state_dict(obj, which=which, source=path)
    if is_safetensors(path):  # a flat dict of tensors: "state_dict" as extract_state_dict sees it
        info["format"] = "safetensors" + info["format"][len("state_dict"):]
    if not allow_nonfinite:
        _check_finite(sd, path)
    recorded = info.pop("recorded", None)
    if recorded is not None:
        arch, kwargs, num_classes = _resolve_recorded(recorded, arch, num_classes, arch_kwargs, path, names)
    else:
        kwargs = _drop_none(arch_kwargs)
        _refuse_downloads(kwargs, path, recorded={})
        if arch is None:
            arch, num_classes = _detect_arch(sd, num_classes, kwargs, path)
        elif num_classes is None:
            num_classes = _infer_num_classes(arch, kwargs, _shapes(sd), path, names=names)
    model = _build_loaded(arch, num_classes, kwargs, sd, path, hint=recorded is None, names=names)
    recorded = recorded or {}
    meta = {
        "arch": arch,
        "arch_kwargs": kwargs,
        "num_classes": num_classes,
        "dataset": recorded.get("dataset"),
        "role": recorded.get("role") or info["which"],
        "config": recorded.get("config"),
        "metrics": recorded.get("metrics"),
        "extra": recorded.get("extra"),
        "provenance": recorded.get("provenance"),
        "format": info["format"],
        "which": info["which"],
        "n_averaged": info["n_averaged"],
        "epoch": info.get("epoch"),
    }
    return Checkpoint(model=model, state_dict=sd, meta=meta, path=path, sha256=file_sha256(path))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_finite(sd: Mapping[str, torch.Tensor], path: str) -> None:
    bad = []
    for name, t in sd.items():
        if t.is_floating_point() or t.is_complex():
            n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if n_nan or n_inf:
                bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf)")
    if bad:
        raise CheckpointError(
            f"{path} has non-finite weights in {len(bad)} tensor(s): {_few(bad)}; NaN/Inf weights make every "
            f"loss and accuracy computed from them NaN, so the file is unusable for an analysis. The run that "
            f"wrote it probably diverged: retrain with a lower learning rate, or use an earlier checkpoint of "
            f"that run. To inspect these tensors in Python, load_checkpoint(path, allow_nonfinite=True) loads "
            f"the file anyway (there is no command-line flag for it)"
        )


def _resolve_recorded(recorded: dict, arch: str | None, num_classes: int | None,
                      arch_kwargs: Mapping | None, path: str, names: ArchNames) -> tuple[str, dict, int]:
    if not isinstance(recorded["arch"], str):
        raise CheckpointError(f"{path} is a widthkit checkpoint without a recorded 'arch'; it is damaged")
    if arch is not None and arch != recorded["arch"]:
        fix = (f"leave out {names.arch()} to use the recorded one" if names.optional
               else names.pass_arch(recorded["arch"]))
        raise CheckpointError(
            f"{path}: the checkpoint records arch {recorded['arch']!r} but {names.keyword}={arch!r} was passed "
            f"(CLI: {names.flag} {arch}); {fix}"
        )
    if num_classes is not None and recorded["num_classes"] is not None and num_classes != recorded["num_classes"]:
        raise CheckpointError(
            f"{path}: the checkpoint records num_classes={recorded['num_classes']} but num_classes={num_classes} "
            f"was passed; leave out num_classes= to use the recorded one (a Python argument: the command line "
            f"always reads it from the file)"
        )
    # a None passed over a recorded keyword drops it (the factory's default applies)
    kwargs = _drop_none({**(recorded["arch_kwargs"] or {}), **(arch_kwargs or {})})
    _refuse_downloads(kwargs, path, recorded=_drop_none(recorded["arch_kwargs"]))
    return recorded["arch"], kwargs, num_classes if num_classes is not None else recorded["num_classes"]


def _drop_none(kwargs: Mapping | None) -> dict:
    return {k: v for k, v in (kwargs or {}).items() if v is not None}


# create_model keywords that make torchvision (or timm) download pretrained weights
_DOWNLOAD_KEYWORDS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def _refuse_downloads(kwargs: Mapping, path: str, recorded: Mapping) -> None:
    """Refuse architecture keywords that ask for pretrained weights: the weights come from the checkpoint, and
    widthkit never downloads anything."""
    asking = [k for k in _DOWNLOAD_KEYWORDS if kwargs.get(k) not in (None, False, "")]
    if not asking:
        return
    key = asking[0]
    what = f"arch_kwargs {key}={kwargs[key]!r}"
    what = f"the checkpoint records {what}, which" if recorded.get(key) == kwargs[key] else what
    raise CheckpointError(
        f"{path}: {what} asks for pretrained weights to be downloaded; widthkit never downloads, and the "
        f"weights come from this checkpoint: drop the keyword "
        f"(load_checkpoint(path, arch_kwargs={{{key!r}: None}}) in Python, or re-save the checkpoint without it)"
    )


# --------------------------------------------------------------------------------------------------------
# Matching weights to architectures (on the meta device: no memory is allocated for the candidates)
# --------------------------------------------------------------------------------------------------------

Shapes = dict[str, tuple[int, ...]]


def _shapes(sd: Mapping[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _meta_model(arch: str, num_classes: int | None, kwargs: Mapping, cache: dict | None = None) -> nn.Module:
    """``create_model(arch, ...)`` on the meta device: shapes without memory. ``cache`` memoises within a call."""
    from .. import models

    key = (arch, num_classes, repr(sorted(kwargs.items())))
    if cache is not None and key in cache:
        return cache[key]
    nc = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device("meta"):
        model = models.create_model(arch, **nc, **kwargs)
    if cache is not None:
        cache[key] = model
    return model


def _meta_shapes(arch: str, num_classes: int | None, kwargs: Mapping, cache: dict | None = None) -> Shapes:
    """Parameter/buffer names and shapes of ``create_model(arch, ...)``, built on the meta device."""
    return _shapes(_meta_model(arch, num_classes, kwargs, cache).state_dict())


def _compare(expected: Shapes, given: Shapes) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, shape-mismatched) keys of ``given`` against ``expected``.

    BatchNorm's ``num_batches_tracked`` may be absent (files from before PyTorch 0.4.1): torch fills it in.
    """
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    mismatched = [k for k in expected if k in given and tuple(expected[k]) != tuple(given[k])]
    return missing, unexpected, mismatched


def _infer_num_classes(arch: str, kwargs: Mapping, given: Shapes, path: str,
                       cache: dict | None = None, names: ArchNames = ANALYSIS_NAMES) -> int | None:
    """The class count that makes ``arch``'s final layer match ``given``; None when it cannot be read.

    The final layer is found by building ``arch`` with 10 and with 11 classes: the last weight whose shape
    changes is the classifier, and the changing dimension of its shape in the file is the class count.
    """
    try:
        s10 = _meta_shapes(arch, 10, kwargs, cache)
        if not any(_compare(s10, given)):  # the common case (CIFAR-10, digits): no second build
            return 10
        s11 = _meta_shapes(arch, 11, kwargs, cache)
    except Exception as err:  # the factory's own error, whatever its type, says why it cannot be built
        raise _build_error(arch, None, kwargs, path, err, names=names) from err
    changing = [k for k in s10 if k in s11 and s10[k] != s11[k] and k in given]
    weights = [k for k in changing if k.endswith("weight")] or changing
    if not weights:
        return None
    key = weights[-1]
    for dim, (a, b) in enumerate(zip(s10[key], s11[key])):
        if (a, b) == (10, 11) and dim < len(given[key]):
            return int(given[key][dim])
    return None


def _detect_arch(sd: Mapping[str, torch.Tensor], num_classes: int | None, kwargs: Mapping,
                 path: str) -> tuple[str, int | None]:
    """The single registered model whose names and shapes match ``sd`` (with its class count)."""
    cache: dict = {}
    matches = _matching_models(_shapes(sd), num_classes, kwargs, cache)
    if len(matches) > 1 and _same_architecture(matches, kwargs, cache):
        # aliases of one network (e.g. 'preresnet' at its default depth 110 and 'preresnet110'): take the most
        # specific name, the longest
        matches = [max(matches, key=lambda m: (len(m[0]), m[0]))]
    if len(matches) == 1:
        return matches[0]
    if matches:
        names = ", ".join(repr(name) for name, _ in matches)
        raise CheckpointError(
            f"{path}: the weights fit several registered models ({names}); pass arch=NAME (CLI: --arch NAME) "
            f"to say which"
        )
    from .. import models

    tried = f" (tried with arch_kwargs={dict(kwargs)})" if kwargs else ""
    raise CheckpointError(
        f"{path}: no registered model matches these weights ({len(sd)} tensors, first keys: "
        f"{_few(list(sd))}); registered: {', '.join(models.list_models())}{tried}; "
        f"pass arch=NAME (CLI: --arch NAME), or arch='torchvision:NAME' (CLI: --arch torchvision:NAME) for a "
        f"torchvision model; a network built with non-default options (e.g. depth, widen_factor) needs them "
        f"as arch_kwargs= (Python only), or a registered name that fixes them (e.g. preresnet164)"
    )


def _matching_models(given: Shapes, num_classes: int | None, kwargs: Mapping,
                     cache: dict | None = None) -> list[tuple[str, int | None]]:
    from .. import models

    matches = []
    for name in models.list_models():
        try:
            missing, unexpected, _ = _compare(_meta_shapes(name, 10, kwargs, cache), given)
            if missing or unexpected:
                continue
            nc = num_classes if num_classes is not None else _infer_num_classes(name, kwargs, given, "", cache)
            if not any(_compare(_meta_shapes(name, nc, kwargs, cache), given)):
                matches.append((name, nc))
        except Exception:  # a factory that rejects these kwargs (or the meta device) is not a match
            continue
    return matches


def _same_architecture(matches: list[tuple[str, int | None]], kwargs: Mapping, cache: dict) -> bool:
    """Whether every match builds the same network: same module names, classes and plain attributes."""
    try:
        first, *rest = (_fingerprint(_meta_model(name, nc, kwargs, cache)) for name, nc in matches)
        return all(other == first for other in rest)
    except Exception:  # cannot build one of them: treat them as different
        return False


def _fingerprint(model: nn.Module) -> list[tuple]:
    """(module name, class, plain attributes such as depth or kernel_size) of every submodule."""
    plain = (bool, int, float, str, tuple, type(None))
    return [
        (name, type(m).__module__, type(m).__qualname__,
         sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                and isinstance(v, plain)))
        for name, m in model.named_modules()
    ]


def _build_loaded(arch: str, num_classes: int | None, kwargs: Mapping, sd: Mapping[str, torch.Tensor],
                  path: str, hint: bool, names: ArchNames = ANALYSIS_NAMES) -> nn.Module:
    """``create_model`` on the CPU, check names and shapes, ``load_state_dict(strict=True)``, ``eval()``."""
    from .. import models

    nc = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = models.create_model(arch, **nc, **kwargs)
    except Exception as err:  # unknown name, bad kwargs: the registry's message names the options
        raise _build_error(arch, num_classes, kwargs, path, err, recorded=not hint, names=names) from err
    missing, unexpected, mismatched = _compare(_shapes(model.state_dict()), _shapes(sd))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the weights do not fit {arch!r}: {len(missing)} missing key(s) [{_few(missing)}], "
            f"{len(unexpected)} unexpected key(s) [{_few(unexpected)}]"
            + (_arch_hint(sd, arch, kwargs, names) if hint else "")
        )
    if mismatched:
        expected = model.state_dict()
        shapes = [f"{k!r} is {tuple(sd[k].shape)} in the checkpoint but {tuple(expected[k].shape)} in the model"
                  for k in mismatched]
        if not hint:
            fix = ("check num_classes= and arch_kwargs= (e.g. depth, widen_factor) against the run that wrote it "
                   "(Python arguments passed over the ones the file records)")
        elif names.optional:
            fix = ("check num_classes= and arch_kwargs= (e.g. depth, widen_factor) against the run that wrote it "
                   "(Python arguments; on the command line pass an --arch whose name fixes them, e.g. --arch "
                   "preresnet164 for depth 164, or leave out --arch to detect the model)")
        else:
            fix = (f"check {names.kwargs()} (e.g. depth, widen_factor) and the data's class count against the run "
                   "that wrote it")
        raise CheckpointError(
            f"{path}: shape mismatch loading into {arch!r} (num_classes={num_classes}, arch_kwargs={dict(kwargs)}): "
            f"{_few(shapes, sep='; ')}; {fix}"
        )
    model.load_state_dict(dict(sd), strict=True)  # a copy: BatchNorm may add num_batches_tracked to it
    return model.eval()


def _arch_hint(sd: Mapping[str, torch.Tensor], arch: str, kwargs: Mapping, names: ArchNames) -> str:
    matches = [name for name, _ in _matching_models(_shapes(sd), None, kwargs) if name != arch]
    if len(matches) == 1:
        detect = f" or leave out {names.arch()} to detect it" if names.optional else ""
        return f"; they match {matches[0]!r}: {names.pass_arch(matches[0])}{detect}"
    return f"; is {names.arch()} the architecture that wrote it?"


def _build_error(arch: str, num_classes: int | None, kwargs: Mapping, path: str, err: Exception,
                 recorded: bool = False, names: ArchNames = ANALYSIS_NAMES) -> CheckpointError:
    """``recorded``: ``arch`` and (some of) ``kwargs`` come from a widthkit file, not from the caller."""
    if recorded:
        fix = ("the file records this model: check any arch_kwargs= passed over the recorded ones (a Python "
               "argument), or load it with the widthkit release and model registrations that wrote it")
    else:
        fix = f"fix {names.arch()} or {names.kwargs()}"
        if names.optional:
            fix += f", or leave out {names.arch()} to detect the model from the weights"
    return CheckpointError(
        f"{path}: cannot build model {arch!r} (num_classes={num_classes}, arch_kwargs={dict(kwargs)}): {err}; {fix}"
    )


def _few(items: list[str], sep: str = ", ") -> str:
    shown = sep.join(str(i) for i in items[:_FEW])
    return shown + (f"{sep}... ({len(items) - _FEW} more)" if len(items) > _FEW else "")


# --------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    arch: str,
    num_classes: int,
    arch_kwargs: Mapping[str, Any] | None = None,
    dataset: str | None = None,
    role: str | None = None,
    config: Any = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Write ``model``'s weights and their provenance as a widthkit checkpoint, atomically.

    The file is a dict ``{"widthkit_checkpoint": 1, "arch", "arch_kwargs", "num_classes", "dataset", "role",
    "config", "metrics", "extra", "state_dict"}`` of plain Python values and CPU tensors, so
    ``torch.load(path, weights_only=True)`` reads it anywhere. It is written to a temporary file in the same
    folder and moved over ``path`` with ``os.replace``: a killed run leaves the old file or the new one,
    never half of one.

    Args:
        path: destination file (its folder is created).
        model: the network (wrappers such as ``DataParallel``, ``torch.compile`` or ``AveragedModel`` are
            fine: their prefixes are stripped) or its state dict. Not modified.
        arch, num_classes, arch_kwargs: how ``widthkit.models.create_model`` rebuilds it; checked now, on the
            meta device, so that a written file always loads.
        dataset: dataset name the model was trained on.
        role: ``'sgd'``, ``'swa'``, ``'iterate'``, ``'start'`` or None.
        config: the resolved run configuration (dict or dataclass).
        metrics: e.g. ``{"test_err": 5.1}`` (errors in %, losses in nats).
        extra: anything else plain (epoch, seed, ...).
        provenance: where the weights were computed (default: :func:`widthkit.runtime.provenance` of this
            process on the CPU): device, thread count, precision, torch/CUDA versions.

    Returns:
        ``path`` as a string.

    >>> save_checkpoint("runs/sgd.pt", model, arch="vgg16_bn", num_classes=10, role="sgd",
    ...                 config=asdict(cfg), metrics={"test_err": 6.6})
    """
    if role is not None and role not in ROLES:
        raise CheckpointError(f"role must be one of {list(ROLES)} or None, got {role!r}")
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"arch must be a registered model name (a non-empty str), got {arch!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise CheckpointError(f"num_classes must be a positive int, got {num_classes!r}")
    path = os.fspath(path)
    sd = _cpu_state_dict(model)
    kwargs = _plain(_drop_none(arch_kwargs), "arch_kwargs")
    _check_fits(arch, num_classes, kwargs, sd, path)
    payload = {
        "widthkit_checkpoint": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": kwargs,
        "num_classes": num_classes,
        "dataset": _plain(dataset, "dataset"),
        "role": role,
        "config": _plain(config, "config"),
        "metrics": _plain(metrics, "metrics"),
        "extra": _plain(extra, "extra"),
        "provenance": _plain(dict(provenance) if provenance is not None else runtime_provenance(), "provenance"),
        "state_dict": sd,
    }
    atomic_save(payload, path)
    return path


def _cpu_state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clean-keyed copy of the weights: detached, on the CPU, sharing no memory with ``model``."""
    if isinstance(model, nn.Module):
        sd = model.state_dict()
    elif isinstance(model, Mapping):
        sd = model
    else:
        raise CheckpointError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    sd = clean_state_dict(sd)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad or not sd:
        raise CheckpointError(
            "cannot save: the state dict must map names to tensors; "
            + (f"non-tensor entries: {_few(bad)}" if bad else "it is empty")
        )
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def _check_fits(arch: str, num_classes: int, kwargs: Mapping, sd: Mapping[str, torch.Tensor], path: str) -> None:
    try:
        expected = _meta_shapes(arch, num_classes, kwargs)
    except Exception as err:  # unknown arch or bad kwargs: the registry's message lists the options
        raise CheckpointError(
            f"cannot save {path}: arch={arch!r} with num_classes={num_classes}, arch_kwargs={dict(kwargs)} "
            f"cannot be built, so the file could not be loaded back: {err}"
        ) from err
    missing, unexpected, mismatched = _compare(expected, _shapes(sd))
    if missing or unexpected or mismatched:
        shapes = [f"{k!r}: {tuple(sd[k].shape)} vs {expected[k]}" for k in mismatched]
        raise CheckpointError(
            f"cannot save {path}: the model's weights do not fit arch={arch!r} (num_classes={num_classes}, "
            f"arch_kwargs={dict(kwargs)}): missing [{_few(missing)}], unexpected [{_few(unexpected)}], "
            f"shapes [{_few(shapes, sep='; ')}]; pass the arch and arguments the model was built with"
        )


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` made of types ``torch.load(weights_only=True)`` accepts.

    Dataclasses become dicts, numpy scalars/arrays become Python numbers/lists, paths become strings,
    tensors become detached CPU copies; anything else is refused with the path to the offending value.
    """
    if value is None or type(value) in (bool, int, float, str):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist() if isinstance(value, np.ndarray) else value.item()
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):  # int subclasses (IntEnum, ...) would pickle as their class
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise CheckpointError(f"cannot save {where}: key {k!r} is a {type(k).__name__}; use str keys")
            out[_plain(k, where)] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(
        f"cannot save {where}: it is a {type(value).__module__}.{type(value).__name__} ({value!r:.60}), which "
        f"torch.load(weights_only=True) would refuse; convert it to str/int/float/bool/None, a list, a dict "
        f"or a tensor"
    )


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`widthkit.fileio.atomic_write`: a kill or a full disk leaves the old file
    or the new one, never half of one. Used for checkpoints and training state."""
    atomic_write(path, lambda f: torch.save(obj, f))
