"""torchvision's datasets by name (issue 21), read from real-format files in torchvision's own layout and compared
with what torchvision's own dataset classes read from the same files (constructed with download=False; nothing is
ever downloaded here)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torchvision import datasets

import widthkit
from widthkit.inputs import torchvision_data
from widthkit.inputs.data import list_datasets, load_dataset


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """An idx file as the MNIST family ships them: 0x00 0x00 0x08 (uint8) ndim, big-endian sizes, the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_idx_dataset(root, folder, prefix_of, n=(7, 5), num_classes=10, low=0, compress=False, seed=0):
    """Random images (N, 28, 28) and labels in [low, num_classes) in ``root/folder/raw`` under torchvision's names."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(("train", "test"), n):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(low, num_classes, count, dtype=np.uint8)
        write_idx(root / folder / "raw" / f"{prefix_of(split)}-images-idx3-ubyte", images, compress)
        write_idx(root / folder / "raw" / f"{prefix_of(split)}-labels-idx1-ubyte", labels, compress)
        out[split] = images, labels
    return out


def mnist_prefix(split):
    return "train" if split == "train" else "t10k"


def _stats(images: np.ndarray):
    x = images.astype(np.float64) / 255.0
    axes = (0, 2, 3)
    return x.mean(axis=axes), x.std(axis=axes)


def _same_as(ds, tv_images, tv_labels, train_images):
    assert torch.equal(ds.images, tv_images) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.labels, tv_labels.to(torch.int64))
    mean, std = _stats(train_images)
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(ds.std, std, rtol=1e-12)


@pytest.mark.parametrize("name, cls", [("mnist", datasets.MNIST), ("fashion-mnist", datasets.FashionMNIST),
                                       ("kmnist", datasets.KMNIST)])
def test_mnist_family_equals_torchvision(tmp_path, name, cls):
    make_idx_dataset(tmp_path, cls.__name__, mnist_prefix)
    train = load_dataset(name, root=tmp_path, split="train")
    for split in ("train", "test"):
        ds = load_dataset(name, root=tmp_path, split=split)
        tv = cls(str(tmp_path), train=split == "train", download=False)
        _same_as(ds, tv.data[:, None], tv.targets, train.images.numpy())
        assert ds.classes == tuple(c.split(" - ")[0] for c in tv.classes) and ds.num_classes == 10
        assert ds.images.shape[1:] == (1, 28, 28)


@pytest.mark.parametrize("split_name", ["letters", "balanced", "byclass", "digits"])
def test_emnist_equals_torchvision(tmp_path, split_name):
    classes = datasets.EMNIST.classes_split_dict[split_name]
    make_idx_dataset(tmp_path, "EMNIST", lambda s: f"emnist-{split_name}-{s}", num_classes=len(classes),
                     low=1 if split_name == "letters" else 0)
    train = load_dataset(f"emnist:{split_name}", root=tmp_path)
    for split in ("train", "test"):
        ds = load_dataset(f"emnist:{split_name}", root=tmp_path, split=split)
        tv = datasets.EMNIST(str(tmp_path), split=split_name, train=split == "train", download=False)
        _same_as(ds, tv.data[:, None], tv.targets, train.images.numpy())
        assert list(ds.classes) == list(tv.classes) and ds.num_classes == len(tv.classes)


def test_gzipped_files_read_as_the_extracted_ones(tmp_path):
    make_idx_dataset(tmp_path / "plain", "MNIST", mnist_prefix, seed=3)
    make_idx_dataset(tmp_path / "gz", "MNIST", mnist_prefix, seed=3, compress=True)
    assert not list((tmp_path / "gz").rglob("*-ubyte"))  # only the .gz files torchvision downloads
    for split in ("train", "test"):
        a = load_dataset("mnist", root=tmp_path / "plain", split=split)
        b = load_dataset("mnist", root=tmp_path / "gz", split=split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.mean == b.mean


def test_svhn_equals_torchvision(tmp_path, monkeypatch):
    import scipy.io

    rng = np.random.default_rng(1)
    for split, n in (("train", 9), ("test", 6)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # the files' layout: (H, W, C, N)
        y = rng.integers(1, 11, (n, 1), dtype=np.uint8)
        y[0] = 10  # the digit 0
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    # torchvision checks the official files' MD5 before it reads; these are small files of the same format
    monkeypatch.setattr(datasets.SVHN, "_check_integrity", lambda self: True)
    train = load_dataset("svhn", root=tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("svhn", root=tmp_path, split=split)
        tv = datasets.SVHN(str(tmp_path), split=split, download=False)
        _same_as(ds, torch.from_numpy(tv.data), torch.from_numpy(tv.labels), train.images.numpy())
        assert int(ds.labels[0]) == 0 and ds.images.shape[1:] == (3, 32, 32) and ds.num_classes == 10
        assert 10 not in ds.labels.tolist()


def test_stl10_equals_torchvision(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split, n in (("train", 4), ("test", 3)):
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 256, n * 3 * 96 * 96, dtype=np.uint8).tobytes())
        (folder / f"{split}_y.bin").write_bytes(rng.integers(1, 11, n, dtype=np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(torchvision_data.STL10_CLASSES) + "\n")
    monkeypatch.setattr(datasets.STL10, "_check_integrity", lambda self: True)
    train = load_dataset("stl10", root=tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("stl10", root=tmp_path, split=split)
        tv = datasets.STL10(str(tmp_path), split=split, download=False)
        _same_as(ds, torch.from_numpy(tv.data), torch.from_numpy(tv.labels), train.images.numpy())
        assert list(ds.classes) == tv.classes and ds.images.is_contiguous()


def test_listed_missing_files_and_damaged_files(tmp_path):
    names = list_datasets()
    for name in ("mnist", "fashion-mnist", "kmnist", "emnist:letters", "svhn", "stl10", "cifar10", "cifar100"):
        assert name in names
    with pytest.raises(FileNotFoundError, match=r"MNIST not found: expected train-images-idx3-ubyte\[\.gz\].*"
                                                r"MNIST/raw.*--data-root.*--download"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(ValueError, match="emnist:SPLIT"):
        load_dataset("emnist", root=tmp_path)
    make_idx_dataset(tmp_path, "MNIST", mnist_prefix)
    raw = tmp_path / "MNIST" / "raw"
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x03" + bytes(20))  # images' magic on a label file
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte is not an idx file of uint8 with 1 dimension"):
        load_dataset("mnist", root=tmp_path, split="test")
    data = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte holds 5388 values but its header says "
                                         r"\(7, 28, 28\) \(5488\); it is truncated"):
        load_dataset("mnist", root=tmp_path)


def test_download_calls_torchvision_only_when_asked(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:  # stands in for torchvision's class: records the call, writes what its download would
        def __init__(self, root, train, download):
            calls.append((root, train, download))
            make_idx_dataset(tmp_path / "d", "MNIST", mnist_prefix)

    monkeypatch.setattr(datasets, "MNIST", FakeMNIST)
    with pytest.raises(FileNotFoundError, match="--download"):
        load_dataset("mnist", root=tmp_path / "d", split="test")
    assert calls == []  # never by default
    ds = load_dataset("mnist", root=tmp_path / "d", split="test", download=True)
    assert calls == [(str(tmp_path / "d"), False, True), (str(tmp_path / "d"), True, True)]
    assert ds.images.shape == (5, 1, 28, 28)

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets, "MNIST", offline)
    with pytest.raises(ValueError, match=r"downloading MNIST into .* with torchvision failed \(OSError: .*name "
                                         r"resolution\); check the internet connection"):
        load_dataset("mnist", root=tmp_path / "e", download=True)


def test_rays_on_mnist_by_name(tmp_path):
    make_idx_dataset(tmp_path, "MNIST", mnist_prefix, n=(40, 30))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    result = widthkit.rays(model, "mnist", data_root=str(tmp_path), dirs=2, steps=2, bn_mode="keep", device="cpu")
    test = load_dataset("mnist", root=tmp_path, split="test")
    with torch.no_grad():
        err = (model(test.normalized()).argmax(1) != test.labels).double().mean().item() * 100
    assert result.models["model0"]["metrics"]["test_err"][0, 0] == pytest.approx(err)
    assert result.config["data"]["name"] == "mnist" and set(result.config["data"]["fingerprint"]) == {"train", "test"}
