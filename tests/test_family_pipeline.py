"""The pipeline's SWA-vs-FGE stage and, with two seeds, the curve between their SGD solutions (tiny digits runs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from widthkit import pipeline
from widthkit.analyses.curve import load_curve
from widthkit.analyses.ensemble import load_ensemble
from widthkit.engine.curves import barrier
from widthkit.report.summary import paired_test
from widthkit.training.trainer import read_log

# two epochs: prefix 1, SGD to 2, SWA to 3 (two snapshots); only training, the ensemble and the curve
ONLY_FAMILY = ["--epochs", "2", "--skip", "rays,line,plane,iterates,trajectory,curvature", "--train-subset", "100",
               "--test-subset", "60", "--bn-subset", "64", "--curve-epochs", "1", "--curve-points", "5",
               "--curve-plane", "3", "--quiet", "--format", "png", "--threads", "1"]


@pytest.mark.slow
def test_two_seeds_report_swa_vs_fge_with_paired_tests_and_the_curve(tmp_path, capsys):
    assert pipeline.main(["--root", str(tmp_path), "--run", "fam", "--seeds", "0,1", *ONLY_FAMILY]) == 0
    an = tmp_path / "analyses" / "fam"
    agg = json.loads((an / "aggregate.json").read_text())
    fam = agg["family"]
    assert fam["n_seeds"] == 2 and set(fam["budgets"]) == {"1.0", "1.5"}
    # every number of the table from the seeds' own ensemble files
    per_seed = {}
    for seed in (0, 1):
        n = load_ensemble(an / f"seed{seed}" / "ensemble.h5").numbers()
        assert [m["label"] for m in n["members"]] == ["swa_iter_001", "swa_iter_002"]
        assert set(n["compare"]) == {"SGD", "SWA 1B", "SWA 1.5B"}
        per_seed[seed] = n
    fge_15 = [100 - per_seed[s]["ensemble"]["test_err"] for s in (0, 1)]
    swa_15 = [100 - per_seed[s]["compare"]["SWA 1.5B"]["test_err"] for s in (0, 1)]
    row = fam["budgets"]["1.5"]
    assert row["fge"]["acc"]["values"] == pytest.approx(fge_15) and row["swa"]["acc"]["values"] == pytest.approx(swa_15)
    assert row["fge"]["passes"]["mean"] == 2 and fam["budgets"]["1.0"]["fge"]["passes"]["mean"] == 1
    assert row["tests"]["acc"]["differences"] == pytest.approx(paired_test(swa_15, fge_15)["differences"])
    report = (an / "report.md").read_text()
    assert "## SWA vs FGE at the same budget, mean ± std over 2 seeds" in report
    assert "FGE − SWA test accuracy" in report and "| 1.5 |" in report
    # the curve between the two SGD solutions, its barrier beside the straight line's
    res = load_curve(an / "curve.h5")
    assert res.info["endpoints"] == ["SGD seed 0", "SGD seed 1"] and res.plane is not None
    for p in ("line", "curve"):
        assert agg["curve"]["barriers"][p]["train_loss"] == pytest.approx(barrier(res.models[p]["metrics"]["train_loss"]))
    assert "## A curve between SGD seed 0 and SGD seed 1" in report and "| straight line |" in report
    assert (tmp_path / "figures" / "fam" / "curve.png").exists()
    assert (tmp_path / "figures" / "fam" / "curve-plane.png").exists()
    # each seed's own report has its SWA-vs-FGE table, from the trainer's snapshots
    seed_report = (an / "seed0" / "report.md").read_text()
    assert "## SWA vs FGE at the same budget" in seed_report and "| FGE (ensemble of the same snapshots) | 1.5 |" \
        in seed_report
    log = read_log(tmp_path / "checkpoints" / "fam" / "seed0" / "log.csv")
    assert sum(r["weights"] == "average" for r in log) >= 2
    assert np.isfinite(res.barriers()["curve"]["test_err"])


def test_family_flags_are_checked_before_training(tmp_path, capsys):
    assert pipeline.main(["--root", str(tmp_path), "--seeds", "0,1", "--curve-bends", "0", *ONLY_FAMILY]) == 2
    err = capsys.readouterr().err
    assert "--bends must be an integer >= 1" in err and err.count("\n") == 1
    assert not (tmp_path / "checkpoints").exists()
