"""Real data and real objectives: photo folders through the decoded cache, uint8 and streamed splits, loss=,
metrics= and forward= (issue: ImageNet-size folders, data larger than memory, any loss and metric)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import widthkit
import importlib
from widthkit.engine.config import EvalConfig
from widthkit.engine.evaluator import EvalSet, Evaluator
from widthkit.inputs import imagefolder
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit.report.store import read
from widthkit.runtime import RuntimeConfig

CPU = RuntimeConfig(device="cpu")  # these tests check CPU arithmetic, on a GPU host too

rays_cli = importlib.import_module("widthkit.rays")
SMALL = ["--train-subset", "160", "--test-subset", "120", "--bn-subset", "64", "--device", "cpu"]


# --------------------------------------------------------------------------------------------- photo folders


def _photo(path, size, mode, seed, fmt):
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2] //= 2  # some structure, so a crop off by one pixel would show
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_photo_folder(root, n_per_class=3, test_dir="val"):
    """train/ and val/ of two classes; JPEG and PNG; RGB, grayscale, RGBA and palette; all sizes differ."""
    kinds = [("RGB", "JPEG", ".jpg"), ("L", "PNG", ".png"), ("RGBA", "PNG", ".png"), ("P", "PNG", ".png"),
             ("L", "JPEG", ".jpeg")]
    k = 0
    for split in ("train", test_dir):
        for c in ("cat", "dog"):
            for i in range(n_per_class):
                mode, fmt, ext = kinds[k % len(kinds)]
                size = (20 + 3 * k, 15 + 2 * ((k * 7) % 11))  # landscape and portrait, odd and even
                _photo(root / split / c / f"img{i}{ext}", size, mode, k, fmt)
                k += 1
    return root


@pytest.mark.timeout(60)
@pytest.mark.parametrize("image_size", [None, 16])
def test_photo_transform_equals_torchvision(tmp_path, image_size):
    from torchvision.transforms import v2

    root = make_photo_folder(tmp_path / "photos")
    for split, folder in (("train", "train"), ("test", "val")):
        ds = load_dataset(f"imagefolder:{root}", split=split, image_size=image_size, progress=False)
        crop = image_size or 224
        resize = {None: 256, 16: 18}[image_size]
        tv = v2.Compose([v2.Resize(resize), v2.CenterCrop(crop), v2.PILToTensor()])
        files = sorted((root / folder).rglob("*.*"))
        assert ds.images.shape == (len(files), 3, crop, crop) and ds.images.dtype == torch.uint8
        assert ds.classes == ("cat", "dog") and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
        for i, f in enumerate(files):
            with Image.open(f) as img:
                expected = tv(img.convert("RGB"))
            assert torch.equal(ds.images[i], expected), f.name
        assert ds.mean == imagefolder.IMAGENET_MEAN  # resized photos: the constants pretrained models expect


@pytest.mark.timeout(60)
def test_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    root = make_photo_folder(tmp_path / "photos")
    first = load_dataset(f"imagefolder:{root}", split="test", image_size=16, progress=False)
    assert first.cache and (root / ".widthkit-cache").is_dir()

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache holds these images")

    monkeypatch.setattr(imagefolder, "_decode_chunk", no_decoding)
    again = load_dataset(f"imagefolder:{root}", split="test", image_size=16, progress=False)
    assert torch.equal(first.images, again.images) and again.cache == first.cache
    # a subset of a cached split is read from it; a touched file or another transform is another entry (and
    # would decode)
    sub = load_dataset(f"imagefolder:{root}", split="test", image_size=16, subset=4, progress=False)
    assert torch.equal(sub.images, first.images[widthkit.runtime.random_subset(len(first), 4, 0)])
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(f"imagefolder:{root}", split="test", image_size=20, progress=False)
    f = sorted((root / "val").rglob("*.png"))[0]
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(f"imagefolder:{root}", split="test", image_size=16, progress=False)


def _uniform_folder(root, n, classes=2, size=(6, 5)):
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        p = root / f"c{i % classes}" / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
    return root


@pytest.mark.timeout(90)
def test_parallel_workers_equal_one_process_and_subset_decodes_only_its_files(tmp_path):
    root = _uniform_folder(tmp_path / "u", 2 * imagefolder.CHUNK + 40)
    one = load_dataset(f"imagefolder:{root}", workers=1, cache_dir=tmp_path / "c1", progress=False)
    many = load_dataset(f"imagefolder:{root}", workers=2, cache_dir=tmp_path / "c2", progress=False)
    assert one.images.shape == (2 * imagefolder.CHUNK + 40, 3, 5, 6)  # one size: kept as it is
    assert torch.equal(one.images, many.images) and torch.equal(one.labels, many.labels)
    files = sorted(root.rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    with Image.open(files[-1]) as img:
        assert torch.equal(one.images[-1], torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))
    assert one.mean != imagefolder.IMAGENET_MEAN  # not resized: the data's own statistics
    sub = load_dataset(f"imagefolder:{root}", subset=10, subset_seed=3, cache_dir=tmp_path / "c3", progress=False)
    idx = widthkit.runtime.random_subset(len(files), 10, 3)
    assert sub.full_size == len(files) and torch.equal(sub.images, one.images[idx])
    entry = next(p for p in (tmp_path / "c3").iterdir() if p.name.startswith("train-") and p.is_dir()
                 and (p / "images.u8").stat().st_size == 10 * 3 * 5 * 6)
    assert entry.is_dir()


KILLED_BUILD = """
import sys, time
from widthkit.inputs import imagefolder
from widthkit.inputs.data import load_dataset

real = imagefolder._decode_chunk
calls = []
def slow(*a):
    calls.append(1)
    if len(calls) > 1:
        time.sleep(600)  # killed here, after the first chunk is marked done
    return real(*a)
imagefolder._decode_chunk = slow
load_dataset("imagefolder:" + sys.argv[1], workers=1, cache_dir=sys.argv[2], progress=False)
"""


@pytest.mark.timeout(90)
def test_killed_build_resumes_where_it_stopped(tmp_path, monkeypatch):
    root = _uniform_folder(tmp_path / "u", 3 * imagefolder.CHUNK)
    cache = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(root), str(cache)])
    try:
        while True:  # no deadline of our own: pytest-timeout bounds the wait
            marks = list(cache.glob("train-*/done.bin"))
            if marks and any(marks[0].read_bytes()):  # a chunk is marked done
                break
            assert child.poll() is None, "the build finished or failed before it could be killed"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert not list(cache.glob("train-*/meta.json"))  # not complete
    decoded = []
    real = imagefolder._decode_chunk
    monkeypatch.setattr(imagefolder, "_decode_chunk", lambda *a: decoded.append(a[2]) or real(*a))
    resumed = load_dataset(f"imagefolder:{root}", workers=1, cache_dir=cache, progress=False)
    assert sorted(decoded) == [imagefolder.CHUNK, 2 * imagefolder.CHUNK]  # chunk 0 was kept
    fresh = load_dataset(f"imagefolder:{root}", workers=1, cache_dir=tmp_path / "fresh", progress=False)
    assert torch.equal(resumed.images, fresh.images)
    assert not list(cache.glob("train-*/done.bin")) and not list(cache.glob("train-*/*.partial"))


def test_missing_and_unwritable_cache_give_clear_errors(tmp_path):
    root = make_photo_folder(tmp_path / "photos", n_per_class=1)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match="cannot create the image cache folder .*--cache-dir"):
        load_dataset(f"imagefolder:{root}", image_size=8, cache_dir=blocker / "cache", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}", progress=False)


# --------------------------------------------------------------------------------------------- uint8, streaming


def test_uint8_storage_and_streaming_equal_resident(digits_ckpts):
    ck = load_checkpoint(digits_ckpts["sgd"])
    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    resident = EvalSet.from_dataset(tr, "cpu")
    streamed = EvalSet.from_dataset(tr, "cpu", max_memory="1KB")
    assert resident.x.dtype == torch.uint8 and resident.nbytes * 4 == tr.normalized().numel() * 4
    assert resident.resident and not streamed.resident and "streamed" in streamed.describe()
    torch.testing.assert_close(torch.cat([x for x, _ in streamed.batches(100)]), tr.normalized(), rtol=0, atol=0)
    ring = streamed._ring  # the read-ahead buffers are kept for the next pass, not allocated at every point
    torch.testing.assert_close(torch.cat([x for x, _ in streamed.batches(100)]), tr.normalized(), rtol=0, atol=0)
    assert ring is not None and streamed._ring is ring
    # a streamed split reads batches through the prefetch ring; numbers are bit-identical
    batches_r = torch.cat([x for x, _ in resident.batches(100)])
    torch.testing.assert_close(batches_r, tr.normalized(), rtol=0, atol=0)
    for bn in ("recompute", "keep"):
        cfg = EvalConfig(bn_mode=bn, bn_subset=300, weight_decay=5e-4)
        ev_r = Evaluator(ck.model, tr, te, cfg, runtime=CPU)
        ev_s = Evaluator(ck.model, tr, te, cfg.replace(max_memory="1KB"), runtime=CPU)
        d = torch.randn(2, ev_r.layout.size)
        coords = np.array([[0.0, 0.0], [0.5, -0.3], [1.0, 1.0]])
        a = ev_r.evaluate(ev_r.theta0, d, coords)
        b = ev_s.evaluate(ev_s.theta0, d, coords)
        for m in a:
            np.testing.assert_array_equal(a[m], b[m])


def test_streamed_rays_equal_resident_rays(digits_ckpts, tmp_path):
    common = dict(dirs=2, steps=3, max_dist=5.0, train_subset=160, test_subset=120, bn_subset=64, device="cpu")
    a = widthkit.rays([digits_ckpts["sgd"]], **common)
    b = widthkit.rays([digits_ckpts["sgd"]], max_memory="2KB", **common)
    for m, v in a.models["sgd"]["metrics"].items():
        np.testing.assert_array_equal(v, b.models["sgd"]["metrics"][m])


# --------------------------------------------------------------------------------------------- objectives


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x)


def test_regression_with_mse_through_rays(tmp_path):
    torch.manual_seed(0)
    model = Regressor().eval()
    xtr, xte = torch.randn(96, 5), torch.randn(40, 5)
    w = torch.randn(5, 2)
    ytr, yte = xtr @ w + 0.1 * torch.randn(96, 2), xte @ w
    res = widthkit.rays(model, ((xtr, ytr), (xte, yte)), dirs=2, steps=4, max_dist=2.0, loss="mse",
                        bn_mode="keep", out=tmp_path / "reg.h5", device="cpu")
    metrics = res.models["model0"]["metrics"]
    assert sorted(metrics) == ["test_loss", "train_loss"]
    axes = read(tmp_path / "reg.h5", load_large=True)["axes"]
    dirs, dist = axes["directions"], axes["distances"]
    theta0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    for i in range(2):
        for j in range(4):  # a per-point loop: write the weights, run the model, mean squared error
            m = Regressor().eval()
            m.load_state_dict(model.state_dict())
            torch.nn.utils.vector_to_parameters(theta0 + float(dist[j]) * torch.as_tensor(dirs[i]).float(),
                                                m.parameters())
            with torch.no_grad():
                expect = F.mse_loss(m(xte), yte).item()
            np.testing.assert_allclose(metrics["test_loss"][i, j], expect, rtol=1e-5)
    assert res.default_thresholds() == ["train_loss=x2", "test_loss=x2"]
    import matplotlib.pyplot as plt

    ax = res.plot(metric="test_loss")
    assert ax.get_ylabel() == "test loss (mse)"  # the loss the file records, not nats
    plt.close(ax.figure)
    assert res.widths("test_loss=x2")["per_direction"]["model0"].shape == (2,)
    assert read(tmp_path / "reg.h5")["config"]["eval"]["loss"] == "mse"


class DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, batch):
        return {"logits": self.fc(batch["pixels"])}


def test_forward_adapter_for_a_dict_model_and_top5_and_class_errors():
    torch.manual_seed(1)
    model = DictModel().eval()
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    ev = Evaluator(model, (x, y), (x, y), EvalConfig(bn_mode="keep", metrics="loss,err,top5_err,class_err:2",
                                                     forward=lambda m, xb: m({"pixels": xb})["logits"]),
                   runtime=CPU.replace(eval_batch_size=16))
    got = ev.evaluate_weights(ev.theta0)
    with torch.no_grad():
        logits = model({"pixels": x})["logits"]
    assert got["test_loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    wrong = [int(logits[i].argmax()) != int(y[i]) for i in range(50)]
    assert got["test_err"] == pytest.approx(100 * sum(wrong) / 50)
    assert got["test_top5_err"] == 0.0  # 3 classes: the top 5 always hold the label
    in2 = [i for i in range(50) if int(y[i]) == 2]
    assert got["test_class_err_2"] == pytest.approx(100 * sum(wrong[i] for i in in2) / len(in2))
    with pytest.raises(ValueError, match="points_in_flight > 1 .* forward="):
        Evaluator(model, (x, y), (x, y), EvalConfig(bn_mode="keep", forward=lambda m, b: m(b)),
                  runtime=CPU.replace(points_in_flight=2))


def test_top5_error_against_a_hand_count():
    torch.manual_seed(2)
    model = nn.Linear(6, 10).eval()
    x, y = torch.randn(64, 6), torch.randint(0, 10, (64,))
    ev = Evaluator(model, (x, y), (x, y), EvalConfig(bn_mode="keep", metrics="top5_err"),
                   runtime=CPU.replace(eval_batch_size=10))
    with torch.no_grad():
        logits = model(x)
    misses = 0
    for i in range(64):
        ranked = sorted(range(10), key=lambda c: -float(logits[i, c]))
        misses += int(y[i]) not in ranked[:5]
    assert ev.evaluate_weights(ev.theta0)["test_top5_err"] == pytest.approx(100 * misses / 64)


class TinyLM(nn.Module):
    def __init__(self, vocab=11):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, vocab)

    def forward(self, ids):
        return self.out(self.emb(ids))


def test_token_level_loss_ignores_padding():
    torch.manual_seed(3)
    model = TinyLM().eval()
    ids = torch.randint(0, 11, (12, 7))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    labels[:3, 4:] = -100  # padding
    ev = Evaluator(model, (ids, labels), (ids, labels), EvalConfig(bn_mode="keep"), runtime=CPU.replace(eval_batch_size=5))
    got = ev.evaluate_weights(ev.theta0)
    with torch.no_grad():
        logits = model(ids)
    keep = labels != -100
    assert got["test_loss"] == pytest.approx(F.cross_entropy(logits[keep], labels[keep]).item(), rel=1e-6)
    assert got["test_err"] == pytest.approx(100 * (logits[keep].argmax(1) != labels[keep]).float().mean().item())


def test_custom_metric_callable_and_clear_errors():
    model = nn.Linear(3, 2).eval()
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))

    def margin(out, target):
        return out.gather(1, target[:, None]).squeeze(1) - out.max(dim=1).values

    ev = Evaluator(model, (x, y), (x, y), EvalConfig(bn_mode="keep", metrics={"margin": margin}), runtime=CPU)
    with torch.no_grad():
        expect = margin(model(x), y).mean().item()
    assert ev.evaluate_weights(ev.theta0)["train_margin"] == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="unknown metric 'top3'.*top5_err"):
        EvalConfig(metrics="loss,top3")
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*cross_entropy, mse"):
        EvalConfig(loss="hinge")
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        EvalConfig(loss="no_such_module:fn")
    with pytest.raises(ValueError, match="labels must be integer class indices.*loss='mse'"):
        Evaluator(model, (x, y.float()), (x, y.float()), EvalConfig(bn_mode="keep"), runtime=CPU)


def test_metrics_flag_and_threshold_on_top5(digits_ckpts, tmp_path, capsys):
    out = tmp_path / "r.h5"
    code = rays_cli.main(["--ckpt", digits_ckpts["sgd"], "--dirs", "2", "--steps", "3", "--max-dist", "30",
                          "--metrics", "loss,err,top5_err", "--threshold", "test_top5_err=+5", "--out", str(out),
                          "--figures", str(tmp_path / "figures"),
                          *SMALL])
    assert code == 0
    assert "width at test_top5_err=+5" in capsys.readouterr().out
    data = read(out)
    assert {"train_top5_err", "test_top5_err", "test_err"} <= set(data["models"]["sgd"]["metrics"])
    assert data["config"]["eval"]["metrics"] == ["loss", "err", "top5_err"]
    top5, top1 = data["models"]["sgd"]["metrics"]["test_top5_err"], data["models"]["sgd"]["metrics"]["test_err"]
    assert (top5 <= top1 + 1e-9).all()


# --------------------------------------------------------------------------------------------- models


def test_timm_models_by_name(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install timm); not installed here")
    model = widthkit.create_model("timm:resnet18", num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 7) and timm.__version__
    path = tmp_path / "timm.pt"
    torch.save(model.state_dict(), path)  # the user's weights; nothing is downloaded
    ck = load_checkpoint(str(path), arch="timm:resnet18", num_classes=7)
    with torch.no_grad():
        torch.testing.assert_close(ck.model.eval()(x), model(x))


def test_timm_missing_or_unknown_is_a_clear_error():
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        with pytest.raises(ValueError, match="pip install timm"):
            widthkit.create_model("timm:resnet18")
    else:
        with pytest.raises(ValueError, match="timm has no model"):
            widthkit.create_model("timm:no_such_net_xyz")


@pytest.mark.timeout(120)
def test_rays_on_a_photo_folder_with_a_torchvision_model(tmp_path, capsys):
    """The issue's command on a folder of photos of mixed sizes (small crops to stay fast): a progress bar while
    the cache is built, and a second run that decodes nothing."""
    root = make_photo_folder(tmp_path / "photos", n_per_class=2, test_dir="test")
    torch.manual_seed(0)
    model = widthkit.create_model("torchvision:resnet18", num_classes=2)
    ckpt = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), ckpt)  # a plain state dict, as torchvision users save them
    argv = ["--ckpt", str(ckpt), "--arch", "torchvision:resnet18", "--data", f"imagefolder:{root}",
            "--image-size", "32", "--dirs", "2", "--steps", "3", "--bn-mode", "keep", "--out", str(tmp_path / "r.h5"),
            "--no-plot", "--device", "cpu"]
    assert rays_cli.main(argv) == 0
    assert "decoding" in capsys.readouterr().err  # the progress bar while the cache is built
    assert rays_cli.main(argv + ["--overwrite"]) == 0
    assert "decoding" not in capsys.readouterr().err
    data = read(tmp_path / "r.h5")
    assert data["models"][next(iter(data["models"]))]["done"].all()


CONCURRENT_LOAD = """
import sys
from widthkit.inputs import imagefolder
from widthkit.inputs.data import load_dataset

real = imagefolder._decode_chunk
decoded = []
imagefolder._decode_chunk = lambda *a: decoded.append(a[2]) or real(*a)
ds = load_dataset("imagefolder:" + sys.argv[1], workers=1, cache_dir=sys.argv[2], progress=False)
print(len(decoded), int(ds.images.sum()))
"""


@pytest.mark.timeout(90)
def test_concurrent_processes_build_the_cache_once(tmp_path):
    """Two processes (two torchrun ranks, two commands) open the same folder at once: one decodes, the other
    waits for it and memory-maps the result."""
    root = _uniform_folder(tmp_path / "u", 2 * imagefolder.CHUNK)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOAD, str(root), str(cache)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate()[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in outs) == [0, 2]  # one process decoded both chunks, the other none
    assert outs[0][1] == outs[1][1]  # the same pixels
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1


def test_figures_of_other_metrics_are_drawn_with_their_labels(digits_ckpts, tmp_path):
    """A line and rays holding only top-5 error and a metric of the user's own: every figure is drawn, the
    axes labelled from the metric names (top-5 error in %)."""
    import matplotlib.pyplot as plt

    def margin(out, y):
        return out.gather(1, y[:, None]).squeeze(1) - out.max(dim=1).values

    common = dict(train_subset=100, test_subset=80, bn_subset=64, metrics={"top5_err": "top5_err", "margin": margin},
                  device="cpu")
    line = widthkit.line([digits_ckpts["sgd"], digits_ckpts["swa"]], steps=4, **common)
    assert sorted(line.models["line"]["metrics"]) == ["test_margin", "test_top5_err", "train_margin",
                                                       "train_top5_err"]
    ax = line.plot()
    labels = {a.get_ylabel() for a in ax.figure.axes}
    assert labels == {"test top-5 error (%)", "test margin"}
    plt.close(ax.figure)
    rays = widthkit.rays([digits_ckpts["sgd"]], dirs=2, steps=3, max_dist=20.0, **common)
    ax = rays.plot(metric="test_top5_err")
    assert ax.get_ylabel() == "test top-5 error (%)"
    plt.close(ax.figure)
    assert rays.default_thresholds() == []  # no test_err and no loss: the user names the threshold
    assert rays.widths("test_top5_err=+5")["per_direction"]["SGD"].shape == (2,)
