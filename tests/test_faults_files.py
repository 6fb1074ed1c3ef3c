"""Files, folders and signals as users meet them (issue 21, items 10, 11, 12, 15, 18 and SIGTERM): real killed
processes, real full and read-only filesystems; every fault is one line, keeps what was finished, and leaves no
lock or temporary file behind."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ANALYSIS_CHILD, STOP_HERE, TRAIN_CHILD, fill_disk, kill9, python_child, wait_for_marker

import widthkit
from widthkit import pipeline
from widthkit.fileio import WriterLock, remove_stale_temps
from widthkit.report.store import read

rays_cmd, plot_cmd, train_cmd = (importlib.import_module(f"widthkit.{m}") for m in ("rays", "plot", "train"))

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--bn", "keep", "--train-subset", "40", "--test-subset", "40", "--quiet", "--no-refine"]


def _rays_args(ckpt, out, *flags):
    return ["--ckpt", ckpt, "--dirs", "3", "--steps", "3", *SMALL, "--out", str(out), *flags]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------------------
# item 10: a kill -9 during the width rewrite leaves a temporary copy; the next run removes it
# ----------------------------------------------------------------------------------------------------------

# argv: MARKER ARGS...: `python -m widthkit.rays ARGS...`, stopped in the width rewrite once the fresh copy of
# the file is complete, just before it would replace the original
REWRITE_CHILD = STOP_HERE + '''
import importlib

marker, args = sys.argv[1], sys.argv[2:]
real = os.replace


def replace(src, dst, *a, **kw):
    if ".h5.tmp-" in os.path.basename(str(src)):
        stop_here(marker)
    return real(src, dst, *a, **kw)


os.replace = replace
sys.exit(importlib.import_module("widthkit.rays").main(args))
'''


@pytest.mark.subprocess
def test_a_killed_width_rewrite_leaves_a_copy_the_next_run_removes(digits_ckpts, tmp_path, spawn):
    out = tmp_path / "r.h5"
    args = _rays_args(digits_ckpts["sgd"], out, "--no-plot")
    assert rays_cmd.main(args) == 0
    before = read(out)
    marker = tmp_path / "marker"
    proc, log = spawn(python_child(REWRITE_CHILD, marker, *args, "--threshold", "test_err=+2"))
    pid = wait_for_marker(marker, proc, log)
    kill9(proc)
    stale = tmp_path / f".r.h5.tmp-{pid}"
    assert stale.is_file() and stale.stat().st_size > 0.5 * out.stat().st_size  # the real fault, reproduced
    assert read(out)["attrs"]["width_report"] == before["attrs"]["width_report"]  # the original is untouched
    # a temporary file of a process that is still alive is another writer's: it stays
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = tmp_path / f".r.h5.tmp-{alive.pid}"
        live.write_bytes(b"mid-write")
        assert rays_cmd.main(args + ["--threshold", "test_err=+2"]) == 0
        assert not stale.exists() and live.exists()
    finally:
        alive.kill()
        alive.wait()
    live.unlink()
    assert _names(tmp_path) == ["child0.log", "marker", "r.h5", "r.widths.json"]
    assert read(out)["attrs"]["width_report"][0]["threshold"] == "test_err=+2"


def test_a_folder_lock_removes_the_temporary_files_of_dead_writers(tmp_path):
    """The trainer locks its folder: a checkpoint half-written by a killed trainer (atomic_write's temporary
    name) goes when the next run takes the lock; a complete file and an unrelated hidden file stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    half = run / f".sgd.pt.tmp-{dead.pid}.k3j_x9z2"
    half.write_bytes(b"half a checkpoint")
    (run / "sgd.pt").write_bytes(b"whole")
    (run / ".notes").write_text("mine")
    with WriterLock(run):
        assert not half.exists()
    assert _names(run) == [".notes", "sgd.pt"]
    assert remove_stale_temps(run) == []


# ----------------------------------------------------------------------------------------------------------
# item 11: full disks
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.subprocess  # mount/umount
def test_a_full_disk_while_drawing_figures_is_one_line_and_leaves_no_empty_png(digits_ckpts, tmp_path, small_disk,
                                                                              capsys):
    out = tmp_path / "r.h5"
    figures = small_disk / "figs"
    figures.mkdir()
    fill_disk(small_disk, leave=8_000)  # the grid fits elsewhere; a figure does not
    args = _rays_args(digits_ckpts["sgd"], out, "--figures", str(figures), "--format", "png")
    assert rays_cmd.main(args) == 2
    err = _one_line(capsys)
    assert err == (f"error: cannot write {figures / 'r.png'}: No space left on device; free some space there (or "
                   "write elsewhere) and run the same command again: what was finished is kept"), err
    assert _names(figures) == []  # no 0-byte or half PNG, no temporary file
    assert _names(tmp_path) == ["r.h5", "r.widths.json", "small"]  # no stale lock
    assert widthkit.load(out).complete()
    (small_disk / "filler").unlink()
    assert rays_cmd.main(args) == 0  # the same command finishes the job
    assert _names(figures) == ["r.png"] and (figures / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.subprocess  # mount/umount
def test_a_completely_full_disk_is_one_line_and_leaves_no_lock(digits_ckpts, small_disk, capsys):
    fill_disk(small_disk, leave=0)
    out = small_disk / "r.h5"
    assert rays_cmd.main(_rays_args(digits_ckpts["sgd"], out, "--no-plot")) == 2
    err = _one_line(capsys)
    assert err.startswith(f"error: could not create {out}: No space left on device; nothing was written"), err
    assert _names(small_disk) == ["filler"]


@pytest.mark.subprocess  # mount/umount
def test_training_onto_a_full_disk_is_one_line_and_loses_nothing(tmp_path, small_disk, capsys):
    flags = ["--epochs", "2", "--quiet"]
    assert train_cmd.main(flags + ["--out", str(tmp_path / "whole")]) == 0  # the uninterrupted reference
    capsys.readouterr()
    run = small_disk / "run"
    fill_disk(small_disk, leave=300_000)  # room for the first files only (a checkpoint is 66 kB, the state 200)
    assert train_cmd.main(flags + ["--out", str(run)]) == 2
    err = _one_line(capsys)
    assert err.startswith(f"error: cannot write {run}/") and ": No space left on device; free some space there" \
        in err and "inline_container" not in err, err
    assert not any(n.startswith(".") for n in _names(run)) and _names(small_disk) == ["filler", "run"]
    from widthkit.inputs.checkpoints import load_checkpoint

    kept = {n: load_checkpoint(run / n).state_dict for n in _names(run) if n.endswith(".pt") and n != "train_state.pt"}
    assert kept, err  # checkpoints were finished before the disk filled up, and are whole ...
    (small_disk / "filler").unlink()
    assert train_cmd.main(flags + ["--out", str(run)]) == 0  # ... and the same command continues from them
    for name in ("start.pt", "sgd.pt", "swa.pt", *kept):  # to the run an uninterrupted run trains
        a, b = load_checkpoint(run / name).state_dict, load_checkpoint(tmp_path / "whole" / name).state_dict
        assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), name
    for name, weights in kept.items():
        if name != "swa.pt":  # (the average is rewritten as it moves on)
            now = load_checkpoint(run / name).state_dict
            assert all(np.array_equal(now[k].numpy(), weights[k].numpy()) for k in now), name


# ----------------------------------------------------------------------------------------------------------
# item 12: a partial file plotted from Python
# ----------------------------------------------------------------------------------------------------------


def test_plotting_a_partial_file_from_python_warns_once_and_marks_it(digits_ckpts, tmp_path):
    import matplotlib.pyplot as plt

    out = tmp_path / "p.h5"

    class Stop(Exception):
        pass

    def progress(done, total):
        if done >= 2:
            raise Stop  # like a kill after the second chunk

    with pytest.raises(Stop):
        widthkit.rays(digits_ckpts["swa"], dirs=3, steps=3, bn_mode="keep", chunk_size=1, train_subset=40,
                      test_subset=40, out=out, progress=progress)
    res = widthkit.load(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        axes = [res.plot(), res.plot()]
    try:
        partial = [w for w in caught if "is partial" in str(w.message)]
        assert len(partial) == 1 and issubclass(partial[0].category, UserWarning)
        assert str(partial[0].message).startswith(f"{out} is partial: 2 of 9 points computed")
        for ax in axes:
            marks = [t.get_text() for t in ax.figure.texts if t.get_gid() == "partial"]
            assert marks == ["PARTIAL: 2 of 9 points computed; resume with the same command"]
    finally:
        for ax in axes:
            plt.close(ax.figure)
    whole = widthkit.rays(digits_ckpts["swa"], dirs=1, steps=2, bn_mode="keep", train_subset=40, test_subset=40,
                          out=tmp_path / "w.h5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete file: no warning, no mark
        ax = whole.plot()
    assert not [t for t in ax.figure.texts if t.get_gid() == "partial"]
    plt.close(ax.figure)


# ----------------------------------------------------------------------------------------------------------
# item 15: typed names stay in their folders
# ----------------------------------------------------------------------------------------------------------


def test_a_checkpoint_label_cannot_place_the_file_outside_analyses(digits_ckpts, tmp_path, monkeypatch):
    work = tmp_path / "w1" / "w2" / "w3" / "w4" / "w5"
    (work / "ck").mkdir(parents=True)
    (work / "ck" / "sgd.pt").write_bytes(Path(digits_ckpts["sgd"]).read_bytes())
    monkeypatch.chdir(work)
    args = ["--ckpt", "../../../../../x/ESCAPED=ck/sgd.pt", "--dirs", "1", "--steps", "2", *SMALL, "--no-plot"]
    assert rays_cmd.main(args) == 0
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["w1/w2/w3/w4/w5/analyses/rays-.._.._.._.._.._x_ESCAPED.h5",
                       "w1/w2/w3/w4/w5/analyses/rays-.._.._.._.._.._x_ESCAPED.widths.json",
                       "w1/w2/w3/w4/w5/ck/sgd.pt"], written
    assert [p.name for p in (work / "analyses").iterdir() if p.is_dir()] == []
    # an explicit --out is the user's choice, and is honoured
    assert rays_cmd.main(args + ["--out", "../elsewhere/r.h5"]) == 0
    assert (work.parent / "elsewhere" / "r.h5").is_file()


@pytest.mark.parametrize("run", ["../../../x", "/abs/x", "a/../../x"])
def test_a_pipeline_run_name_cannot_leave_the_root(tmp_path, capsys, run):
    root = tmp_path / "root" / "a" / "b"
    assert pipeline.main(["--run", run, "--root", str(root)]) == 2
    err = _one_line(capsys)
    assert f"--run {run!r} would place the run outside the checkpoints/, analyses/ and figures/ of --root" in err
    assert _names(tmp_path) == []  # refused before any folder was made


def test_a_pipeline_run_name_may_hold_sub_folders():
    assert pipeline.check_run_name("ablation/lr0.1") == "ablation/lr0.1"


# ----------------------------------------------------------------------------------------------------------
# item 18: messages
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.subprocess  # mount/umount
def test_training_into_a_read_only_folder_names_it(read_only_folder, capsys):
    assert train_cmd.main(["--epochs", "2", "--quiet", "--out", str(read_only_folder / "run")]) == 2
    assert _one_line(capsys) == (f"error: cannot write to {read_only_folder / 'run'} (Read-only file system); "
                                 "choose another folder (--out, --figures, --root)")


@pytest.mark.subprocess  # mount/umount
def test_plotting_into_a_read_only_folder_names_it(digits_ckpts, tmp_path, read_only_folder, capsys):
    out = tmp_path / "r.h5"
    widthkit.rays(digits_ckpts["sgd"], dirs=1, steps=2, bn_mode="keep", train_subset=40, test_subset=40, out=out)
    assert plot_cmd.main([str(out), "--figures", str(read_only_folder / "f"), "--format", "png"]) == 2
    assert _one_line(capsys) == (f"error: cannot write to {read_only_folder / 'f'} (Read-only file system); "
                                 "choose another folder (--out, --figures, --root)")


def test_out_naming_a_directory_is_one_line(digits_ckpts, tmp_path, capsys):
    folder = tmp_path / "results"
    folder.mkdir()
    assert rays_cmd.main(_rays_args(digits_ckpts["sgd"], folder, "--no-plot")) == 2
    assert _one_line(capsys) == f"error: --out {folder} is a directory; give a file name such as {folder}/rays.h5"
    assert _names(folder) == [] and _names(tmp_path) == ["results"]
    with pytest.raises(ValueError, match=r"out='.*results' is a folder; give the analysis file's name, such as "
                                         r"'.*results/rays\.h5'"):
        widthkit.rays(digits_ckpts["sgd"], dirs=1, steps=2, bn_mode="keep", out=folder)  # the API too
    assert _names(folder) == []


def test_the_train_init_hint_names_trains_own_flags(digits_ckpts, tmp_path, capsys):
    """train has --model (and --model-kwargs), not --arch: a mismatched --init says which --model fits."""
    import torch

    from widthkit.inputs.checkpoints import load_checkpoint

    bare = tmp_path / "mlp-weights.pt"
    torch.save(load_checkpoint(digits_ckpts["mlp"]).state_dict, bare)
    for init in (digits_ckpts["mlp"], bare):
        assert train_cmd.main(["--init", str(init), "--epochs", "1", "--quiet", "--out",
                               str(tmp_path / "run")]) == 2
        err = _one_line(capsys)
        assert "--model digits_mlp" in err and "--arch" not in err and "arch=" not in err.split(": ", 2)[-1], err
    assert not (tmp_path / "run").exists()  # nothing made for a run that cannot start


def test_huge_seeds_are_refused_before_any_folder(tmp_path, capsys):
    root = tmp_path / "root"
    assert pipeline.main(["--seeds", "0,99999999999999999999999", "--root", str(root)]) == 2
    assert _one_line(capsys) == ("error: --seeds: 99999999999999999999999 is too large; seeds run from 0 to "
                                 "9223372036854775807 (2**63 - 1)")
    assert _names(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# SIGTERM is an interruption like Ctrl-C
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_sigterm_of_rays_says_what_was_saved_and_leaves_no_lock(digits_ckpts, tmp_path, spawn):
    out = tmp_path / "r.h5"
    args = _rays_args(digits_ckpts["sgd"], out, "--no-plot", "--chunk-size", "1")
    marker = tmp_path / "m"
    proc, log = spawn(python_child(ANALYSIS_CHILD, marker, 3, "widthkit.rays", *args))
    wait_for_marker(f"{marker}.0", proc, log)
    os.kill(proc.pid, signal.SIGTERM)  # what `kill PID` and batch schedulers send
    assert proc.wait() == 128 + signal.SIGTERM
    said = Path(log).read_text().strip().splitlines()
    assert said[-1] == ("terminated (SIGTERM): every finished chunk of points is in the file; run the same command "
                        "again to resume"), said
    assert "Traceback" not in Path(log).read_text()
    assert _names(tmp_path) == ["child0.log", "m.0", "r.h5"]  # no .r.h5.lock, no temporary file
    done = int(read(out)["models"]["sgd"]["done"].sum())
    assert 3 <= done < 9
    assert rays_cmd.main(args) == 0  # resumed to the end, identical to a run never stopped
    assert rays_cmd.main(_rays_args(digits_ckpts["sgd"], tmp_path / "whole.h5", "--no-plot")) == 0
    a, b = read(out)["models"]["sgd"]["metrics"], read(tmp_path / "whole.h5")["models"]["sgd"]["metrics"]
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.subprocess
def test_sigterm_of_train_says_what_was_saved_and_leaves_no_lock(tmp_path, spawn):
    run = tmp_path / "run"
    marker = tmp_path / "m"
    proc, log = spawn(python_child(TRAIN_CHILD, marker, 2, 3, "--epochs", "2", "--quiet", "--out", run))
    wait_for_marker(marker, proc, log)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait() == 143
    said = Path(log).read_text().strip().splitlines()
    assert said[-1] == ("terminated (SIGTERM): every finished epoch is saved in the output folder; run the same "
                        "command again to resume"), said
    assert _names(tmp_path) == ["child0.log", "m", "run"]  # no .run.lock
    assert not any(n.startswith(".") for n in _names(run))
    assert train_cmd.main(["--epochs", "2", "--quiet", "--out", str(run)]) == 0
