"""Faults an image folder and its decoded cache meet in real use (issue 21): the folder changed under a resumed
run, a build killed with its decoding workers, a full disk, damaged cache entries, decompression bombs,
unreadable class folders, and a model that does not fit the folder found before anything is decoded."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import STOP_HERE, python_child, wait_for_marker

import widthkit
from widthkit.inputs import data, imagefolder
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


# ------------------------------------------------------------------------------- a build killed with its workers

KILLED_WITH_WORKERS = STOP_HERE + """
# argv: ROOT CACHE MARKER BLOCKED: build the train split's cache with 2 workers, chunks of 4 images; chunk 0
# decodes, every later chunk is an image that takes forever (its worker writes BLOCKED/<pid> and waits); the
# builder stops at MARKER once chunk 0 is marked done
from widthkit.inputs import imagefolder
from widthkit.inputs.data import load_dataset

root, cache, marker, blocked = sys.argv[1:5]
imagefolder.CHUNK = 4
real_decode, real_progress = imagefolder._decode_chunk, imagefolder._progress


def decode(target, shape, start, paths, transform):
    if start > 0:
        open(os.path.join(blocked, str(os.getpid())), "w").close()
        while True:
            time.sleep(3600)
    return real_decode(target, shape, start, paths, transform)


def progress(total, desc, enabled):
    bar = real_progress(total, desc, False)
    bar.update = lambda n: n > 0 and stop_here(marker)  # called once per chunk marked done
    return bar


imagefolder._decode_chunk, imagefolder._progress = decode, progress
load_dataset("imagefolder:" + root, workers=2, cache_dir=cache, progress=True)
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped has ended: it holds no file any more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_build_takes_its_workers_along_and_a_rerun_finishes_it(tmp_path, spawn, monkeypatch, sig):
    root = digits_folder(tmp_path / "digits", per_class=(2, 1))  # 20 train images: 5 chunks of 4
    cache, blocked = tmp_path / "cache", tmp_path / "blocked"
    blocked.mkdir()
    proc, log = spawn(python_child(KILLED_WITH_WORKERS, root, cache, tmp_path / "marker", blocked))
    wait_for_marker(tmp_path / "marker", proc, log)
    while len(os.listdir(blocked)) < 2:  # both workers are decoding (no deadline: pytest-timeout bounds it)
        assert proc.poll() is None
    workers = [int(p) for p in os.listdir(blocked)]
    try:
        os.kill(proc.pid, sig)
        proc.wait()
        while any(_alive(w) for w in workers):  # they die with their builder; before the fix they waited forever
            pass
    finally:
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    lock = next(cache.glob(".train-*.lock"))
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds the build lock now
    monkeypatch.setattr(imagefolder, "CHUNK", 4)
    decoded = []
    real = imagefolder._decode_chunk
    monkeypatch.setattr(imagefolder, "_decode_chunk", lambda *a: decoded.append(a[2]) or real(*a))
    resumed = load_dataset(f"imagefolder:{root}", workers=1, cache_dir=cache, progress=False)
    assert sorted(decoded) == [4, 8, 12, 16]  # chunk 0 was kept
    fresh = load_dataset(f"imagefolder:{root}", workers=1, cache_dir=tmp_path / "fresh", progress=False)
    assert torch.equal(resumed.images, fresh.images) and torch.equal(resumed.labels, fresh.labels)


# ------------------------------------------------------------------------------- a full disk during the build


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 2 MiB tmpfs (skipped where mounting is not allowed); ``remount(size)`` makes it larger."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("needs root to mount a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


BUILD = """
import sys
from widthkit import cli
from widthkit.inputs import imagefolder
from widthkit.inputs.data import load_dataset

root, cache, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
imagefolder.CHUNK = 8  # several chunks: with 2 workers they are decoded by a process pool
sys.exit(cli.run(lambda: load_dataset("imagefolder:" + root, image_size=160, workers=workers, cache_dir=cache,
                                      progress=False) and 0))
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_disk_during_the_build_is_one_line_naming_the_cache(tmp_path, tiny_disk, workers):
    root = digits_folder(tmp_path / "digits")  # 50 train images, 160x160 RGB: 3.7 MiB decoded
    cache = tiny_disk / "cache"
    run = subprocess.run([sys.executable, "-c", BUILD, root, cache, str(workers)], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr[-2000:]  # before: SIGBUS (rc -7) or a BrokenProcessPool traceback
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert f"no room for the image cache in {cache}" in lines[0] and "3.7 MiB" in lines[0]
    assert "free space there, or pass --cache-dir" in lines[0]
    assert not list(cache.rglob("meta.json")) and not list(cache.rglob("images.u8*"))  # nothing half-written kept
    subprocess.run(["mount", "-o", "remount,size=8m", str(tiny_disk)], check=True)
    again = subprocess.run([sys.executable, "-c", BUILD, root, cache, str(workers)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    built = load_dataset(f"imagefolder:{root}", image_size=160, cache_dir=cache, progress=False)
    fresh = load_dataset(f"imagefolder:{root}", image_size=160, cache_dir=tmp_path / "fresh", workers=1,
                         progress=False)
    assert torch.equal(built.images, fresh.images)


WORKER_KILLED = """
import os, signal, sys
from widthkit import cli
from widthkit.inputs import imagefolder
from widthkit.inputs.data import load_dataset

imagefolder.CHUNK = 8
real = imagefolder._decode_chunk


def decode(target, shape, start, paths, transform):
    if start == 16:  # as the out-of-memory killer would
        os.kill(os.getpid(), signal.SIGKILL)
    return real(target, shape, start, paths, transform)


imagefolder._decode_chunk = decode
sys.exit(cli.run(lambda: load_dataset("imagefolder:" + sys.argv[1], workers=2, cache_dir=sys.argv[2],
                                      progress=False) and 0))
"""


def test_a_decoding_worker_killed_by_the_system_is_one_line(tmp_path):
    root = digits_folder(tmp_path / "digits")
    run = subprocess.run([sys.executable, "-c", WORKER_KILLED, root, tmp_path / "cache"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        f"error: a process decoding 50 train images (as they are (8x8, L)) into {tmp_path / 'cache'} died (killed "
        "by the system: out of memory?); run again to resume the build, with fewer --workers"]
    assert not list((tmp_path / "cache").rglob("meta.json"))


# ------------------------------------------------------------------------------- damaged cache entries


def _entry_of(cache, split="train"):
    (entry,) = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith(f"{split}-")]
    return entry


def _damage_truncate(entry):
    data = (entry / "images.u8").read_bytes()
    (entry / "images.u8").write_bytes(data[:-64])
    return r"images\.u8 holds \d+ bytes, not \d+"


def _damage_garbage(entry):
    size = (entry / "images.u8").stat().st_size
    (entry / "images.u8").write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    return r"images 0\.\.\d+ do not match their checksum"


def _damage_one_image(entry):
    with open(entry / "images.u8", "r+b") as f:  # one pixel of the last image: a chunk other than the first
        f.seek(-1, os.SEEK_END)
        value = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([value ^ 0xFF]))
    return r"images \d+\.\.49 do not match their checksum"


def _damage_meta_text(entry):
    (entry / "meta.json").write_text("{not json")
    return r"meta\.json is not valid \(JSONDecodeError"


def _damage_meta_keys(entry):
    (entry / "meta.json").write_text("{}")
    return r"meta\.json is not valid \(KeyError"


def _damage_meta_list(entry):
    (entry / "meta.json").write_text("[1, 2]")
    return r"meta\.json describes list"


@pytest.mark.parametrize("damage", [_damage_truncate, _damage_garbage, _damage_one_image, _damage_meta_text,
                                    _damage_meta_keys, _damage_meta_list])
def test_a_damaged_cache_entry_is_named_and_decoded_again(tmp_path, monkeypatch, caplog, damage):
    root = digits_folder(tmp_path / "digits")
    cache = tmp_path / "cache"
    monkeypatch.setattr(imagefolder, "CHUNK", 16)  # 50 images: 4 chunks, each with its own checksum
    first = load_dataset(f"imagefolder:{root}", cache_dir=cache, workers=1, progress=False)
    reference = first.images.clone()
    entry = _entry_of(cache)
    pattern = damage(entry)
    decoded = []
    real = imagefolder._decode_chunk
    monkeypatch.setattr(imagefolder, "_decode_chunk", lambda *a: decoded.append(a[2]) or real(*a))
    with caplog.at_level("WARNING", logger="widthkit.inputs.imagefolder"):
        again = load_dataset(f"imagefolder:{root}", cache_dir=cache, workers=1, progress=False)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"the image cache entry {entry} is damaged (")
    assert re.search(pattern, messages[0]) and messages[0].endswith("; decoding it again")
    assert sorted(decoded) == [0, 16, 32, 48]  # decoded again, all of it
    assert torch.equal(again.images, reference) and _entry_of(cache) == entry
    caplog.clear()
    load_dataset(f"imagefolder:{root}", cache_dir=cache, workers=1, progress=False)
    assert not caplog.records and len(decoded) == 4  # repaired: read as it is


def test_a_damaged_entry_in_a_read_only_cache_is_refused_with_its_path(tmp_path, tiny_disk):
    root = digits_folder(tmp_path / "digits")
    cache = tiny_disk / "cache"
    load_dataset(f"imagefolder:{root}", cache_dir=cache, workers=1, progress=False)
    entry = _entry_of(cache)
    _damage_garbage(entry)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    with pytest.raises(OSError, match=rf"the image cache entry {re.escape(str(entry))} is damaged \(images 0\.\.49 do "
                                      r"not match their checksum\) and cannot be built in .*Read-only file system\); "
                                      r"pass --cache-dir DIR"):
        load_dataset(f"imagefolder:{root}", cache_dir=cache, workers=1, progress=False)


# ------------------------------------------------------------------------------- a subset from its split's cache


def _count_decodes(monkeypatch):
    decoded = []
    real = imagefolder._decode_chunk
    monkeypatch.setattr(imagefolder, "_decode_chunk", lambda *a: decoded.append(len(a[3])) or real(*a))
    return decoded


def test_a_subset_of_a_cached_split_is_read_from_it(tmp_path, monkeypatch):
    root = digits_folder(tmp_path / "digits")
    cache = tmp_path / "cache"
    monkeypatch.setattr(imagefolder, "STATS_SAMPLE", 20)  # the statistics come from a subset of the 50 train images
    decoded = _count_decodes(monkeypatch)
    full = load_dataset(f"imagefolder:{root}", cache_dir=cache, workers=1, normalize="dataset", progress=False)
    assert sum(decoded) == 50  # once: the statistics' sample was read from the split's entry, not decoded again
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 1
    sample = widthkit.runtime.random_subset(50, 20, 0)
    mean = full.images[sample].double().mean().item() / 255
    assert full.mean == pytest.approx((mean,), rel=1e-12)  # the sample's statistics
    sub = load_dataset(f"imagefolder:{root}", subset=7, subset_seed=5, cache_dir=cache, workers=1, progress=False)
    assert sum(decoded) == 50 and sorted(p.name for p in cache.iterdir() if p.is_dir()) == entries
    assert torch.equal(sub.images, full.images[widthkit.runtime.random_subset(50, 7, 5)])
    assert sub.full_size == 50 and sub.mean == full.mean and sub.fingerprint != full.fingerprint
    # a subset asked for first decodes only its own files, into an entry of its own
    only = load_dataset(f"imagefolder:{root}", split="test", subset=6, cache_dir=cache, workers=1, progress=False)
    assert sum(decoded) == 56 and len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert torch.equal(only.images[0], torch.from_numpy(np.asarray(Image.open(
        sorted((root / "test").rglob("*.png"), key=lambda p: (p.parent.name, p.name))[
            int(widthkit.runtime.random_subset(30, 6, 0)[0])]))[None].copy()))


SLOW_BUILDER = STOP_HERE + """
# argv: ROOT CACHE MARKER GO: builds the whole train split (chunks of 8, one process); the first chunk tells the
# test that the build lock is held (MARKER) and waits for GO before it decodes
from widthkit.inputs import imagefolder
from widthkit.inputs.data import load_dataset

root, cache, marker, go = sys.argv[1:5]
imagefolder.CHUNK = 8
real = imagefolder._decode_chunk


def decode(target, shape, start, paths, transform):
    if start == 0:
        with open(marker + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(marker + ".tmp", marker)
        while not os.path.exists(go):
            time.sleep(0.01)
    return real(target, shape, start, paths, transform)


imagefolder._decode_chunk = decode
load_dataset("imagefolder:" + root, workers=1, cache_dir=cache, normalize="dataset", progress=False)
"""


def test_a_subset_waits_for_its_split_being_cached_and_reads_from_it(tmp_path, spawn, monkeypatch):
    import threading

    root = digits_folder(tmp_path / "digits")
    cache = tmp_path / "cache"
    proc, log = spawn(python_child(SLOW_BUILDER, root, cache, tmp_path / "marker", tmp_path / "go"))
    wait_for_marker(tmp_path / "marker", proc, log)  # the other process holds the whole split's build lock
    decoded = _count_decodes(monkeypatch)
    got = {}
    reader = threading.Thread(target=lambda: got.setdefault("ds", load_dataset(
        f"imagefolder:{root}", subset=9, cache_dir=cache, workers=1, normalize="dataset", progress=False)))
    reader.start()
    while not any(line.split()[1] == "->" and line.split()[5] == str(os.getpid()) for line in open("/proc/locks")):
        assert reader.is_alive()  # until this process waits for the build lock (no deadline: pytest-timeout)
    (tmp_path / "go").touch()
    reader.join()
    assert proc.wait() == 0
    assert decoded == []  # this process decoded nothing: it waited for the other and read its rows
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1
    full = load_dataset(f"imagefolder:{root}", cache_dir=cache, progress=False)
    assert torch.equal(got["ds"].images, full.images[widthkit.runtime.random_subset(50, 9, 0)])


# ------------------------------------------------------------------------------- a model that does not fit


def _no_decoding(*a, **k):
    raise AssertionError("the folder was decoded before the model was checked against it")


def test_a_class_count_the_model_lacks_is_found_before_decoding(digits_ckpts, tmp_path, monkeypatch, capsys):
    root = digits_folder(tmp_path / "digits")
    for split in ("train", "test"):  # two more classes than the checkpoint's 10 outputs
        for c in ("x1", "x2"):
            (root / split / c).mkdir()
            Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(root / split / c / "0.png")
    monkeypatch.setattr(imagefolder, "_decode_chunk", _no_decoding)
    rays_cli = importlib.import_module("widthkit.rays")
    out = tmp_path / "r.h5"
    assert rays_cli.main(["--ckpt", digits_ckpts["sgd"], "--data", f"imagefolder:{root}", "--cache-dir",
                          str(tmp_path / "cache"), "--out", str(out), "--no-plot", "--dirs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: the imagefolder:{root} train labels run from 0 to 11, but "
                                               "the model has 10 outputs")
    assert not out.exists() and not list((tmp_path / "cache").glob("*/images.u8*"))


def test_a_channel_count_the_model_lacks_is_found_before_decoding(digits_ckpts, tmp_path, monkeypatch):
    root = digits_folder(tmp_path / "digits")
    for p in root.rglob("*.png"):  # RGB photos of the digits: 3 channels for a 1-channel model
        with Image.open(p) as img:
            rgb = img.convert("RGB")
        rgb.save(p)
    monkeypatch.setattr(imagefolder, "_decode_chunk", _no_decoding)
    with pytest.raises(ValueError, match=rf"the model cannot take the imagefolder:{re.escape(str(root))} inputs, "
                                         r"shaped \(3, 8, 8\) per example"):
        widthkit.rays(digits_ckpts["sgd"], f"imagefolder:{root}", dirs=1, steps=2, cache_dir=tmp_path / "cache",
                      device="cpu")
    assert not list((tmp_path / "cache").glob("*/images.u8*"))


def test_the_preview_is_what_the_full_load_gives(tmp_path):
    root = digits_folder(tmp_path / "digits")
    train, test = data.preview_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    full = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache", progress=False)
    assert train.labels.tolist() == [0, 9] and train.num_classes == full.num_classes == 10
    assert torch.equal(train.images[0], full.images[0]) and torch.equal(train.images[1], full.images[45])
    assert test.images.shape == (2, 1, 8, 8) and data.preview_dataset("digits") is None


# ------------------------------------------------------------------------------- a decompression bomb


def _png_claiming(path, width, height):
    """A PNG whose header claims ``width`` x ``height`` 8-bit gray pixels (the IHDR chunk with its CRC), with one
    tiny IDAT: opening it reads only the header, as a decompression bomb is met."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("image_size, workers", [(None, 1), (16, 1), (16, 2)])
def test_a_decompression_bomb_is_one_line_naming_the_file(tmp_path, monkeypatch, image_size, workers):
    from PIL import Image as PILImage

    root = digits_folder(tmp_path / "digits")
    bomb = root / "train" / "3" / "bomb.png"
    _png_claiming(bomb, 30000, 30000)
    with pytest.raises(PILImage.DecompressionBombError):
        PILImage.open(bomb)  # what PIL itself does with it
    monkeypatch.setattr(imagefolder, "CHUNK", 8)  # several chunks: with 2 workers a process pool decodes
    with pytest.raises(ValueError) as err:
        load_dataset(f"imagefolder:{root}", image_size=image_size, workers=workers, cache_dir=tmp_path / "c",
                     progress=False)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"image {bomb} claims more pixels than PIL decodes safely")
    assert "900000000 pixels" in message and "remove it from the folder" in message


# ------------------------------------------------------------------------------- an unreadable class folder


def _as_unprivileged_user(fn) -> str:
    """``fn()`` in a forked child that first drops root to the user nobody (root reads any folder, whatever its
    mode: only another user meets a chmod 000 folder as users do). Returns what it returned or raised, as text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                text = f"ok: {fn()}"
            except Exception as e:
                text = f"{type(e).__name__}: {e}"
            os.write(w, text.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def test_an_unreadable_class_folder_is_named_as_unreadable(tmp_path):
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="widthkit-perm-"))  # under /tmp, which the user nobody can enter
    try:
        base.chmod(0o755)
        root = digits_folder(base / "digits")
        listed = _as_unprivileged_user(lambda: len(imagefolder.list_folder(root, "x").files["train"]))
        assert listed == "ok: 50"  # as that user, the folder as it is lists
        (root / "test" / "4").chmod(0o000)
        (root / "train" / "7" / "deeper").mkdir()
        got = _as_unprivileged_user(lambda: load_dataset(f"imagefolder:{root}", split="test", progress=False))
        assert got == (f"PermissionError: the image folder {root / 'test' / '4'} cannot be read (Permission denied); "
                       "give this user read and search permission on it (chmod a+rx), or move it out of the class "
                       "folders"), got
        (root / "test" / "4").chmod(0o755)
        (root / "train" / "7" / "deeper").chmod(0o300)  # a sub-folder of a class: searchable, not listable
        got = _as_unprivileged_user(lambda: imagefolder.list_folder(root, "x"))
        assert got.startswith(f"PermissionError: the image folder {root / 'train' / '7' / 'deeper'} cannot be read")
    finally:
        for p in base.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)
        shutil.rmtree(base)
