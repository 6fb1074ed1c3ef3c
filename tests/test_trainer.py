"""Tests of widthkit.trainer / widthkit.train on the bundled digits data (tiny runs, CPU, one thread)."""

from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_CHILD, kill9, python_child, wait_for_marker
from widthkit.training import trainer
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit.runtime import RuntimeConfig
from widthkit.train import main
from widthkit.training.trainer import (
    LOG_COLUMNS,
    TrainConfig,
    list_recipes,
    load_recipe,
    lr_at,
    train,
    train_branches,
)

# B = 4 epochs: prefix 0..3 (swa_start = floor(0.75 * 4) = 3), SGD branch 3..4, SWA branch 3..6 (3 averages)
SMALL = dict(epochs=4, save_iterates=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    out = tmp_path_factory.mktemp("branches")
    cfg = TrainConfig(**SMALL)
    return cfg, out, train_branches(cfg, out, progress=False, device="cpu")


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


# --------------------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("branch", ["sgd", "swa"])
def test_lr_at_matches_the_formula(branch):
    cfg = TrainConfig(epochs=100, lr=0.1, swa_lr=0.05, swa_start=80)
    # sgd: t = epoch / B with ratio 0.01; swa (authors' train.py): t = epoch / swa_start with ratio swa_lr / lr
    horizon, r = (100, 0.01) if branch == "sgd" else (80, 0.5)
    expected = {0.0: 1.0, 0.5: 1.0, 0.7: (1 + r) / 2, 0.9: r, 1.0: r}  # factor 1 - (1 - r)(t - 0.5)/0.4 between
    for t, factor in expected.items():
        assert lr_at(round(t * horizon), cfg, branch) == pytest.approx(0.1 * factor, rel=1e-12), t
    # linear in between, constant after 0.9
    assert lr_at(0.6 * horizon, cfg, branch) == pytest.approx(0.1 * (1 - (1 - r) / 4), rel=1e-12)
    assert lr_at(1.4 * horizon, cfg, branch) == pytest.approx(0.1 * r, rel=1e-12)


def test_lr_at_swa_branch_is_sgd_then_constant():
    cfg = TrainConfig(epochs=100, lr=0.1, swa_lr=0.05, swa_start=75)
    assert lr_at(74, cfg, "swa_branch") == lr_at(74, cfg, "sgd") == pytest.approx(0.1 * (1 - 0.99 * 24 / 40))
    assert lr_at(75, cfg, "swa_branch") == lr_at(149, cfg, "swa_branch") == 0.05


@pytest.mark.parametrize("epoch, branch, match", [
    (0, "cyclic", r"branch must be one of \['sgd', 'swa', 'swa_branch'\], got 'cyclic'"),
    (-1, "sgd", "epoch must be a number >= 0, got -1"),
])
def test_lr_at_rejects_bad_arguments(epoch, branch, match):
    with pytest.raises(ValueError, match=match):
        lr_at(epoch, TrainConfig(), branch)


# --------------------------------------------------------------------------------------------------------
# config validation, recipes
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values, match", [
    ({"learning_rate": 0.1}, r"unknown training config key\(s\) \['learning_rate'\]; valid keys: \['model'"),
    ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ({"lr": -0.1}, "lr must be a positive number, got -0.1"),
    ({"swa_lr": 0}, "swa_lr must be a positive number"),
    ({"epochs": 4, "swa_start": 5}, r"swa_start=5 is outside the budget: it must be in \[1, epochs=4\]; lower "
                                    r"swa_start \(or leave it unset for 0.75\*epochs = 3; CLI: --swa-start auto\)"),
    ({"model": "resnet9000"}, "training config 'model': unknown model 'resnet9000'.*Valid names: .*digits_cnn"),
    ({"dataset": "imagenet"}, r"unknown dataset 'imagenet'; valid names: \['cifar10', 'cifar100', 'digits', "),
    ({"device": "cpu"}, "device is a runtime setting, not part of the training config: pass --device on the "
                        r"command line \(in Python: runtime=RuntimeConfig\(device=...\)\)"),
    ({"amp": True, "threads": 1}, "amp, threads are runtime settings"),
    ({"epochs": "10"}, r"'epochs' must be of type int, got '10' \(str\)"),
    ({"augment": 1}, r"'augment' must be of type bool, got 1"),
    ({"model_kwargs": None}, r"'model_kwargs' must be of type dict, got None"),
    ({"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ({"epochs": 4, "swa_budget": 1.0, "swa_c": 2}, "SWA would average no model: it runs from epoch swa_start=3 "
                                                   "to swa_budget\\*epochs=4 and averages every swa_c=2 epochs"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
])
def test_config_rejects_bad_values_with_a_fix(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)


def test_config_defaults_and_copies():
    kwargs = {"width": 8}
    cfg = TrainConfig(model_kwargs=kwargs, lr=1)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.model_kwargs == kwargs and cfg.model_kwargs is not kwargs
    assert cfg.swa_start_epoch == 15 and cfg.swa_end_epoch == 30  # 0.75 * 20, 1.5 * 20
    assert cfg.resolved()["swa_start"] == 15 and cfg.swa_start is None
    assert TrainConfig(epochs=30, swa_budget=1.25).swa_end_epoch == 38  # 37.5 rounded half up


def test_recipes_load_and_follow_the_paper():
    names = list_recipes()
    for name in ["digits", "vgg16-cifar10", "vgg16-cifar100", "preresnet110-cifar10", "preresnet164-cifar100",
                 "wrn28x10-cifar10", "wrn28x10-cifar100"]:
        assert name in names
    assert load_recipe("digits") == TrainConfig()  # the embedded default
    for name in names:  # every bundled recipe is a valid config, or says what it needs from the user
        if trainer.recipe_info(name).needs:
            with pytest.raises(ValueError, match=f"recipe '{name}' needs "):
                load_recipe(name)
        else:
            load_recipe(name)
    vgg = load_recipe("vgg16-cifar100")
    assert (vgg.model, vgg.lr, vgg.weight_decay, vgg.epochs, vgg.swa_lr, vgg.batch_size, vgg.swa_budget) == \
        ("vgg16", 0.05, 5e-4, 200, 0.01, 128, 1.5)
    prn = load_recipe("preresnet164-cifar100")
    assert (prn.lr, prn.weight_decay, prn.epochs, prn.swa_lr) == (0.1, 3e-4, 150, 0.05)
    assert load_recipe("preresnet110-cifar10").swa_lr == 0.01
    wrn = load_recipe("wrn28x10-cifar10")
    assert (wrn.model, wrn.lr, wrn.weight_decay, wrn.epochs, wrn.swa_lr) == ("wideresnet28x10", 0.1, 5e-4, 200, 0.05)


def test_recipe_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown recipe 'vgg19'; bundled recipes: \['digits'"):
        load_recipe("vgg19")
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text('lr = 0.1\nlearning_rate = 0.2\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown training config key\(s\) \['learning_rate'\]"):
        load_recipe(bad_key)
    bad_value = tmp_path / "neg.toml"
    bad_value.write_text('lr = -1\n')
    with pytest.raises(ValueError, match="neg.toml: lr must be a positive number"):
        load_recipe(bad_value)
    broken = tmp_path / "broken.toml"
    broken.write_text('lr = \n')
    with pytest.raises(ValueError, match="broken.toml is not valid TOML"):
        load_recipe(broken)
    with pytest.raises(ValueError, match="recipe file .*missing.toml does not exist"):
        load_recipe(tmp_path / "missing.toml")
    good = tmp_path / "good.toml"
    good.write_text('epochs = 8\nmodel_kwargs = { width = 8 }\n')
    assert load_recipe(good) == TrainConfig(epochs=8, model_kwargs={"width": 8})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA messages")
def test_device_errors_without_cuda(tmp_path):
    with pytest.raises(ValueError, match="device='cuda' but CUDA is not available here"):
        train(TrainConfig(), tmp_path / "out", device="cuda")
    with pytest.raises(ValueError, match="device='cuda:1' but CUDA is not available here"):
        train_branches(TrainConfig(), tmp_path / "out", runtime=RuntimeConfig(device="cuda:1"))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epochs'\]; the runtime settings are"):
        train(TrainConfig(), tmp_path / "out", epochs=3)
    assert not any(tmp_path.iterdir())  # refused before anything was written


# --------------------------------------------------------------------------------------------------------
# the branch protocol
# --------------------------------------------------------------------------------------------------------


def test_branches_writes_checkpoints_with_metadata(branches):
    cfg, out, paths = branches
    assert paths["start"] == str(out / "start.pt") and paths["sgd"] == str(out / "sgd.pt")
    assert paths["swa"] == str(out / "swa.pt") and len(paths["iterates"]) == 3
    assert not (out / "branch_state.pt").exists()
    expected_epoch = {"start": 3, "sgd": 4, "swa": 6}
    for role in ("start", "sgd", "swa"):
        ckpt = load_checkpoint(paths[role])
        meta = ckpt.meta
        assert (meta["role"], meta["arch"], meta["dataset"], meta["num_classes"]) == (role, "digits_cnn", "digits", 10)
        assert meta["config"] == cfg.resolved() and meta["config"]["swa_start"] == 3
        assert meta["extra"]["seed"] == 0 and meta["extra"]["epoch"] == expected_epoch[role]
        epochs = meta["metrics"]["epochs"]
        # SWA: the iterate of each epoch, the average at budgets 1 (epoch 4) and 1.25 (epoch 5), the final one at 1.5
        assert [(r["phase"], r["weights"]) for r in epochs if r["phase"] != "prefix"] == {
            "start": [], "sgd": [("sgd", "iterate"), ("sgd_final", "iterate")],
            "swa": [("swa", "iterate"), ("swa", "average")] * 2 + [("swa", "iterate"), ("swa_final", "average")]}[role]
        if role != "start":
            final = epochs[-1]
            assert meta["metrics"]["test_err"] == final["test_err"]
            assert meta["metrics"]["test_acc"] == pytest.approx(100 - final["test_err"])
            assert meta["metrics"]["test_acc"] > 80  # 4 epochs of digits
    assert load_checkpoint(paths["swa"]).meta["extra"]["n_averaged"] == 3


def test_log_csv_rows_follow_the_schedule(branches):
    cfg, out, _ = branches
    with open(out / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == LOG_COLUMNS
    assert [(r["phase"], r["weights"], int(r["epoch"]), float(r["budget"])) for r in rows] == [
        ("prefix", "iterate", 1, 0.25), ("prefix", "iterate", 2, 0.5), ("prefix", "iterate", 3, 0.75),
        ("sgd", "iterate", 4, 1.0), ("sgd_final", "iterate", 4, 1.0),
        ("swa", "iterate", 4, 1.0), ("swa", "average", 4, 1.0), ("swa", "iterate", 5, 1.25),
        ("swa", "average", 5, 1.25), ("swa", "iterate", 6, 1.5), ("swa_final", "average", 6, 1.5)]
    for r in rows:
        if r["phase"] in ("prefix", "sgd"):
            assert float(r["lr"]) == pytest.approx(lr_at(int(r["epoch"]) - 1, cfg, "sgd"))
        elif r["weights"] == "iterate" and r["phase"] == "swa":
            assert float(r["lr"]) == cfg.swa_lr
        else:  # evaluations of a finished model or of the average: no learning rate
            assert r["lr"] == "" and 0 <= float(r["test_err"]) <= 100


def test_swa_weights_are_the_plain_average_of_the_iterates(branches):
    cfg, out, paths = branches
    iterates = [load_checkpoint(p) for p in paths["iterates"]]
    assert [c.meta["extra"]["epoch"] for c in iterates] == [4, 5, 6]
    assert all(c.meta["role"] == "iterate" for c in iterates)
    swa = weights(paths["swa"])
    params = [n for n, _ in iterates[0].model.named_parameters()]
    for name in params:
        mean = sum(c.state_dict[name].double() for c in iterates) / len(iterates)
        torch.testing.assert_close(swa[name].double(), mean, rtol=0, atol=1e-6)
    # and the average is not any one iterate
    assert not torch.equal(swa[params[0]], iterates[-1].state_dict[params[0]])


def test_swa_batchnorm_stats_come_from_a_pass_over_the_training_data(branches):
    cfg, out, paths = branches
    ckpt = load_checkpoint(paths["swa"])
    model = ckpt.model.double()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bns
    seen: dict[str, list] = {n: [] for n in bns}
    hooks = [m.register_forward_hook(lambda m, inp, o, n=n: seen[n].append(inp[0].detach())) for n, m in bns.items()]
    model.train()  # batch statistics drive the forward pass, whatever the running stats are
    x = load_dataset("digits", split="train").normalized(dtype=torch.float64)
    with torch.no_grad():
        for i in range(0, len(x), cfg.batch_size):
            model(x[i:i + cfg.batch_size])
    for h in hooks:
        h.remove()
    last_iterate = weights(paths["iterates"][-1])
    for name in bns:
        means = torch.stack([a.mean(dim=(0, 2, 3)) for a in seen[name]])
        variances = torch.stack([a.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for a in seen[name]])
        rm, rv = ckpt.state_dict[f"{name}.running_mean"], ckpt.state_dict[f"{name}.running_var"]
        torch.testing.assert_close(rm.double(), means.mean(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rv.double(), variances.mean(0), rtol=1e-5, atol=1e-5)
        assert int(ckpt.state_dict[f"{name}.num_batches_tracked"]) == len(seen[name]) == 23  # ceil(1437 / 64)
        assert not torch.allclose(rm, last_iterate[f"{name}.running_mean"])  # not copied from an iterate


def test_same_seed_twice_is_bit_identical_and_sgd_mode_equals_the_sgd_branch(branches, tmp_path):
    cfg, out, paths = branches
    again = train_branches(cfg, tmp_path / "again", progress=False, device="cpu")
    for role in ("start", "sgd", "swa"):
        assert_same_weights(paths[role], again[role])
    for a, b in zip(paths["iterates"], again["iterates"]):
        assert_same_weights(a, b)
    single = train(cfg, tmp_path / "sgd_only", "sgd", progress=False, device="cpu")
    assert set(single) == {"sgd", "budgets", "iterates", "sgd_iterates", "log", "state"}
    assert single["budgets"] == {} and len(single["sgd_iterates"]) == 4  # every epoch of the SGD run
    assert_same_weights(paths["sgd"], single["sgd"])
    other_seed = train(cfg.replace(seed=1), tmp_path / "seed1", "sgd", progress=False, device="cpu")
    assert not torch.equal(weights(other_seed["sgd"])["fc.weight"], weights(paths["sgd"])["fc.weight"])


def test_single_swa_run(tmp_path):
    cfg = TrainConfig(epochs=2, swa_budget=2.0, save_iterates=True)  # swa_start 1, end 4
    paths = train(cfg, tmp_path, "swa", progress=False, device="cpu")
    assert set(paths) == {"swa", "budgets", "iterates", "sgd_iterates", "log", "state"} and len(paths["iterates"]) == 3
    # budgets 1 -> epoch 2; 1.25 -> epoch 3 (2.5 rounded half up), which is 1.5 budgets: kept as 1.5; the end of
    # the run (swa_budget 2) is swa.pt
    assert paths["budgets"] == {1.0: str(tmp_path / "swa_budget1.pt"), 1.5: str(tmp_path / "swa_budget1.5.pt"),
                                2.0: str(tmp_path / "swa.pt")}
    with open(paths["log"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows if r["weights"] == "iterate"] == [lr_at(e, cfg, "swa") for e in range(4)]
    assert rows[-1]["phase"] == "swa_final" and rows[-1]["lr"] == ""


def test_augmentation_is_seeded(tmp_path):
    cfg = TrainConfig(epochs=1, augment=True, pad=1, flip=False)
    a = train(cfg, tmp_path / "a", "sgd", progress=False)["sgd"]
    b = train(cfg, tmp_path / "b", "sgd", progress=False)["sgd"]
    plain = train(cfg.replace(augment=False), tmp_path / "plain", "sgd", progress=False)["sgd"]
    assert_same_weights(a, b)
    assert not torch.equal(weights(a)["fc.weight"], weights(plain)["fc.weight"])


def test_missing_data_fails_before_writing_anything(tmp_path):
    cfg = TrainConfig(model="preresnet20", dataset="cifar10", data_root=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train(cfg, tmp_path / "out", "sgd", progress=False, device="cpu")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------------
# output folders: refuse foreign runs, skip finished work, overwrite
# --------------------------------------------------------------------------------------------------------


def test_finished_run_is_skipped(branches):
    cfg, out, paths = branches
    stamps = {p: os.stat(p).st_mtime_ns for p in (paths["sgd"], paths["swa"], paths["log"])}
    assert train_branches(cfg, out, progress=False) == paths
    assert train_branches(cfg.replace(data_root="/elsewhere"), out, progress=False) == paths  # resume-free field
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


def test_a_folder_with_another_run_is_refused(branches, tmp_path):
    cfg, out, _ = branches
    with pytest.raises(ValueError, match=r"holds a run with a different config \(lr: 0.1 -> 0.2\); use a new "
                                         r"output folder \(--out\) or pass --overwrite"):
        train_branches(cfg.replace(lr=0.2), out, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"holds a 'branches' run, not a 'sgd' one"):
        train(cfg, out, "sgd", progress=False, device="cpu")
    (tmp_path / "sgd.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds training outputs \['sgd.pt'\] but no train_state.pt"):
        train(cfg, tmp_path, "sgd", progress=False, device="cpu")
    with pytest.raises(ValueError, match="mode must be 'sgd' or 'swa'"):
        train(cfg, tmp_path, "branches", progress=False, device="cpu")


def test_overwrite_starts_over(tmp_path):
    cfg = TrainConfig(epochs=1, save_iterates=True)  # swa_start 1, SWA to epoch 2
    train_branches(cfg, tmp_path, progress=False, device="cpu")
    (tmp_path / "swa_iter_099.pt").write_bytes(b"stale")
    (tmp_path / "notes.txt").write_text("mine")
    paths = train_branches(cfg.replace(lr=0.02), tmp_path, overwrite=True, progress=False, device="cpu")
    assert load_checkpoint(paths["swa"]).meta["config"]["lr"] == 0.02
    assert not (tmp_path / "swa_iter_099.pt").exists() and (tmp_path / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------------------------------------
# resume after SIGKILL, through the CLI
# --------------------------------------------------------------------------------------------------------


def _cli(out: Path) -> list[str]:
    return [sys.executable, "-m", "widthkit.train", "--recipe", "digits", "--out", str(out), "--epochs", "4",
            "--device", "cpu", "--save-iterates", "--quiet"]  # = SMALL


@pytest.mark.subprocess
def test_resume_after_sigkill_is_bit_identical(branches, tmp_path, spawn, capsys):
    cfg, ref_out, ref = branches  # the uninterrupted reference run
    out = tmp_path / "killed"
    # the same command in a child that stops (alive, blocked) after 5 SGD steps of its 6th epoch: epochs 1-3
    # are the prefix, 4 the SGD branch, 5 the first of the SWA branch (averaged once), 6 the second
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic as this process (one thread)
    proc, log = spawn(python_child(TRAIN_CHILD, tmp_path / "stop", 6, 5, *_cli(out)[3:]), env=env)
    wait_for_marker(tmp_path / "stop", proc, log)
    kill9(proc)  # in the SWA branch, mid-epoch, after one average
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    assert (state["phase"], state["epoch"], state["n_averaged"]) == ("swa", 4, 1)
    assert (out / "sgd.pt").is_file() and not (out / "swa.pt").exists()
    assert main(_cli(out)[3:]) == 0  # the same command, run to completion (in this process: saves a start-up)
    assert f"swa: {out / 'swa.pt'}" in capsys.readouterr().out
    _assert_same_run(ref, out)


def test_resume_after_a_crash_in_the_sgd_branch(branches, tmp_path, monkeypatch):
    """Interrupted after the prefix: the rerun finishes the SGD branch, then starts the SWA branch from the
    branch_state.pt the crashed run wrote."""
    cfg, _, ref = branches
    real, calls = trainer.train_epoch, []

    def crash_on_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # epochs 1-3: prefix; 4: the SGD branch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        train_branches(cfg, tmp_path, progress=False, device="cpu")
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert (state["phase"], state["epoch"]) == ("sgd", 3) and (tmp_path / "branch_state.pt").is_file()
    monkeypatch.setattr(trainer, "train_epoch", real)
    _assert_same_run(ref, tmp_path, train_branches(cfg, tmp_path, progress=False, device="cpu"))


def _assert_same_run(ref: dict, out: Path, paths: dict | None = None) -> None:
    for role in ("start", "sgd", "swa"):
        assert_same_weights(ref[role], out / f"{role}.pt")
    assert len(ref["iterates"]) == 3
    for path in ref["iterates"]:
        assert_same_weights(path, out / Path(path).name)
    if paths is not None:
        assert paths["iterates"] == [str(out / Path(p).name) for p in ref["iterates"]]
    with open(out / "log.csv") as f, open(ref["log"]) as g:
        strip = lambda rows: [r.rsplit(",", 1)[0] for r in rows]  # all but time_s
        assert strip(f.read().splitlines()) == strip(g.read().splitlines())


# --------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------


def test_cli_flags_override_the_recipe_and_config_file(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("weight_decay = 1e-3\nbatch_size = 32\n")
    out = tmp_path / "run"
    assert main(["--out", str(out), "--config", str(config), "--mode", "sgd", "--epochs", "1", "--lr", "0.1",
                 "--swa_lr", "0.02", "--model-kwargs", '{"width": 4}', "--no-augment", "--device", "cpu",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"sgd: {out / 'sgd.pt'}" in printed and f"log: {out / 'log.csv'}" in printed
    recorded = load_checkpoint(out / "sgd.pt").meta["config"]
    assert (recorded["epochs"], recorded["lr"], recorded["swa_lr"], recorded["weight_decay"],
            recorded["batch_size"], recorded["model_kwargs"], recorded["model"]) == \
        (1, 0.1, 0.02, 1e-3, 32, {"width": 4}, "digits_cnn")


@pytest.mark.parametrize("argv, match", [
    (["--lr", "-1"], "lr must be a positive number, got -1.0"),
    (["--recipe", "nope"], "unknown recipe 'nope'; bundled recipes"),
    (["--model-kwargs", "[1]"], "expected a JSON object"),
    (["--epochs", "2.5"], "invalid int value: '2.5'"),
    (["--recipe", "vgg16-cifar10", "--epochs", "4"], r"swa_start=160 is outside the budget.*--swa-start auto"),
    (["--swa-start", "soon"], "expected an integer or 'auto', got 'soon'"),
])
def test_cli_errors_are_messages(tmp_path, capsys, argv, match):
    try:  # argparse's own errors exit; values the config refuses return 2 with one "error: ..." line
        code = main(argv + ["--out", str(tmp_path / "x"), "--quiet"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_cli_swa_start_auto_resets_the_recipe_value():
    from widthkit import cli
    from widthkit.train import build_parser

    args = build_parser().parse_args(["--recipe", "vgg16-cifar10", "--epochs", "8", "--swa-start", "auto"])
    cfg = trainer.layered_config(args.recipe, args.config, cli.config_values(args, trainer.TrainConfig, layered=True))
    assert cfg.swa_start is None and cfg.swa_start_epoch == 6


def test_cli_lists_recipes(capsys):
    assert main(["--list-recipes"]) == 0
    assert capsys.readouterr().out.split() == list_recipes()


def test_the_trainer_runs_under_the_runtime_precision_policy(tmp_path, monkeypatch):
    """The analyses' precision policy, applied by the trainer too: fp32 pins oneDNN's float32 math to IEEE even
    when the process asked for bf16 matmuls; precision='bf16' trains under bf16 autocast (on CPU as well), and
    each checkpoint records the policy it was trained under."""
    seen = []
    real = trainer.train_epoch

    def spy(*args, **kwargs):
        seen.append((torch.backends.mkldnn.matmul.fp32_precision, kwargs.get("precision")))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", spy)
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"  # a process-wide setting must not reach fp32 training
    try:
        paths = train(TrainConfig(epochs=1), tmp_path / "fp32", "sgd", progress=False, device="cpu")
        assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # put back afterwards
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert seen and set(seen) == {("ieee", "fp32")}
    assert load_checkpoint(paths["sgd"]).meta["provenance"]["precision"] == "fp32"
    seen.clear()
    paths = train(TrainConfig(epochs=1), tmp_path / "bf16", "sgd", progress=False, device="cpu", precision="bf16")
    assert {p for _, p in seen} == {"bf16"}
    prov = load_checkpoint(paths["sgd"]).meta["provenance"]
    assert (prov["precision"], prov["autocast"]) == ("bf16", "bfloat16")
