"""Faults an image folder and its decoded cache meet in real use (issue 21): the folder changed under a resumed
run, a build killed with its decoding workers, a full disk, damaged cache entries, decompression bombs,
unreadable class folders, and a model that does not fit the folder found before anything is decoded."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import widthkit
from widthkit.inputs import imagefolder
from widthkit.inputs.data import load_dataset
from widthkit.report.store import ConfigMismatch, read


def digits_folder(root, per_class=(5, 3)):
    """scikit-learn's digits as an image folder of 8x8 grayscale PNGs: root/train/<digit>/*, root/test/<digit>/*;
    the digits checkpoints fit it (1 channel, 8x8, 10 classes)."""
    for split, n in zip(("train", "test"), per_class):
        ds = load_dataset("digits", split=split)
        for c in range(10):
            rows = (ds.labels == c).nonzero().flatten()[:n]
            for i, r in enumerate(rows.tolist()):
                p = root / split / str(c) / f"{i}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(ds.images[r, 0].numpy(), "L").save(p)
    return root


# ------------------------------------------------------------------------------- the folder changed under a run


def _stop_after_first_chunk(done, total):
    if 0 < done < total:
        raise KeyboardInterrupt  # an interrupted run: the first chunk is in the file, the rest is not


def test_resuming_after_the_test_images_changed_is_refused(digits_ckpts, tmp_path):
    root = digits_folder(tmp_path / "digits")
    out = tmp_path / "r.h5"
    common = dict(data=f"imagefolder:{root}", dirs=2, steps=3, bn_mode="keep", device="cpu", workers=1,
                  cache_dir=tmp_path / "cache", out=out)
    with pytest.raises(KeyboardInterrupt):
        widthkit.rays(digits_ckpts["sgd"], progress=_stop_after_first_chunk, **common)
    partial = read(out)["models"]["sgd"]["done"]
    assert 0 < partial.sum() < partial.size
    before = load_dataset(f"imagefolder:{root}", split="test", cache_dir=tmp_path / "cache", progress=False)
    for p in sorted((root / "test").rglob("*.png"))[::2]:  # other pictures under the same names
        with Image.open(p) as img:
            Image.fromarray(255 - np.asarray(img)).save(p)
    after = load_dataset(f"imagefolder:{root}", split="test", cache_dir=tmp_path / "cache", progress=False)
    assert not torch.equal(before.images, after.images) and before.fingerprint != after.fingerprint
    with pytest.raises(ConfigMismatch, match=r"the data changed since .*r\.h5.*the test split.*--overwrite.*--out"):
        widthkit.rays(digits_ckpts["sgd"], **common)
    assert (read(out)["models"]["sgd"]["done"] == partial).all()  # the file is as it was
    # --overwrite starts afresh on the data as it is now, and equals a run of its own on it
    fresh = widthkit.rays(digits_ckpts["sgd"], **{**common, "out": tmp_path / "fresh.h5"})
    again = widthkit.rays(digits_ckpts["sgd"], overwrite=True, **common)
    for name, values in fresh.models["sgd"]["metrics"].items():
        assert np.array_equal(again.models["sgd"]["metrics"][name], values), name


def test_a_file_written_before_fingerprints_still_resumes(digits_ckpts, tmp_path):
    root = digits_folder(tmp_path / "digits")
    out = tmp_path / "r.h5"
    common = dict(data=f"imagefolder:{root}", dirs=2, steps=3, bn_mode="keep", device="cpu", workers=1,
                  cache_dir=tmp_path / "cache", out=out)
    with pytest.raises(KeyboardInterrupt):
        widthkit.rays(digits_ckpts["sgd"], progress=_stop_after_first_chunk, **common)
    with h5py.File(out, "r+") as f:  # as an older widthkit wrote it: no fingerprint in the data description
        config = json.loads(f.attrs["config"])
        assert set(config["data"]["fingerprint"]) == {"train", "test"}
        del config["data"]["fingerprint"]
        f.attrs["config"] = json.dumps(config)
    resumed = widthkit.rays(digits_ckpts["sgd"], **common)
    fresh = widthkit.rays(digits_ckpts["sgd"], **{**common, "out": tmp_path / "fresh.h5"})
    assert resumed.models["sgd"]["done"].all()
    for name, values in fresh.models["sgd"]["metrics"].items():
        assert np.array_equal(resumed.models["sgd"]["metrics"][name], values), name


def test_fingerprints_of_the_bundled_and_file_datasets(tmp_path):
    a, b = load_dataset("digits", split="test"), load_dataset("digits", split="test")
    assert a.fingerprint == b.fingerprint and a.fingerprint != load_dataset("digits").fingerprint
    sub = load_dataset("digits", split="test", subset=20, subset_seed=1)
    assert sub.fingerprint not in (a.fingerprint, load_dataset("digits", split="test", subset=20).fingerprint)
    assert a.subset([0, 1]).fingerprint != a.subset([1, 0]).fingerprint
