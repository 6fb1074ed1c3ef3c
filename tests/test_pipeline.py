"""The train-then-analyze pipeline on the digits recipe, shrunk to two epochs and tiny grids."""

import os

import numpy as np
import pytest

from widthkit import pipeline
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.report.store import read

# a few Hessian-vector products on a few examples: the stage runs, its numbers are tested in test_curvature.py
TINY_CURVATURE = ["--curvature-loss-subset", "64", "--curvature-trace-hvps", "6", "--curvature-slq-probes", "1",
                  "--curvature-slq-steps", "8", "--curvature-lanczos-max-iter", "12"]
TINY = ["--epochs", "2", "--dirs", "2", "--steps", "3", "--line-steps", "3", "--plane-resolution", "3",
        "--train-subset", "200", "--quiet", "--format", "png,pdf", "--device", "cpu", *TINY_CURVATURE]


@pytest.mark.slow
def test_two_epoch_pipeline_writes_every_promised_file(tmp_path, capsys):
    assert pipeline.main(["--root", str(tmp_path), "--run", "tiny", *TINY]) == 0
    printed = capsys.readouterr().out
    ck, an, fig = tmp_path / "checkpoints" / "tiny", tmp_path / "analyses" / "tiny", tmp_path / "figures" / "tiny"
    for name in ("start.pt", "sgd.pt", "swa.pt", "log.csv"):
        assert (ck / name).stat().st_size > 0, name
    roles = {r: load_checkpoint(ck / f"{r}.pt").meta["role"] for r in ("start", "sgd", "swa")}
    assert roles == {"start": "start", "sgd": "sgd", "swa": "swa"}
    for name in ("rays", "line", "plane"):
        data = read(an / f"{name}.h5")
        assert all(m["done"].all() for m in data["models"].values()), name
        assert all(np.isfinite(v).all() for m in data["models"].values() for v in m["metrics"].values())
    assert read(an / "rays.h5")["models"]["swa"]["metrics"]["test_err"].shape == (2, 3)
    assert read(an / "plane.h5")["axes"]["point_labels"] == ["start", "SGD", "SWA"]
    assert (an / "rays.widths.json").exists()
    for stem in ("rays", "line", "plane_test_err", "plane_train_loss_l2"):
        assert (fig / f"{stem}.png").stat().st_size > 5000 and (fig / f"{stem}.pdf").exists(), stem
    report = (an / "report.md").read_text()
    assert "## Test accuracy" in report and "| SWA |" in report and "width at test_err=+5" in report
    for link in ("../../figures/tiny/rays.png", "../../figures/tiny/plane_test_err.png"):
        assert link in report and (an / link).resolve().exists()
    assert f"report:      {an / 'report.md'}" in printed

    # re-running skips what is finished: no checkpoint or analysis is rewritten
    stamps = {p: os.stat(p).st_mtime_ns for p in [*ck.glob("*.pt"), *an.glob("*.h5")]}
    assert pipeline.main(["--root", str(tmp_path), "--run", "tiny", *TINY]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


def test_pipeline_refuses_bad_input_before_training(tmp_path, capsys):
    assert pipeline.main(["--root", str(tmp_path), "--skip", "rays,contour", *TINY]) == 2
    assert "unknown stage(s) ['contour']" in capsys.readouterr().err
    assert pipeline.main(["--root", str(tmp_path), "--model", "resnet9000", *TINY]) == 2
    err = capsys.readouterr().err
    assert "resnet9000" in err and "digits_cnn" in err
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").rglob("*.pt"))


def test_report_without_rays_shows_the_trainers_accuracy(tmp_path, capsys):
    assert pipeline.main(["--root", str(tmp_path), "--run", "norays", "--skip", "rays,line,plane,iterates,trajectory,curvature", *TINY]) == 0
    report = (tmp_path / "analyses" / "norays" / "report.md").read_text()
    final = load_checkpoint(tmp_path / "checkpoints" / "norays" / "swa.pt").meta["metrics"]
    final = final.get("final", final)
    assert f"| SWA | {100 - final['test_err']:.2f} | {final['test_loss']:.4f} |" in report
    assert "the rays stage was skipped" in report


@pytest.mark.slow
def test_pipeline_draws_the_iterate_planes_and_the_hessian(tmp_path, capsys):
    """Four epochs: SWA averages 3 iterates, so the Figure-1 plane (iterates 1, 2, 3 with SWA and SGD marked),
    the iterates' PCA plane with their trajectory, and the Hessian stage all run and reach the report."""
    from widthkit.report.curvature_store import read_curvature

    argv = ["--root", str(tmp_path), "--run", "it", "--epochs", "4", "--skip", "rays,line,plane",
            "--plane-resolution", "3", "--train-subset", "100", "--test-subset", "60", "--bn-subset", "64",
            "--quiet", "--format", "png", *TINY_CURVATURE]
    assert pipeline.main(argv) == 0
    an, fig = tmp_path / "analyses" / "it", tmp_path / "figures" / "it"
    iterates = read(an / "iterates.h5")
    assert iterates["attrs"]["mark_labels"] == ["SWA", "SGD"]
    assert [p.rsplit("_", 1)[-1] for p in iterates["axes"]["point_labels"]] == ["001", "002", "003"]
    trajectory = read(an / "trajectory.h5")
    assert trajectory["axes"]["trajectory"].shape == (3, 2)
    curv = read_curvature(an / "curvature.h5")
    assert set(curv["models"]) == {"sgd", "swa"}
    report = (an / "report.md").read_text()
    for text in ("the paper's Figure 1", "trajectory", "Hessian spectrum", "../../figures/it/curvature.png"):
        assert text in report, text
    assert (fig / "curvature.png").stat().st_size > 5000 and (fig / "trajectory_test_err.png").exists()
