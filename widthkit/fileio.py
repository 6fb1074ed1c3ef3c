"""Writing files so that a kill, a full disk or a second process never leaves half of one.

:func:`atomic_write` is the one atomic writer of widthkit; :class:`WriterLock` the one writer lock.

Checkpoints, training state, logs, JSON reports and rewritten analysis files all go through
:func:`atomic_write`: the content goes to a temporary file in the same folder, is flushed to disk, gets the
permissions a plain ``open()`` would give it, and replaces the destination with ``os.replace``. On any
error the temporary file is removed and the old destination is untouched.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
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


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None] | bytes | str) -> Path:
    """Write ``path`` atomically; ``write`` is the content (bytes or text) or a function of a binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def check_writable(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and make sure a file can be written in it; ``ValueError`` naming the folder
    otherwise (read-only filesystem, no permission, a file in the way). Commands call it before any work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
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
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        WriterLock._held[self._key] = [fd, 1]
        self._acquired = True
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
