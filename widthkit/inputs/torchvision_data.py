"""torchvision's datasets, read from the files torchvision's own ``download=True`` writes, as uint8 arrays.

Layouts under the data root (what ``torchvision.datasets.X(root, download=True)`` leaves there):

- ``mnist``, ``fashion-mnist``, ``kmnist``: ``<root>/MNIST/raw/``, ``<root>/FashionMNIST/raw/``,
  ``<root>/KMNIST/raw/``, holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (or the same names with ``.gz``, read as they are).
- ``emnist:SPLIT`` (SPLIT one of byclass, bymerge, balanced, letters, digits, mnist): ``<root>/EMNIST/raw/
  emnist-SPLIT-{train,test}-{images-idx3,labels-idx1}-ubyte[.gz]``. The pixels are kept as the files (and
  torchvision) hold them, i.e. each image transposed; ``letters`` has labels 1..26 and a class 0 named "N/A",
  as in torchvision.
- ``svhn``: ``<root>/train_32x32.mat`` and ``test_32x32.mat`` (MATLAB files, read with ``scipy.io``; also looked
  for in ``<root>/svhn/`` and ``<root>/SVHN/``); the label 10 stands for the digit 0.
- ``stl10``: ``<root>/stl10_binary/{train,test}_{X,y}.bin`` (+ ``class_names.txt``); labels 1..10 in the file,
  0..9 here; images stored column-major, turned upright as torchvision does.
- ``cifar10``, ``cifar100``: the python folders, read by :mod:`widthkit.inputs.data`; only their download is here.

:func:`read` returns the split's images ``(N, C, H, W)`` uint8, labels int64, class names and the files it read.
Nothing is downloaded unless :func:`download` is called (``--download``), which calls torchvision's own download.
"""

from __future__ import annotations

import gzip
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Arrays", "NAMES", "EMNIST_SPLITS", "download", "read", "read_files", "title"]

DIGITS = tuple(string.digits)
# EMNIST's class lists (the dataset's own definitions): the merged splits fold the lowercase letters whose
# shape equals their capital into it
_EMNIST_MERGED = set("cijklmopsuvwxyz")
_EMNIST_ALL = tuple(sorted(string.digits + string.ascii_letters))
EMNIST_SPLITS = {
    "byclass": _EMNIST_ALL,
    "bymerge": tuple(c for c in _EMNIST_ALL if c not in _EMNIST_MERGED),
    "balanced": tuple(c for c in _EMNIST_ALL if c not in _EMNIST_MERGED),
    "letters": ("N/A",) + tuple(string.ascii_lowercase),
    "digits": DIGITS,
    "mnist": DIGITS,
}


@dataclass(frozen=True)
class _Idx:
    """One dataset in the MNIST idx format: torchvision's folder name and class names."""

    title: str
    folder: str
    classes: tuple[str, ...]
    url: str


_IDX = {
    "mnist": _Idx("MNIST", "MNIST", DIGITS, "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": _Idx("Fashion-MNIST", "FashionMNIST",
                          ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                           "Ankle boot"), "https://github.com/zalandoresearch/fashion-mnist"),
    "kmnist": _Idx("KMNIST", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
                   "https://github.com/rois-codh/kmnist"),
}
for _split, _classes in EMNIST_SPLITS.items():
    _IDX[f"emnist:{_split}"] = _Idx(f"EMNIST ({_split})", "EMNIST", _classes,
                                    "https://www.nist.gov/itl/products-and-services/emnist-dataset")

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
NAMES = tuple(_IDX) + ("svhn", "stl10")


@dataclass
class Arrays:
    """One split as read from disk: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,), ``classes`` (names,
    ``classes[label]``), ``files`` (the files read, for the data's fingerprint)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    files: list[Path]


def title(name: str) -> str:
    return _IDX[name].title if name in _IDX else {"svhn": "SVHN", "stl10": "STL-10"}.get(name, name)


def read(name: str, root: Path, split: str) -> Arrays:
    """One split (``"train"`` or ``"test"``) of dataset ``name`` (one of :data:`NAMES`) under ``root``.

    Raises:
        FileNotFoundError: the files are not there (names them, the folder looked in, and ``--download``).
        ValueError: a file that is not what its name says (wrong magic number, size or content).
    """
    if name in _IDX:
        return _read_idx_dataset(name, root, split)
    if name == "svhn":
        return _read_svhn(root, split)
    if name == "stl10":
        return _read_stl10(root, split)
    raise ValueError(f"unknown torchvision dataset {name!r}; known: {list(NAMES)}")


def read_files(name: str, root: Path, split: str) -> list[Path]:
    """The files :func:`read` reads for this split (without reading them). Raises FileNotFoundError as it does."""
    if name in _IDX:
        return _idx_paths(name, root, split)
    if name == "svhn":
        return [_svhn_path(root, split)]
    if name == "stl10":
        return _stl10_paths(root, split)
    raise ValueError(f"unknown torchvision dataset {name!r}; known: {list(NAMES)}")


def _missing(name: str, where: Path, expected: list[str], url: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{title(name)} not found: expected {', '.join(expected)} in {where.resolve()}, where "
        f"torchvision.datasets puts them. Pass --data-root (or set $WIDTHKIT_DATA) to the folder you gave torchvision "
        f"as root, or add --download to fetch them with torchvision (needs internet; from {url})")


# ------------------------------------------------------------------------------------------------ idx files


def _idx_files(name: str, split: str) -> tuple[str, str]:
    if name.startswith("emnist:"):
        prefix = f"emnist-{name.split(':', 1)[1]}-{split}"
    else:
        prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 idx file (the MNIST format: magic 0x00 0x00 0x08 ndim, then ndim big-endian uint32 sizes, then
    the values), plain or gzip-compressed. Raises ValueError naming the file when it is not one."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        if isinstance(e, (FileNotFoundError, PermissionError)):
            raise
        raise ValueError(f"{path} cannot be read ({e}); it may be truncated: download it again") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise ValueError(f"{path} is not an idx file of uint8 with {ndim} dimension(s) (its first bytes are "
                         f"{data[:4].hex() or 'missing'}, expected 000008{ndim:02x}); download it again")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(data) - header} values but its header says {shape} "
                         f"({int(np.prod(shape))}); it is truncated or damaged: download it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _idx_paths(name: str, root: Path, split: str) -> list[Path]:
    """[images, labels] of the split: the plain files torchvision extracts, else the .gz it downloaded."""
    spec = _IDX[name]
    raw = root / spec.folder / "raw"
    found = []
    for base in _idx_files(name, split):
        path = next((raw / f for f in (base, base + ".gz") if (raw / f).is_file()), None)
        if path is None:
            raise _missing(name, raw, [f"{b}[.gz]" for b in _idx_files(name, split)], spec.url)
        found.append(path)
    return found


def _read_idx_dataset(name: str, root: Path, split: str) -> Arrays:
    spec = _IDX[name]
    found = _idx_paths(name, root, split)
    images, labels = read_idx(found[0], 3), read_idx(found[1], 1)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{found[0]} holds {images.shape[0]} images but {found[1]} {labels.shape[0]} labels")
    _check_labels(found[1], labels, len(spec.classes), low=1 if name == "emnist:letters" else 0)
    return Arrays(images[:, None], labels.astype(np.int64), spec.classes, found)


def _check_labels(path: Path, labels: np.ndarray, num_classes: int, low: int = 0) -> None:
    if labels.size and (labels.min() < low or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [{low}, {num_classes}), got min {labels.min()}, "
                         f"max {labels.max()}; is it the right file?")


# ------------------------------------------------------------------------------------------------ SVHN


def _svhn_folder(root: Path) -> Path:
    for folder in (root, root / "svhn", root / "SVHN"):
        if (folder / "train_32x32.mat").is_file() or (folder / "test_32x32.mat").is_file():
            return folder
    return root


def _svhn_path(root: Path, split: str) -> Path:
    folder = _svhn_folder(root)
    path = folder / f"{split}_32x32.mat"
    if not path.is_file():
        raise _missing("svhn", folder, [path.name], SVHN_URL)
    return path


def _read_svhn(root: Path, split: str) -> Arrays:
    path = _svhn_path(root, split)
    try:
        import scipy.io
    except ImportError:
        raise ValueError("reading SVHN's .mat files needs scipy: pip install scipy") from None
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises many kinds of errors on a damaged file; all mean the same here
        raise ValueError(f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}); download it again") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{path}: 'X' must be uint8 (32, 32, 3, N), got {got}")
    if not isinstance(y, np.ndarray) or y.size != x.shape[3] or not np.issubdtype(y.dtype, np.number):
        raise ValueError(f"{path}: 'y' must hold {x.shape[3]} labels")
    labels = y.reshape(-1).astype(np.int64)
    _check_labels(path, labels, 11)  # 1..10 in the official files
    labels[labels == 10] = 0  # the file labels the digit 0 as 10
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    return Arrays(images, labels, DIGITS, [path])


# ------------------------------------------------------------------------------------------------ STL-10


def _stl10_paths(root: Path, split: str) -> list[Path]:
    """[images, labels] and, where present, class_names.txt."""
    folder = root / "stl10_binary" if root.name != "stl10_binary" else root
    xs, ys = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    if not xs.is_file() or not ys.is_file():
        raise _missing("stl10", folder, [xs.name, ys.name], STL10_URL)
    return [xs, ys] + ([folder / "class_names.txt"] if (folder / "class_names.txt").is_file() else [])


def _read_stl10(root: Path, split: str) -> Arrays:
    xs, ys, *names = _stl10_paths(root, split)
    pixels = np.fromfile(xs, dtype=np.uint8)
    per_image = 3 * 96 * 96
    if pixels.size % per_image:
        raise ValueError(f"{xs} holds {pixels.size} bytes, not a whole number of 3x96x96 images; it is truncated "
                         "or damaged: download it again")
    labels = np.fromfile(ys, dtype=np.uint8).astype(np.int64) - 1  # the file counts classes from 1
    if labels.size != pixels.size // per_image:
        raise ValueError(f"{xs} holds {pixels.size // per_image} images but {ys} {labels.size} labels")
    _check_labels(ys, labels, 10)
    # each image is stored channel by channel, each channel column-major: swap to rows
    images = np.ascontiguousarray(pixels.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))
    classes = STL10_CLASSES
    if names:
        listed = tuple(line.strip() for line in names[0].read_text().splitlines() if line.strip())
        if len(listed) == 10:
            classes = listed
    return Arrays(images, labels, classes, [xs, ys, *names])


# ------------------------------------------------------------------------------------------------ download


def download(name: str, root: Path, split: str) -> None:
    """Fetch the split with torchvision's own download (``torchvision.datasets.X(root, download=True)``) into the
    layout :func:`read` reads. Only called when the user asks (``--download``).

    Raises:
        ValueError: torchvision missing, or the download failed (no internet, a changed mirror).
    """
    try:
        from torchvision import datasets
    except ImportError:
        raise ValueError(f"--download needs torchvision (pip install torchvision), or put the {title(name)} files "
                         f"under {root} by hand") from None
    train = split == "train"
    if name.startswith("emnist:"):
        make = lambda: datasets.EMNIST(str(root), split=name.split(":", 1)[1], train=train, download=True)  # noqa: E731
    else:
        cls = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "cifar10": "CIFAR10",
               "cifar100": "CIFAR100", "svhn": "SVHN", "stl10": "STL10"}.get(name)
        if cls is None:
            return  # bundled (digits) or the user's own (image folders): nothing to download
        kwargs = {"split": split} if name in ("svhn", "stl10") else {"train": train}
        make = lambda: getattr(datasets, cls)(str(root), download=True, **kwargs)  # noqa: E731
    root.mkdir(parents=True, exist_ok=True)
    try:
        make()
    except Exception as e:  # URLError, RuntimeError (checksum), OSError: one line, whichever it is
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"downloading {title(name)} into {root} with torchvision failed ({type(e).__name__}: "
                         f"{first}); check the internet connection, or put the files there by hand") from None
