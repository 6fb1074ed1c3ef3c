"""Writing files so that a kill or a full disk never leaves half of one: the one atomic writer of widthkit.

Checkpoints, training state, logs, JSON reports and rewritten analysis files all go through
:func:`atomic_write`: the content goes to a temporary file in the same folder, is flushed to disk, gets the
permissions a plain ``open()`` would give it, and replaces the destination with ``os.replace``. On any
error the temporary file is removed and the old destination is untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable


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


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented standard JSON (NaN/inf as strings, numpy values as numbers), atomically."""
    from .report.store import to_json

    return atomic_write(path, json.dumps(json.loads(to_json(obj)), indent=2) + "\n")
