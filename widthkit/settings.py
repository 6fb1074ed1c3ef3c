"""Typed configuration: dataclass fields that carry their own help text, validated once on construction.

Every config of widthkit (:class:`~widthkit.engine.config.EvalConfig`, the analysis geometries,
:class:`~widthkit.training.trainer.TrainConfig`) is a dataclass whose fields are declared with :func:`option`.
The command-line flags are generated from those fields (:mod:`widthkit.cli`), so a setting has one name in
the API, on the command line (``eval_batch_size`` -> ``--eval-batch-size``), in the HDF5 ``config`` and in
the docs, and one validation: the dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


def option(default: Any, help: str, **cli: Any) -> Any:
    """A dataclass field whose ``help`` is both its documentation and its CLI help.

    ``cli`` holds argparse overrides for the generated flag (``flag="--threshold"``, ``old=("--bn",)`` for old
    spellings that still work with a deprecation warning, ``deprecated="--precision bf16"`` for a whole setting
    replaced by another,
    ``nargs``, ``action``, ``metavar``) where the field's type alone does not say how it is typed in.
    """
    meta = {"help": help, "cli": cli}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_types(cls) -> dict[str, Any]:
    """The resolved annotations of a config dataclass."""
    return typing.get_type_hints(cls)


def base_type(hint: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of an annotation such as ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def choices_of(hint: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` annotation (optionally ``| None``), else None."""
    kind, _ = base_type(hint)
    return typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = True) -> None:
    """``value`` must be an int >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_number(name: str, value: Any, minimum: float | None = None, positive: bool = False,
                 optional: bool = True) -> None:
    """``value`` must be a finite number (>= ``minimum``, > 0 when ``positive``), or None when ``optional``."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (not positive or value > 0)
    if not ok:
        want = "a positive number" if positive else ("a number" + (f" >= {minimum}" if minimum is not None else ""))
        raise ValueError(f"{name} must be {want}{' or None' if optional else ''}, got {value!r}")


def from_dict(cls, values: typing.Mapping, what: str):
    """``cls(**values)`` with an unknown key turned into a ``ValueError`` that lists the valid ones."""
    if not isinstance(values, typing.Mapping):
        raise ValueError(f"a {what} must be a dict, got {type(values).__name__}")
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in valid]
    if unknown:
        raise ValueError(f"unknown {what} key(s) {unknown}; valid keys: {valid}")
    return cls(**values)


def split_kwargs(cls, kwargs: dict) -> tuple[dict, dict]:
    """(the keyword arguments that are fields of ``cls``, the rest)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}
