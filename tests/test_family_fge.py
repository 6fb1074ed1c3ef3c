"""FGE in the trainer (--mode fge, Garipov et al. 2018): the triangular schedule against its formula, the snapshots
and the SWA average of exactly them, the ensemble the log reports against softmaxes averaged by hand, the
snapshots as members of widthkit.ensemble, and the cycle checked against the phase before any work."""

from __future__ import annotations

import math

import pytest
import torch

import widthkit
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit.train import main as train_main
from widthkit.training.recipes import load_recipe
from widthkit.training.schedule import fge_lr, fge_snapshot_at, steps_per_epoch
from widthkit.training.trainer import TrainConfig, read_log, train

pytestmark = pytest.mark.usefixtures("one_thread")
# B = 4: SGD schedule for epochs 0..3 (swa_start 3), then FGE to epoch 8 (swa_budget 2): cycles of 2 epochs, a
# snapshot at the middle of each (after epochs 4, 6 and 8)
FGE = dict(epochs=4, swa_budget=2.0)
CPU = dict(device="cpu", threads=1)  # the runtime: where it trains


@pytest.fixture(scope="module")
def fge_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fge")
    cfg = TrainConfig(**FGE)
    return cfg, out, train(cfg, out, "fge", progress=False, **CPU)


def test_fge_learning_rate_is_the_triangle_of_garipov_et_al():
    # the authors' schedule as a function of the fraction t of the cycle, evaluated independently
    def authors(t, a1, a2):
        return (1 - 2 * t) * a1 + 2 * t * a2 if t <= 0.5 else (2 - 2 * t) * a2 + (2 * t - 1) * a1

    c = 10
    for i in range(1, 35):
        t = ((i - 1) % c + 1) / c
        assert fge_lr(i, c, 0.05, 5e-4) == pytest.approx(authors(t, 0.05, 5e-4), rel=1e-12, abs=0)
    assert fge_lr(5, c, 0.05, 5e-4) == pytest.approx(5e-4) and fge_lr(10, c, 0.05, 5e-4) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="even int"):
        fge_lr(1, 3, 0.05, 5e-4)
    cfg = TrainConfig(fge_c=4, fge_c_unit="steps")
    assert [i for i in range(1, 13) if fge_snapshot_at(i, cfg, 23)] == [2, 6, 10]


def test_fge_run_saves_the_snapshots_and_averages_exactly_them(fge_run):
    cfg, out, paths = fge_run
    assert paths["iterates"] == [str(out / f"fge_{n:03d}.pt") for n in (1, 2, 3)]
    spe = steps_per_epoch(len(load_dataset("digits", split="train")), cfg.batch_size)
    snaps = [load_checkpoint(p) for p in paths["iterates"]]
    for n, ck in enumerate(snaps, start=1):
        extra = ck.meta["extra"]
        assert extra["epoch"] == 2 + 2 * n and ck.meta["role"] == "iterate"  # the middle of each 2-epoch cycle
        assert extra["snapshot"] == {"index": n, "schedule": "fge", "cycle": 2, "cycle_unit": "epochs",
                                     "cycle_steps": 2 * spe, "lr_max": 0.05, "lr_min": 5e-4,
                                     "taken": "middle of the cycle"}
    # swa.pt: the plain average of the three snapshots' weights (BN statistics recomputed afterwards)
    swa = torch.load(paths["swa"], weights_only=True)["state_dict"]
    states = [torch.load(p, weights_only=True)["state_dict"] for p in paths["iterates"]]
    for k, v in swa.items():
        if "running" in k or "num_batches" in k:
            continue
        torch.testing.assert_close(v, sum(s[k] for s in states) / 3, rtol=1e-6, atol=1e-7)
    # the log: the SGD schedule, then the FGE rate of each epoch's first step
    rows = read_log(paths["log"])
    lrs = [r["lr"] for r in rows if r["weights"] == "iterate"]
    assert lrs[3] == pytest.approx(fge_lr(1, 2 * spe, 0.05, 5e-4)) and lrs[4] == pytest.approx(fge_lr(spe + 1, 2 * spe, 0.05, 5e-4))


def test_the_logged_fge_ensemble_is_the_average_of_the_snapshots_softmaxes(fge_run):
    _, out, paths = fge_run
    te = load_dataset("digits", split="test")
    x, y = te.normalized(), te.labels
    with torch.no_grad():
        probs = torch.stack([torch.softmax(load_checkpoint(p).model.eval().double()(x.double()), 1)
                             for p in paths["iterates"]]).mean(0)
    nll = -probs.gather(1, y[:, None]).log().mean().item()
    err = 100.0 * (probs.argmax(1) != y).double().mean().item()
    final = [r for r in read_log(paths["log"]) if r["phase"] == "ensemble_final"]
    assert len(final) == 1 and final[0]["weights"] == "ensemble" and final[0]["budget"] == 2.0
    assert final[0]["test_loss"] == pytest.approx(nll, abs=1e-5) and final[0]["test_err"] == pytest.approx(err)
    # at the 1-budget mark (epoch 4) the ensemble is the first snapshot alone
    first = [r for r in read_log(paths["log"]) if r["weights"] == "ensemble" and r["budget"] == 1.0][0]
    with torch.no_grad():
        alone = torch.softmax(load_checkpoint(paths["iterates"][0]).model.eval().double()(x.double()), 1)
    assert first["epoch"] == 4
    assert first["test_loss"] == pytest.approx(-alone.gather(1, y[:, None]).log().mean().item(), abs=1e-5)
    # widthkit.ensemble of the run's folder picks the snapshots (not swa.pt or the budget averages) and, with
    # each snapshot's own BN statistics, reports the trainer's numbers
    res = widthkit.ensemble(iterates=str(out), swa=paths["swa"], bn_mode="keep", device="cpu")
    n = res.numbers()
    assert [m["label"] for m in n["members"]] == ["fge_001", "fge_002", "fge_003"]
    assert n["ensemble"]["test_loss"] == pytest.approx(nll, abs=1e-5) and n["ensemble"]["test_err"] == pytest.approx(err)
    swa_row = [r for r in read_log(paths["log"]) if r["phase"] == "fge_final"][0]
    assert n["compare"]["SWA"]["test_err"] == pytest.approx(swa_row["test_err"])
    assert n["forward_passes"] == {"ensemble": 3, "SWA": 1}


def test_a_cycle_longer_than_the_phase_is_refused_before_any_file(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"the FGE cycle \(fge_c=8 epochs, .*\) is longer than the FGE phase"):
        train(TrainConfig(**{**FGE, "swa_budget": 1.5}, fge_c=8), tmp_path / "a", "fge", progress=False, **CPU)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
    assert train_main(["--mode", "fge", "--epochs", "4", "--fge-c", "9", "--fge-c-unit", "steps", "--device", "cpu",
                       "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "even number of steps" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    with pytest.raises(ValueError, match="fge_lr_max .* must be a number >= fge_lr"):
        TrainConfig(fge_lr_max=1e-4, fge_lr=1e-3)


def test_recipes_carry_the_fge_settings_of_garipov_et_al():
    assert (load_recipe("digits").fge_c, load_recipe("digits").fge_lr_max, load_recipe("digits").fge_lr) == \
        (2, 0.05, 5e-4)
    for name in ("vgg16-cifar10", "vgg16-cifar100"):
        cfg = load_recipe(name)
        assert (cfg.fge_c, cfg.fge_c_unit, cfg.fge_lr_max, cfg.fge_lr) == (2, "epochs", 1e-2, 5e-4), name
    for name in ("preresnet110-cifar10", "preresnet164-cifar100", "wrn28x10-cifar10", "wrn28x10-cifar100"):
        cfg = load_recipe(name)
        assert (cfg.fge_c, cfg.fge_lr_max, cfg.fge_lr) == (4, 5e-2, 5e-4), name
    assert not math.isnan(load_recipe("digits").fge_lr)


def test_an_interrupted_fge_run_continues_to_the_same_snapshots_and_average(fge_run, tmp_path, monkeypatch):
    from widthkit.training import trainer

    cfg, _, ref = fge_run
    real, calls = trainer.train_epoch, []

    def crash_in_sixth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # after the first snapshot (epoch 4) and the 1.25-budget evaluation (epoch 5)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", crash_in_sixth)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, "fge", progress=False, **CPU)
    monkeypatch.setattr(trainer, "train_epoch", real)
    paths = train(cfg, tmp_path, "fge", progress=False, **CPU)
    for a, b in zip(ref["iterates"] + [ref["swa"]], paths["iterates"] + [paths["swa"]], strict=True):
        wa = torch.load(a, weights_only=True)["state_dict"]
        wb = torch.load(b, weights_only=True)["state_dict"]
        assert all(torch.equal(wa[k], wb[k]) for k in wa), b
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_log(ref["log"])]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in read_log(paths["log"])] == strip
