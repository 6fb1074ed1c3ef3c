"""Ensembles of checkpoints (widthkit.ensemble) against independent answers: softmaxes averaged by hand,
per-model loops, BatchNorm recomputed with torch's own update_bn."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch.optim.swa_utils import update_bn

import widthkit
from conftest import train_digits
from widthkit.analyses.ensemble import load_ensemble
from widthkit.engine.ensemble import EnsembleAccumulator, disagreement
from widthkit.inputs.checkpoints import save_checkpoint
from widthkit.inputs.data import load_dataset
from widthkit.report.store import read

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three digits_cnn checkpoints of different seeds (and training lengths) and one of another architecture."""
    d = tmp_path_factory.mktemp("members")
    paths = []
    for seed, epochs in ((0, 1), (1, 2), (2, 1)):
        paths.append(str(d / f"m{seed}.pt"))
        save_checkpoint(paths[-1], train_digits(seed, epochs), arch="digits_cnn", num_classes=10, dataset="digits",
                        role="sgd", config={"weight_decay": 5e-4})
    mlp = str(d / "mlp.pt")
    save_checkpoint(mlp, train_digits(3, 1, "digits_mlp"), arch="digits_mlp", num_classes=10, dataset="digits")
    return paths, mlp


@pytest.fixture(scope="module")
def digits():
    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    return tr.normalized(), tr.labels, te.normalized(), te.labels


def softmaxes(paths, x, recompute_on=None, batch_size=64):
    """Each checkpoint's softmax on x, computed the plain way: model in eval mode, one forward pass (BatchNorm
    statistics first recomputed with torch's update_bn over ``recompute_on`` in batches of ``batch_size``)."""
    out = []
    for p in paths:
        model = widthkit.load_checkpoint(p).model.double()
        if recompute_on is not None:
            update_bn([recompute_on[i:i + batch_size].double() for i in range(0, len(recompute_on), batch_size)], model)
        with torch.no_grad():
            out.append(torch.softmax(model.eval()(x.double()), dim=1))
    return torch.stack(out)  # (M, N, C)


@pytest.mark.parametrize("bn_mode", ["keep", "recompute"])
def test_ensemble_predictions_equal_the_average_of_the_members_softmaxes(members, digits, bn_mode):
    paths, _ = members
    x_tr, _, x_te, y_te = digits
    res = widthkit.ensemble(paths, bn_mode=bn_mode, device="cpu", eval_batch_size=64)
    probs = softmaxes(paths, x_te, x_tr if bn_mode == "recompute" else None)  # (M, N, C) float64
    torch.testing.assert_close(res.probabilities, probs.mean(0), rtol=0, atol=1e-6)
    assert torch.equal(res.labels, y_te)

    # every number of the file from the same softmaxes: members alone, the first k together, disagreement
    n = res.numbers()
    for k in range(1, len(paths) + 1):
        p = probs[:k].mean(0)
        nll = -p.gather(1, y_te[:, None]).log().mean().item()
        err = 100.0 * (p.argmax(1) != y_te).double().mean().item()
        assert n["by_size"]["test_loss"][k - 1] == pytest.approx(nll, abs=1e-6)
        assert n["by_size"]["test_err"][k - 1] == pytest.approx(err, abs=1e-9)
        own = probs[k - 1]
        assert n["members"][k - 1]["test_loss"] == pytest.approx(-own.gather(1, y_te[:, None]).log().mean().item(),
                                                                 abs=1e-6)
        assert n["members"][k - 1]["test_err"] == pytest.approx(100.0 * (own.argmax(1) != y_te).double().mean().item())
    pred = probs.argmax(2)
    for i in range(len(paths)):
        for j in range(len(paths)):
            assert n["disagreement"][i, j] == pytest.approx(100.0 * (pred[i] != pred[j]).double().mean().item())
    assert n["forward_passes"] == {"ensemble": 3}


def test_single_models_beside_the_ensemble_and_the_file_round_trip(members, digits, tmp_path):
    paths, _ = members
    _, _, x_te, y_te = digits
    out = tmp_path / "ens.h5"
    res = widthkit.ensemble(paths[:2], swa=paths[2], compare={"SGD": paths[0]}, bn_mode="keep", device="cpu",
                            out=out)
    probs = softmaxes(paths, x_te)
    n = res.numbers()
    for label, p in (("SWA", probs[2]), ("SGD", probs[0])):
        assert n["compare"][label]["test_loss"] == pytest.approx(-p.gather(1, y_te[:, None]).log().mean().item(),
                                                                 abs=1e-6)
        assert n["compare"][label]["test_err"] == pytest.approx(100.0 * (p.argmax(1) != y_te).double().mean().item())
    assert n["forward_passes"] == {"ensemble": 2, "SWA": 1, "SGD": 1}
    # the file: kind ensemble, provenance, what was compared, the same numbers read back
    data = read(out)
    assert data["kind"] == "ensemble" and data["attrs"]["provenance"]["device"] == "cpu"
    assert data["attrs"]["member_labels"] == ["m0", "m1"] and data["attrs"]["compare_labels"] == ["SWA", "SGD"]
    assert [m["sha256"] for m in data["config"]["models"]] == [widthkit.load_checkpoint(p).sha256
                                                              for p in (*paths[:2], paths[2], paths[0])]
    back = load_ensemble(out).numbers()
    assert back["compare"] == n["compare"] and np.array_equal(back["by_size"]["test_err"], n["by_size"]["test_err"])
    assert "ensemble of 2" in res.table() and "SWA" in res.table()
    # a finished file is not computed again by the same call
    stamp = out.stat().st_mtime_ns
    again = widthkit.ensemble(paths[:2], swa=paths[2], compare={"SGD": paths[0]}, bn_mode="keep", device="cpu",
                              out=out)
    assert out.stat().st_mtime_ns == stamp and again.probabilities is None
    assert again.numbers()["ensemble"] == n["ensemble"]


def test_accumulator_is_the_mean_of_softmaxes_even_where_one_underflows():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(50, 7, generator=g) * s for s in (1.0, 30.0, 300.0)]  # the last: softmax underflows
    labels = torch.randint(0, 7, (50,), generator=g)
    acc = EnsembleAccumulator(labels)
    for z in logits:
        acc.add(z)
    mean = torch.stack([torch.softmax(z.double(), 1) for z in logits]).mean(0)
    torch.testing.assert_close(acc.probabilities(), mean, rtol=0, atol=1e-12)
    assert np.isfinite(acc.add(logits[0])[1][0])
    p = torch.tensor([[0, 1, 2], [0, 1, 1]])
    np.testing.assert_allclose(disagreement(p), [[0.0, 100 / 3], [100 / 3, 0.0]], rtol=1e-12)


def test_ensemble_bad_inputs_are_one_line_errors_before_any_work(members, tmp_path, capsys):
    command = importlib.import_module("widthkit.ensemble")

    paths, mlp = members
    out = tmp_path / "e.h5"
    cases = [
        (["--ckpt", paths[0]], "an ensemble needs at least two members, got 1"),
        (["--ckpt", paths[0], "--ckpt", mlp], "does not share the architecture"),
        (["--ckpt", paths[0], "--ckpt", paths[1], "--swa", mlp], "does not share the architecture"),
        (["--ckpt", paths[0], "--ckpt", paths[1], "--compare", "sgd.pt"], "expected LABEL=PATH"),
        (["--iterates", str(tmp_path)], "no checkpoint file"),
    ]
    for argv, message in cases:
        assert command.main([*argv, "--device", "cpu", "--out", str(out), "--no-plot"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
