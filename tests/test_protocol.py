"""The paper's protocol end to end: SWA evaluated at its budgets, the cyclic schedule, SWA from given weights,
seeds and their aggregate. Every number is checked against an independent computation (AveragedModel +
update_bn by hand, eq. 2 by hand, the pretrained model's own loss, means and t-tests by hand)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.optim.swa_utils import AveragedModel, update_bn

from conftest import train_digits
from widthkit import pipeline
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit.models import create_model
from widthkit.report.summary import aggregate_seeds, paired_test, pool_widths
from widthkit.report.width import summarize
from widthkit.train import main as train_main
from widthkit.training import trainer
from widthkit.training.trainer import TrainConfig, lr_at, read_log, recipe_info, train, train_branches

N_TRAIN, BATCH = 1438, 64
STEPS = 23  # ceil(1438 / 64): 22 full batches and one of 30


pytestmark = pytest.mark.usefixtures("one_thread")


def digits(split):
    ds = load_dataset("digits", split=split)
    return ds.normalized(), ds.labels


def plain_metrics(model, split):
    """(mean cross-entropy, error %) of ``model`` in eval mode on a digits split, in one forward pass."""
    x, y = digits(split)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) != y).sum().item() / len(y)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# --------------------------------------------------------------------------------------------------------
# SWA at 1, 1.25 and 1.5 budgets during one run
# --------------------------------------------------------------------------------------------------------

# B = 4: prefix to epoch 3, SGD branch to 4, SWA branch to 6 averaging after epochs 4, 5, 6 (budgets 1, 1.25, 1.5)
SMALL = dict(epochs=4, save_iterates=True)


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("budgets")
    return out, train_branches(TrainConfig(**SMALL), out, progress=False, device="cpu")


def test_logged_budget_averages_equal_averaged_model_and_update_bn_by_hand(budget_run):
    out, paths = budget_run
    assert paths["budgets"] == {1.0: str(out / "swa_budget1.pt"), 1.25: str(out / "swa_budget1.25.pt"),
                                1.5: str(out / "swa.pt")}
    iterates = paths["iterates"]
    assert [load_checkpoint(p).meta["extra"]["epoch"] for p in iterates] == [4, 5, 6]
    rows = {int(r["epoch"]): r for r in read_log(paths["log"]) if r["weights"] == "average"}
    assert sorted(rows) == [4, 5, 6] and [rows[e]["budget"] for e in (4, 5, 6)] == [1.0, 1.25, 1.5]
    x_train, _ = digits("train")
    for n, (budget, epoch) in enumerate(((1.0, 4), (1.25, 5), (1.5, 6)), start=1):
        models = [load_checkpoint(p).model for p in iterates[:n]]  # the SGD iterates up to this epoch
        avg = AveragedModel(models[0])
        for m in models:
            avg.update_parameters(m)
        update_bn([x_train[i:i + BATCH] for i in range(0, N_TRAIN, BATCH)], avg)
        expected = {"train": plain_metrics(avg.module, "train"), "test": plain_metrics(avg.module, "test")}
        row = rows[epoch]
        for split in ("train", "test"):
            assert row[f"{split}_loss"] == pytest.approx(expected[split][0], rel=1e-5, abs=1e-7), (budget, split)
            assert row[f"{split}_err"] == pytest.approx(expected[split][1], abs=1e-9), (budget, split)
        saved = load_checkpoint(paths["budgets"][budget])
        assert (saved.meta["role"], saved.meta["extra"]["budget"], saved.meta["extra"]["n_averaged"]) == \
            ("swa", budget, n)
        assert saved.meta["metrics"]["test_err"] == row["test_err"]
        for k, v in avg.module.state_dict().items():
            torch.testing.assert_close(saved.state_dict[k].double(), v.double(), rtol=0, atol=1e-6, msg=k)


def test_budget_evaluations_do_not_disturb_the_run(budget_run, tmp_path):
    """Evaluating the average on copies leaves training and the running average as they are: a run evaluated
    only at 1.25 budgets ends with bit-identical iterates, swa.pt and 1.25-budget average."""
    out, paths = budget_run
    other = train_branches(TrainConfig(**SMALL, swa_evals=(1.25,)), tmp_path, progress=False, device="cpu")
    assert other["budgets"] == {1.25: str(tmp_path / "swa_budget1.25.pt"), 1.5: str(tmp_path / "swa.pt")}
    assert not (tmp_path / "swa_budget1.pt").exists()
    for a, b in [(paths["swa"], other["swa"]), (paths["budgets"][1.25], other["budgets"][1.25]),
                 *zip(paths["iterates"], other["iterates"]), *zip(paths["sgd_iterates"], other["sgd_iterates"])]:
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)


def test_iterates_of_both_branches_carry_their_epoch(budget_run):
    out, paths = budget_run
    assert paths["sgd_iterates"] == [str(out / "sgd_iter_004.pt")]  # the SGD branch: epoch 4 of B = 4
    meta = load_checkpoint(paths["sgd_iterates"][0]).meta
    assert (meta["role"], meta["extra"]["epoch"]) == ("iterate", 4)
    wa, wb = weights(paths["sgd_iterates"][0]), weights(paths["sgd"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the last SGD iterate is the SGD solution


# --------------------------------------------------------------------------------------------------------
# the cyclic schedule (eq. 2), averaging at each cycle's end
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c, unit", [(10, "steps"), (1, "epochs")])
def test_cyclic_lr_at_every_step_is_eq2_and_swa_averages_each_cycles_end(tmp_path, c, unit):
    a1, a2 = 0.08, 0.01
    cfg = TrainConfig(**SMALL, swa_schedule="cyclic", swa_lr_max=a1, swa_lr=a2, swa_c=c, swa_c_unit=unit)
    lrs, snaps = [], []
    pre = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    post = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: snaps.append(torch.cat([p.detach().flatten() for p in opt.param_groups[0]["params"]])))
    try:
        paths = train_branches(cfg, tmp_path, progress=False, device="cpu")
    finally:
        pre.remove()
        post.remove()
    # prefix (3 epochs) and SGD branch (1 epoch), then the SWA branch from the prefix (3 epochs)
    assert len(lrs) == 7 * STEPS
    assert lrs[:4 * STEPS] == [lr_at(e, cfg, "sgd") for e in range(4) for _ in range(STEPS)]
    cycle = c if unit == "steps" else c * STEPS
    by_hand = []
    for i in range(1, 3 * STEPS + 1):  # Izmailov et al. 2018, eq. 2
        t = ((i - 1) % cycle + 1) / cycle
        by_hand.append((1 - t) * a1 + t * a2)
    assert lrs[4 * STEPS:] == pytest.approx(by_hand, rel=1e-12, abs=0)
    # averaged: the weights after the last step of every cycle, nothing else
    ends = [i for i in range(1, 3 * STEPS + 1) if i % cycle == 0]
    assert len(paths["iterates"]) == len(ends) == (6 if unit == "steps" else 3)
    swa = load_checkpoint(paths["swa"])
    flat = torch.cat([p.detach().flatten() for p in swa.model.parameters()])
    mean = torch.stack([snaps[4 * STEPS + i - 1].double() for i in ends]).mean(0)
    torch.testing.assert_close(flat.double(), mean, rtol=0, atol=1e-6)
    assert [load_checkpoint(p).meta["extra"]["epoch"] for p in paths["iterates"]] == \
        pytest.approx([3 + i / STEPS for i in ends])
    swa_rows = [r for r in read_log(paths["log"]) if r["phase"] == "swa" and r["weights"] == "iterate"]
    assert [r["lr"] for r in swa_rows] == pytest.approx([by_hand[k * STEPS] for k in range(3)], rel=1e-12)


def test_a_killed_cyclic_run_resumes_bit_identically(tmp_path, monkeypatch):
    """Averages in the middle of epochs (cycles of 10 steps) survive a crash between epochs."""
    cfg = TrainConfig(**SMALL, swa_schedule="cyclic", swa_lr_max=0.08, swa_lr=0.01, swa_c=10, swa_c_unit="steps")
    ref = train_branches(cfg, tmp_path / "ref", progress=False, device="cpu")
    real, calls = trainer.train_epoch, []

    def crash_in_the_second_swa_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # epochs 1-3 prefix, 4 SGD, 5-7 SWA
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", crash_in_the_second_swa_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_branches(cfg, tmp_path / "run", progress=False, device="cpu")
    monkeypatch.setattr(trainer, "train_epoch", real)
    again = train_branches(cfg, tmp_path / "run", progress=False, device="cpu")
    assert [os.path.basename(p) for p in again["iterates"]] == [os.path.basename(p) for p in ref["iterates"]]
    for a, b in [(ref["swa"], again["swa"]), *zip(ref["iterates"], again["iterates"])]:
        wa, wb = weights(a), weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (a, b)


# --------------------------------------------------------------------------------------------------------
# SWA from given weights (the paper's ImageNet protocol)
# --------------------------------------------------------------------------------------------------------


def _first_training_forward(model_type):
    """A global forward hook keeping (input, output) of the first train-mode forward of a ``model_type``."""
    seen = []

    def hook(module, inputs, output):
        if isinstance(module, model_type) and module.training and not seen:
            seen.append((inputs[0].detach().clone(), output.detach().clone()))

    return seen, torch.nn.modules.module.register_module_forward_hook(hook)


def test_init_from_a_plain_state_dict_starts_from_those_weights(tmp_path):
    pretrained = train_digits(seed=7, epochs=1)
    path = tmp_path / "pretrained.pth"
    torch.save(pretrained.state_dict(), path)  # a bare state dict, as torchvision's weight files are
    cfg = TrainConfig(epochs=2, swa_budget=1.0, swa_lr=0.02, init=str(path), save_iterates=True)
    seen, handle = _first_training_forward(type(pretrained))
    try:
        paths = train(cfg, tmp_path / "out", "swa", progress=False, device="cpu")
    finally:
        handle.remove()
    x, y = digits("train")
    first = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(cfg.seed))[:BATCH]
    x_batch, logits = seen[0]
    assert torch.equal(x_batch, x[first])  # the run's first batch
    reference = create_model("digits_cnn", num_classes=10)
    reference.load_state_dict(torch.load(path, weights_only=True))
    reference.train()
    with torch.no_grad():
        expected = F.cross_entropy(reference(x[first]), y[first]).item()
    assert F.cross_entropy(logits, y[first]).item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    with torch.no_grad():
        untrained = F.cross_entropy(create_model("digits_cnn", num_classes=10).train()(x[first]), y[first]).item()
    assert abs(untrained - expected) > 0.5  # so the equality above says the weights were loaded

    # start.pt: the given weights, evaluated as they are; swa.pt: the average of epochs 1 and 2, BN recomputed
    start = load_checkpoint(paths["start"])
    sd = torch.load(path, weights_only=True)
    assert all(torch.equal(start.state_dict[k], sd[k]) for k in sd)
    init_row = [r for r in read_log(paths["log"]) if r["phase"] == "init"][0]
    assert (init_row["weights"], init_row["epoch"]) == ("iterate", 0)
    reference.load_state_dict(sd)  # its running statistics as in the file (the train-mode pass above moved them)
    assert init_row["test_loss"] == pytest.approx(plain_metrics(reference, "test")[0], rel=1e-5)
    swa = load_checkpoint(paths["swa"])
    assert swa.meta["extra"]["n_averaged"] == 2 and swa.meta["extra"]["budget"] == 1.0
    assert int(swa.state_dict["features.1.num_batches_tracked"]) == STEPS  # update_bn: one pass over the data
    assert swa.meta["extra"]["init_sha256"] == start.meta["extra"]["init_sha256"] == load_checkpoint(path).sha256
    assert [r["phase"] for r in read_log(paths["log"])] == ["init", "swa", "swa", "swa_final"]


def _tiny_image_folder(root, n_train=8, n_test=3, size=32):
    from PIL import Image

    g = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_init_from_a_torchvision_state_dict(tmp_path):
    import torchvision

    folder = _tiny_image_folder(tmp_path / "images")
    torch.manual_seed(3)
    pretrained = torchvision.models.shufflenet_v2_x0_5(num_classes=2)
    path = tmp_path / "shufflenet.pth"
    torch.save(pretrained.state_dict(), path)
    cfg = TrainConfig(model="torchvision:shufflenet_v2_x0_5", dataset=f"imagefolder:{folder}", epochs=1,
                      swa_budget=1.0, batch_size=8, init=str(path))
    seen, handle = _first_training_forward(type(pretrained))
    try:
        paths = train(cfg, tmp_path / "out", "swa", progress=False, device="cpu")
    finally:
        handle.remove()
    ds = load_dataset(f"imagefolder:{folder}", split="train")
    x, y = ds.normalized(), ds.labels
    first = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.seed))[:8]
    x_batch, logits = seen[0]
    assert torch.equal(x_batch, x[first])
    pretrained.train()
    with torch.no_grad():
        expected = F.cross_entropy(pretrained(x[first]), y[first]).item()
    assert F.cross_entropy(logits, y[first]).item() == pytest.approx(expected, rel=1e-5)
    assert load_checkpoint(paths["swa"]).meta["arch"] == "torchvision:shufflenet_v2_x0_5"


def test_train_cli_with_init_runs_the_swa_phase(tmp_path, capsys):
    path = tmp_path / "w.pth"
    torch.save(train_digits(seed=1, epochs=1).state_dict(), path)
    out = tmp_path / "run"
    common = ["--out", str(out), "--init", str(path), "--epochs", "1", "--swa-budget", "2", "--device", "cpu",
              "--quiet"]
    assert train_main([*common, "--mode", "branches"]) == 2
    assert "runs the SWA phase alone from given weights" in capsys.readouterr().err
    assert train_main(common) == 0  # --mode swa implied
    printed = capsys.readouterr().out
    assert f"start: {out / 'start.pt'}" in printed and f"swa: {out / 'swa.pt'}" in printed
    assert "SWA 1B" in printed and "SWA 1.5B" in printed


@pytest.mark.parametrize("changes, match", [
    ({"swa_evals": (1.75,)}, r"swa_evals mark 1.75 \(epoch 7\) lies beyond the end of SWA \(swa_budget=1.5, epoch 6\)"),
    ({"swa_evals": (0.5,)}, r"swa_evals mark 0.5 \(epoch 2\) is not after the start of SWA \(epoch 3\)"),
    ({"swa_evals": (1.0, 1.1)}, r"swa_evals marks 1 and 1.1 both fall on epoch 4"),
    ({"swa_evals": (1.0,), "swa_c": 2}, r"swa_evals mark 1 \(epoch 4\) comes before the first average"),
    ({"swa_lr_max": 0.1}, r"swa_lr_max=0.1 is the cyclic schedule's alpha1, but swa_schedule='constant'"),
    ({"swa_schedule": "cyclic", "swa_lr_max": 0.01, "swa_lr": 0.05}, r"swa_lr_max \(alpha1.*must be a number >= swa_lr"),
    ({"swa_schedule": "triangle"}, r"unknown swa_schedule 'triangle'; valid choices: constant, cyclic"),
    ({"swa_c_unit": "batches"}, r"unknown swa_c_unit 'batches'; valid choices: epochs, steps"),
    ({"init": "w.pth", "swa_start": 2}, r"with init the run is the SWA phase alone, from epoch 0; leave swa_start unset"),
    ({"swa_evals": ("1",)}, r"'swa_evals' must be a list of numbers"),
    ({"dataset": "imagefolder:"}, r"'imagefolder:' without a folder: pass your data folder"),
])
def test_protocol_settings_are_checked_with_a_fix(changes, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"epochs": 4, **changes})


def test_protocol_refusals_before_any_file(tmp_path):
    with pytest.raises(ValueError, match="use train\\(cfg, out, 'swa'\\)"):
        train_branches(TrainConfig(init="w.pth"), tmp_path / "a", device="cpu")
    with pytest.raises(ValueError, match="use mode='swa'"):
        train(TrainConfig(init="w.pth"), tmp_path / "b", "sgd", device="cpu")
    with pytest.raises(ValueError, match="checkpoint file .*missing.pth does not exist"):
        train(TrainConfig(init=str(tmp_path / "missing.pth")), tmp_path / "c", "swa", device="cpu")
    cfg = TrainConfig(epochs=1, swa_budget=2.0, swa_c=30, swa_c_unit="steps")  # 1 SWA epoch of 23
    with pytest.raises(ValueError, match="fewer than one cycle of swa_c=30 steps"):
        train_branches(cfg, tmp_path / "d", device="cpu")
    assert not any(tmp_path.iterdir())


def test_recipes_carry_the_published_numbers_and_their_needs():
    published = {"vgg16-cifar100": ((72.55, 0.10), (74.27, 0.25)), "wrn28x10-cifar10": ((96.18, 0.11), (96.79, 0.05)),
                 "preresnet164-cifar10": ((95.28, 0.10), (95.83, 0.03))}
    for name, (sgd, swa15) in published.items():
        paper = recipe_info(name).paper
        assert paper["sgd"] == sgd and paper["swa"][1.5] == swa15 and sorted(paper["swa"]) == [1.0, 1.25, 1.5]
        assert "timgaripov/swa" in paper["source"] and paper["runs"] == 3
    for name in ("vgg16-cifar10", "preresnet110-cifar10", "preresnet110-cifar100", "preresnet164-cifar100",
                 "wrn28x10-cifar100"):
        assert recipe_info(name).paper is not None
    assert recipe_info("digits").paper is None
    imagenet = recipe_info("imagenet-resnet50")
    assert imagenet.paper is None and set(imagenet.needs) == {"dataset", "init"}
    with pytest.raises(ValueError, match=r"recipe 'imagenet-resnet50' needs dataset \(--dataset\): your ImageNet"):
        trainer.layered_config("imagenet-resnet50", overrides={"init": "w.pth"})
    cfg = trainer.layered_config("imagenet-resnet50", overrides={"init": "w.pth", "dataset": "imagefolder:/data/in"})
    assert (cfg.model, cfg.swa_schedule, cfg.swa_start_epoch, cfg.swa_end_epoch, cfg.swa_evals) == \
        ("torchvision:resnet50", "cyclic", 0, 10, (0.5, 1.0))


# --------------------------------------------------------------------------------------------------------
# seeds: the aggregate, by hand
# --------------------------------------------------------------------------------------------------------


def _report(sgd, swa, c_sgd, c_swa, m, threshold="test_err=+5"):
    return {"threshold": threshold, "per_direction": {"SGD": sgd, "SWA": swa},
            "crossed": {"SGD": c_sgd, "SWA": c_swa},
            "summaries": {"SGD": {"max_distance": m}, "SWA": {"max_distance": m}}, "comparison": None}


def test_seed_aggregate_equals_a_hand_computation():
    inf, nan = math.inf, math.nan
    seeds = [
        {"seed": 0, "sgd": 90.0, "swa": {1.0: 91.0, 1.5: 92.0},
         "widths": [_report([1.0, 2.0, inf, 3.0], [1.5, 2.5, inf, 4.5], [True, True, False, True],
                            [True, True, False, True], 5.0)]},
        {"seed": 1, "sgd": 92.0, "swa": {1.0: 92.5, 1.5: 93.5},
         "widths": [_report([2.0, nan, 3.5, 1.0], [2.0, 1.0, "inf", 1.5], [True, False, True, True],
                            [True, True, False, True], 4.0)]},
        {"seed": 2, "sgd": 91.0, "swa": {1.0: 91.0, 1.5: 93.0},
         "widths": [_report([0.5, 1.0, 1.5, 2.0], [1.0, 1.0, 2.5, 3.5], [True] * 4, [True] * 4, 5.0)]},
    ]
    agg = aggregate_seeds(seeds)
    # accuracies: mean and sample std by hand
    for key, values in (("sgd", [90.0, 92.0, 91.0]),):
        mean = sum(values) / 3
        assert agg["accuracy"][key]["mean"] == pytest.approx(mean)
        assert agg["accuracy"][key]["std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 2))
    swa15 = [92.0, 93.5, 93.0]
    assert agg["accuracy"]["swa"][1.5]["mean"] == pytest.approx(sum(swa15) / 3)
    assert agg["budgets"] == [1.0, 1.5]
    # paired t-test across seeds by hand: t = mean(d) / (sd(d) / sqrt(n)), two-sided p from Student's t, n-1 dof
    d = [2.0, 1.5, 2.0]
    md = sum(d) / 3
    sd = math.sqrt(sum((v - md) ** 2 for v in d) / 2)
    t = md / (sd / math.sqrt(3))
    test = agg["accuracy_tests"][1.5]
    assert test["mean_diff"] == pytest.approx(md) and test["t"] == pytest.approx(t)
    assert test["t_pvalue"] == pytest.approx(2 * stats.t.sf(abs(t), 2))
    assert test["wilcoxon_min_pvalue"] == pytest.approx(0.25)

    # widths: the smallest max distance (4) bounds every seed; seed 0's 4.5 becomes "> 4"; seed 1's direction 1
    # is incomplete for SGD (NaN) and left out
    (w,) = agg["widths"]
    m = 4.0
    assert w["max_distance"] == m
    sgd_w = [1.0, 2.0, inf, 3.0] + [2.0, 3.5, 1.0] + [0.5, 1.0, 1.5, 2.0]
    sgd_c = [True, True, False, True] + [True, True, True] + [True] * 4
    swa_w = [1.5, 2.5, inf, inf] + [2.0, inf, 1.5] + [1.0, 1.0, 2.5, 3.5]
    swa_c = [True, True, False, False] + [True, False, True] + [True] * 4
    filled_sgd = [v if c else m for v, c in zip(sgd_w, sgd_c)]
    filled_swa = [v if c else m for v, c in zip(swa_w, swa_c)]
    pooled = w["pooled"]
    assert pooled["summaries"]["SGD"]["mean"] == pytest.approx(sum(filled_sgd) / 11)
    assert pooled["summaries"]["SWA"]["n_crossed"] == 8 and pooled["summaries"]["SGD"]["n_crossed"] == 10
    assert pooled["summaries"]["SWA"]["median"] == pytest.approx(float(np.median(filled_swa)))
    diffs = [b - a for a, b in zip(filled_sgd, filled_swa)]
    wider_swa = sum(1 for a, ca, b, cb in zip(sgd_w, sgd_c, swa_w, swa_c)
                    if (ca and cb and b > a) or (ca and not cb))
    assert pooled["comparison"]["n"] == 11 and pooled["comparison"]["wider"]["SWA"] == wider_swa == 8
    assert pooled["comparison"]["wilcoxon"]["pvalue"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    # per-seed mean widths (censored at m) and their paired test across seeds
    means_sgd = [sum(filled_sgd[:4]) / 4, sum(filled_sgd[4:7]) / 3, sum(filled_sgd[7:]) / 4]
    means_swa = [sum(filled_swa[:4]) / 4, sum(filled_swa[4:7]) / 3, sum(filled_swa[7:]) / 4]
    assert w["seed_means"]["SGD"] == pytest.approx(means_sgd) and w["seed_means"]["SWA"] == pytest.approx(means_swa)
    assert w["seed_means_lower_bound"] is True
    dm = [b - a for a, b in zip(means_sgd, means_swa)]
    t = (sum(dm) / 3) / (np.std(dm, ddof=1) / math.sqrt(3))
    assert w["across_seeds"]["t"] == pytest.approx(t)
    assert summarize(np.array(filled_sgd), np.array(sgd_c), m)["mean"] == pytest.approx(sum(filled_sgd) / 11)


def test_paired_test_and_pool_widths_refuse_what_they_cannot_compare():
    assert paired_test([1.0], [2.0])["t_pvalue"] is None
    same = paired_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert same["t"] is None and "the same" in same["notes"][0] and same["mean_diff"] == 1.0
    with pytest.raises(ValueError, match="equally long"):
        paired_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at one threshold"):
        pool_widths([_report([1.0], [1.0], [True], [True], 2.0),
                     _report([1.0], [1.0], [True], [True], 2.0, threshold="train_loss=+0.5")])


# --------------------------------------------------------------------------------------------------------
# the pipeline over seeds
# --------------------------------------------------------------------------------------------------------

TINY = ["--epochs", "2", "--dirs", "2", "--steps", "3", "--line-steps", "3", "--plane-resolution", "3",
        "--train-subset", "200", "--quiet", "--format", "png", "--skip", "curvature"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_over_two_seeds_end_to_end(tmp_path, capsys):
    recipe = tmp_path / "digits-paper.toml"  # digits with published numbers, to see them printed beside
    recipe.write_text('model = "digits_cnn"\n\n[paper]\nsource = "a test"\nruns = 3\nsgd = [97.5, 0.25]\n'
                      'swa = { "1.5" = [98.0, 0.5] }\n')
    argv = ["--root", str(tmp_path), "--recipe", str(recipe), "--seeds", "0,1", *TINY]
    assert pipeline.main(argv) == 0
    printed = capsys.readouterr().out
    ck, an = tmp_path / "checkpoints" / "digits-paper-seeds", tmp_path / "analyses" / "digits-paper-seeds"
    accuracies = {}
    for seed in (0, 1):
        folder = ck / f"seed{seed}"
        # B = 2: SWA from epoch 1 to 3; budget 1 = epoch 2, 1.25 and 1.5 both epoch 3 (= 1.5 budgets): swa.pt
        for name in ("start.pt", "sgd.pt", "swa.pt", "swa_budget1.pt", "sgd_iter_002.pt", "swa_iter_001.pt",
                     "swa_iter_002.pt"):
            assert (folder / name).is_file(), (seed, name)
        assert load_checkpoint(folder / "swa.pt").meta["config"]["seed"] == seed
        assert load_checkpoint(folder / "swa.pt").meta["config"]["save_iterates"] is True  # kept by the pipeline
        for name in ("rays.h5", "line.h5", "plane.h5", "report.md"):
            assert (an / f"seed{seed}" / name).is_file(), (seed, name)
        rows = read_log(folder / "log.csv")
        accuracies[seed] = {"sgd": [100 - r["test_err"] for r in rows if r["phase"] == "sgd_final"][0],
                            "swa": {r["budget"]: 100 - r["test_err"] for r in rows if r["weights"] == "average"}}
    agg = json.loads((an / "aggregate.json").read_text())
    sgd = [accuracies[s]["sgd"] for s in (0, 1)]
    assert agg["accuracy"]["sgd"]["mean"] == pytest.approx(np.mean(sgd))
    assert agg["accuracy"]["sgd"]["std"] == pytest.approx(abs(sgd[0] - sgd[1]) / math.sqrt(2))
    swa = [accuracies[s]["swa"][1.5] for s in (0, 1)]
    assert agg["accuracy"]["swa"]["1.5"]["mean"] == pytest.approx(np.mean(swa))
    assert [w["threshold"] for w in agg["widths"]] == ["test_err=+5", "train_loss_l2=+0.5"]
    assert agg["widths"][0]["pooled"]["comparison"]["n"] == 4  # 2 directions x 2 seeds
    report = (an / "report.md").read_text()
    row = f"| digits_cnn (2) | {np.mean(sgd):.2f} ± {np.std(sgd, ddof=1):.2f} |"
    assert row in report and row in printed
    assert "| published (3 runs) | 97.50 ± 0.25 | — | 98.00 ± 0.50 |" in report  # budgets 1 and 1.5
    assert "[seed0/report.md](seed0/report.md)" in report and "paired t-test" in report

    # a re-run finds everything finished: no checkpoint or analysis is rewritten
    stamps = {p: os.stat(p).st_mtime_ns for p in [*ck.rglob("*.pt"), *an.rglob("*.h5")]}
    assert pipeline.main(argv) == 0
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,1", "--seed", "2"], "pass either --seed (one run) or --seeds (several), not both"),
    (["--seeds", "0,x"], "--seeds takes comma-separated integers such as 0,1,2, got '0,x'"),
    (["--seeds", "1,1"], "--seeds needs distinct integers >= 0"),
    (["--init", "w.pth"], "the pipeline trains SGD and SWA from scratch"),
])
def test_pipeline_seed_flags_are_checked_before_training(tmp_path, capsys, argv, message):
    assert pipeline.main(["--root", str(tmp_path), *argv, *TINY]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


def test_training_threads_flag_is_kept_recorded_and_the_callers_count_restored(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    try:
        paths = train(TrainConfig(epochs=1), tmp_path / "flag", "sgd", progress=False, device="cpu", threads=1)
        assert torch.get_num_threads() == 2  # the caller's count, restored
    finally:
        torch.set_num_threads(1)
    assert load_checkpoint(paths["sgd"]).meta["provenance"]["threads"] == 1
    assert torch.load(paths["state"], weights_only=True)["threads"] == 1
    # unset: timed, unless a resumed run recorded its count
    seen = []

    def fake_choose(measure, requested, recorded):
        measure()  # the timed work runs on a copy: it must leave the run alone
        seen.append((requested, recorded))
        return {"threads": 1}

    monkeypatch.setattr(trainer, "choose_threads", fake_choose)
    cfg = TrainConfig(epochs=2)
    real, calls = trainer.train_epoch, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "timed", "sgd", progress=False, device="cpu")
    monkeypatch.setattr(trainer, "train_epoch", real)
    resumed = train(cfg, tmp_path / "timed", "sgd", progress=False, device="cpu")
    assert seen == [(None, None), (None, 1)]
    reference = train(cfg, tmp_path / "reference", "sgd", progress=False)  # timing does not change the numbers
    wa, wb = weights(resumed["sgd"]), weights(reference["sgd"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
