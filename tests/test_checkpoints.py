"""widthkit.checkpoints: every layout written by its real producer loads back bit for bit; every bad input
fails with a message that names the file and the fix."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import tarfile
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from widthkit import models
from widthkit.inputs.checkpoints import (
    Checkpoint,
    CheckpointError,
    clean_state_dict,
    extract_state_dict,
    load_checkpoint,
    save_checkpoint,
)
from widthkit.runtime import provenance


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one intra-op thread avoids OpenMP spinning on a shared, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



def trained_cnn(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """digits_cnn with non-default weights and BN running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = models.create_model("digits_cnn", num_classes=num_classes)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model(torch.randn(16, 1, 8, 8))  # moves running_mean/var and num_batches_tracked
    return model.eval()


def mlp(seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return models.create_model("digits_mlp", **kw).eval()


def assert_same_model(ckpt: Checkpoint, source: nn.Module) -> None:
    """Weights identical tensor by tensor, and the same logits on a fixed batch."""
    expected = source.state_dict()
    loaded = ckpt.model.state_dict()
    assert list(ckpt.state_dict) == list(expected)
    assert list(loaded) == list(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v.cpu()), k
        assert torch.equal(ckpt.state_dict[k], v.cpu()), k
    assert not ckpt.model.training
    assert all(t.device.type == "cpu" for t in loaded.values())
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), source.eval()(x))


def sgd_step_optimizer_state(model: nn.Module) -> dict:
    """The state dict of a real SGD optimizer after one step on ``model`` (momentum buffers filled)."""
    work = copy.deepcopy(model).train()
    opt = torch.optim.SGD(work.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loss = nn.functional.cross_entropy(work(torch.randn(8, 1, 8, 8)), torch.arange(8) % 10)
    loss.backward()
    opt.step()
    return opt.state_dict()


def prefixed(sd: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------------
# widthkit's own format
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Cfg:
    lr: float = 0.05
    epochs: int = 3
    schedule: tuple = (0.5, 0.9)


def test_own_format_round_trip_with_meta(tmp_path):
    torch.manual_seed(3)
    model = models.create_model("digits_cnn", num_classes=7, width=4).eval()
    path = tmp_path / "runs" / "swa.pt"  # the folder is created
    out = save_checkpoint(path, model, arch="digits_cnn", num_classes=7, arch_kwargs={"width": 4, "in_channels": None},
                          dataset="digits", role="swa", config=_Cfg(),
                          metrics={"test_err": np.float64(4.5), "n": np.int64(3)},
                          extra={"epoch": 3, "path": tmp_path})
    assert out == str(path)

    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain types only
    assert raw["widthkit_checkpoint"] == 1
    assert set(raw) == {"widthkit_checkpoint", "arch", "arch_kwargs", "num_classes", "dataset", "role", "config",
                        "metrics", "extra", "provenance", "state_dict"}
    assert type(raw["metrics"]["test_err"]) is float and type(raw["metrics"]["n"]) is int

    ckpt = load_checkpoint(path)
    assert_same_model(ckpt, model)
    assert ckpt.meta == {
        "arch": "digits_cnn", "arch_kwargs": {"width": 4}, "num_classes": 7, "dataset": "digits", "role": "swa",
        "config": {"lr": 0.05, "epochs": 3, "schedule": (0.5, 0.9)}, "metrics": {"test_err": 4.5, "n": 3},
        "extra": {"epoch": 3, "path": str(tmp_path)}, "provenance": provenance(), "format": "widthkit", "which": None,
        "n_averaged": None, "epoch": None,
    }
    assert ckpt.path == str(path)
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_checkpoint(path, arch="digits_cnn", num_classes=7, which="swa").meta["which"] == "swa"


def test_save_copies_weights_and_leaves_the_model_alone(tmp_path):
    model = trained_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "a.pt", model, arch="digits_cnn", num_classes=10)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.fc.weight.add_(1.0)  # the file must not share memory with the model
    assert torch.equal(load_checkpoint(tmp_path / "a.pt").model.fc.weight, before["fc.weight"])


def test_save_strips_wrappers_and_accepts_state_dicts(tmp_path):
    model = trained_cnn()
    swa = AveragedModel(model)
    save_checkpoint(tmp_path / "swa.pt", swa, arch="digits_cnn", num_classes=10, role="swa")
    save_checkpoint(tmp_path / "dp.pt", nn.DataParallel(model).state_dict(), arch="digits_cnn", num_classes=10)
    for name in ("swa.pt", "dp.pt"):
        raw = torch.load(tmp_path / name, weights_only=True)
        assert list(raw["state_dict"]) == list(model.state_dict())
        assert_same_model(load_checkpoint(tmp_path / name), model)


def test_save_is_atomic(tmp_path, monkeypatch):
    model, path = mlp(), tmp_path / "m.pt"
    save_checkpoint(path, model, arch="digits_mlp", num_classes=10, role="sgd")
    old = path.read_bytes()
    save_checkpoint(path, mlp(seed=1), arch="digits_mlp", num_classes=10)  # overwrite works
    assert path.read_bytes() != old
    assert os.listdir(tmp_path) == ["m.pt"]

    current = path.read_bytes()

    def dies_halfway(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, mlp(seed=2), arch="digits_mlp", num_classes=10)
    assert path.read_bytes() == current  # the old file survives, no temporary file is left behind
    assert os.listdir(tmp_path) == ["m.pt"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"role": "best"}, r"role must be one of \['sgd', 'swa', 'iterate', 'start'\] or None, got 'best'"),
        ({"config": {"opt": object()}}, r"cannot save config\['opt'\]: it is a builtins.object"),
        ({"metrics": {1.5: 2}}, r"cannot save metrics: key 1.5 is a float; use str keys"),
        ({"arch": "nope"}, r"arch='nope' .* cannot be built.*unknown model 'nope'"),
        ({"arch": "digits_cnn"}, r"do not fit arch='digits_cnn'.*missing \[features\.0\.weight"),
        ({"num_classes": 3}, r"shapes \['fc2\.weight': \(10, 64\) vs \(3, 64\)"),
        ({"num_classes": 0}, r"num_classes must be a positive int, got 0"),
    ],
)
def test_save_rejects_bad_arguments(tmp_path, kwargs, message):
    args = {"arch": "digits_mlp", "num_classes": 10, **kwargs}
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(tmp_path / "x.pt", mlp(), **args)
    assert not os.listdir(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# other layouts, each written by its real producer
# ----------------------------------------------------------------------------------------------------------


def _averaged_model(model):
    swa = AveragedModel(model)
    swa.update_parameters(model)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.mul_(-0.5)
    swa.update_parameters(moved)  # now a real average of two different weight vectors
    return swa.state_dict(), swa.module


def _swa_authors(model, which):
    """Laid out like github.com/timgaripov/swa train.py: save_checkpoint(dir, epoch, state_dict=...,
    swa_state_dict=... or None, swa_n=... or None, optimizer=...)."""
    swa_model = trained_cnn(seed=9)
    state = {
        "epoch": 150,
        "state_dict": model.state_dict(),
        "swa_state_dict": swa_model.state_dict() if which != "sgd-only" else None,
        "swa_n": 25 if which != "sgd-only" else None,
        "optimizer": sgd_step_optimizer_state(model),
    }
    if which == "swa-only":
        del state["state_dict"]
    return state, (model if which == "sgd-only" else swa_model)


def _lightning(model):
    return _lightning_dict(model), model


def _lightning_dict(model):
    return {
        "epoch": 4,
        "global_step": 120,
        "pytorch-lightning_version": "2.2.0",
        "state_dict": prefixed(model.state_dict(), "model."),
        "optimizer_states": [sgd_step_optimizer_state(model)],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
    }


# name -> (producer(model) -> (object saved, source model), expected meta["format"], load kwargs)
LAYOUTS = {
    "bare": (lambda m: (m.state_dict(), m), "state_dict", {}),
    "averaged_model": (_averaged_model, "state_dict+averaged_model", {}),
    "data_parallel": (lambda m: (nn.DataParallel(m).state_dict(), m), "state_dict+data_parallel", {}),
    "compiled": (lambda m: (torch.compile(m).state_dict(), m), "state_dict+compiled", {}),
    "compiled_data_parallel": (lambda m: (torch.compile(nn.DataParallel(m)).state_dict(), m),
                               "state_dict+compiled+data_parallel", {}),
    "data_parallel_compiled": (lambda m: (nn.DataParallel(torch.compile(m)).state_dict(), m),
                               "state_dict+compiled+data_parallel", {}),
    "averaged_data_parallel": (lambda m: (AveragedModel(nn.DataParallel(m)).state_dict(), m),
                               "state_dict+averaged_model+data_parallel", {}),
    "compiled_submodule": (lambda m: (_compile_features(m).state_dict(), m), "state_dict+compiled", {}),
    "dict_state_dict": (lambda m: ({"epoch": 3, "state_dict": m.state_dict(),
                                    "optimizer": sgd_step_optimizer_state(m)}, m), "dict:state_dict", {}),
    "dict_model": (lambda m: ({"model": m.state_dict(), "args": {"lr": 0.1}}, m), "dict:model", {}),
    "dict_model_state": (lambda m: ({"model_state": m.state_dict()}, m), "dict:model_state", {}),
    "dict_model_state_dict": (lambda m: ({"model_state_dict": m.state_dict(), "epoch": 2}, m),
                              "dict:model_state_dict", {}),
    "dict_net": (lambda m: ({"net": nn.DataParallel(m).state_dict(), "acc": 91.0}, m), "dict:net+data_parallel", {}),
    "lightning": (_lightning, "lightning", {}),
    "lightning_compiled": (lambda m: ({"pytorch-lightning_version": "2.2.0",
                                       "state_dict": prefixed(torch.compile(m).state_dict(), "net.")}, m),
                           "lightning+compiled", {}),
    "model_prefix_without_lightning": (lambda m: (prefixed(m.state_dict(), "model."), m), "state_dict+lightning", {}),
    "swa_authors_swa": (lambda m: _swa_authors(m, "both"), "swa_authors", {"which": "swa"}),
    "swa_authors_sgd": (lambda m: _swa_authors(m, "both"), "swa_authors", {"which": "sgd"}),
    "swa_authors_sgd_only": (lambda m: _swa_authors(m, "sgd-only"), "swa_authors", {}),
    "swa_authors_swa_only": (lambda m: _swa_authors(m, "swa-only"), "swa_authors", {}),
}


def _compile_features(model):
    wrapped = copy.deepcopy(model)
    wrapped.features = torch.compile(wrapped.features)
    return wrapped


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_load_identically(tmp_path, layout):
    produce, expected_format, load_kwargs = LAYOUTS[layout]
    model = trained_cnn()
    obj, source = produce(model)
    if layout == "swa_authors_sgd":
        source = model
    path = tmp_path / f"{layout}.pt"
    torch.save(obj, path)
    ckpt = load_checkpoint(path, arch="digits_cnn", **load_kwargs)
    assert_same_model(ckpt, source)
    assert ckpt.meta["format"] == expected_format
    assert ckpt.meta["arch"] == "digits_cnn" and ckpt.meta["num_classes"] == 10


def test_meta_of_averaged_and_swa_authors_files(tmp_path):
    model = trained_cnn()
    torch.save(_averaged_model(model)[0], tmp_path / "avg.pt")
    assert load_checkpoint(tmp_path / "avg.pt", arch="digits_cnn").meta["n_averaged"] == 2

    torch.save(_swa_authors(model, "both")[0], tmp_path / "swa.pt")
    swa = load_checkpoint(tmp_path / "swa.pt", arch="digits_cnn", which="swa").meta
    assert (swa["which"], swa["role"], swa["n_averaged"], swa["epoch"]) == ("swa", "swa", 25, 150)
    sgd = load_checkpoint(tmp_path / "swa.pt", arch="digits_cnn", which="sgd").meta
    assert (sgd["which"], sgd["role"], sgd["n_averaged"], sgd["epoch"]) == ("sgd", "sgd", None, 150)
    only = load_checkpoint(tmp_path / "swa.pt", arch="digits_cnn", which="sgd")
    assert only.meta["format"] == "swa_authors"


def test_state_dict_without_num_batches_tracked_loads(tmp_path):
    """State dicts from PyTorch < 0.4.1 (e.g. the SWA authors' era) lack BatchNorm's num_batches_tracked."""
    model = trained_cnn()
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pt")
    ckpt = load_checkpoint(tmp_path / "old.pt", arch="digits_cnn")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), model(x))


def test_extract_state_dict_on_loaded_objects():
    sd = mlp().state_dict()
    out, info = extract_state_dict({"model": prefixed(sd, "module.")})
    assert list(out) == list(sd) and info["format"] == "dict:model+data_parallel"
    assert out["fc1.weight"] is sd["fc1.weight"]  # no copies


def test_clean_state_dict_by_hand():
    w, b, n = torch.ones(2, 2), torch.zeros(2), torch.tensor(7)
    sd = {"n_averaged": n, "module._orig_mod.fc.weight": w, "module._orig_mod.fc.bias": b}
    assert clean_state_dict(sd) == {"fc.weight": w, "fc.bias": b}
    assert list(sd) == ["n_averaged", "module._orig_mod.fc.weight", "module._orig_mod.fc.bias"]  # untouched
    assert list(clean_state_dict({"_orig_mod.module.model.a": w, "_orig_mod.module.model.b": b})) == ["a", "b"]
    assert list(clean_state_dict({"layer._orig_mod.conv.weight": w})) == ["layer.conv.weight"]
    # a prefix only goes when every key has it; model. is stripped once (a Lightning module's attribute)
    assert list(clean_state_dict({"module.a": w, "b": b})) == ["module.a", "b"]
    assert list(clean_state_dict({"model.model.a": w})) == ["model.a"]
    assert list(clean_state_dict({"n_averaged": n, "c": w})) == ["n_averaged", "c"]
    assert list(clean_state_dict({"net.a": w})) == ["net.a"]  # net. only goes in Lightning files


# ----------------------------------------------------------------------------------------------------------
# architecture detection
# ----------------------------------------------------------------------------------------------------------


def test_detects_arch_and_num_classes_from_a_bare_state_dict(tmp_path):
    model = mlp(num_classes=3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert (ckpt.meta["arch"], ckpt.meta["num_classes"], ckpt.meta["format"]) == ("digits_mlp", 3, "state_dict")
    assert_same_model(ckpt, model)

    # non-default options: detection builds the candidates with the given arch_kwargs
    wide = mlp(num_classes=4, hidden=32)
    torch.save({"model": wide.state_dict()}, tmp_path / "w.pt")
    ckpt = load_checkpoint(tmp_path / "w.pt", arch_kwargs={"hidden": 32})
    assert (ckpt.meta["arch"], ckpt.meta["num_classes"], ckpt.meta["arch_kwargs"]) == ("digits_mlp", 4, {"hidden": 32})
    assert_same_model(ckpt, wide)


def test_num_classes_inferred_when_arch_is_given(tmp_path):
    model = trained_cnn(num_classes=100)
    torch.save(model.state_dict(), tmp_path / "c100.pt")
    ckpt = load_checkpoint(tmp_path / "c100.pt", arch="digits_cnn")
    assert ckpt.meta["num_classes"] == 100
    assert_same_model(ckpt, model)


def test_aliases_of_one_network_are_not_ambiguous(tmp_path):
    """'preresnet' (default depth 110) and 'preresnet110' build the same network: take the specific name."""
    with torch.device("meta"):
        meta = models.create_model("preresnet110").state_dict()
    sd = {k: torch.ones(v.shape, dtype=v.dtype) for k, v in meta.items()}  # stand-in weights of the right shapes
    torch.save(sd, tmp_path / "p.pt")
    ckpt = load_checkpoint(tmp_path / "p.pt")
    assert ckpt.meta["arch"] == "preresnet110" and ckpt.meta["num_classes"] == 10
    assert all(torch.equal(v, sd[k]) for k, v in ckpt.model.state_dict().items())


def test_alias_registered_by_a_user_is_not_ambiguous(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # registrations vanish after the test
    models.register_model("digits_mlp_small")(lambda num_classes=10: models.DigitsMLP(num_classes, hidden=64))
    model = mlp(num_classes=5)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ckpt = load_checkpoint(tmp_path / "m.pt")
    assert (ckpt.meta["arch"], ckpt.meta["num_classes"]) == ("digits_mlp_small", 5)
    assert_same_model(ckpt, model)


class _TanhMLP(models.DigitsMLP):
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.flatten(x, 1))))


def test_ambiguous_detection_lists_the_candidates(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))  # registrations vanish after the test
    models.register_model("digits_tanh_mlp", input_shape=(1, 8, 8))(lambda num_classes=10: _TanhMLP(num_classes))
    torch.save(mlp().state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m\.pt: the weights fit several registered models "
                                              r"\('digits_mlp', 'digits_tanh_mlp'\); pass arch=NAME "
                                              r"\(CLI: --arch NAME\)"):
        load_checkpoint(tmp_path / "m.pt")
    assert load_checkpoint(tmp_path / "m.pt", arch="digits_tanh_mlp").meta["arch"] == "digits_tanh_mlp"


def test_no_registered_model_matches(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"odd\.pt: no registered model matches these weights \(2 tensors, "
                                              r"first keys: encoder\.weight, decoder\.bias\); registered: digits_cnn"):
        load_checkpoint(tmp_path / "odd.pt")


# ----------------------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------------------


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint file .*nothere\.pt does not exist"):
        load_checkpoint(tmp_path / "nothere.pt")
    with pytest.raises(CheckpointError, match=r"is a folder; pass the checkpoint file inside it"):
        load_checkpoint(tmp_path)


def _torch_complaints(path) -> list[str]:
    """What torch.load(weights_only=True) itself says about ``path``: its message and the one it wraps."""
    with pytest.raises(Exception) as info:
        torch.load(path, map_location="cpu", weights_only=True)
    return [str(e) for e in (info.value, info.value.__context__) if e is not None]


def assert_cut_cleanly(msg: str, torch_said: list[str]) -> None:
    """The corrupt-file message quotes torch's complaint whole, or cut after a sentence or between words,
    never inside a word or a `backtick span`."""
    match = re.search(r"torch\.load failed with (\w+)(?:: (.*?))?; copy or save the file again", msg)
    assert match, msg
    quoted = match.group(2) or ""
    assert quoted.count("`") % 2 == 0, quoted
    head = quoted[: -len(" ...")] if quoted.endswith(" ...") else quoted
    sources = [" ".join(t.split()) for t in torch_said]
    # a prefix of what torch said, ending where a word or a sentence ends
    assert any(src.startswith(head) and (len(src) == len(head) or src[len(head)] in " .") for src in sources), (
        quoted, sources)
    assert len(quoted) <= 170


@pytest.mark.parametrize("damage", ["truncated", "junk", "empty", "truncated_legacy"])
def test_corrupt_files(tmp_path, damage):
    path = tmp_path / "bad.pt"
    legacy = damage == "truncated_legacy"
    torch.save(mlp().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes({"junk": b"this is not a checkpoint at all", "empty": b""}.get(damage, data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match=r"bad\.pt \(\d+ bytes\) is truncated or corrupt: torch\.load failed "
                                              r"with \w+.*copy or save the file again") as info:
        load_checkpoint(path, arch="digits_mlp")
    assert_cut_cleanly(str(info.value), _torch_complaints(path))
    assert "refused" not in str(info.value)


@pytest.mark.parametrize("seed", range(6))
def test_random_bytes_are_corrupt_and_the_reason_is_cut_cleanly(tmp_path, seed):
    rng = np.random.default_rng(seed)
    path = tmp_path / "noise.pt"
    path.write_bytes(rng.integers(0, 256, size=int(rng.choice([7, 100, 4096])), dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=r"noise\.pt \(\d+ bytes\) is truncated or corrupt") as info:
        load_checkpoint(path)
    assert_cut_cleanly(str(info.value), _torch_complaints(path))
    assert "Re-running `torch.;" not in str(info.value)


# torch 2.14's preamble to a weights-only failure: longer than the quote, with `backtick spans` to keep whole
_PREAMBLE = (
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted source."
)


@pytest.mark.parametrize("text", [
    _PREAMBLE,
    _PREAMBLE.replace(". ", ", "),  # no sentence end in reach: cut between words
    "a `very long span " + "x " * 100 + "that goes on` and on",  # the cut must not fall inside it
])
def test_a_long_torch_message_is_cut_between_words(tmp_path, monkeypatch, text):
    path = tmp_path / "odd.pt"
    path.write_bytes(b"\xff" * 32)

    def load(*args, **kwargs):
        raise pickle.UnpicklingError(text)  # another torch release's wording, nothing wrapped in it

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(CheckpointError, match=r"odd\.pt \(32 bytes\) is truncated or corrupt") as info:
        load_checkpoint(path)
    assert_cut_cleanly(str(info.value), [text])


# ----------------------------------------------------------------------------------------------------------
# files whose pickle would run code
# ----------------------------------------------------------------------------------------------------------


class _RunsACommand:
    """Unpickled without weights_only, this runs ``command`` in a shell: what a hostile checkpoint does."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


_SYSTEM = f"{os.system.__module__}.system"  # 'posix.system' (or 'nt.system' on Windows)


def _swap_data_pkl(archive, payload: bytes, out) -> None:
    """A copy of the torch.save zip ``archive`` whose pickle (``data.pkl``) is ``payload``."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name in src.namelist():
            dst.writestr(name, payload if name.endswith("/data.pkl") else src.read(name))


def _write_hostile(kind: str, path, command: str) -> None:
    hostile = _RunsACommand(command)
    if kind == "torch_save":
        torch.save({"state_dict": mlp().state_dict(), "callback": hostile}, path)
    elif kind == "torch_save_legacy":
        torch.save({"state_dict": mlp().state_dict(), "callback": hostile}, path,
                   _use_new_zipfile_serialization=False)
    elif kind.startswith("raw_pickle_"):
        path.write_bytes(pickle.dumps(hostile, protocol=int(kind.rpartition("_")[2])))
    else:  # zip_<protocol>: a real torch.save archive with its pickle replaced
        original = path.with_suffix(".orig")
        torch.save(mlp().state_dict(), original)
        _swap_data_pkl(original, pickle.dumps(hostile, protocol=int(kind.rpartition("_")[2])), path)


HOSTILE = ["torch_save", "torch_save_legacy", "raw_pickle_0", "raw_pickle_2",
           f"raw_pickle_{pickle.HIGHEST_PROTOCOL}", "zip_2", f"zip_{pickle.HIGHEST_PROTOCOL}"]


def test_the_hostile_payload_is_live(tmp_path, monkeypatch):
    """The control for the test below: unpickled the unsafe way, the payload does run its command."""
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps(_RunsACommand("echo pwned > CONTROL"), protocol=2)
    pickle.loads(payload)
    assert (tmp_path / "CONTROL").read_text().strip() == "pwned"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocols other than 2
@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_pickle_is_refused_for_safety_and_never_run(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)  # the command writes MARKER in the working folder
    path = tmp_path / "hostile.pt"
    _write_hostile(kind, path, "echo pwned > MARKER")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} refused for safety: its pickle wants to import {_SYSTEM!r}"), msg
    assert "nothing from the file was run" in msg and "treat the file as hostile" in msg
    assert "re-save just the weights as a state dict in the environment that made it" in msg
    assert "torch.save(" in msg and "state_dict" in msg
    assert "corrupt" not in msg and "copy or save the file again" not in msg
    assert not (tmp_path / "MARKER").exists()  # the command never ran
    written = {"hostile.pt", "hostile.orig"} if kind.startswith("zip") else {"hostile.pt"}
    assert {p.name for p in tmp_path.iterdir()} == written  # and nothing else appeared


@pytest.mark.parametrize("wording", [
    "Unsupported global: GLOBAL mylab.nets.Net was not an allowed global by default. Please use "
    "`torch.serialization.add_safe_globals([mylab.nets.Net])` to allowlist this global if you trust this class.",
    "Trying to load unsupported GLOBAL mylab.nets.Net whose module mylab is blocked.",
    "Weights only load failed. Check the documentation.\n\n\tWeightsUnpickler error: Unsupported global: "
    "GLOBAL mylab.nets.Net was not an allowed global by default.",
])
def test_refusal_wordings_of_torch_are_all_recognised(tmp_path, monkeypatch, wording):
    path = tmp_path / "net.pt"
    torch.save(mlp().state_dict(), path)

    def load(*args, **kwargs):
        raise pickle.UnpicklingError(wording)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(CheckpointError, match=r"net\.pt refused for safety: its pickle wants to import "
                                              r"'mylab\.nets\.Net'"):
        load_checkpoint(path)


def test_a_refusal_in_words_this_code_does_not_know_is_read_from_the_pickle(tmp_path, monkeypatch):
    """A future torch that names nothing in its message: the refused global is read off the pickle itself."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hostile.pt"
    _write_hostile("torch_save", path, "echo pwned > MARKER")
    real_load = torch.load

    def load(*args, **kwargs):
        try:
            return real_load(*args, **kwargs)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError("this file cannot be loaded safely") from None

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(CheckpointError, match=rf"hostile\.pt refused for safety: its pickle wants to import "
                                              rf"'{re.escape(_SYSTEM)}'"):
        load_checkpoint(path)
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_plain_pickle_files_are_named_as_such(tmp_path, protocol):
    (tmp_path / "args.pkl").write_bytes(pickle.dumps({"lr": 0.1, "epochs": [1, 2]}, protocol=protocol))
    with pytest.raises(CheckpointError, match=rf"args\.pkl is a plain Python pickle \(protocol {protocol}\), not a "
                                              rf"file written by torch\.save.*torch\.save\(state_dict, path\)"):
        load_checkpoint(tmp_path / "args.pkl")
    (tmp_path / "sd.pkl").write_bytes(pickle.dumps(mlp().state_dict(), protocol=protocol))
    with pytest.raises(CheckpointError, match=r"sd\.pkl refused for safety: its pickle wants to import "
                                              r"'torch\.\S+'.* plain Python pickle \(pickle\.dump\).*"
                                              r"state_dict = pickle\.load"):
        load_checkpoint(tmp_path / "sd.pkl")


def test_whole_module_pickle_is_refused_with_the_fix(tmp_path):
    torch.save(mlp(), tmp_path / "whole.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "whole.pt")
    msg = str(info.value)
    assert "whole.pt refused for safety" in msg and "widthkit.models.DigitsMLP" in msg
    assert "can run arbitrary code" in msg and "weights_only=True" in msg
    assert "torch.save(model.state_dict(), path)" in msg and "in the environment that made it" in msg


def test_classes_from_a_training_script_are_refused_not_called_corrupt(tmp_path, monkeypatch):
    """A whole model pickled from someone's train.py refers to ``__main__.Net``, which this process lacks."""
    net = type("Net", (nn.Module,), {"__module__": "__main__"})
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules["__main__"], "Net", net, raising=False)
        torch.save(net(), tmp_path / "script.pt")
    with pytest.raises(CheckpointError, match=r"script\.pt refused for safety: its pickle wants to import "
                                              r"'__main__\.Net'.*torch\.save\(model, path\) of a whole module"):
        load_checkpoint(tmp_path / "script.pt")


def test_numpy_values_are_refused_too(tmp_path):
    torch.save({"state_dict": mlp().state_dict(), "best_acc": np.float64(91.2)}, tmp_path / "np.pt")
    with pytest.raises(CheckpointError, match=r"np\.pt refused for safety: its pickle wants to import "
                                              r"'numpy\.\S+'"):
        load_checkpoint(tmp_path / "np.pt")


# Protocol-0 pickles written by hand, as an attacker would: a string pushed before the global (torch's
# weights-only unpickler stops at the string opcode, before it ever sees the global) and INST, which imports
# and calls in one opcode.
_PROTOCOL_0 = {
    "string_first": b"(S'echo pwned > MARKER'\ntp0\n0cos\nsystem\n(S'echo pwned > MARKER'\ntR.",
    "inst": b"(S'echo pwned > MARKER'\nios\nsystem\n.",
}


@pytest.mark.parametrize("kind", sorted(_PROTOCOL_0))
def test_a_hostile_protocol_0_pickle_is_refused_for_safety_not_called_corrupt(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    payload = _PROTOCOL_0[kind]
    (tmp_path / "control").mkdir()
    with monkeypatch.context() as patch:  # the control: unpickled the unsafe way, it runs the command
        patch.chdir(tmp_path / "control")
        pickle.loads(payload)
    assert (tmp_path / "control" / "MARKER").read_text().strip() == "pwned"
    path = tmp_path / "hostile.pkl"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path} refused for safety: its pickle wants to import 'os.system', which widthkit "
                          "does not allow"), msg
    assert "nothing from the file was run" in msg and "If you trust the file" in msg
    assert "corrupt" not in msg
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_old_protocol_plain_pickles_are_named_as_such(tmp_path, protocol):
    (tmp_path / "args.pkl").write_bytes(pickle.dumps({"lr": 0.1, "epochs": [1, 2]}, protocol=protocol))
    with pytest.raises(CheckpointError, match=rf"args\.pkl is a plain Python pickle \(protocol {protocol}\)"):
        load_checkpoint(tmp_path / "args.pkl")


def _legacy_tar(path, sd: dict) -> None:
    """A file in torch's legacy tar format (PyTorch 0.1.x), laid out as torch.serialization's own reader of it
    expects: ``storages`` (count, then per storage its key, location and type, and its raw elements), ``tensors``
    (count, then per tensor its key, storage, sizes, strides and offset) and ``pickle`` (the object, tensors
    referred to by persistent ids)."""
    storages, tensors, body = io.BytesIO(), io.BytesIO(), io.BytesIO()
    pickle.dump(len(sd), storages, protocol=2)
    pickle.dump(len(sd), tensors, protocol=2)
    for i, t in enumerate(sd.values()):
        t = t.contiguous()
        pickle.dump((i, "cpu", torch.FloatStorage), storages, protocol=2)
        storages.write(struct.pack("<q", t.numel()) + t.numpy().tobytes())
        pickle.dump((1000 + i, i, None), tensors, protocol=2)
        tensors.write(struct.pack("<i", t.dim()) + b"\0" * 4 + struct.pack(f"<{t.dim()}q", *t.shape)
                      + struct.pack(f"<{t.dim()}q", *t.stride()) + struct.pack("<q", 0))
    pickle.dump([], storages, protocol=2)  # no storage views

    class Ref:
        def __init__(self, key):
            self.key = key

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.key if isinstance(obj, Ref) else None

    Pickler(body, protocol=2).dump({name: Ref(1000 + i) for i, name in enumerate(sd)})
    with tarfile.open(path, "w:", format=tarfile.PAX_FORMAT) as tar:
        for member, buf in (("storages", storages), ("tensors", tensors), ("pickle", body)):
            info = tarfile.TarInfo(member)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))


def test_torchs_legacy_tar_format_is_named_not_called_corrupt(tmp_path):
    sd = mlp().state_dict()
    path = tmp_path / "old.tar"
    _legacy_tar(path, sd)
    back = torch.load(path, weights_only=False)  # torch's own (unsafe) reader: it is the real format
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    with pytest.raises(Exception, match="legacy .tar format"):
        torch.load(path, weights_only=True)  # and torch's safe loader cannot read it
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, arch="digits_mlp")
    msg = str(info.value)
    assert msg.startswith(f"{path} is in torch's legacy .tar format (written by PyTorch 0.1.x)"), msg
    assert "torch.save(torch.load(path, weights_only=False), 'weights.pt')" in msg
    assert "corrupt" not in msg


def _safetensors_file(path, sd: dict) -> None:
    """A .safetensors file written by hand from the format's specification (8-byte little-endian header
    length, JSON header of dtype/shape/data_offsets, raw little-endian bytes), not by the package."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in sd.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.int64: "I64"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_safetensors_files_are_read_with_the_safetensors_package(tmp_path):
    pytest.importorskip("safetensors")
    model = trained_cnn(3)
    path = tmp_path / "model.safetensors"
    _safetensors_file(path, model.state_dict())
    ckpt = load_checkpoint(path)
    assert_same_model(ckpt, model)
    assert ckpt.meta["arch"] == "digits_cnn" and ckpt.meta["format"] == "safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # cut short: corrupt, said so
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(\d+ bytes\) is a truncated or corrupt "
                                              r"safetensors file"):
        load_checkpoint(path)


def test_safetensors_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    _safetensors_file(path, mlp().state_dict())
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as where it is not installed: import fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a safetensors file; reading it needs the "
                                              r"safetensors package, which is not installed: pip install "
                                              r"safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "obj, message",
    [
        (torch.zeros(3, 4), r"not a model checkpoint: it holds a single tensor of shape \(3, 4\); expected a "
                            r"state dict"),
        ([torch.zeros(2), 1, 2], r"not a model checkpoint: it holds a list of 3 items"),
        ({"epoch": 3, "lr": 0.1}, r"not a model checkpoint: it holds a dict with keys \['epoch', 'lr'\] and no "
                                  r"tensors"),
        ({}, r"not a model checkpoint: it holds a dict with keys \[\] and no tensors"),
        ({"w": torch.zeros(2), "step": 3}, r"cannot find the model weights in a dict with keys \['w', 'step'\]"),
        ({"state_dict": {}, "swa_n": 3, "swa_state_dict": None},
         r"looks like an SWA training checkpoint .* holds no weights"),
        ({"widthkit_checkpoint": 2, "state_dict": {"a": torch.zeros(1)}},
         r"widthkit checkpoint of format version 2; this widthkit reads version 1"),
    ],
)
def test_non_checkpoints(tmp_path, obj, message):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "x.pt")) + ".*" + message):
        load_checkpoint(tmp_path / "x.pt", arch="digits_mlp")


@pytest.mark.parametrize("arch, kwargs", [
    ("torchvision:lraspp_mobilenet_v3_large", {"weights_backbone": "IMAGENET1K_V1"}),
    ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}),
    ("digits_cnn", {"pretrained": True}),
])
def test_recorded_pretrained_weights_are_refused_and_never_downloaded(tmp_path, monkeypatch, arch, kwargs):
    """A checkpoint whose recorded architecture options ask torchvision for pretrained weights: building it
    would download them (torch.hub's downloader, patched here to record the attempt)."""
    downloads = []

    def download(url, *args, **kw):
        downloads.append(url)
        raise OSError("no downloads in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # nothing cached there
    path = tmp_path / "pretrained.pt"
    torch.save({"widthkit_checkpoint": 1, "arch": arch, "arch_kwargs": kwargs, "num_classes": 10,
                "state_dict": {"w": torch.zeros(2)}}, path)
    key, value = next(iter(kwargs.items()))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: the checkpoint records arch_kwargs {key}={value!r}, which asks for pretrained "
                          "weights to be downloaded; widthkit never downloads"), msg
    assert f"drop the keyword (load_checkpoint(path, arch_kwargs={{{key!r}: None}})" in msg
    assert downloads == [] and not (tmp_path / "torch-home").exists()
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=rf"bare\.pt: arch_kwargs {key}={re.escape(repr(value))} asks for "
                                              "pretrained"):
        load_checkpoint(tmp_path / "bare.pt", arch=arch, arch_kwargs={key: value})  # passed, not recorded
    assert downloads == []


def test_a_recorded_keyword_passed_as_none_is_dropped(tmp_path):
    """arch_kwargs={key: None} over a recorded keyword drops it: the file then loads as the factory builds it."""
    model = mlp()
    path = tmp_path / "m.pt"
    torch.save({"widthkit_checkpoint": 1, "arch": "digits_mlp", "arch_kwargs": {"pretrained": True},
                "num_classes": 10, "state_dict": model.state_dict()}, path)
    assert_same_model(load_checkpoint(path, arch_kwargs={"pretrained": None}), model)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    sd = trained_cnn().state_dict()
    broken = {k: v for k, v in sd.items() if not k.startswith("features.7")}
    broken["head.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"keys\.pt: the weights do not fit 'digits_cnn': 1 missing key\(s\) "
                                              r"\[features\.7\.weight\], 1 unexpected key\(s\) \[head\.weight\]"):
        load_checkpoint(tmp_path / "keys.pt", arch="digits_cnn")


def test_wrong_arch_on_a_bare_state_dict_suggests_the_matching_one(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"do not fit 'digits_cnn': 17 missing key\(s\) \[features\.0\.weight, .*"
                                              r"\.\.\. \(12 more\)\], 4 unexpected .*; they match 'digits_mlp': pass "
                                              r"arch='digits_mlp' \(CLI: --arch digits_mlp\) or leave out arch= "
                                              r"\(CLI: --arch\) to detect it"):
        load_checkpoint(tmp_path / "m.pt", arch="digits_cnn")


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    torch.save(mlp(hidden=32).state_dict(), tmp_path / "h.pt")
    with pytest.raises(CheckpointError, match=r"h\.pt: shape mismatch loading into 'digits_mlp' .*'fc1\.weight' is "
                                              r"\(32, 64\) in the checkpoint but \(64, 64\) in the model.*check "
                                              r"num_classes= and arch_kwargs= .*\(Python arguments; on the "
                                              r"command line pass an --arch whose name fixes them.*or leave out "
                                              r"--arch to detect the model\)"):
        load_checkpoint(tmp_path / "h.pt", arch="digits_mlp")


def test_nonfinite_weights_are_refused_by_default(tmp_path):
    model = trained_cnn()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["fc.weight"][0, :3] = float("nan")
    sd["features.1.running_var"][0] = float("inf")
    torch.save(sd, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match=r"nan\.pt has non-finite weights in 2 tensor\(s\): "
                                              r"features\.1\.running_var \(0 NaN, 1 Inf\), fc\.weight "
                                              r"\(3 NaN, 0 Inf\); ") as info:
        load_checkpoint(tmp_path / "nan.pt", arch="digits_cnn")
    msg = str(info.value)
    assert "unusable for an analysis" in msg and "lower learning rate" in msg
    # the Python option to inspect them, and no pretence of a flag: a CLI user cannot analyse such weights
    assert "load_checkpoint(path, allow_nonfinite=True)" in msg and "no command-line flag" in msg
    assert "--allow" not in msg
    ckpt = load_checkpoint(tmp_path / "nan.pt", arch="digits_cnn", allow_nonfinite=True)
    assert torch.isnan(ckpt.model.fc.weight).sum() == 3


def test_which_errors(tmp_path):
    model = trained_cnn()
    torch.save(_swa_authors(model, "both")[0], tmp_path / "both.pt")
    torch.save(_swa_authors(model, "sgd-only")[0], tmp_path / "sgd.pt")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=r"both\.pt holds both SGD weights \('state_dict'\) and SWA weights "
                                              r"\('swa_state_dict'\); pass which='swa' or which='sgd' \(CLI: --which "
                                              r"swa / --which sgd, or --ckpt .*both\.pt#swa\)"):
        load_checkpoint(tmp_path / "both.pt", arch="digits_cnn")
    with pytest.raises(CheckpointError, match=r"which must be one of \['swa', 'sgd'\] or None, got 'ema'; pass "
                                              r"which='swa' or which='sgd' \(CLI: --which swa / --which sgd\)"):
        load_checkpoint(tmp_path / "both.pt", arch="digits_cnn", which="ema")
    with pytest.raises(CheckpointError, match=r"sgd\.pt has no SWA weights \('swa_state_dict' is missing or empty\); "
                                              r"it holds only SGD weights: pass which='sgd' \(CLI: --which sgd\) "
                                              r"or leave out which= \(CLI: --which, and the #swa suffix of --ckpt\)"):
        load_checkpoint(tmp_path / "sgd.pt", arch="digits_cnn", which="swa")
    with pytest.raises(CheckpointError, match=r"bare\.pt holds one model \(state_dict\), so which='swa' has nothing "
                                              r"to choose from: .*leave out which= \(CLI: --which, and the "
                                              r"#swa/#sgd suffix of --ckpt\)"):
        load_checkpoint(tmp_path / "bare.pt", arch="digits_cnn", which="swa")


def test_own_format_disagreements(tmp_path):
    path = tmp_path / "sgd.pt"
    save_checkpoint(path, trained_cnn(), arch="digits_cnn", num_classes=10, role="sgd")
    with pytest.raises(CheckpointError, match=r"sgd\.pt: the checkpoint records arch 'digits_cnn' but "
                                              r"arch='preresnet20' was passed \(CLI: --arch preresnet20\); leave "
                                              r"out arch= \(CLI: --arch\) to use the recorded one"):
        load_checkpoint(path, arch="preresnet20")
    with pytest.raises(CheckpointError, match=r"checkpoint records num_classes=10 but num_classes=100 was passed; "
                                              r"leave out num_classes= to use the recorded one \(a Python "
                                              r"argument: the command line always reads it from the file\)"):
        load_checkpoint(path, num_classes=100)
    with pytest.raises(CheckpointError, match=r"sgd\.pt holds the 'sgd' model but which='swa' was asked for; "
                                              r"leave out which= \(CLI: --which, and the #swa suffix of --ckpt\)"):
        load_checkpoint(path, which="swa")
    with pytest.raises(CheckpointError, match=r"shape mismatch loading into 'digits_cnn' \(num_classes=10, "
                                              r"arch_kwargs=\{'width': 8\}\).*\(Python arguments passed over the "
                                              r"ones the file records\)"):
        load_checkpoint(path, arch_kwargs={"width": 8})
