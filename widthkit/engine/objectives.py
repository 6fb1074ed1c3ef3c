"""What is measured at a point: a per-example loss, metrics, and how the model is called.

An :class:`Objective` is the one definition of "the numbers of a split" that the evaluator uses (the
trainer's log uses :func:`split_sums`, the same cross-entropy and top-1 error). Every metric is accumulated
as a float64 ``(sum, count)`` pair on the device, so a mean over examples, over tokens, or over the examples
of one class all come out of the same loop, independent of how the data is batched.

Built-in metric names (``metrics="loss,err,top5_err"`` / ``--metrics loss,err,top5_err``):

- ``loss``: the mean of the objective's loss (``loss=``; cross-entropy by default, in nats);
- ``err``: top-1 error in % (outputs ``(..., classes)``, integer labels ``(...)``; labels equal to
  ``ignore_index`` = -100 are not counted, so token-level error of a language model works as it is);
- ``top5_err``: top-5 error in % (top-k with k = min(5, classes));
- ``class_err:K``: top-1 error in % among the examples whose label is K.

A metric can also be any callable ``fn(output, target)`` returning per-example values ``(B,)`` (their mean is
reported) or a ``(sum, count)`` pair (``sum / count`` is reported, e.g. a token-level mean); pass
``{"name": fn}`` to name it. ``loss=`` takes a built-in name (``cross_entropy``, ``mse``), a callable of the
same form, or ``"module:function"`` (imported); ``forward=`` (an adapter ``fn(model, inputs) -> output`` for
models that take dicts or return objects, e.g. ``lambda m, x: m(input_ids=x).logits``) likewise.

Stored metric names are ``<split>_<metric>``: ``train_loss``, ``test_err``, ``test_top5_err``,
``test_class_err_3``, and ``train_loss_l2`` = train loss + ½·wd·‖θ‖² when a weight decay is set.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import autocast

SPLITS: tuple[str, ...] = ("train", "test")
L2_METRIC = "train_loss_l2"  # train loss + ½·wd·‖θ‖², the regularised objective the SWA paper plots
IGNORE_INDEX = -100  # labels never counted (padding tokens), as torch's cross_entropy
DEFAULT_METRICS = ("loss", "err")
BUILTIN_LOSSES = ("cross_entropy", "mse")
METRIC_SYNTAX = ("loss, err, top5_err, class_err:K (K a class index), or a callable fn(output, target) in Python")

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def split_sums(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, out: torch.Tensor,
               amp: bool = False) -> None:
    """Add the cross-entropy sum and the error count of ``model`` over ``(x, y)`` to ``out`` (2,) float64.

    The trainer's per-epoch measurement (the evaluator's default objective computes the same numbers).
    Batches of ``batch_size``; everything stays on the device (no host synchronisation).
    """
    for start in range(0, len(y), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        with autocast(x.device, amp):
            logits = model(xb)
        logits = logits.float()
        out[0] += F.cross_entropy(logits, yb, reduction="sum").double()
        out[1] += (logits.argmax(dim=1) != yb).sum().double()


def import_callable(spec: str, what: str) -> Callable:
    """``"package.module:function"`` -> the function (the module is imported as Python would)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{what} {spec!r} must be 'module:function' (e.g. 'mylosses:smooth_l1'), or a built-in name")
    try:
        obj = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"cannot import {module!r} for {what} {spec!r}: {err}; run from the folder that holds it "
                         "or put it on PYTHONPATH") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module!r} has no {name!r} (for {what} {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable")
    return obj


def describe_callable(fn) -> str:
    """A stable name for a callable, recorded in files (``module:qualname``)."""
    module = getattr(fn, "__module__", None) or "?"
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{name}"


def _flat_classes(output: torch.Tensor, target: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (M, classes), labels (M,)) from outputs (..., classes) and integer labels (...)."""
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise ValueError(f"{what} needs integer class labels, got {target.dtype} labels (e.g. "
                         f"{target.flatten()[:3].tolist()}); pass y.long() if they are whole numbers, or a loss= "
                         "and metrics= for regression targets (e.g. loss='mse', metrics='loss')")
    if output.dim() < 2 or tuple(output.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"{what} needs outputs shaped (..., classes) matching labels shaped (...); got outputs "
                         f"{tuple(output.shape)} and labels {tuple(target.shape)}. Pass forward= to adapt the model's "
                         "output, or a loss=/metrics= of your own")
    return output.reshape(-1, output.shape[-1]).float(), target.reshape(-1)


def _cross_entropy(output, target):
    logits, labels = _flat_classes(output, target, "the cross-entropy loss")
    total = F.cross_entropy(logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    return total, (labels != IGNORE_INDEX).sum()


def _mse(output, target):
    if output.shape != target.shape:
        if output.numel() != target.numel():
            raise ValueError(f"mse loss: outputs {tuple(output.shape)} and targets {tuple(target.shape)} differ")
        target = target.reshape(output.shape)
    per = (output.float() - target.float()).square()
    return per.reshape(per.shape[0], -1).mean(dim=1)


_LOSSES = {"cross_entropy": _cross_entropy, "mse": _mse}


def _topk_errors(output, target, k: int, what: str, only_class: int | None = None):
    logits, labels = _flat_classes(output, target, what)
    keep = labels != IGNORE_INDEX
    if only_class is not None:
        if only_class >= logits.shape[1]:  # a shape, known before the first point: no NaN grid of 0 widths
            raise ValueError(f"{what} asks for class {only_class}, but the model has {logits.shape[1]} outputs: "
                             f"the class index must be in 0..{logits.shape[1] - 1}")
        keep = keep & (labels == only_class)
    k = min(k, logits.shape[1])
    if k == 1:
        wrong = logits.argmax(dim=1) != labels
    else:
        wrong = ~(logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return (wrong & keep).sum(), keep.sum()


class Metric:
    """One metric: ``name`` (the stored suffix), ``error`` (reported in %), ``fn(output, target) -> (sum, count)``,
    ``tensor`` (it needs the model's output as one tensor: every built-in does)."""

    def __init__(self, name: str, fn: Callable, error: bool = False, units: str | None = None, tensor: bool = True):
        self.name, self.fn, self.error, self.units, self.tensor = name, fn, error, units, tensor

    def __repr__(self) -> str:
        return f"Metric({self.name!r})"


def _batch_size(output, target) -> int | None:
    """Examples in a batch: the labels' first dimension (else the outputs'), None when neither is a tensor."""
    for t in (target, output):
        if torch.is_tensor(t) and t.dim() > 0:
            return int(t.shape[0])
    return None


def _as_sum_count(value, what: str, batch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss or metric result as (sum, count): per-example values must be shaped ``(batch,)`` (checked on
    every batch: shapes are known without waiting for the device)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        total, count = value
        total = torch.as_tensor(total)
        return total.double().sum(), count.double() if torch.is_tensor(count) else float(count)
    if torch.is_tensor(value):
        if value.dim() != 1 or (batch is not None and value.shape[0] != batch):
            got = "one number" if value.dim() == 0 else f"values shaped {tuple(value.shape)}"
            raise ValueError(f"{what} returned {got} for a batch of {batch} examples; it must return one value "
                             f"per example, shaped ({batch},) (e.g. reduction='none', then .mean(dim=1) over "
                             "any other dimensions), or a (sum, count) pair")
        return value.double().sum(), float(value.shape[0])  # a number: no host-to-device copy (graph capture)
    raise ValueError(f"{what} must return a tensor of per-example values (B,) or a (sum, count) pair, "
                     f"got {type(value).__name__}")


# what a user's callable raises when it cannot handle what it is given: reported in one line, naming it
_CALLABLE_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError)


def call_user(fn: Callable, what: str, *args):
    """``fn(*args)`` for a user's loss, metric or forward adapter; its errors as one ``ValueError`` naming it
    (``what``) with the original message (the original stays the cause)."""
    try:
        return fn(*args)
    except _CALLABLE_ERRORS as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"{what} raised {type(err).__name__}" + (f": {first}" if first else "")) from err


def describe_value(value) -> str:
    """What a callable returned, in a few words: ``a tuple of 2 items (Tensor (8, 10), Tensor (8, 10))``."""
    def one(v):
        return f"Tensor {tuple(v.shape)}" if torch.is_tensor(v) else type(v).__name__
    if isinstance(value, (tuple, list)):
        items = ", ".join(one(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} items ({items})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)[:6]}"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


class Objective:
    """The loss, the metrics and the forward adapter of an evaluation, resolved from names or callables.

    Args:
        loss: ``"cross_entropy"`` (default), ``"mse"``, ``"module:function"`` or a callable
            ``fn(output, target)`` -> per-example values (B,) or a ``(sum, count)`` pair.
        metrics: names or callables (see the module docs); a comma-separated string, a sequence, or a
            ``{name: callable}`` dict. Default: ``loss, err`` with the cross-entropy loss, ``loss`` alone
            with any other loss.
        forward: None (``model(inputs)``), ``"module:function"`` or a callable ``fn(model, inputs) -> output``.
    """

    def __init__(self, loss: Any = "cross_entropy", metrics: Any = None, forward: Any = None):
        self.loss_name, self.loss_fn = self._resolve_loss(loss)
        self.forward_name, self.forward_fn = self._resolve_forward(forward)
        if metrics is None or metrics == "" or metrics == ():
            metrics = DEFAULT_METRICS if self.loss_name == "cross_entropy" else ("loss",)
        self.metrics: list[Metric] = self._resolve_metrics(metrics)

    # -- resolution ------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_loss(loss):
        if callable(loss):
            return describe_callable(loss), loss
        if not isinstance(loss, str) or not loss:
            raise ValueError(f"loss must be one of {', '.join(BUILTIN_LOSSES)}, 'module:function' or a callable; "
                             f"got {loss!r}")
        if loss in _LOSSES:
            return loss, _LOSSES[loss]
        if ":" not in loss:
            raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(BUILTIN_LOSSES)}, 'module:function', or a "
                             "callable fn(output, target) in Python")
        return loss, import_callable(loss, "loss")

    @staticmethod
    def _resolve_forward(forward):
        if forward is None or forward == "":
            return None, None
        if callable(forward):
            return describe_callable(forward), forward
        if isinstance(forward, str):
            return forward, import_callable(forward, "forward")
        raise ValueError(f"forward must be a callable fn(model, inputs) or 'module:function', got {forward!r}")

    def _resolve_metrics(self, metrics) -> list[Metric]:
        if isinstance(metrics, str):
            items = [(None, m.strip()) for m in metrics.split(",") if m.strip()]
        elif isinstance(metrics, Mapping):
            items = list(metrics.items())
        elif isinstance(metrics, Sequence):
            items = [(None, m) for m in metrics]
        else:
            items = [(None, metrics)]
        out: list[Metric] = []
        for name, item in items:
            out.append(self._metric(name, item))
        names = [m.name for m in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"metric(s) {dup} given twice; name callables with a dict {{'name': fn}}")
        if not out:
            raise ValueError(f"no metrics given; valid: {METRIC_SYNTAX}")
        return out

    def _metric(self, name, item) -> Metric:
        if callable(item):
            name = name or getattr(item, "__name__", "")
            if not isinstance(name, str) or not _NAME.match(name) or name == "<lambda>":
                raise ValueError(f"name the metric callable {item!r} with lowercase letters, digits and _: pass "
                                 "metrics={'my_metric': fn}")
            what = f"metric {name} ({describe_callable(item)})"
            return Metric(name, lambda out, y, fn=item, w=what: _as_sum_count(call_user(fn, w, out, y), w,
                                                                            _batch_size(out, y)), tensor=False)
        if not isinstance(item, str):
            raise ValueError(f"unknown metric {item!r}; valid: {METRIC_SYNTAX}")
        if item == "loss":
            return Metric("loss", self._loss_sums, units="nats" if self.loss_name == "cross_entropy" else None,
                          tensor=self.loss_name in _LOSSES)
        if item == "err":
            return Metric("err", lambda o, y: _topk_errors(o, y, 1, "err"), error=True)
        if item == "top5_err":
            return Metric("top5_err", lambda o, y: _topk_errors(o, y, 5, "top5_err"), error=True)
        m = re.fullmatch(r"class_err:(\d+)", item)
        if m:
            k = int(m.group(1))
            return Metric(f"class_err_{k}", lambda o, y, k=k: _topk_errors(o, y, 1, f"class_err:{k}", k), error=True)
        raise ValueError(f"unknown metric {item!r}; valid: {METRIC_SYNTAX}")

    def _loss_sums(self, output, target):
        what = f"loss {self.loss_name}"
        value = self.loss_fn(output, target) if self.loss_name in _LOSSES else call_user(self.loss_fn, what, output,
                                                                                          target)
        return _as_sum_count(value, what, _batch_size(output, target))

    # -- use --------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def metric_names(self, splits=SPLITS, weight_decay: float = 0.0) -> list[str]:
        """Stored names, split by split: ``train_loss``, ``train_err``, ..., and ``train_loss_l2`` when wd > 0."""
        names = [f"{s}_{m.name}" for s in SPLITS if s in splits for m in self.metrics]
        if weight_decay > 0 and "train" in splits and "loss" in self.names:
            names.append(L2_METRIC)
        return names

    def output(self, model: nn.Module, inputs):
        """The model's output on ``inputs``, through the forward adapter when there is one."""
        if self.forward_fn is None:
            return model(inputs)
        return call_user(self.forward_fn, f"forward={self.forward_name}", model, inputs)

    def accumulate(self, output, target, out: torch.Tensor) -> None:
        """Add each metric's (sum, count) of one batch to ``out`` (2·len(metrics),) float64, on the device."""
        if not torch.is_tensor(output):
            self._refuse_output(output)
        if torch.is_tensor(output) and output.is_floating_point() and output.dtype != torch.float64:
            output = output.float()
        for i, metric in enumerate(self.metrics):
            total, count = metric.fn(output, target)
            out[2 * i] += total.double() if torch.is_tensor(total) else float(total)
            out[2 * i + 1] += count.double() if torch.is_tensor(count) else float(count)

    def _refuse_output(self, output) -> None:
        """A model output that is not one tensor, for metrics that need one: say what came back and the fix."""
        needing = [m.name for m in self.metrics if m.tensor]
        if not needing:
            return  # the user's own loss and metrics take whatever the model returns
        needs = f"the metrics {needing} need the model's output as one tensor (batch, classes)"
        if self.forward_fn is None:
            raise ValueError(f"the model returned {describe_value(output)}; {needs}: pass forward= (CLI: --forward "
                             "module:function) returning the logits, e.g. lambda m, x: m(x)[0] for a tuple or "
                             "lambda m, x: m(x).logits")
        raise ValueError(f"forward={self.forward_name} returned {describe_value(output)}; {needs}: make it return "
                         "the logits, e.g. lambda m, x: m(x)[0] for a tuple")

    def recorded(self) -> dict:
        """What goes into a file's config: the loss, the metrics and the adapter by name."""
        return {"loss": self.loss_name, "metrics": self.names, "forward": self.forward_name}

    def check_targets(self, target: torch.Tensor, split: str) -> None:
        """Refuse labels the class metrics cannot use (float labels with cross-entropy or error metrics)."""
        needs_classes = self.loss_name == "cross_entropy" and "loss" in self.names
        needs_classes = needs_classes or any(m.error for m in self.metrics)
        if needs_classes and (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool):
            raise ValueError(f"labels must be integer class indices, got {target.dtype} {split} labels (e.g. "
                             f"{target.flatten()[:3].tolist()}); pass y.long() if they are whole numbers, or "
                             "loss='mse', metrics='loss' (or your own loss=/metrics=) for regression targets")
