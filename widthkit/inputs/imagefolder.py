"""Image folders of real photos: the evaluation transform, and a decoded uint8 cache built once in parallel.

Layout (``imagefolder:PATH``): ``PATH/train/<class>/*`` with ``PATH/test/<class>/*`` or ``PATH/val/<class>/*``
(ImageNet's own layout works as it is), or ``PATH/<class>/*`` alone (a train split only). Classes are the
sorted sub-folder names of the train split (label = index); any format and size PIL reads.

**Transform** (evaluation only; the trainer's augmentation never enters it): images that all share one size
are kept as they are (1 channel when every image is grayscale, else RGB). Photos of mixed sizes, or any folder
given an ``image_size`` N, are converted to RGB, resized so the shorter side is round(N / 0.875) (256 for
224) with bilinear filtering, and centre-cropped to N x N: torchvision's ``Resize(256)`` + ``CenterCrop(224)``
on the PIL image, pixel for pixel (tests compare them).

**Cache.** Each split is decoded once, by worker processes, into ``<cache>/<split>-<key>/images.u8``, a raw
uint8 ``(N, C, H, W)`` array that every later command (and every torchrun rank) memory-maps instead of
decoding. The key covers the files' relative names, sizes and modification times, their labels, the
transform and the subset, so any change to the folder builds a new cache. A subset of a split whose whole
entry exists (or is being built) is read from it instead of decoded again. Building is resumable (finished
chunks are marked in ``done.bin``; a killed build continues where it stopped, and its worker processes die
with it), and concurrent processes wait for the one that builds (a blocking ``flock``). The file's disk space
is reserved before decoding starts (a full disk is one error line, not a crash). ``meta.json`` records the
CRC-32 of every chunk; each open checks the sizes and chunks' checksums, and a damaged entry is decoded
again. The cache lives in ``PATH/.widthkit-cache`` when PATH is writable, else in ``$XDG_CACHE_HOME/widthkit``
(``~/.cache/widthkit``); ``cache_dir`` chooses another place.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import random
import struct
import sys
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write, to_json

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PHOTO_SIZE = 224
CACHE_VERSION = 1
CHUNK = 256  # images per decoding task (and per done-mark)
STATS_SAMPLE = 10_000  # train images the "dataset" normalisation statistics come from (a fixed sample)
VERIFY_BYTES = 64 * 2**20  # bytes of an entry whose checksums are verified at every open (all of a smaller one)
_GRAY_MODES = ("1", "L", "LA", "I;16", "I;16B", "I;16L")


@dataclass(frozen=True)
class Transform:
    """The evaluation transform: ``size`` (crop, None = as is), ``resize`` (shorter side), ``mode`` ("RGB" or "L"),
    ``shape`` (H, W) of the images when kept as they are."""

    mode: str
    size: int | None = None
    resize: int | None = None
    shape: tuple[int, int] | None = None

    @classmethod
    def for_size(cls, size: int) -> "Transform":
        return cls("RGB", size, int(round(size / 0.875)))

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def out_hw(self) -> tuple[int, int]:
        return (self.size, self.size) if self.size is not None else tuple(self.shape)

    @property
    def photos(self) -> bool:
        return self.size is not None

    def describe(self) -> str:
        if self.size is None:
            return f"as they are ({self.shape[1]}x{self.shape[0]}, {self.mode})"
        return f"RGB, shorter side resized to {self.resize}, centre crop {self.size}x{self.size}"

    def apply(self, img) -> np.ndarray:
        """A PIL image -> uint8 (C, H, W)."""
        from PIL import Image

        img = img.convert(self.mode)
        if self.size is not None:
            w, h = img.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize, int(self.resize * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), Image.BILINEAR)
            top = int(round((new_h - self.size) / 2.0))
            left = int(round((new_w - self.size) / 2.0))
            img = img.crop((left, top, left + self.size, top + self.size))
        elif img.size != (self.shape[1], self.shape[0]):
            raise ValueError(f"image is {img.size[0]}x{img.size[1]}, but the folder's images are "
                             f"{self.shape[1]}x{self.shape[0]}")
        pixels = np.asarray(img, dtype=np.uint8)
        return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


# --------------------------------------------------------------------------------------------------------
# listing
# --------------------------------------------------------------------------------------------------------


def class_files(folder: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} for the non-hidden sub-folders of ``folder`` (searched recursively)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder.resolve()} does not exist")
    try:
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    except PermissionError as e:
        raise _unreadable_folder(folder, e) from None
    if not classes:
        raise FileNotFoundError(f"{folder.resolve()} has no class sub-folders; expected {folder}/<class>/<image> "
                                f"with one sub-folder of images per class")
    files = {c: _images_under(folder / c) for c in classes}
    empty = [c for c, fs in files.items() if not fs]
    if empty:
        raise FileNotFoundError(f"class folder(s) {', '.join(empty)} in {folder.resolve()} hold no images "
                                f"(extensions {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder(s)")
    return files


def _images_under(folder: Path) -> list[Path]:
    """The image files under ``folder`` and its sub-folders (not following links to folders), sorted. A folder
    that cannot be read is an error naming it (not a class without images)."""
    def fail(err: OSError):
        raise _unreadable_folder(Path(err.filename) if err.filename else folder, err)

    found = []
    for where, _, names in os.walk(folder, onerror=fail):
        found += [p for p in (Path(where) / n for n in names)
                  if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found)


def _unreadable_folder(folder: Path, err: OSError) -> PermissionError:
    return PermissionError(f"the image folder {folder.resolve()} cannot be read ({err.strerror or err}); give this "
                           "user read and search permission on it (chmod a+rx), or move it out of the class folders")


@dataclass
class Listing:
    """The files of both splits of an image folder, with labels and class names."""

    root: Path
    classes: tuple[str, ...]
    files: dict  # split -> list[Path]
    labels: dict  # split -> list[int]
    _stats: dict = field(default_factory=dict, repr=False)  # path -> (relative name, size, mtime), read once

    def entries(self, paths: list[Path]) -> list[tuple[str, int, int]]:
        """(name relative to the root, size, mtime in ns) of each file: what a cache key covers. Each file is
        stat'ed once per listing (the transform's memo and the split's cache key both need it)."""
        out = []
        for p in paths:
            entry = self._stats.get(p)
            if entry is None:
                st = p.stat()
                rel = str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)
                entry = self._stats[p] = (rel, st.st_size, st.st_mtime_ns)
            out.append(entry)
        return out


def list_folder(root: Path, name: str) -> Listing:
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root.resolve()} (from {name!r}) does not exist")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir():
        train = class_files(root / "train")
        test = class_files(test_dir) if test_dir is not None else None
        if test is not None and list(test) != list(train):
            raise ValueError(
                f"{test_dir} and {root / 'train'} must hold the same class folders; "
                f"only in train: {sorted(set(train) - set(test))}, only in {test_dir.name}: "
                f"{sorted(set(test) - set(train))}")
    else:
        train, test = class_files(root), None
    classes = tuple(train)

    def flat(files):
        return [p for c in classes for p in files[c]], [k for k, c in enumerate(classes) for _ in files[c]]

    out = Listing(root, classes, {}, {})
    out.files["train"], out.labels["train"] = flat(train)
    if test is not None:
        out.files["test"], out.labels["test"] = flat(test)
    return out


def no_test_split(root: Path) -> FileNotFoundError:
    has_train = (root / "train").is_dir()
    return FileNotFoundError(
        f"{root.resolve()} has no test split: " + (f"{root / 'train'} exists but {root / 'test'} does not (nor "
                                                    f"{root / 'val'})" if has_train
                                                    else "it has no train/ and test/ sub-folders (val/ works as test/)")
        + f"; arrange it as {root}/train/<class>/* and {root}/test/<class>/* (or val/), or use split='train'")


# --------------------------------------------------------------------------------------------------------
# choosing the transform
# --------------------------------------------------------------------------------------------------------


def _unreadable(path, err: Exception) -> ValueError:
    """The one-line error of an image PIL cannot (or refuses to) decode."""
    if type(err).__name__ == "DecompressionBombError":
        return ValueError(f"image {path} claims more pixels than PIL decodes safely ({err}); remove it from the "
                          "folder (a damaged or hostile file), or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine")
    return ValueError(f"cannot read image {path}: {err}")


def _image_errors() -> tuple[type[Exception], ...]:
    """What decoding a bad file raises (PIL.UnidentifiedImageError is an OSError)."""
    from PIL import Image

    return OSError, ValueError, Image.DecompressionBombError


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode, img.size
    except _image_errors() as e:
        raise _unreadable(path, e) from None


def choose_transform(listing: Listing, image_size: int | None, cache: Path) -> Transform:
    """``image_size`` given: photos at that size. Else images of one size are kept as they are and mixed
    sizes get the photo transform at 224. The decision for a folder is remembered in the cache (reading every
    header of a large folder again would delay every command)."""
    if image_size is not None:
        return Transform.for_size(image_size)
    paths = listing.files["train"] + listing.files.get("test", [])
    key = digest([listing.entries(paths)])
    memo = cache / f"transform-{key[:20]}.json"
    try:
        return Transform(**{k: tuple(v) if k == "shape" and v else v for k, v in json.loads(memo.read_text()).items()})
    except (OSError, ValueError, TypeError):
        pass
    # a probe first (photo folders, of mixed sizes, show it within the first few files), then every header
    step = max(1, len(paths) // 256)
    first_mode, first_size = _header(paths[0])
    modes, transform = set(), None
    for p in paths[::step] + paths:
        mode, size = _header(p)
        modes.add(mode)
        if size != first_size:
            transform = Transform.for_size(PHOTO_SIZE)
            break
    if transform is None:
        gray = all(m in _GRAY_MODES for m in modes)
        transform = Transform("L" if gray else "RGB", shape=(first_size[1], first_size[0]))
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(memo, to_json(asdict(transform)))
    except OSError:
        pass  # a read-only cache: decided again next time
    return transform


# --------------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------------


def default_cache_dir(root: Path) -> Path:
    """``PATH/.widthkit-cache`` when the image folder is writable, else the user's cache folder."""
    here = root / ".widthkit-cache"
    if here.is_dir() and os.access(here, os.W_OK) or not here.exists() and os.access(root, os.W_OK):
        return here
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "widthkit"


def digest(parts) -> str:
    """SHA-256 (hex) of JSON-encoded ``parts``: cache keys and data fingerprints."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, separators=(",", ":"), default=str).encode())
    return h.hexdigest()


@contextmanager
def _build_lock(fd: int):
    """A blocking exclusive ``flock`` on the open lock file ``fd`` (closed at the end): one process builds a
    cache entry, the others wait and then reuse it. Yields ``fd`` (forked decoding workers close their copy:
    see :func:`_worker_start`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


_PARENT: int | None = None  # in a decoding worker: the pid of the process building the cache
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_start(parent: int, inherited_lock: int | None) -> None:
    """Initializer of a decoding worker: it dies with the process that builds the cache, and holds no lock.

    A forked worker shares the builder's lock (a ``flock`` belongs to the open file, which the fork copied),
    and a worker whose builder was killed would wait for work forever, adopted by pid 1, holding it: every
    later run would then wait for that lock. So the copy is closed, and on Linux the kernel kills the worker
    when its builder dies (``PR_SET_PDEATHSIG``); elsewhere the worker checks its parent between images.
    """
    global _PARENT
    _PARENT = parent
    if inherited_lock is not None:
        try:
            os.close(inherited_lock)
        except OSError:
            pass
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the builder died before the request above took effect
        os._exit(1)


def _decode_chunk(target: str, shape: tuple, start: int, paths: list[str], transform: Transform) -> tuple[int, int]:
    """Decode ``paths`` into rows ``start..`` of the memory-mapped ``target`` (runs in a worker process).
    Returns (images decoded, CRC-32 of the rows written)."""
    from PIL import Image

    images = np.memmap(target, dtype=np.uint8, mode="r+", shape=shape)
    for i, p in enumerate(paths):
        if _PARENT is not None and os.getppid() != _PARENT:
            os._exit(1)  # the builder is gone: nobody will mark this chunk done
        try:
            with Image.open(p) as img:
                images[start + i] = transform.apply(img)
        except _image_errors() as e:
            raise _unreadable(p, e) from None
    images.flush()
    crc = zlib.crc32(images[start:start + len(paths)])
    del images
    return len(paths), crc


def _allocate(path: Path, nbytes: int) -> None:
    """Reserve the disk space of the whole file now. Writes through a memory map into a sparse file on a disk
    that fills up kill the process with SIGBUS (no message, no traceback); reserved up front, a full disk is an
    ``OSError`` (ENOSPC) before any image is decoded."""
    if nbytes == 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # EINVAL/EOPNOTSUPP: a filesystem that cannot reserve space; the file stays sparse
    finally:
        os.close(fd)


def _no_room(cache: Path, what: str, nbytes: int) -> OSError:
    """The one-line error of a full disk while the cache is built."""
    try:
        st = os.statvfs(cache)
        free = f", {_size(st.f_bavail * st.f_frsize)} free"
    except OSError:
        free = ""
    err = OSError(f"no room for the image cache in {cache}: decoding {what} needs {_size(nbytes)}{free}; free "
                  "space there, or pass --cache-dir DIR on a disk with room (the images decoded so far are kept, "
                  "and a re-run resumes)")
    err.errno = errno.ENOSPC
    return err


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


def _build(entry: Path, paths: list[Path], transform: Transform, workers: int | None, progress: bool,
           what: str, meta: dict, lock_fd: int | None = None) -> None:
    """Decode ``paths`` into ``entry/images.u8`` (resuming a killed build), then mark it complete: ``meta`` and
    the chunks' CRC-32 go to ``meta.json``. ``lock_fd``: the build lock, which forked workers must not hold.

    While it runs, ``done.bin`` holds one byte per chunk (0 to do, 2 done with its CRC-32 in ``crc.bin``; 1 done by
    a version that kept no CRC) and ``crc.bin`` a little-endian uint32 per chunk.
    """
    n = len(paths)
    shape = (n, transform.channels, *transform.out_hw)
    partial = entry / "images.u8.partial"
    done_path, crc_path = entry / "done.bin", entry / "crc.bin"
    n_chunks = (n + CHUNK - 1) // CHUNK
    entry.mkdir(parents=True, exist_ok=True)
    nbytes = int(np.prod(shape))
    fresh = not partial.exists() or partial.stat().st_size != nbytes or not done_path.exists() \
        or done_path.stat().st_size != n_chunks
    if fresh:
        with open(partial, "wb") as f:
            f.truncate(nbytes)
        done_path.write_bytes(bytes(n_chunks))
    if not crc_path.exists() or crc_path.stat().st_size != 4 * n_chunks:
        crc_path.write_bytes(bytes(4 * n_chunks))
    try:
        _allocate(partial, nbytes)
    except OSError:
        if fresh:  # nothing decoded yet: hold no space
            for p in (partial, done_path, crc_path):
                p.unlink(missing_ok=True)
        raise
    done = bytearray(done_path.read_bytes())
    todo = [c for c in range(n_chunks) if not done[c]]
    workers = workers or min(os.cpu_count() or 1, 16)
    bar = _progress(n, f"decoding {what} into the cache", progress)
    bar.update(sum(min(CHUNK, n - c * CHUNK) for c in range(n_chunks) if done[c]))
    with open(done_path, "r+b") as marks, open(crc_path, "r+b") as crcs:
        def mark(c: int, result: tuple[int, int]) -> None:
            count, crc = result
            crcs.seek(4 * c)
            crcs.write(struct.pack("<I", crc))
            crcs.flush()
            marks.seek(c)
            marks.write(b"\x02")
            marks.flush()
            done[c] = 2
            bar.update(count)

        args = [(str(partial), shape, c * CHUNK, [str(p) for p in paths[c * CHUNK:(c + 1) * CHUNK]], transform)
                for c in todo]
        if workers <= 1 or len(todo) <= 1:
            for c, a in zip(todo, args):
                mark(c, _decode_chunk(*a))
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            fork = "fork" in mp.get_all_start_methods()
            pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)),
                                       mp_context=mp.get_context("fork" if fork else "spawn"),
                                       initializer=_worker_start, initargs=(os.getpid(), lock_fd if fork else None))
            try:
                futures = {pool.submit(_decode_chunk, *a): c for c, a in zip(todo, args)}
                for fut in as_completed(futures):
                    mark(futures[fut], fut.result())
            except BrokenProcessPool:
                pool.shutdown(wait=False, cancel_futures=True)
                raise OSError(f"a process decoding {what} into {entry.parent} died (killed by the system: out of "
                              "memory?); run again to resume the build, with fewer --workers") from None
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)  # the chunks under way end, nothing new starts
                raise
            pool.shutdown()
    bar.close()
    sums = list(struct.unpack(f"<{n_chunks}I", crc_path.read_bytes()))
    row = nbytes // n if n else 0
    with open(partial, "rb") as f:
        for c in range(n_chunks):
            if done[c] != 2:  # decoded by a version that kept no CRC
                f.seek(c * CHUNK * row)
                sums[c] = zlib.crc32(f.read(min(CHUNK, n - c * CHUNK) * row))
        os.fsync(f.fileno())
    # the description first, then the images: a kill in between leaves the finished partial file to rename
    atomic_write(entry / "meta.json", to_json({**meta, "version": CACHE_VERSION, "shape": list(shape),
                                               "nbytes": nbytes, "chunk": CHUNK, "crc32": sums}, indent=1))
    os.replace(partial, entry / "images.u8")
    done_path.unlink(missing_ok=True)
    crc_path.unlink(missing_ok=True)


def _check_entry(entry: Path, shape: tuple) -> str | None:
    """What is wrong with a cache entry (None: nothing). Checks that ``meta.json`` parses and describes
    ``shape``, that ``images.u8`` has its exact size, and the CRC-32 of chunks of it against those recorded when
    they were written: every chunk of an entry up to :data:`VERIFY_BYTES`, else the first, the last and random
    others up to that many bytes (a different choice at every open). Entries of versions that recorded no CRC
    are checked by size only."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict) or list(meta["shape"]) != list(shape):
            got = meta.get("shape") if isinstance(meta, dict) else type(meta).__name__
            return f"meta.json describes {got}, not {list(shape)}"
        crcs = meta.get("crc32")
        chunk = int(meta.get("chunk", CHUNK))
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, TypeError, KeyError) as e:
        return f"meta.json is not valid ({type(e).__name__}: {e})"
    images = entry / "images.u8"
    nbytes = int(np.prod(shape))
    try:
        size = images.stat().st_size
    except FileNotFoundError:
        return "images.u8 is missing"
    if size != nbytes:
        return f"images.u8 holds {size} bytes, not {nbytes}"
    if crcs is None:
        return None
    n = shape[0]
    n_chunks = (n + chunk - 1) // chunk if chunk > 0 else -1
    if not isinstance(crcs, list) or len(crcs) != n_chunks or not all(isinstance(v, int) for v in crcs):
        return f"meta.json's crc32 list is not one checksum per chunk of {chunk} images"
    row = nbytes // n if n else 0
    per_chunk = chunk * row
    if nbytes <= VERIFY_BYTES:
        check = list(range(n_chunks))
    else:
        others = list(range(1, n_chunks - 1))
        random.shuffle(others)
        check = [0, n_chunks - 1] + others[:max(1, VERIFY_BYTES // max(per_chunk, 1) - 2)]
    with open(images, "rb") as f:
        for c in sorted(set(check)):
            f.seek(c * per_chunk)
            if zlib.crc32(f.read(min(chunk, n - c * chunk) * row)) != crcs[c]:
                return f"images {c * chunk}..{min(n, (c + 1) * chunk) - 1} do not match their checksum"
    return None


def _entry(cache: Path, name: str, paths: list[Path], transform: Transform, workers: int | None, progress: bool,
           what: str, meta: dict) -> np.memmap:
    """The cache entry ``cache/name`` of ``paths``, memory-mapped (copy-on-write: never altered), built first
    when it is missing and built again when it is damaged (see :func:`_check_entry`)."""
    entry = cache / name
    shape = (len(paths), transform.channels, *transform.out_hw)
    problem = _check_entry(entry, shape) if (entry / "meta.json").exists() else "missing"
    if problem is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"cannot create the image cache folder {cache}: {e.strerror}; pass --cache-dir DIR "
                          "(a writable folder with room for the decoded images)") from None
        try:
            fd = os.open(cache / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            state = "is not built yet" if problem == "missing" else f"is damaged ({problem})"
            raise OSError(f"the image cache entry {entry} {state} and cannot be built in {cache} ({e.strerror}); "
                          "pass --cache-dir DIR (a writable folder with room for the decoded images)") from None
        with _build_lock(fd) as lock_fd:
            # another process may have built (or repaired) it while this one waited
            problem = _check_entry(entry, shape) if (entry / "meta.json").exists() else "missing"
            if problem is not None:
                if problem != "missing":
                    log.warning(f"the image cache entry {entry} is damaged ({problem}); decoding it again")
                    try:
                        for p in (entry / "meta.json", entry / "images.u8"):
                            p.unlink(missing_ok=True)
                    except OSError as e:
                        raise ValueError(f"the image cache entry {entry} is damaged ({problem}) and cannot be "
                                         f"rebuilt there ({e.strerror}); delete it, or pass --cache-dir DIR") from None
                try:
                    _build(entry, paths, transform, workers, progress, what, meta, lock_fd)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                        raise _no_room(cache, what, int(np.prod(shape))) from None
                    raise
                problem = _check_entry(entry, shape)
                if problem is not None:  # written and read back wrong: the disk or memory is failing
                    raise OSError(f"the image cache entry {entry} was just written but reads back wrong ({problem}); "
                                  "check the disk, or pass --cache-dir DIR elsewhere")
    return np.memmap(entry / "images.u8", dtype=np.uint8, mode="c", shape=shape)


def _building(cache: Path, name: str) -> bool:
    """Whether another process is building the entry ``cache/name`` now (it holds its lock)."""
    try:
        fd = os.open(cache / f".{name}.lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def probe(listing: Listing, split: str, transform: Transform) -> tuple[np.ndarray, list[int]]:
    """The first image of the first class and the first of the last class of ``split``, decoded directly (no
    cache): uint8 ``(2, C, H, W)`` and their labels ``[0, classes - 1]``. Enough to check a model against the
    folder (channels, size, number of classes) before the whole split is decoded."""
    from PIL import Image

    files, labels = listing.files[split], listing.labels[split]
    picks = [0, labels.index(labels[-1])]
    images = []
    for i in picks:
        try:
            with Image.open(files[i]) as img:
                images.append(transform.apply(img))
        except _image_errors() as e:
            raise _unreadable(files[i], e) from None
    return np.stack(images), [labels[i] for i in picks]


@dataclass
class CachedSplit:
    """One decoded split: ``images`` uint8 (N, C, H, W), memory-mapped from the entry ``folder`` (``mapped``) or
    rows read from it into memory, ``labels`` (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    folder: Path
    transform: Transform
    full_size: int
    key: str  # SHA-256 of the files' names, sizes and mtimes, their labels, the transform and the subset
    mapped: bool = True


def cached_split(listing: Listing, split: str, transform: Transform, cache: Path, indices: torch.Tensor | None,
                 workers: int | None = None, progress: bool = True) -> CachedSplit:
    """The split's images (those at ``indices``, or all) from the cache, building it first when needed.

    A subset (``indices``) is read from the whole split's entry when that one is complete or being built by
    another process (waiting for it); else only the subset's files are decoded, into an entry of its own.
    """
    all_paths, all_labels = listing.files[split], listing.labels[split]
    full_size = len(all_paths)
    paths, labels = all_paths, all_labels
    if indices is not None:
        idx = indices.tolist()
        paths, labels = [all_paths[i] for i in idx], [all_labels[i] for i in idx]
    key = digest([CACHE_VERSION, split, asdict(transform), labels, listing.entries(paths)])
    meta = {"split": split, "transform": asdict(transform), "root": str(listing.root),
            "classes": list(listing.classes), "n_files": full_size}
    y = torch.tensor(labels, dtype=torch.int64)
    if indices is not None:
        full_key = digest([CACHE_VERSION, split, asdict(transform), all_labels, listing.entries(all_paths)])
        full_name = f"{split}-{full_key[:20]}"
        if (cache / full_name / "meta.json").exists() or _building(cache, full_name):
            what = f"{full_size} {split} images ({transform.describe()})"
            full = _entry(cache, full_name, all_paths, transform, workers, progress, what, meta)
            rows = torch.from_numpy(np.ascontiguousarray(full[np.asarray(idx, dtype=np.int64)]))
            return CachedSplit(rows, y, cache / full_name, transform, full_size, key, mapped=False)
    name = f"{split}-{key[:20]}"
    images = _entry(cache, name, paths, transform, workers, progress,
                    f"{len(paths)} {split} images ({transform.describe()})", meta)
    return CachedSplit(torch.from_numpy(images), y, cache / name, transform, full_size, key)
