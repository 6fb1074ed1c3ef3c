"""Writing files so that a kill, a full disk or a second process never leaves half of one.

:func:`atomic_write` is the one atomic writer of widthkit; :class:`WriterLock` the one writer lock.

Checkpoints, training state, logs, JSON reports, figures and rewritten analysis files all go through
:func:`atomic_write` (or, for HDF5 files written by h5py, :func:`temp_path`): the content goes to a temporary
file in the same folder (``.NAME.tmp-PID...``), is flushed to disk, gets the permissions a plain ``open()``
would give it, and replaces the destination with ``os.replace``. On any error the temporary file is removed and
the old destination is untouched; a full disk is an ``OSError`` naming the destination, whatever the writer
(``torch.save`` reports it as its own ``RuntimeError``). A process killed mid-write cannot remove its temporary
file: the next process that takes the output's :class:`WriterLock` removes those of dead processes.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Callable

import numpy as np


class OutputBusy(RuntimeError):
    """Another process is writing the same output."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what a plain open() gives a new file (mkstemp's files are 0600)


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary file this process writes beside ``path`` before swapping it in: ``.NAME.tmp-PID``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# a temporary file of temp_path or atomic_write (which adds mkstemp's random suffix): .NAME.tmp-PID[.XXXXXXXX]
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:\.[A-Za-z0-9_]+)?$")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None] | bytes | str) -> Path:
    """Write ``path`` atomically; ``write`` is the content (bytes or text) or a function of a binary file.

    Raises:
        OSError: the write failed (full disk, read-only folder, ...), with the errno and ``path`` as its
            filename, also when ``write`` reported it as another error (``torch.save``'s ``RuntimeError``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{temp_path(path).name}.", suffix="")
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode() if isinstance(write, str) else write)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        os_error = _os_error_of(err)
        if os_error is not None:
            raise _naming(os_error, path) from err
        raise
    return path


def _os_error_of(err: BaseException) -> OSError | None:
    """The OS error behind a failed write: ``err`` itself, or the one a writer wrapped in a ``RuntimeError``
    (torch.save on a full disk: "inline_container.cc ... unexpected pos", the OSError as its context)."""
    if isinstance(err, OSError):
        return err if err.errno else None
    if isinstance(err, RuntimeError):
        return next((e for e in _chain(err) if isinstance(e, OSError) and e.errno), None)
    return None


def _chain(err: BaseException):
    """``err`` and the exceptions it was raised from or during."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` (its errno and reason) naming ``path``, the file the caller meant to write."""
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed processes left beside ``path`` (and inside it, when it is a
    folder); returns them. A file whose process (the PID in its name) is still alive, or is this one, is kept:
    call it only while holding ``path``'s :class:`WriterLock`, so that no live writer can be mid-write."""
    path = Path(path)
    found = [p for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*")]
    if path.is_dir():
        found += [p for p in path.glob(".*.tmp-*") if p.is_file()]
    removed = []
    for p in found:
        m = _TEMP_NAME.match(p.name)
        if m is None or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts: it may be a writer too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in a JSON attribute")


def to_json(obj, indent: int | None = None) -> str:
    """Standard JSON of ``obj`` (non-finite floats as the strings "nan"/"inf"/"-inf", numpy values as numbers)."""
    return json.dumps(_sanitize(obj), sort_keys=True, default=_json_default, indent=indent)


def _sanitize(obj):
    """Replace non-finite floats by strings so the JSON is standard ("inf", "-inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_sanitize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _sanitize(obj.tolist())
    return obj


_NAME_MAX = 200  # bytes of a file name made from user text (filesystems allow 255)


def safe_name(name: str) -> str:
    """User-typed text (a label, a run name) as ONE file name: path separators and NUL become ``_`` and leading
    dots are dropped, so it can never climb out of its folder (``..``), name the folder itself, or hide; a name
    longer than 200 bytes keeps its start and its extension."""
    out = re.sub(r"[/\\\x00]", "_", name).lstrip(".") or "_"
    if len(out.encode()) > _NAME_MAX:
        stem, dot, ext = out.rpartition(".")
        stem, ext = (stem, dot + ext) if dot and len(ext) <= 8 else (out, "")
        out = stem.encode()[:_NAME_MAX - len(ext.encode())].decode(errors="ignore") + ext
    return out


def check_writable(folder: str | os.PathLike, create: bool = True) -> Path:
    """Make sure a file can be written in ``folder`` (created if needed; with ``create=False`` nothing is
    created: the nearest existing folder above it is tried instead); ``ValueError`` naming the folder otherwise
    (read-only filesystem, no permission, a file in the way). Commands call it before any work."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            existing = folder
        else:
            existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise ValueError(f"cannot write to {folder} ({err.strerror or err}); choose another folder "
                         "(--out, --figures, --root)") from None
    return folder


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented standard JSON (NaN/inf as strings, numpy values as numbers), atomically."""
    return atomic_write(path, to_json(obj, indent=2) + "\n")


class WriterLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside an output (a file or a folder), re-entrant
    within a process.

    A command takes it once for everything it writes to one output (grid, widths, figures; a training run's
    folder); library calls made
    while it is held (``update_attrs``, a resumed grid) take it again without blocking themselves. The lock
    file is removed on the last release, so a finished run leaves nothing behind; after ``flock`` succeeds
    the path is checked to still name the locked file (another process may have removed it in between).
    Taking it removes the temporary files of killed writers (:func:`remove_stale_temps`).
    """

    _held: dict[str, list] = {}  # resolved lock path -> [fd, depth]

    def __init__(self, path):
        path = Path(path)
        self.data_path = path
        self.path = path.with_name(f".{path.name}.lock")
        self._key = str(self.path.resolve()) if self.path.parent.exists() else str(self.path.absolute())
        self._acquired = False

    def acquire(self) -> "WriterLock":
        if self._acquired:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        held = WriterLock._held.get(self._key)
        if held is not None:
            held[1] += 1
            self._acquired = True
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    other = os.read(fd, 64).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                raise OutputBusy(
                    f"{self.data_path} is being written by another widthkit process (pid {other}); wait for it to "
                    "finish, or write elsewhere with --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file while we waited: lock the new one
        try:  # the pid is only for the busy message: a full disk must not leave a held, stale lock behind
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                self.path.unlink(missing_ok=True)
                os.close(fd)
                raise
        WriterLock._held[self._key] = [fd, 1]
        self._acquired = True
        remove_stale_temps(self.data_path)
        return self

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        held = WriterLock._held[self._key]
        held[1] -= 1
        if held[1] > 0:
            return
        del WriterLock._held[self._key]
        self.path.unlink(missing_ok=True)  # while still holding it: nobody can be between flock and the check
        fcntl.flock(held[0], fcntl.LOCK_UN)
        os.close(held[0])

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
