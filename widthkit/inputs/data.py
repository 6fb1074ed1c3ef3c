"""Datasets by name, as uint8 tensors with their normalisation, and batched crop+flip augmentation.

Every loader returns a :class:`Dataset`: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``, the
per-channel ``mean``/``std`` of the *train* split in [0, 1] pixel units (used for both splits) and the
split's name. Nothing here downloads anything.

Datasets (``load_dataset(name, root=None, split="train")``):

- ``digits`` (the default): scikit-learn's bundled 8x8 handwritten digits, 1 channel, 10 classes, with a
  fixed stratified 80/20 train/test split (seed 0, independent of any global RNG state).
- ``cifar10`` / ``cifar100``: the official *python version* folders ``<root>/cifar-10-batches-py/`` and
  ``<root>/cifar-100-python/`` (fine labels), read directly.
- ``imagefolder:PATH``: one sub-folder per class; ``PATH/train/<class>/*`` and ``PATH/test/<class>/*``
  when ``PATH/train/`` exists, else ``PATH/<class>/*`` is the whole train split (and there is no test split).

>>> ds = load_dataset("digits", split="train")
>>> ds.images.shape[1:], ds.num_classes
(torch.Size([1, 8, 8]), 10)
>>> x = ds.normalized()                       # float32 (N, 1, 8, 8), mean ~0 and std ~1 per channel
>>> x_aug = augment(x, torch.Generator().manual_seed(0), pad=1)
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..fileio import atomic_write, to_json
from ..runtime import random_subset
from . import imagefolder, torchvision_data
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "DEFAULT_DATASET",
    "Dataset",
    "augment",
    "list_datasets",
    "load_dataset",
]

DEFAULT_DATASET = "digits"
SPLITS = ("train", "test")
IMAGEFOLDER_PREFIX = "imagefolder:"

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


# --------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """One split of a labelled image dataset, held as uint8 pixels.

    Args:
        name: the name it was loaded by (``"digits"``, ``"cifar10"``, ``"imagefolder:PATH"``, ...).
        images: uint8 tensor ``(N, C, H, W)``, pixel values 0..255.
        labels: int64 tensor ``(N,)``, class indices in ``[0, num_classes)``.
        num_classes: number of classes of the dataset (not only those present in this split).
        mean, std: per-channel mean and standard deviation of the *train* split, in [0, 1] pixel units
            (pixel / 255); ``len(mean) == len(std) == C``.
        split: ``"train"`` or ``"test"``.
        classes: optional class names, ``classes[label]``; empty when unknown.
        full_size: examples in the whole split before a subset was drawn.
        cache: image folders: the decoded cache folder the images are memory-mapped from.
        fingerprint: a SHA-256 (hex) of what the split was built from, so a run resumed on other data can be
            refused: image folders, the files' names/sizes/modification times, labels, transform and subset
            (and the normalisation statistics); file datasets, their files' names, sizes and modification
            times; the bundled digits, the arrays themselves. A subset's covers its indices. None when unknown
            (a Dataset built by hand).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    split: str
    classes: tuple[str, ...] = field(default=())
    full_size: int | None = None  # examples in the whole split (before a subset was drawn)
    cache: str | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.classes = tuple(str(c) for c in self.classes)
        if self.full_size is None:
            self.full_size = int(self.images.shape[0])
        _check_dataset(self)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def normalized(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(images / 255 - mean) / std`` as a new ``(N, C, H, W)`` tensor of ``dtype`` on ``device``.

        The uint8 pixels are moved first (4x less traffic than floats) and the arithmetic runs in float32
        (float64 when ``dtype`` is float64), then the result is cast to ``dtype``.
        """
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype (e.g. torch.float32), got {dtype!r}")
        work = torch.float64 if dtype == torch.float64 else torch.float32
        x = self.images.to(device=device).to(work)  # always a copy: uint8 -> float
        mean = torch.tensor(self.mean, dtype=work, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=work, device=x.device).view(1, -1, 1, 1)
        return x.div_(255.0).sub_(mean).div_(std).to(dtype)

    def subset(self, indices: Sequence[int] | torch.Tensor | np.ndarray | slice) -> "Dataset":
        """A new Dataset with the samples at ``indices`` (int indices, a bool mask of length N, or a slice).

        Normalisation (``mean``/``std``), name, split and classes are kept; the tensors are copies; the
        fingerprint covers the indices.
        """
        idx = _as_index(indices, len(self))
        fingerprint = None if self.fingerprint is None else imagefolder.digest([self.fingerprint, idx.tolist()])
        return replace(self, images=self.images[idx].clone(), labels=self.labels[idx].clone(), cache=None,
                       fingerprint=fingerprint)


def _as_index(indices, n: int) -> torch.Tensor:
    """int64 (K,) indices into a length-``n`` axis from int indices, a bool mask of length n, or a slice."""
    if isinstance(indices, slice):
        return torch.arange(n)[indices]
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    if idx.dim() != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype == torch.bool:
        if idx.shape[0] != n:
            raise ValueError(f"a boolean mask must have length {n}, got {idx.shape[0]}")
        return idx.nonzero().flatten()
    if idx.numel() == 0:
        return idx.to(torch.int64)
    if idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise ValueError(f"indices must be integers or a boolean mask, got dtype {idx.dtype}")
    idx = idx.to(torch.int64)
    if int(idx.min()) < -n or int(idx.max()) >= n:
        raise ValueError(f"indices must lie in [-{n}, {n}) for a dataset of {n} samples, "
                         f"got min {int(idx.min())}, max {int(idx.max())}")
    return idx


def _describe(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_dataset(ds: Dataset) -> None:
    """Reject inconsistent Dataset fields with a message naming the field."""
    if not isinstance(ds.images, torch.Tensor) or ds.images.dtype != torch.uint8 or ds.images.dim() != 4:
        raise ValueError(f"Dataset.images must be a uint8 tensor (N, C, H, W), got {_describe(ds.images)}")
    if not isinstance(ds.labels, torch.Tensor) or ds.labels.dtype != torch.int64 or ds.labels.dim() != 1:
        raise ValueError(f"Dataset.labels must be an int64 tensor (N,), got {_describe(ds.labels)}")
    if ds.labels.shape[0] != ds.images.shape[0]:
        raise ValueError(f"Dataset has {ds.images.shape[0]} images but {ds.labels.shape[0]} labels")
    if isinstance(ds.num_classes, bool) or not isinstance(ds.num_classes, int) or ds.num_classes < 1:
        raise ValueError(f"Dataset.num_classes must be a positive int, got {ds.num_classes!r}")
    if ds.labels.numel() and (int(ds.labels.min()) < 0 or int(ds.labels.max()) >= ds.num_classes):
        raise ValueError(f"Dataset.labels must lie in [0, {ds.num_classes}), got min {int(ds.labels.min())},"
                         f" max {int(ds.labels.max())}")
    channels = ds.images.shape[1]
    if len(ds.mean) != channels or len(ds.std) != channels:
        raise ValueError(f"Dataset.mean and .std need one value per channel ({channels}),"
                         f" got {len(ds.mean)} and {len(ds.std)}")
    if not all(np.isfinite(s) and s > 0 for s in ds.std):
        raise ValueError(f"Dataset.std must be positive and finite, got {ds.std}")
    if ds.split not in SPLITS:
        raise ValueError(f"Dataset.split must be one of {list(SPLITS)}, got {ds.split!r}")
    if ds.classes and len(ds.classes) != ds.num_classes:
        raise ValueError(f"Dataset.classes has {len(ds.classes)} names for {ds.num_classes} classes")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images ``(N, C, H, W)``, in [0, 1] units.

    Sums run in float64 over chunks, so large sets need no float copy of the whole tensor. A constant
    channel (std 0) gets std 1, so normalising it only centres it.
    """
    n_pixels = images.shape[0] * images.shape[2] * images.shape[3]
    if n_pixels == 0:
        raise ValueError(f"cannot compute channel statistics of an empty image tensor {tuple(images.shape)}")
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(images.shape[1], dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    mean = total / n_pixels
    var = (total_sq / n_pixels - mean.square()).clamp_min(0.0)
    std = var.sqrt() / 255.0
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((mean / 255.0).tolist()), tuple(std.tolist())


# --------------------------------------------------------------------------------------------------------
# registry and entry point
# --------------------------------------------------------------------------------------------------------

_LOADERS: dict[str, Callable[[Path | None, str], Dataset]] = {}


def _register(name: str):
    def wrap(fn):
        _LOADERS[name] = fn
        return fn

    return wrap


def list_datasets() -> list[str]:
    """The dataset names :func:`load_dataset` accepts (sorted, ``emnist:SPLIT`` once per split);
    ``imagefolder:PATH`` is accepted as well."""
    return sorted(_LOADERS)


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", *,
                 subset: int | None = None, subset_seed: int = 0, image_size: int | None = None,
                 normalize: str = "auto", cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                 progress: bool = True, download: bool = False) -> Dataset:
    """Load one split of a dataset by name.

    Args:
        name: one of :func:`list_datasets` (``"digits"``, ``"cifar10"``, ``"cifar100"``, ``"mnist"``,
            ``"fashion-mnist"``, ``"kmnist"``, ``"emnist:SPLIT"``, ``"svhn"``, ``"stl10"``) or ``"imagefolder:PATH"``.
        root: the folder torchvision's datasets were given as root (holding ``cifar-10-batches-py/``,
            ``MNIST/raw/``, ...; see :mod:`widthkit.inputs.torchvision_data`); default ``$WIDTHKIT_DATA``, else
            ``./data``. Unused by ``digits`` and ``imagefolder:``.
        split: ``"train"`` or ``"test"``.
        subset: keep ``subset`` fixed random examples (``runtime.random_subset(n, subset, subset_seed)``,
            in their order in the split); an image folder decodes only those.
        image_size: image folders: resize + centre-crop to this size (see :mod:`widthkit.inputs.imagefolder`).
        normalize: ``"dataset"`` (the train split's channel statistics), ``"imagenet"`` (torchvision's
            constants), ``"auto"`` (imagenet for resized photo folders, else dataset).
        cache_dir, workers, progress: image folders: where the decoded cache lives, how many processes decode,
            whether a progress bar is shown while it is built.
        download: torchvision's datasets and CIFAR: fetch the split (and the train split, whose statistics
            normalise it) with torchvision's own download first. Never done unless asked.

    Returns:
        a :class:`Dataset`; with ``normalize="dataset"`` ``mean``/``std`` come from the train split.

    Raises:
        ValueError: unknown name or split, or malformed files.
        FileNotFoundError: the dataset's files are not where they should be (the message says what to do).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {type(name).__name__}")
    if normalize not in ("auto", "dataset", "imagenet"):
        raise ValueError(f"unknown normalize {normalize!r}; valid choices: auto, dataset, imagenet")
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_imagefolder(name, split, subset=subset, subset_seed=subset_seed, image_size=image_size,
                                 normalize=normalize, cache_dir=cache_dir, workers=workers, progress=progress)
    if name not in _LOADERS:
        hint = " (emnist needs its split: emnist:SPLIT)" if name == "emnist" else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; valid names: {list_datasets()}, "
                         f"or '{IMAGEFOLDER_PREFIX}PATH' for a folder with one sub-folder of images per class")
    if download:
        for part in dict.fromkeys((split, "train")):
            torchvision_data.download(name, data_root(root), part)
    ds = _LOADERS[name](None if root is None else Path(root), split)
    if normalize == "imagenet":
        if ds.images.shape[1] != 3:
            raise ValueError(f"normalize='imagenet' needs RGB images; {name} has {ds.images.shape[1]} channel(s)")
        ds = replace(ds, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    idx = random_subset(len(ds), subset, subset_seed)
    return ds if idx is None else replace(ds.subset(idx), full_size=len(ds))


def files_fingerprint(name: str, split: str, paths: Sequence[Path]) -> str:
    """The fingerprint of a split read from ``paths``: their names, sizes and modification times (a stat
    each, no reading: cheap on any size of dataset, and any rewrite of a file changes it)."""
    stats = [(p.name, st.st_size, st.st_mtime_ns) for p in paths for st in (Path(p).stat(),)]
    return imagefolder.digest([name, split, stats])


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root`` if given, else ``$WIDTHKIT_DATA``, else ``./data`` (``~`` expanded)."""
    if root is None:
        root = os.environ.get("WIDTHKIT_DATA") or "data"
    return Path(root).expanduser()


# --------------------------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# --------------------------------------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (N,1,8,8), labels int64 (N,), train index, test index), read-only, computed once."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # values are 0..16; map to 0..255 with round-half-up (v * 255 / 16 = 127.5 for v = 8 -> 128)
    images = np.floor(bunch.images.astype(np.float64) * 255.0 / 16.0 + 0.5).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    for a in (images, labels, train_idx, test_idx):
        a.setflags(write=False)
    return images, labels, train_idx, test_idx


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) index arrays, taking ``round(test_fraction * n_c)`` samples of each class c.

    Uses its own ``np.random.RandomState(seed)`` (a frozen stream), so the split never depends on global
    RNG state or on the library version.
    """
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@_register("digits")
def _load_digits(root: Path | None, split: str) -> Dataset:
    """scikit-learn's 1797 8x8 digits (bundled, no download) as uint8 ``(N, 1, 8, 8)``, 10 classes."""
    images, labels, train_idx, test_idx = _digits_arrays()
    mean, std = channel_stats(torch.from_numpy(images[train_idx]))
    idx = train_idx if split == "train" else test_idx
    x, y = images[idx], labels[idx]
    fingerprint = imagefolder.digest(["digits", split, hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()])
    return Dataset(name="digits", images=torch.from_numpy(x), labels=torch.from_numpy(y), num_classes=10,
                   mean=mean, std=std, split=split, classes=tuple(str(d) for d in range(10)), fingerprint=fingerprint)


# --------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (official python-pickle folders)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarSpec:
    name: str
    title: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def all_files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files + (self.meta_file,)


_CIFAR = {
    "cifar10": _CifarSpec(
        name="cifar10", title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": _CifarSpec(
        name="cifar100", title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
        train_files=("train",), test_files=("test",), meta_file="meta", label_key="fine_labels",
        names_key="fine_label_names", num_classes=100,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}

# The only globals an official CIFAR pickle (Python 2, numpy arrays) or a Python 3 re-pickle of it refers to.
_PICKLE_ALLOWED = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at protocol < 3
})


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy-array globals, so a stray file cannot run code when loaded."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which an official CIFAR file never does")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy >= 2 moved numpy.core
        return super().find_class(module, name)


def _read_cifar_pickle(path: Path) -> dict[str, object]:
    """Load one official CIFAR python file as a dict with ``str`` keys.

    pickle is used here only for the official CIFAR dataset files, through an unpickler that refuses every
    global except numpy's array reconstruction. The files are Python 2 pickles: read with
    ``encoding="bytes"`` their keys (and strings) come back as ``bytes``, while a Python 3 re-pickle has
    ``str`` keys; both are accepted.
    """
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise ValueError(f"{path} is not a readable CIFAR python file ({type(e).__name__}: {e}); it may be "
                         f"truncated or corrupt: re-download the python version from {CIFAR_URL} "
                         f"and extract it again") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, but a CIFAR python file holds a dict")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _cifar_folder(spec: _CifarSpec, root: Path | None) -> Path:
    """``<root>/<folder>``, or ``root`` itself when it is that folder (by name, or by holding the meta file)."""
    base = data_root(root)
    if base.name == spec.folder:
        return base
    if not (base / spec.folder).is_dir() and (base / spec.meta_file).is_file():
        return base
    return base / spec.folder


def _check_cifar_files(spec: _CifarSpec, folder: Path, needed: tuple[str, ...]) -> None:
    missing = [f for f in needed if not (folder / f).is_file()]
    if not missing:
        return
    where = (f"folder {folder.resolve()} does not exist" if not folder.is_dir()
             else f"missing {', '.join(missing)} in {folder.resolve()}")
    raise FileNotFoundError(
        f"{spec.title} not found: {where}. Expected the official python-version files "
        f"{', '.join(spec.all_files)} in {folder}. To fix: download '{spec.title} python version' "
        f"({spec.archive}) from {CIFAR_URL} and extract it into {folder.parent} (giving {folder}), "
        f"or pass --data-root (or set $WIDTHKIT_DATA) to the folder that holds {spec.folder}/. "
        f"widthkit never downloads data.")


def _cifar_batch(spec: _CifarSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, 32, 32), labels int64 (n,)) from one data file."""
    batch = _read_cifar_pickle(path)
    for key in ("data", spec.label_key):
        if key not in batch:
            raise ValueError(f"{path} has no {key!r} entry (keys: {sorted(batch)}); is it a {spec.title} file?")
    data, labels = batch["data"], np.asarray(batch[spec.label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array (n, 3072), got {got}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: {spec.label_key!r} must hold {data.shape[0]} integer labels, "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {spec.num_classes}), "
                         f"got min {labels.min()}, max {labels.max()}")
    # each row: the 1024 red values, then green, then blue, each plane 32x32 row-major
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_class_names(spec: _CifarSpec, path: Path) -> tuple[str, ...]:
    meta = _read_cifar_pickle(path)
    names = meta.get(spec.names_key)
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        raise ValueError(f"{path}: {spec.names_key!r} must list {spec.num_classes} class names "
                         f"(keys: {sorted(meta)})")
    return tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names)


def _load_cifar(spec: _CifarSpec, root: Path | None, split: str) -> Dataset:
    folder = _cifar_folder(spec, root)
    files = spec.train_files if split == "train" else spec.test_files
    _check_cifar_files(spec, folder, files + (spec.meta_file,))
    classes = _cifar_class_names(spec, folder / spec.meta_file)
    parts = [_cifar_batch(spec, folder / f) for f in files]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    images = np.require(images, requirements=["C_CONTIGUOUS", "WRITEABLE"])  # a copy only if needed
    return Dataset(name=spec.name, images=torch.from_numpy(images),
                   labels=torch.from_numpy(labels), num_classes=spec.num_classes, mean=spec.mean, std=spec.std,
                   split=split, classes=classes,
                   fingerprint=files_fingerprint(spec.name, split, [folder / f for f in files + (spec.meta_file,)]))


@_register("cifar10")
def _load_cifar10(root: Path | None, split: str) -> Dataset:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta)."""
    return _load_cifar(_CIFAR["cifar10"], root, split)


@_register("cifar100")
def _load_cifar100(root: Path | None, split: str) -> Dataset:
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python/`` (train, test, meta)."""
    return _load_cifar(_CIFAR["cifar100"], root, split)


# --------------------------------------------------------------------------------------------------------
# torchvision's datasets (MNIST family, SVHN, STL-10) in torchvision's own layout
# --------------------------------------------------------------------------------------------------------

_TRAIN_STATS: dict[str, tuple] = {}  # train split's fingerprint -> (mean, std): the test split needs them too


def _load_torchvision(name: str, root: Path | None, split: str) -> Dataset:
    """One split read by :func:`torchvision_data.read`, normalised with the train split's channel statistics."""
    base = data_root(root)
    arrays = torchvision_data.read(name, base, split)
    fingerprint = files_fingerprint(name, split, arrays.files)
    train_print = fingerprint if split == "train" else files_fingerprint(
        name, "train", torchvision_data.read_files(name, base, "train"))
    if train_print not in _TRAIN_STATS:
        train = arrays if split == "train" else torchvision_data.read(name, base, "train")
        _TRAIN_STATS[train_print] = channel_stats(torch.from_numpy(train.images))
    mean, std = _TRAIN_STATS[train_print]
    return Dataset(name=name, images=torch.from_numpy(arrays.images), labels=torch.from_numpy(arrays.labels),
                   num_classes=len(arrays.classes), mean=mean, std=std, split=split, classes=arrays.classes,
                   fingerprint=imagefolder.digest([fingerprint, train_print]))


for _name in torchvision_data.NAMES:
    _LOADERS[_name] = functools.partial(_load_torchvision, _name)


# --------------------------------------------------------------------------------------------------------
# imagefolder:PATH
# --------------------------------------------------------------------------------------------------------

def _load_imagefolder(name: str, split: str, *, subset, subset_seed, image_size, normalize, cache_dir, workers,
                      progress) -> Dataset:
    """An image folder's split through the decoded uint8 cache (:mod:`widthkit.inputs.imagefolder`)."""
    raw = name[len(IMAGEFOLDER_PREFIX):]
    if not raw:
        raise ValueError(f"'{IMAGEFOLDER_PREFIX}' needs a folder: '{IMAGEFOLDER_PREFIX}PATH'")
    path = Path(raw).expanduser()
    listing = imagefolder.list_folder(path, name)
    if split not in listing.files:
        raise imagefolder.no_test_split(path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else imagefolder.default_cache_dir(path)
    transform = imagefolder.choose_transform(listing, image_size, cache)
    idx = random_subset(len(listing.files[split]), subset, subset_seed)
    part = imagefolder.cached_split(listing, split, transform, cache, idx, workers, progress)
    if normalize == "imagenet" or normalize == "auto" and transform.photos:
        if transform.channels != 3:
            raise ValueError(f"normalize='imagenet' needs RGB images; {path} holds grayscale images")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:  # the train split's statistics, from a fixed sample of it
        n_train = len(listing.files["train"])
        sample = random_subset(n_train, imagefolder.STATS_SAMPLE, 0)
        same = sample is None and idx is None or sample is not None and idx is not None and torch.equal(sample, idx)
        stats_part = part if split == "train" and same else imagefolder.cached_split(
            listing, "train", transform, cache, sample, workers, progress)
        mean, std = _cached_stats(stats_part)
    return Dataset(name=name, images=part.images, labels=part.labels, num_classes=len(listing.classes), mean=mean,
                   std=std, split=split, classes=listing.classes, full_size=part.full_size,
                   cache=str(part.folder) if part.mapped else None,
                   fingerprint=imagefolder.digest([part.key, mean, std]))


def preview_dataset(name: str, *, image_size: int | None = None, normalize: str = "auto",
                    cache_dir: str | os.PathLike | None = None) -> tuple[Dataset, Dataset | None] | None:
    """Two images of each split of an image folder (the first of its first class and of its last class, labels
    0 and classes-1), decoded directly, as ``(train, test or None)`` Datasets shaped and labelled as
    :func:`load_dataset` would give them; None for any other dataset (those cost nothing to load). Lets a
    model be checked against the folder (channels, size, class count) before the whole folder is decoded.

    Their ``mean``/``std`` are those :func:`load_dataset` uses where they are constants (ImageNet's), else
    the two images' own (a stand-in: only shapes and labels are to be checked on them).
    """
    if not isinstance(name, str) or not name.startswith(IMAGEFOLDER_PREFIX) or not name[len(IMAGEFOLDER_PREFIX):]:
        return None
    path = Path(name[len(IMAGEFOLDER_PREFIX):]).expanduser()
    listing = imagefolder.list_folder(path, name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else imagefolder.default_cache_dir(path)
    transform = imagefolder.choose_transform(listing, image_size, cache)
    out = []
    for split in SPLITS:
        if split not in listing.files:
            out.append(None)
            continue
        images, labels = imagefolder.probe(listing, split, transform)
        x = torch.from_numpy(images)
        if normalize == "imagenet" or normalize == "auto" and transform.photos:
            mean, std = (IMAGENET_MEAN, IMAGENET_STD) if transform.channels == 3 else channel_stats(x)
        else:
            mean, std = channel_stats(x)
        out.append(Dataset(name=name, images=x, labels=torch.tensor(labels, dtype=torch.int64),
                           num_classes=len(listing.classes), mean=mean, std=std, split=split,
                           classes=listing.classes))
    return out[0], out[1]


def _cached_stats(part: imagefolder.CachedSplit):
    """channel_stats of cached images, remembered beside them (a pass over a large cache takes a while), under
    the images' own key (a subset read from its split's entry has its own)."""
    import json

    memo = part.folder / f"stats-{part.key[:20]}.json"
    try:
        d = json.loads(memo.read_text())
        return tuple(d["mean"]), tuple(d["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = channel_stats(part.images)
    try:
        atomic_write(memo, to_json({"mean": mean, "std": std}))
    except OSError:
        pass  # a read-only cache: computed again next time
    return mean, std


# --------------------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------------------


def augment(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, flip: bool = True,
            fill: float | Sequence[float] = 0.0) -> torch.Tensor:
    """Random crop after padding and random horizontal flip, per sample, as batched tensor ops.

    The standard CIFAR training augmentation (pad 4, crop back to H x W, flip with probability 1/2), applied
    to a whole batch on its own device without a Python loop over samples.

    Args:
        x: batch ``(N, C, H, W)``, any dtype, CPU or CUDA; not modified.
        generator: source of the random offsets and flips (default: torch's global CPU generator). They are
            drawn on the generator's device and then moved to ``x``'s, so a CPU generator with a fixed seed
            gives the same augmentation on any device.
        pad: padding on each side in pixels; the crop's top-left corner is uniform in ``[0, 2*pad]^2``.
            ``pad=0`` disables the crop.
        flip: flip each sample left-right with probability 1/2.
        fill: value of the padding, a scalar or one value per channel. On normalised inputs 0 pads with the
            mean colour; ``fill=[-m / s for m, s in zip(ds.mean, ds.std)]`` pads with black pixels as
            torchvision's ``RandomCrop(padding=4)`` does on raw images.

    Returns:
        a new tensor shaped like ``x``.

    Draw order (for reproducibility): ``torch.randint(0, 2*pad+1, (2, N))`` row offsets then column offsets
    (only when ``pad > 0``), then ``torch.randint(0, 2, (N,))`` flips (only when ``flip``).
    """
    _check_augment_args(x, generator, pad, flip)
    n = x.shape[0]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if pad > 0:
        offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=gen_device).to(x.device)
    else:
        offsets = torch.zeros(2, n, dtype=torch.int64, device=x.device)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=gen_device).to(x.device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=x.device)
    return _crop_flip(x, offsets[0], offsets[1], flips, pad, fill)


def _check_augment_args(x: torch.Tensor, generator, pad, flip) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"augment expects a batch tensor (N, C, H, W), got {got}")
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int (pixels per side), got {pad!r}")
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True or False, got {flip!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _crop_flip(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, flips: torch.Tensor, pad: int,
               fill: float | Sequence[float] = 0.0) -> torch.Tensor:
    """Crop ``x`` padded by ``pad`` at per-sample top-left corners and flip the flagged samples.

    Args:
        x: ``(N, C, H, W)``.
        rows, cols: int64 ``(N,)`` top-left corner of each crop in the padded image, in ``[0, 2*pad]``.
        flips: bool ``(N,)``, flip that sample left-right (after cropping).
        pad: padding per side; fill: padding value (scalar or per channel).

    Returns:
        ``out[n] = flip_n(padded[n, :, rows[n]:rows[n]+H, cols[n]:cols[n]+W])``, a new ``(N, C, H, W)`` tensor.
    """
    n, c, h, w = x.shape
    fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device).flatten()
    if fill_t.numel() not in (1, c):
        raise ValueError(f"fill must be a scalar or one value per channel ({c}), got {fill_t.numel()} values")
    padded = fill_t.view(1, -1, 1, 1).expand(n, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad:pad + h, pad:pad + w] = x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    row_idx = rows.view(n, 1) + ar_h  # (N, H) source row of each output row
    col_idx = cols.view(n, 1) + torch.where(flips.view(n, 1), (w - 1) - ar_w, ar_w)  # (N, W), reversed if flipped
    out = padded.gather(2, row_idx.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))  # (N, C, H, W+2p)
    return out.gather(3, col_idx.view(n, 1, 1, w).expand(n, c, h, w))  # (N, C, H, W)
