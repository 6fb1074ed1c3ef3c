"""Tests for widthkit.data: digits, CIFAR python folders, image folders, Dataset, augment."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from widthkit.inputs import data
from widthkit.inputs.data import Dataset, augment, list_datasets, load_dataset

# --------------------------------------------------------------------------------------------------------
# helpers: tiny CIFAR folders in the official format
# --------------------------------------------------------------------------------------------------------


def _py2_emit(obj, out: bytearray) -> None:
    """Serialise like Python 2's cPickle at protocol 2 (str -> BINSTRING, numpy via numpy.core.multiarray)."""
    if obj is None:
        out += b"N"
    elif isinstance(obj, bool):
        out += b"\x88" if obj else b"\x89"
    elif isinstance(obj, int):
        if 0 <= obj < 256:
            out += b"K" + bytes([obj])
        elif 0 <= obj < 65536:
            out += b"M" + struct.pack("<H", obj)
        else:
            out += b"J" + struct.pack("<i", obj)
    elif isinstance(obj, bytes):
        out += (b"U" + bytes([len(obj)]) if len(obj) < 256 else b"T" + struct.pack("<I", len(obj))) + obj
    elif isinstance(obj, tuple):
        out += b"("
        for item in obj:
            _py2_emit(item, out)
        out += b"t"
    elif isinstance(obj, list):
        out += b"]("
        for item in obj:
            _py2_emit(item, out)
        out += b"e"
    elif isinstance(obj, dict):
        out += b"}("
        for k, v in obj.items():
            _py2_emit(k, out)
            _py2_emit(v, out)
        out += b"u"
    elif isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        _py2_emit((0,), out)
        _py2_emit(b"b", out)
        out += b"\x87R("  # TUPLE3, REDUCE, MARK (start of the array state)
        _py2_emit(1, out)
        _py2_emit(tuple(obj.shape), out)
        out += b"cnumpy\ndtype\n"
        _py2_emit((b"u1", 0, 1), out)
        out += b"R"
        _py2_emit((3, b"|", None, None, None, -1, -1, 0), out)
        out += b"b"  # BUILD the dtype
        _py2_emit(False, out)
        _py2_emit(np.ascontiguousarray(obj).tobytes(), out)
        out += b"tb"  # TUPLE (state), BUILD the array
    else:
        raise TypeError(type(obj))


def _write_pickle(path, d: dict, style: str) -> None:
    """style: 'py2' (hand-made Python 2 stream), 'bytes' (bytes keys, protocol 2), 'str' (Python 3 re-pickle)."""
    if style == "py2":
        buf = bytearray(b"\x80\x02")
        _py2_emit(d, buf)
        path.write_bytes(bytes(buf + b"."))
    elif style == "bytes":
        with open(path, "wb") as f:
            pickle.dump(d, f, protocol=2)
    elif style == "str":
        with open(path, "wb") as f:
            pickle.dump({k.decode(): v for k, v in d.items()}, f, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        raise ValueError(style)


def _batch(rng, n, num_classes, label_key, name):
    x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, num_classes, size=n)]
    d = {b"batch_label": name.encode(), label_key: y, b"data": x,
         b"filenames": [f"img_{name}_{i}.png".encode() for i in range(n)]}
    return d, x, np.asarray(y)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root, style="py2", sizes=(3, 2, 4, 1, 2), n_test=5, seed=0):
    """Write <root>/cifar-10-batches-py; return {"train": (x, y), "test": (x, y)} with x (n, 3072)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i, n in enumerate(sizes, start=1):
        d, x, y = _batch(rng, n, 10, b"labels", f"training batch {i} of 5")
        _write_pickle(folder / f"data_batch_{i}", d, style)
        xs.append(x)
        ys.append(y)
    d, xt, yt = _batch(rng, n_test, 10, b"labels", "testing batch 1 of 1")
    _write_pickle(folder / "test_batch", d, style)
    meta = {b"num_cases_per_batch": 10000, b"label_names": [s.encode() for s in CIFAR10_NAMES], b"num_vis": 3072}
    _write_pickle(folder / "batches.meta", meta, style)
    return {"train": (np.concatenate(xs), np.concatenate(ys)), "test": (xt, yt)}


def make_cifar100(root, style="py2", n_train=7, n_test=4, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        d, x, y = _batch(rng, n, 100, b"fine_labels", split)
        d[b"coarse_labels"] = [int(v) % 20 for v in y]
        _write_pickle(folder / split, d, style)
        out[split] = (x, y)
    meta = {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}
    _write_pickle(folder / "meta", meta, style)
    return out


def rows_to_chw(x: np.ndarray) -> np.ndarray:
    """The documented CIFAR row layout, by explicit index arithmetic: pixel (c, h, w) is x[c*1024 + h*32 + w]."""
    out = np.empty((x.shape[0], 3, 32, 32), dtype=np.uint8)
    for c in range(3):
        for h in range(32):
            start = c * 1024 + h * 32
            out[:, c, h, :] = x[:, start:start + 32]
    return out


# --------------------------------------------------------------------------------------------------------
# CIFAR
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "bytes", "str"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar10_pixels_labels_and_stats(tmp_path, style, split):
    written = make_cifar10(tmp_path, style)
    ds = load_dataset("cifar10", root=tmp_path, split=split)
    x, y = written[split]
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(y), 3, 32, 32)
    assert ds.labels.dtype == torch.int64
    np.testing.assert_array_equal(ds.images.numpy(), rows_to_chw(x))
    np.testing.assert_array_equal(ds.labels.numpy(), y)
    # one pixel by hand: sample 1, green plane, row 5, column 7
    assert int(ds.images[1, 1, 5, 7]) == int(x[1, 1024 + 5 * 32 + 7])
    assert ds.num_classes == 10 and ds.split == split and ds.name == "cifar10" and len(ds) == len(y)
    assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    assert list(ds.classes) == CIFAR10_NAMES


@pytest.mark.parametrize("style", ["py2", "bytes", "str"])
def test_cifar100_fine_labels(tmp_path, style):
    written = make_cifar100(tmp_path, style)
    for split in ("train", "test"):
        ds = load_dataset("cifar100", root=str(tmp_path), split=split)
        x, y = written[split]
        np.testing.assert_array_equal(ds.images.numpy(), rows_to_chw(x))
        np.testing.assert_array_equal(ds.labels.numpy(), y)
        assert ds.num_classes == 100 and ds.classes[7] == "fine7"
        assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)


def test_cifar_root_forms(tmp_path, monkeypatch):
    written = make_cifar10(tmp_path / "store")
    expected = rows_to_chw(written["test"][0])
    # root pointing at the cifar-10-batches-py folder itself
    ds = load_dataset("cifar10", root=tmp_path / "store" / "cifar-10-batches-py", split="test")
    np.testing.assert_array_equal(ds.images.numpy(), expected)
    # a renamed folder that holds the files directly
    os.rename(tmp_path / "store" / "cifar-10-batches-py", tmp_path / "renamed")
    np.testing.assert_array_equal(load_dataset("cifar10", root=tmp_path / "renamed", split="test").images.numpy(),
                                  expected)
    # $WIDTHKIT_DATA, then ./data
    (tmp_path / "env").mkdir()
    os.rename(tmp_path / "renamed", tmp_path / "env" / "cifar-10-batches-py")
    monkeypatch.setenv("WIDTHKIT_DATA", str(tmp_path / "env"))
    np.testing.assert_array_equal(load_dataset("cifar10", split="test").images.numpy(), expected)
    monkeypatch.delenv("WIDTHKIT_DATA")
    monkeypatch.chdir(tmp_path)
    os.rename(tmp_path / "env", tmp_path / "data")
    np.testing.assert_array_equal(load_dataset("cifar10", split="test").images.numpy(), expected)


def test_cifar_missing_folder_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    msg = str(err.value)
    for needle in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta", "does not exist",
                   str(tmp_path / "cifar-10-batches-py"), "cifar-10-python.tar.gz", "cs.toronto.edu",
                   "--data-root", "WIDTHKIT_DATA"):
        assert needle in msg, needle
    with pytest.raises(FileNotFoundError, match="cifar-100-python.*meta"):
        load_dataset("cifar100", root=tmp_path, split="test")


def test_cifar_incomplete_folder_message(tmp_path):
    written = make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_3 in .*cifar-10-batches-py"):
        load_dataset("cifar10", root=tmp_path, split="train")
    # the test split needs only test_batch and the meta file
    np.testing.assert_array_equal(load_dataset("cifar10", root=tmp_path, split="test").labels.numpy(),
                                  written["test"][1])
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(FileNotFoundError, match="missing batches.meta"):
        load_dataset("cifar10", root=tmp_path, split="test")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_cifar_corrupt_pickle_names_file(tmp_path, damage):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"this is not a pickle at all", "truncated": raw[: len(raw) // 2],
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match=r"data_batch_2 is not a readable CIFAR python file.*re-download"):
        load_dataset("cifar10", root=tmp_path)


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_refuses_foreign_globals(tmp_path):
    make_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": _Sneaky(), "labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch is not a readable.*getcwd, which an official CIFAR file never"):
        load_dataset("cifar10", root=tmp_path, split="test")


@pytest.mark.parametrize("content, pattern", [
    ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, r"'data' must be a uint8 array \(n, 3072\)"),
    ({b"data": np.zeros((2, 3072), np.int32), b"labels": [0, 1]}, r"'data' must be a uint8 array"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"'labels' must hold 2 integer labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must lie in \[0, 10\)"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, r"has no 'labels' entry"),
    ([1, 2, 3], r"holds a list, but a CIFAR python file holds a dict"),
])
def test_cifar_malformed_content(tmp_path, content, pattern):
    make_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(content, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch.*" + pattern):
        load_dataset("cifar10", root=tmp_path, split="test")


def test_cifar_bad_meta(tmp_path):
    make_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"batches.meta: 'label_names' must list 10 class names"):
        load_dataset("cifar10", root=tmp_path, split="test")


# --------------------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------------------


def _save_png(path, arr, mode):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def make_image_folder(root, classes=("zebra", "ant", "mole"), per_class=(2, 3, 1), size=(4, 5), seed=0,
                      gray=False):
    """Write root/<class>/img<i>.png of height x width = size; return (arrays in (C, H, W), labels) in
    the order the loader must produce (classes sorted, files sorted)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, cls in enumerate(sorted(classes)):
        for i in range(per_class[classes.index(cls)]):
            if gray:
                arr = rng.integers(0, 256, size=size, dtype=np.uint8)
                _save_png(root / cls / f"img{i}.png", arr, "L")
                images.append(arr[None])
            else:
                arr = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
                _save_png(root / cls / f"img{i}.png", arr, "RGB")
                images.append(arr.transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def _stats_float64(images: np.ndarray):
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def test_imagefolder_train_test(tmp_path):
    x_train, y_train = make_image_folder(tmp_path / "train", seed=0)
    x_test, y_test = make_image_folder(tmp_path / "test", per_class=(1, 1, 2), seed=1)
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "ant" / ".hidden.png").write_bytes(b"junk")
    name = f"imagefolder:{tmp_path}"
    train = load_dataset(name, split="train")
    test = load_dataset(name, split="test")
    assert train.images.shape == (6, 3, 4, 5) and train.images.dtype == torch.uint8
    np.testing.assert_array_equal(train.images.numpy(), x_train)
    np.testing.assert_array_equal(train.labels.numpy(), y_train)
    np.testing.assert_array_equal(test.images.numpy(), x_test)
    np.testing.assert_array_equal(test.labels.numpy(), y_test)
    assert train.classes == ("ant", "mole", "zebra") and train.num_classes == 3 == test.num_classes
    assert list(train.labels.numpy()) == [0, 0, 0, 1, 2, 2]
    mean, std = _stats_float64(x_train)
    np.testing.assert_allclose(train.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(train.std, std, rtol=1e-9)
    assert test.mean == train.mean and test.std == train.std
    assert train.name == name and test.split == "test"


def test_imagefolder_flat_layout_and_no_test_split(tmp_path):
    x, y = make_image_folder(tmp_path, gray=True)
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.images.shape == (6, 1, 4, 5)
    np.testing.assert_array_equal(ds.images.numpy(), x)
    np.testing.assert_array_equal(ds.labels.numpy(), y)
    with pytest.raises(FileNotFoundError, match=r"has no test split: it has no train/ and test/ sub-folders.*"
                                                r"/train/<class>/\*.*split='train'"):
        load_dataset(f"imagefolder:{tmp_path}", split="test")


def test_imagefolder_train_without_test(tmp_path):
    make_image_folder(tmp_path / "train")
    assert len(load_dataset(f"imagefolder:{tmp_path}")) == 6
    with pytest.raises(FileNotFoundError, match=r"has no test split: .*train exists but .*test does not"):
        load_dataset(f"imagefolder:{tmp_path}", split="test")


def test_imagefolder_mixed_gray_and_rgb_becomes_rgb(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    rgb = np.random.default_rng(3).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    _save_png(tmp_path / "a" / "g.png", gray, "L")
    _save_png(tmp_path / "b" / "c.png", rgb, "RGB")
    ds = load_dataset(f"imagefolder:{tmp_path}")
    assert ds.images.shape == (2, 3, 4, 5)
    np.testing.assert_array_equal(ds.images[0].numpy(), np.stack([gray] * 3))
    np.testing.assert_array_equal(ds.images[1].numpy(), rgb.transpose(2, 0, 1))


def test_imagefolder_mixed_sizes_are_photos(tmp_path):
    # images of different sizes: the photo transform (RGB, shorter side 256, centre crop 224)
    _save_png(tmp_path / "a" / "one.png", np.zeros((4, 5, 3), np.uint8), "RGB")
    _save_png(tmp_path / "b" / "two.png", np.zeros((6, 5, 3), np.uint8), "RGB")
    ds = load_dataset(f"imagefolder:{tmp_path}", progress=False)
    assert ds.images.shape == (2, 3, 224, 224)
    assert ds.mean == (0.485, 0.456, 0.406)  # photos: torchvision's ImageNet constants by default
    assert load_dataset(f"imagefolder:{tmp_path}", normalize="dataset", progress=False).mean == (0.0, 0.0, 0.0)


def test_imagefolder_class_mismatch(tmp_path):
    make_image_folder(tmp_path / "train", classes=("a", "b"), per_class=(1, 1))
    make_image_folder(tmp_path / "test", classes=("a", "c"), per_class=(1, 1))
    with pytest.raises(ValueError, match=r"same class folders; only in train: \['b'\], only in test: \['c'\]"):
        load_dataset(f"imagefolder:{tmp_path}", split="test")


def test_imagefolder_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match=r"'imagefolder:' needs a folder"):
        load_dataset("imagefolder:")
    with pytest.raises(FileNotFoundError, match=r"image folder .*nope .*does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "flat").mkdir()
    _save_png(tmp_path / "flat" / "loose.png", np.zeros((2, 2), np.uint8), "L")
    with pytest.raises(FileNotFoundError, match=r"has no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path / 'flat'}")
    make_image_folder(tmp_path / "e", classes=("a",), per_class=(1,))
    (tmp_path / "e" / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) empty in .* hold no images"):
        load_dataset(f"imagefolder:{tmp_path / 'e'}")
    make_image_folder(tmp_path / "c", classes=("a",), per_class=(1,))
    (tmp_path / "c" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        load_dataset(f"imagefolder:{tmp_path / 'c'}")


# --------------------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------------------


def test_digits_split_pixels_and_stats():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert train.images.shape[1:] == (1, 8, 8) and test.images.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797 and len(test) == 359 and len(train) == 1438
    assert train.num_classes == 10 and train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    # pixel values: round-half-up of v * 255 / 16, checked by a per-value table
    table = {v: int(v * 255 / 16 + 0.5) for v in range(17)}
    assert table[8] == 128 and table[16] == 255 and table[1] == 16
    expected = np.vectorize(table.get)(bunch.images.astype(int)).astype(np.uint8)[:, None]
    tr_idx, te_idx = data.stratified_split(bunch.target, 0.2, 0)
    np.testing.assert_array_equal(train.images.numpy(), expected[tr_idx])
    np.testing.assert_array_equal(test.labels.numpy(), bunch.target[te_idx])
    # stratified: each class contributes round(0.2 * its count) test samples
    for c in range(10):
        n_c = int((bunch.target == c).sum())
        assert int((test.labels == c).sum()) == round(0.2 * n_c)
    # normalisation from the train split, used for both
    x = train.normalized(dtype=torch.float64)
    assert abs(float(x.mean())) < 1e-12 and abs(float(x.std(unbiased=False)) - 1.0) < 1e-12
    assert test.mean == train.mean and test.std == train.std


def test_digits_split_is_deterministic_and_ignores_global_rng():
    torch.manual_seed(123)
    np.random.seed(123)
    a = load_dataset("digits", split="test")
    torch.manual_seed(7)
    np.random.seed(7)
    np.random.rand(10)
    b = load_dataset("digits", split="test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # fresh tensors each call: mutating one result leaves the next untouched
    a.images.zero_()
    assert load_dataset("digits", split="test").images.sum() > 0


def test_stratified_split_partitions():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 3)
    tr, te = data.stratified_split(labels, 0.2, 0)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(18))
    assert [int((labels[te] == c).sum()) for c in range(3)] == [2, 1, 1]
    assert np.array_equal(te, data.stratified_split(labels, 0.2, 0)[1])
    assert not np.array_equal(te, data.stratified_split(labels, 0.2, 1)[1])
    assert not np.array_equal(te, data.stratified_split(labels, 0.2, 1)[1]) or True  # seeds may coincide


# --------------------------------------------------------------------------------------------------------
# load_dataset / list_datasets
# --------------------------------------------------------------------------------------------------------


def test_list_datasets():
    emnist = [f"emnist:{s}" for s in ("balanced", "byclass", "bymerge", "digits", "letters", "mnist")]
    assert list_datasets() == ["cifar10", "cifar100", "digits", *emnist, "fashion-mnist", "kmnist", "mnist", "stl10",
                               "svhn"]
    assert data.DEFAULT_DATASET in list_datasets()


def test_load_dataset_rejects_bad_name_and_split():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; valid names: \['cifar10', 'cifar100', "
                                         r"'digits', .*'svhn'\], or 'imagefolder:PATH'"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\], got 'val'"):
        load_dataset("digits", split="val")


# --------------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------------


def _tiny(n=6, c=3, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    labels = torch.arange(n, dtype=torch.int64) % 3
    return Dataset("tiny", images, labels, 3, mean=[0.5, 0.4, 0.3][:c], std=(0.2, 0.25, 0.3)[:c], split="train")


def test_normalized_matches_float64_reference():
    ds = _tiny()
    ref = (ds.images.numpy().astype(np.float64) / 255.0 - np.array(ds.mean)[None, :, None, None]) \
        / np.array(ds.std)[None, :, None, None]
    x32 = ds.normalized()
    assert x32.dtype == torch.float32 and x32.shape == ds.images.shape
    np.testing.assert_allclose(x32.numpy(), ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ds.normalized(dtype=torch.float64).numpy(), ref, rtol=1e-14, atol=1e-14)
    assert ds.normalized(dtype=torch.bfloat16).dtype == torch.bfloat16
    assert ds.images.dtype == torch.uint8  # unchanged
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        ds.normalized(dtype=torch.int32)


def test_subset():
    ds = _tiny()
    sub = ds.subset([4, 1])
    assert torch.equal(sub.images, ds.images[[4, 1]]) and torch.equal(sub.labels, ds.labels[[4, 1]])
    assert sub.mean == ds.mean and sub.split == ds.split and len(sub) == 2
    mask = torch.tensor([True, False, True, False, False, True])
    assert torch.equal(ds.subset(mask).images, ds.images[[0, 2, 5]])
    assert torch.equal(ds.subset(slice(1, 3)).labels, ds.labels[1:3])
    assert len(ds.subset([])) == 0
    sub.images.zero_()
    assert ds.images.sum() > 0  # a copy
    with pytest.raises(ValueError, match=r"indices must lie in \[-6, 6\).*max 6"):
        ds.subset([6])
    with pytest.raises(ValueError, match=r"boolean mask must have length 6"):
        ds.subset([True, False])
    with pytest.raises(ValueError, match="indices must be integers"):
        ds.subset([0.5])
    with pytest.raises(ValueError, match="indices must be 1-D"):
        ds.subset([[0, 1]])


def test_dataset_validation():
    ds = _tiny()
    with pytest.raises(ValueError, match=r"images must be a uint8 tensor \(N, C, H, W\), got torch.float32"):
        Dataset("x", ds.images.float(), ds.labels, 3, ds.mean, ds.std, "train")
    with pytest.raises(ValueError, match=r"labels must be an int64 tensor"):
        Dataset("x", ds.images, ds.labels.int(), 3, ds.mean, ds.std, "train")
    with pytest.raises(ValueError, match=r"6 images but 5 labels"):
        Dataset("x", ds.images, ds.labels[:5], 3, ds.mean, ds.std, "train")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        Dataset("x", ds.images, ds.labels, 2, ds.mean, ds.std, "train")
    with pytest.raises(ValueError, match=r"one value per channel \(3\), got 1 and 3"):
        Dataset("x", ds.images, ds.labels, 3, (0.5,), ds.std, "train")
    with pytest.raises(ValueError, match=r"std must be positive"):
        Dataset("x", ds.images, ds.labels, 3, ds.mean, (0.1, 0.0, 0.1), "train")
    with pytest.raises(ValueError, match=r"split must be one of \['train', 'test'\], got 'val'"):
        Dataset("x", ds.images, ds.labels, 3, ds.mean, ds.std, "val")
    with pytest.raises(ValueError, match=r"classes has 2 names for 3 classes"):
        Dataset("x", ds.images, ds.labels, 3, ds.mean, ds.std, "train", classes=("a", "b"))


def test_channel_stats_matches_numpy_and_handles_constant_channel():
    ds = _tiny(n=5, c=2)
    ds.images[:, 1] = 77
    mean, std = data.channel_stats(ds.images)
    ref_mean, ref_std = _stats_float64(ds.images.numpy())
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std[0], ref_std[0], rtol=1e-9)
    assert mean[1] == pytest.approx(77 / 255) and std[1] == 1.0


# --------------------------------------------------------------------------------------------------------
# augment
# --------------------------------------------------------------------------------------------------------


def reference_crop_flip(x, rows, cols, flips, pad, fill=0.0):
    """Per-sample loop with numpy: pad with fill, slice the H x W window, mirror the columns if flagged."""
    x = x.numpy()
    n, c, h, w = x.shape
    fill = np.broadcast_to(np.asarray(fill, dtype=x.dtype).reshape(-1, 1, 1), (c, 1, 1))
    out = np.empty_like(x)
    for i in range(n):
        padded = np.empty((c, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
        padded[...] = fill
        padded[:, pad:pad + h, pad:pad + w] = x[i]
        crop = padded[:, rows[i]:rows[i] + h, cols[i]:cols[i] + w]
        out[i] = crop[:, :, ::-1] if flips[i] else crop
    return out


@pytest.mark.parametrize("pad", [0, 1, 3])
def test_crop_flip_matches_loop_for_every_offset(pad):
    x = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    offsets = [(r, c) for r in range(2 * pad + 1) for c in range(2 * pad + 1)]
    xs = x.repeat(len(offsets), 1, 1, 1)  # every sample with every offset, flipped and not
    rows = torch.tensor([r for r, _ in offsets for _ in range(2)])
    cols = torch.tensor([c for _, c in offsets for _ in range(2)])
    for flips in (torch.zeros(len(xs), dtype=torch.bool), torch.arange(len(xs)) % 3 == 0):
        got = data._crop_flip(xs, rows, cols, flips, pad)
        np.testing.assert_array_equal(got.numpy(), reference_crop_flip(xs, rows.tolist(), cols.tolist(),
                                                                       flips.tolist(), pad))


def test_augment_equals_loop_with_documented_draws():
    x = torch.randn(16, 3, 6, 7, generator=torch.Generator().manual_seed(1))
    x_before = x.clone()
    out = augment(x, torch.Generator().manual_seed(42), pad=2, flip=True)
    g = torch.Generator().manual_seed(42)
    offsets = torch.randint(0, 5, (2, 16), generator=g)
    flips = torch.randint(0, 2, (16,), generator=g).bool()
    ref = reference_crop_flip(x, offsets[0].tolist(), offsets[1].tolist(), flips.tolist(), 2)
    np.testing.assert_array_equal(out.numpy(), ref)
    assert out.shape == x.shape and torch.equal(x, x_before)
    assert 0 < int(flips.sum()) < 16  # the check above exercised both branches


def test_augment_per_channel_fill_and_uint8():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    rows, cols = torch.tensor([0, 6, 3, 0]), torch.tensor([6, 0, 3, 0])
    flips = torch.tensor([True, False, False, True])
    fill = [10, 20, 30]
    got = data._crop_flip(x, rows, cols, flips, 3, fill=fill)
    np.testing.assert_array_equal(got.numpy(), reference_crop_flip(x, rows.tolist(), cols.tolist(), flips.tolist(),
                                                                   3, fill))
    assert got.dtype == torch.uint8
    assert augment(x, torch.Generator().manual_seed(0), fill=fill).dtype == torch.uint8
    with pytest.raises(ValueError, match=r"fill must be a scalar or one value per channel \(3\), got 2"):
        augment(x, fill=[1, 2])


def test_augment_identities():
    x = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    same = augment(x, pad=0, flip=False)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    # flipping twice with the same draws is the identity; once is a mirror
    once = augment(x, torch.Generator().manual_seed(9), pad=0)
    twice = augment(once, torch.Generator().manual_seed(9), pad=0)
    assert torch.equal(twice, x)
    flipped = torch.randint(0, 2, (5,), generator=torch.Generator().manual_seed(9)).bool()
    assert torch.equal(once[flipped], x[flipped].flip(-1)) and torch.equal(once[~flipped], x[~flipped])
    assert torch.equal(data._crop_flip(data._crop_flip(x, *(torch.zeros(5, dtype=torch.long),) * 2,
                                                       torch.ones(5, dtype=torch.bool), 0),
                                       *(torch.zeros(5, dtype=torch.long),) * 2, torch.ones(5, dtype=torch.bool), 0),
                       x)
    assert augment(x[:0]).shape == (0, 2, 4, 4)


def test_augment_draws_cover_all_offsets_and_flip_half():
    x = torch.arange(1.0, 2.0).view(1, 1, 1, 1).repeat(4000, 1, 1, 1)  # single bright pixel per sample
    out = augment(x, torch.Generator().manual_seed(0), pad=1, flip=False)
    # with H = W = 1 and pad 1 the pixel survives only when the crop is at offset (1, 1): probability 1/9
    assert abs(float(out.mean()) - 1 / 9) < 0.02
    ramp = torch.arange(4.0).view(1, 1, 1, 4).repeat(4000, 1, 1, 1)
    flipped = augment(ramp, torch.Generator().manual_seed(1), pad=0)[:, 0, 0, 0] == 3
    assert abs(float(flipped.float().mean()) - 0.5) < 0.04


def test_augment_global_rng_when_no_generator():
    x = torch.randn(8, 1, 4, 4)
    torch.manual_seed(5)
    a = augment(x)
    torch.manual_seed(5)
    assert torch.equal(a, augment(x))


@pytest.mark.parametrize("kwargs, pattern", [
    ({"pad": -1}, r"pad must be a non-negative int \(pixels per side\), got -1"),
    ({"pad": True}, r"pad must be a non-negative int"),
    ({"pad": 1.5}, r"pad must be a non-negative int"),
    ({"flip": 1}, r"flip must be True or False, got 1"),
    ({"generator": 3}, r"generator must be a torch.Generator or None, got int"),
])
def test_augment_bad_arguments(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        augment(torch.zeros(2, 1, 3, 3), **kwargs)


def test_augment_rejects_non_batch():
    with pytest.raises(ValueError, match=r"augment expects a batch tensor \(N, C, H, W\), got \(3, 3\)"):
        augment(torch.zeros(3, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_cuda_matches_cpu():
    x = torch.randn(32, 3, 8, 8)
    cpu = augment(x, torch.Generator().manual_seed(4))
    gpu = augment(x.cuda(), torch.Generator().manual_seed(4))
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)
    ds = _tiny()
    # normalising divides in float32 on each device: within the fp32 policy (a 1.5e-7 difference failed rtol=1e-6)
    from conftest import assert_forward_close

    assert_forward_close(ds.normalized(device="cuda"), ds.normalized(), "fp32", "normalised pixels")
