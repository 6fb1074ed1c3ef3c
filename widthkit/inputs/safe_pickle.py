"""Reading checkpoint files without running anything in them.

:func:`safe_load` is the one ``torch.load(path, map_location="cpu", weights_only=True)`` of widthkit
(checkpoints and training state). When torch cannot read a file, the file is examined, never run, to say why:

- its pickle wants to import a Python object outside torch's allowlist (``os.system``, a model class, numpy
  values): refused for safety, naming the object and how to re-save the weights if the file is trusted; the
  pickle is only disassembled (:mod:`pickletools`), for every pickle protocol (0 to 5);
- a plain ``pickle.dump`` file, not a ``torch.save`` one;
- torch's legacy ``.tar`` format (PyTorch 0.1.x), which ``weights_only`` loading does not support;
- anything else: truncated or corrupt, quoting torch's complaint.

``.safetensors`` files (a JSON header and raw tensor bytes: no code at all) are read with the ``safetensors``
package where it is installed; without it the message says ``pip install safetensors``.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file (or an argument about one) that widthkit cannot use; the message says the fix."""


def safe_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with errors that say what went wrong
    (:class:`CheckpointError`); a ``.safetensors`` file is read as its dict of tensors (see the module docs).

    A file torch refuses for safety (its pickle names a Python object outside torch's allowlist, such as
    ``os.system`` or a model class) is reported as refused, naming the object; a plain ``pickle.dump`` file and
    torch's legacy ``.tar`` format as such; anything else that fails as truncated or corrupt. Nothing in the
    file is run to find out.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} does not exist (looked in {os.path.abspath(path)})")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; pass the checkpoint file inside it")
    try:
        if is_safetensors(path):
            return _load_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: permission denied") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError,
            AttributeError, OSError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise _load_error(path, err) from err


# --------------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------------

_SAFETENSORS_MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length N, then N bytes of
    JSON (an object) within the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= min(size - 8, _SAFETENSORS_MAX_HEADER)


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is a safetensors file; reading it needs the safetensors package, which is not installed: "
            f"pip install safetensors (then run the same command again)"
        ) from None
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        detail = _excerpt(str(err))
        raise CheckpointError(
            f"{path} ({os.path.getsize(path)} bytes) is a truncated or corrupt safetensors file"
            + (f" ({detail})" if detail else "") + "; copy or save the file again"
        ) from err


# --------------------------------------------------------------------------------------------------------
# Why torch.load failed
# --------------------------------------------------------------------------------------------------------

_LEGACY_TAR_MEMBERS = {"storages", "tensors", "pickle"}


def _is_legacy_tar(path: str) -> bool:
    """torch's legacy ``.tar`` format: a tar archive holding ``storages``, ``tensors`` and ``pickle``."""
    try:
        if not tarfile.is_tarfile(path):
            return False
        with tarfile.open(path, "r:") as archive:
            return _LEGACY_TAR_MEMBERS <= set(archive.getnames())
    except (tarfile.TarError, OSError, ValueError):
        return False


def _load_error(path: str, err: Exception) -> CheckpointError:
    """Why ``torch.load(path, weights_only=True)`` raised ``err``: refused for safety, a plain pickle, torch's
    legacy tar format, or corrupt."""
    if _is_legacy_tar(path):
        return CheckpointError(
            f"{path} is in torch's legacy .tar format (written by PyTorch 0.1.x), which "
            f"torch.load(weights_only=True) cannot read, and widthkit loads nothing else: a full load runs the "
            f"file's pickle. If you trust the file, re-save it once with a current torch in a separate session: "
            f"torch.save(torch.load(path, weights_only=False), 'weights.pt') (for a whole model: its "
            f".state_dict()), then pass weights.pt"
        )
    scan = _scan_pickles(path)
    plain = scan is not None and scan.kind == "pickle"
    refused = _refused_globals(err) if isinstance(err, pickle.UnpicklingError) else []
    if not refused and scan is not None:  # a wording this code does not know, or none: the pickle itself says
        allowed = _allowed_globals()
        refused = [name for name in scan.globals if not allowed(name)]
    if refused:
        return _refusal(path, refused, plain)
    if plain:
        return CheckpointError(
            f"{path} is a plain Python pickle (protocol {scan.protocol}), not a file written by torch.save, "
            f"and torch.load(weights_only=True) cannot read it; if you trust the file, load it with pickle "
            f"in the environment that made it and save the weights with torch.save(state_dict, path)"
        )
    return _corrupt(path, err)


# torch's own wordings of a refused global, first the ones that name it (torch 2.x: "Unsupported global: GLOBAL
# x.y was not an allowed global by default", "Trying to load unsupported GLOBAL x.y whose module x is blocked"),
# then one that names only the module.
_REFUSED_GLOBAL_PATTERNS = (
    re.compile(r"\bGLOBAL\s+`*([A-Za-z_][\w.]*)"),
    re.compile(r"\bwhose module\s+`*([A-Za-z_][\w.]*)`*\s+is blocked"),
)


def _refused_globals(err: pickle.UnpicklingError) -> list[str]:
    """The globals torch's weights-only unpickler refused, read from its messages; [] when it names none.

    torch re-raises its unpickler's error as a new ``UnpicklingError`` whose message wraps the original
    (``raise ... from None``), so the original stays reachable as ``__context__``: both are read.
    """
    found: list[str] = []
    seen: set[int] = set()
    exc: BaseException | None = err
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, pickle.UnpicklingError):
            for pattern in _REFUSED_GLOBAL_PATTERNS:
                names = [n.rstrip(".") for n in pattern.findall(str(exc))]
                names = [n for n in names if n and _plausible_global(n)]
                found += [n for n in names if n not in found]
                if names:
                    break
        exc = exc.__cause__ or exc.__context__
    return found


def _plausible_global(name: str) -> bool:
    """False for a name torch itself lacks (a garbled read of a truncated legacy file, e.g. ``torch.Lo``).

    Only torch's names are checked: a user's class may simply live in a module this process has not imported.
    """
    module, _, attr = name.rpartition(".")
    if (module == "torch" or module.startswith("torch.")) and module in sys.modules:
        return hasattr(sys.modules[module], attr)
    return True


def _refusal(path: str, names: list[str], plain: bool) -> CheckpointError:
    """``path`` refused because its pickle names ``names``; ``plain``: it was written by pickle, not torch.save."""
    name = names[0]
    more = [repr(n) for n in names[1:]]
    others = f" (and {', '.join(more[:4])}{', ...' if len(more) > 4 else ''})" if more else ""
    module = name.partition(".")[0] if "." in name else "builtins"
    where = f" (where {name!r} can be imported)"
    if module in _blocked_modules():
        where = ""
        why = (f" {module!r} gives access to the operating system (running commands, reading files): no "
               f"checkpoint needs it, so treat the file as hostile unless you know who made it and why it holds "
               f"{name!r}.")
    elif plain:
        why = " The file is a plain Python pickle (pickle.dump), not a torch.save file."
    else:
        why = (" Typical cause: torch.save(model, path) of a whole module, or numpy values in a training "
               "checkpoint.")
    if plain:
        fix = ("state_dict = pickle.load(open(path, 'rb')); torch.save(state_dict, path) (for a whole model: "
               "torch.save(model.state_dict(), path))")
    else:
        fix = ("model = torch.load(path, weights_only=False); torch.save(model.state_dict(), path) (for a dict "
               "checkpoint: torch.save(ckpt['state_dict'], path))")
    return CheckpointError(
        f"{path} refused for safety: its pickle wants to import {name!r}{others}, which widthkit does not allow: "
        f"unpickling arbitrary objects can run arbitrary code, so widthkit reads only tensors and plain "
        f"containers (torch.load(weights_only=True)); nothing from the file was run.{why} If you trust the file, "
        f"re-save just the weights as a state dict in the environment that made it{where}: {fix}"
    )


def _blocked_modules() -> tuple[str, ...]:
    """Modules torch refuses even when allowlisted (``os``, ``sys``, ``posix``, ``nt`` in torch 2.x)."""
    try:
        from torch import _weights_only_unpickler
    except ImportError:  # another torch
        return ("sys", "os", "posix", "nt")
    return tuple(getattr(_weights_only_unpickler, "_blocklisted_modules", ("sys", "os", "posix", "nt")))


def _allowed_globals() -> Callable[[str], bool]:
    """A predicate: is this ``module.name`` one ``torch.load(weights_only=True)`` accepts?"""
    try:  # torch's private allowlists (built-in and torch.serialization.add_safe_globals)
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
        allowed |= set(_weights_only_unpickler._get_user_allowed_globals())
    except Exception:  # another torch: its tensors, storages and dtypes, and the containers it allows
        return lambda name: name.startswith("torch.") or name in _PLAIN_GLOBALS
    return lambda name: name in allowed or name in _PLAIN_GLOBALS


_PLAIN_GLOBALS = frozenset({"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.set",
                            "builtins.bytearray", "builtins.complex"})


@dataclass(frozen=True)
class _PickleScan:
    kind: str  # "zip" (torch.save), "legacy" (torch.save(_use_new_zipfile_serialization=False)), "pickle"
    protocol: int
    globals: tuple[str, ...]  # every module.name the pickle(s) refer to, in order of appearance


_LEGACY_MAGIC = getattr(torch.serialization, "MAGIC_NUMBER", 0x1950A86A20F9469CFC6C)


def _scan_pickles(path: str) -> _PickleScan | None:
    """Disassemble the file's pickles without running them; None when they are not complete, valid pickles.

    A torch.save zip holds one pickle (``data.pkl``); a legacy torch.save file starts with four (magic number,
    protocol, system info, the object); anything else is read as one plain pickle.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                read = None if member is None else _read_pickle(io.BytesIO(archive.read(member)))
            return None if read is None else _PickleScan("zip", read[0], read[1])
        with open(path, "rb") as f:
            if f.read(2) == b"PK":  # a zip without its directory: a truncated torch.save file
                return None
            f.seek(0)
            first = _read_pickle(f)
            if first is None:
                return None
            if first[0] < 2 and f.read(1):  # an old-protocol pickle has no header: it must be the whole file
                return None
            if first[2] != _LEGACY_MAGIC:
                return _PickleScan("pickle", first[0], first[1])
            names = list(first[1])
            for _ in range(3):
                read = _read_pickle(f)
                if read is None:
                    return None
                names += [n for n in read[1] if n not in names]
            return _PickleScan("legacy", first[0], tuple(names))
    except Exception:  # an unreadable archive or file is for the caller to call corrupt
        return None


_STRING_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
                         "BINUNICODE8"})


def _read_pickle(f) -> tuple[int, tuple[str, ...], Any] | None:
    """``(protocol, globals, value)`` of the pickle starting at ``f``'s position (left just after it), where
    ``value`` is the argument of a pickle holding a single number (the legacy magic number) or None.

    None unless it is a complete, consistent pickle: random bytes almost never pass :func:`pickletools.dis`'s
    stack and memo checks. Protocols 0 and 1 have no ``PROTO`` header (their protocol is the highest one among
    their opcodes); every torch.save file has one (2 or later).
    """
    start = f.tell()
    names: list[str] = []
    strings: list[str] = []  # strings pushed so far, for STACK_GLOBAL (protocol 4+) which pops two of them
    memo: dict[int, str | None] = {}
    top: str | None = None  # the string on top of the stack, if the top is one
    ops = []
    newest = 0  # the highest protocol among the opcodes
    for op, arg, _ in pickletools.genops(f):
        ops.append((op.name, arg))
        newest = max(newest, op.proto)
        if op.name in ("GLOBAL", "INST"):
            module, _, attr = arg.partition(" ")
            names.append(f"{module}.{attr}")
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(f"{strings[-2]}.{strings[-1]}")
        if op.name in _STRING_OPS and isinstance(arg, str):
            top = arg
            strings.append(arg)
        elif op.name == "MEMOIZE":
            memo[len(memo)] = top
        elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = top
        elif op.name in ("GET", "BINGET", "LONG_BINGET"):
            top = memo.get(int(arg))
            if top is not None:
                strings.append(top)
        elif op.name != "FRAME":
            top = None
    if not ops:
        return None
    if ops[0][0] == "PROTO":
        protocol = ops[0][1]
        if not 2 <= protocol <= pickle.HIGHEST_PROTOCOL:
            return None
    else:
        protocol = newest
        if protocol >= 2:  # protocol-2 opcodes without the PROTO header that protocol 2 writes first
            return None
    end = f.tell()
    if end - start <= _CHECKED_PICKLE_BYTES:  # larger ones are no accident of random bytes
        f.seek(start)
        pickletools.dis(io.BytesIO(f.read(end - start)), out=_Discard())  # ValueError: not a consistent pickle
        f.seek(end)
    value = ops[1][1] if len(ops) == 3 and isinstance(ops[1][1], int) else None
    return protocol, tuple(dict.fromkeys(n for n in names if _is_dotted_name(n))), value


_CHECKED_PICKLE_BYTES = 64 << 20


class _Discard:
    """A text sink: :func:`pickletools.dis` checks the pickle; its listing is not needed."""

    def write(self, text: str) -> int:
        return len(text)


def _is_dotted_name(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _corrupt(path: str, err: Exception) -> CheckpointError:
    size = os.path.getsize(path)
    detail = _excerpt(_torch_reason(err))
    return CheckpointError(
        f"{path} ({size} bytes) is truncated or corrupt: torch.load failed with {type(err).__name__}"
        + (f": {detail}" if detail else "")
        + "; copy or save the file again (an interrupted save or transfer leaves such files)"
    )


def _torch_reason(err: Exception) -> str:
    """torch's own complaint: for a weights-only load, the unpickler's error that torch's longer message wraps
    (kept as ``__context__``), else the message itself."""
    inner = err.__context__
    if isinstance(err, pickle.UnpicklingError) and isinstance(inner, pickle.UnpicklingError) and str(inner).strip():
        return str(inner)
    return str(err)


def _excerpt(text: str, limit: int = 160) -> str:
    """``text`` on one line, at most about ``limit`` characters, cut after a sentence or else between words,
    never inside a word or a `backtick span`."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())  # no ANSI bold, no line breaks
    if len(text) <= limit:
        return text[:-1] if re.search(r"[^.]\.$", text) else text  # the caller's sentence goes on

    def outside_backticks(i: int) -> bool:
        return text[:i].count("`") % 2 == 0

    sentences = [m.end() - 1 for m in re.finditer(r"[.!?](?=\s)", text[: limit + 1]) if outside_backticks(m.end())]
    if sentences and sentences[-1] >= limit // 3:
        return text[: sentences[-1]]  # the full stop is left out: the caller's sentence goes on
    spaces = [m.start() for m in re.finditer(r"\s", text[: limit + 1]) if outside_backticks(m.start())]
    if spaces:
        return text[: spaces[-1]].rstrip(",;:") + " ..."
    first = re.match(r"\S+", text)
    return first.group(0) + " ..."  # one long word (a path): whole

