"""The shape of the code: one evaluation config behind every command, no private names across modules, no import
cycles, the writer lock over the whole command, nothing left behind, provenance in every output."""

import ast
import gc
import importlib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import fill_disk

import widthkit
from widthkit import EvalConfig, cli, pipeline
from widthkit.report.store import read
from widthkit.training.trainer import TrainConfig, layered_config

# the command modules share their names with the API functions: import them as modules
rays_cmd, line_cmd, plane_cmd = (importlib.import_module(f"widthkit.{m}") for m in ("rays", "line", "plane"))
PACKAGE = Path(widthkit.__file__).parent
EVAL_FLAGS = [cli.flag_name(name) for name in EvalConfig.__dataclass_fields__]  # --bn-mode, --dataset, ...


def _options(parser) -> dict:
    """flag -> argparse action of a parser."""
    return {s: a for a in parser._actions for s in a.option_strings}


def test_analysis_commands_share_the_evaluation_flags_and_defaults():
    parsers = {"rays": rays_cmd.build_parser(), "line": line_cmd.build_parser(), "plane": plane_cmd.build_parser()}
    base = ["--ckpt", "x.pt"]
    configs = {}
    for name, p in parsers.items():
        opts = _options(p)
        assert all(f in opts for f in EVAL_FLAGS), name
        configs[name] = EvalConfig(**cli.config_values(p.parse_args(base), EvalConfig))
    assert configs["rays"] == configs["line"] == configs["plane"] == EvalConfig()
    # the pipeline takes data, device, precision, seed and weight decay from the training config; the rest of
    # its evaluation flags are the same flags with the same defaults
    p = pipeline.build_parser()
    opts = _options(p)
    assert all(f in opts for f in EVAL_FLAGS), "pipeline"
    args = p.parse_args([])
    cfg = pipeline.eval_config(args, layered_config(args.recipe))
    expected = EvalConfig(dataset="digits", weight_decay=TrainConfig().weight_decay)
    assert cfg == expected
    # rays' own flags: the same names and defaults in rays and in the pipeline
    rays_opts = _options(parsers["rays"])
    for flag in ("--dirs", "--steps", "--max-dist", "--norm", "--exclude", "--threshold", "--refine", "--tol"):
        assert opts[flag].default == rays_opts[flag].default, flag
    assert opts["--line-steps"].default == _options(parsers["line"])["--steps"].default
    assert tuple(opts["--plane-resolution"].default) == tuple(_options(parsers["plane"])["--resolution"].default)


@pytest.mark.parametrize("cmd", [rays_cmd, line_cmd, plane_cmd, pipeline])
def test_bn_mode_and_norm_are_validated_by_the_config_alone(cmd, capsys, tmp_path):
    opts = _options(cmd.build_parser())
    assert opts["--bn-mode"].choices is None and opts["--norm"].choices is None if "--norm" in opts else True
    argv = ["--ckpt", str(tmp_path / "missing.pt")] if cmd is not pipeline else ["--root", str(tmp_path)]
    assert cmd.main(argv + ["--bn", "train"]) == 2
    err = capsys.readouterr().err
    assert "unknown bn_mode 'train'; valid choices: recompute, keep, batch" in err
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.h5"))  # refused before any work
    if "--norm" in opts:
        assert cmd.main(argv + ["--norm", "sphere"]) == 2
        assert "unknown direction normalisation 'sphere'; valid choices: unit, filter, layer, adaptive" \
            in capsys.readouterr().err


def test_exclude_none_means_the_same_everywhere():
    from widthkit import PlaneConfig, RaysConfig

    for p, cls in ((rays_cmd.build_parser(), RaysConfig), (plane_cmd.build_parser(), PlaneConfig)):
        for text, kinds in (("none", ()), ("biasbn", ("bias", "norm")), ("bias", ("bias",))):
            args = p.parse_args(["--ckpt", "x", "--exclude", text])
            assert cls(**cli.config_values(args, cls)).exclude == kinds


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, path.name == "__init__.py"


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module, path, is_pkg, modules):
    """(target module, imported names, the alias each binds) of every widthkit import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_pkg, node)
            if not target.startswith("widthkit"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in modules else target, a.name if sub not in modules else None,
                            a.asname or a.name))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("widthkit"):
                    out.append((a.name, None, a.asname or a.name.split(".")[0]))
    return out


def test_no_private_name_crosses_a_module_boundary():
    modules = {m for m, _, _ in _modules()}
    offences = []
    for module, path, is_pkg in _modules():
        imported_modules = set()
        for target, name, alias in _imports(module, path, is_pkg, modules):
            if name is None:
                imported_modules.add(alias)
            elif name.startswith("_") and not name.startswith("__"):
                offences.append(f"{module}: from {target} import {name}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in imported_modules and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                offences.append(f"{module}: {node.value.id}.{node.attr}")
    assert not offences, offences


def test_no_import_cycle_even_through_deferred_imports():
    modules = {m for m, _, _ in _modules()}
    graph = {m: set() for m in modules}
    for module, path, is_pkg in _modules():
        for target, _, _ in _imports(module, path, is_pkg, modules):
            if target in modules and target != module and not module.startswith(target + ".") \
                    and not target.startswith(module + "."):
                graph[module].add(target)
    # the package __init__ files re-export their children; an edge into a package means its __init__
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_api_result_without_out_leaves_no_temporary_files(digits_ckpts, monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    res = widthkit.rays(digits_ckpts["swa"], dirs=1, steps=2, bn_mode="keep", train_subset=50, test_subset=50)
    folder = res.path.parent
    assert folder.parent == tmp_path and res.path.exists()
    del res
    gc.collect()
    assert not folder.exists() and not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="exactly two"):  # a failed call leaves nothing either
        widthkit.line([digits_ckpts["swa"]], bn_mode="keep")
    assert not list(tmp_path.iterdir())


@pytest.mark.subprocess
def test_writer_lock_covers_widths_and_figures_and_is_gone_after(digits_ckpts, tmp_path):
    """While the command still works on its file (widths, figures), a second process cannot take it; after a
    clean finish no lock file is left beside the result."""
    out = tmp_path / "r.h5"
    code = ("import sys; from widthkit.fileio import WriterLock, OutputBusy\n"
            "try:\n    WriterLock(sys.argv[1]).acquire()\nexcept OutputBusy as e:\n    print(e); sys.exit(3)")
    seen = {}

    def after(res):
        other = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
        seen["code"], seen["msg"] = other.returncode, other.stdout
        res.record_widths([res.widths("test_err=+5")])  # re-enters the lock held by this process

    widthkit.rays(digits_ckpts["swa"], dirs=2, steps=3, bn_mode="keep", train_subset=50, test_subset=50,
                  out=out, after=after)
    assert seen["code"] == 3 and "being written by another widthkit process" in seen["msg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5"]
    assert "widths" in read(out)


def test_provenance_in_every_file_and_checkpoint(digits_ckpts, tmp_path):
    import torch

    out = tmp_path / "r.h5"
    widthkit.rays(digits_ckpts["swa"], dirs=1, steps=2, bn_mode="keep", train_subset=50, test_subset=50, out=out,
                  device="cpu")
    prov = read(out)["attrs"]["provenance"]
    assert prov["threads"] == torch.get_num_threads() and prov["device"] == "cpu"
    assert prov["precision"] == "fp32" and prov["torch_version"] == torch.__version__
    ck = widthkit.load_checkpoint(digits_ckpts["swa"])
    assert ck.meta["provenance"]["threads"] == torch.get_num_threads()
    assert ck.meta["provenance"]["torch_version"] == torch.__version__


@pytest.mark.subprocess
def test_a_second_train_into_the_same_folder_is_refused(tmp_path, capsys):
    """Two `train --out ck` at once: the second stops with a clear error instead of overwriting the first."""
    train_cmd = importlib.import_module("widthkit.train")
    out = tmp_path / "ck"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from widthkit.fileio import WriterLock; WriterLock(sys.argv[1]).acquire();"
         " print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # the other run holds the folder now
        assert train_cmd.main(["--out", str(out), "--epochs", "2", "--quiet"]) == 2
        assert "being written by another widthkit process" in capsys.readouterr().err
        assert not list(tmp_path.rglob("*.pt"))
    finally:
        holder.kill()
        holder.wait()


def test_model_and_data_are_checked_against_each_other_before_any_file(digits_ckpts, tmp_path):
    import torch

    x = torch.randn(20, 1, 8, 8)
    bad = {
        "labels run from 0 to 11": (x, torch.arange(20) % 12),
        "labels run from -1": (x, torch.arange(20) % 10 - 1),
        "integer class indices": (x, (torch.arange(20) % 10).float()),
        "cannot take the user-data inputs": (torch.randn(20, 3, 8, 8), torch.arange(20) % 10),
    }
    for i, (message, split) in enumerate(bad.items()):
        out = tmp_path / f"r{i}.h5"
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            widthkit.rays(digits_ckpts["swa"], (split, split), dirs=1, steps=2, bn_mode="keep", out=out)
        assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.subprocess  # mount/umount
def test_a_full_disk_while_storing_widths_keeps_the_finished_grid(digits_ckpts, small_disk, capsys):
    out = small_disk / "r.h5"
    args = ["--ckpt", digits_ckpts["sgd"], "--dirs", "30", "--steps", "3", "--bn", "keep", "--no-plot", "--quiet",
            "--train-subset", "50", "--test-subset", "50", "--no-refine", "--out", str(out)]
    assert rays_cmd.main(args) == 0
    before = read(out)
    size = out.stat().st_size
    assert rays_cmd.main(args) == 0 and out.stat().st_size == size  # a re-run does not grow the file
    fill_disk(small_disk, leave=100_000)
    capsys.readouterr()
    assert rays_cmd.main(args + ["--threshold", "test_err=+2"]) == 2  # new widths must be stored: no room
    err = capsys.readouterr().err
    assert "the file and its finished grid are unchanged" in err and "free that much space" in err
    after = widthkit.load(out)  # readable, the grid and the earlier widths intact
    for group, m in before["models"].items():
        for name, values in m["metrics"].items():
            assert (after.models[group]["metrics"][name] == values).all()
    assert after.data["attrs"]["width_report"] == before["attrs"]["width_report"]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "r.h5", "r.widths.json"]


def test_figures_of_real_runs_say_what_their_coordinates_are(digits_ckpts, tmp_path):
    """A --norm filter rays run and a random plane, computed for real, draw the units their files store."""
    import matplotlib.pyplot as plt

    from widthkit.report import render

    small = dict(bn_mode="keep", train_subset=40, test_subset=40)
    rays_file = tmp_path / "rays.h5"
    widthkit.rays([digits_ckpts["sgd"], digits_ckpts["swa"]], dirs=2, steps=3, norm="filter", out=rays_file, **small)
    plane_file = tmp_path / "plane.h5"
    widthkit.plane(digits_ckpts["swa"], random=True, resolution=3, out=plane_file, **small)
    for path, want, title_has in (
            (rays_file, "multiples of filter-normalised directions", "filter-normalised directions"),
            (plane_file, "multiples of filter-normalised random directions",
             "Random plane around SWA (filter-normalised directions)")):
        figs = render.figures_of(read(path))
        try:
            for _, fig in figs:
                axes = [ax for ax in fig.axes if ax.get_xlabel()]
                labels = " ".join(ax.get_xlabel() + " " + ax.get_ylabel() for ax in axes).replace("\n", " ")
                titles = " ".join([fig.get_suptitle()]
                                  + [ax.get_title() for ax in fig.axes]).replace("\n", " ")
                assert want in labels and title_has in titles, (labels, titles)
                assert "‖θ−θ₀‖₂" not in labels and "weight-space units" not in labels
                assert "Plane through" not in titles
        finally:
            for _, fig in figs:
                plt.close(fig)


@pytest.mark.subprocess  # mount/umount
def test_read_only_outputs_are_refused_before_any_work(digits_ckpts, read_only_folder, tmp_path, capsys):
    base = ["--ckpt", digits_ckpts["swa"], "--dirs", "1", "--steps", "2", "--bn", "keep", "--quiet"]
    assert rays_cmd.main(base + ["--out", str(read_only_folder / "r.h5")]) == 2
    assert "cannot write to" in capsys.readouterr().err
    assert rays_cmd.main(base + ["--out", str(tmp_path / "r.h5"), "--figures", str(read_only_folder / "f")]) == 2
    assert "cannot write to" in capsys.readouterr().err
    assert not (tmp_path / "r.h5").exists()  # refused before the grid, not after it


def test_a_partial_file_says_so_on_its_figures_and_in_plot(digits_ckpts, tmp_path, capsys):
    import matplotlib.pyplot as plt

    from widthkit.report import render, store

    plot_cmd = importlib.import_module("widthkit.plot")
    out = tmp_path / "p.h5"

    class Stop(Exception):
        pass

    def progress(done, total):
        if done >= 2:
            raise Stop  # like a kill after the second chunk: the first two chunks are in the file

    with pytest.raises(Stop):
        widthkit.rays(digits_ckpts["swa"], dirs=3, steps=3, bn_mode="keep", chunk_size=1, train_subset=40,
                      test_subset=40, out=out, progress=progress)
    data = read(out)
    assert store.completeness(data) == (2, 9)
    assert plot_cmd.main([str(out), "--figures", str(tmp_path / "f"), "--format", "png"]) == 0
    assert "is partial: 2 of 9 points computed" in capsys.readouterr().err
    figs = render.figures_of(data)
    try:
        texts = [t.get_text() for _, fig in figs for t in fig.texts if t.get_gid() == "partial"]
        assert texts == ["PARTIAL: 2 of 9 points computed; resume with the same command"]
    finally:
        for _, fig in figs:
            plt.close(fig)


def test_subsets_larger_than_the_data_are_refused(digits_ckpts, tmp_path, capsys):
    base = ["--ckpt", digits_ckpts["swa"], "--dirs", "1", "--steps", "2", "--quiet", "--out", str(tmp_path / "r.h5")]
    for flag, n in (("--train-subset", "5000"), ("--bn-subset", "2000"), ("--test-subset", "360")):
        assert rays_cmd.main(base + [flag, n]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {n} asks for more images than the digits split has" in err, err
    assert not (tmp_path / "r.h5").exists()


@pytest.mark.parametrize("flags, message", [
    (["--threshold", "garbage"], "cannot parse threshold 'garbage'"),
    (["--format", "bogus"], "unknown figure format(s) ['bogus']"),
    (["--tol", "-1"], "tol must be a positive number"),
    (["--tol", "0"], "tol must be a positive number"),
    (["--device", "bogus"], "unknown device 'bogus'"),
])
def test_every_flag_is_checked_before_the_first_point(digits_ckpts, tmp_path, capsys, flags, message):
    out = tmp_path / "r.h5"
    assert rays_cmd.main(["--ckpt", digits_ckpts["swa"], "--quiet", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.subprocess  # mount/umount
def test_a_full_disk_when_the_file_is_created_is_one_line_and_leaves_nothing(digits_ckpts, small_disk, capsys):
    fill_disk(small_disk, leave=20_000)
    out = small_disk / "r.h5"
    assert rays_cmd.main(["--ckpt", digits_ckpts["sgd"], "--dirs", "30", "--steps", "3", "--bn", "keep", "--quiet",
                          "--no-plot", "--train-subset", "50", "--test-subset", "50", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not create") and err.count("\n") == 1 and "No space left on device" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("faster", [1, 2])
def test_threads_are_chosen_by_timing_on_a_fake_clock(monkeypatch, faster):
    """The chooser times torch's default count against one thread and keeps the faster (a fake clock: the
    measured work 'takes' 1 s at the faster count and 3 s at the other)."""
    import torch

    from widthkit import runtime
    from widthkit.runtime import threads

    before = torch.get_num_threads()
    clock = {"t": 0.0}
    monkeypatch.setattr(threads.time, "perf_counter", lambda: clock["t"])

    def measure():
        clock["t"] += 1.0 if torch.get_num_threads() == faster else 3.0

    try:
        torch.set_num_threads(2)
        choice = runtime.choose_threads(measure)
        assert choice == {"threads": faster, "chosen_by": "timing", "seconds": {2: 1.0 if faster == 2 else 3.0,
                                                                                 1: 1.0 if faster == 1 else 3.0}}
        assert torch.get_num_threads() == faster
        assert runtime.choose_threads(measure, requested=2)["chosen_by"] == "flag" and torch.get_num_threads() == 2
        assert runtime.choose_threads(measure, recorded=1) == {"threads": 1, "chosen_by": "resumed file", "seconds": {}}
    finally:
        torch.set_num_threads(before)


def test_an_analysis_records_its_threads_restores_the_callers_and_a_resume_keeps_them(digits_ckpts, tmp_path,
                                                                                      monkeypatch):
    import torch

    from widthkit.analyses import grid

    calls = []
    real = grid.choose_threads
    monkeypatch.setattr(grid, "choose_threads", lambda *a, **kw: calls.append(a[1:]) or real(*a, **kw))
    before = torch.get_num_threads()
    out = tmp_path / "r.h5"
    small = dict(dirs=1, steps=2, bn_mode="keep", train_subset=40, test_subset=40, out=out, device="cpu")
    widthkit.rays(digits_ckpts["swa"], threads=1, **small)
    prov = read(out)["attrs"]["provenance"]
    assert prov["threads"] == 1 and prov["thread_choice"]["chosen_by"] == "flag"
    assert torch.get_num_threads() == before
    widthkit.rays(digits_ckpts["swa"], **small)  # the same file again: its recorded count is kept
    assert calls == [(1, None), (None, 1)]


def _config_classes() -> dict:
    """Every typed config of widthkit: the dataclasses whose fields are declared with ``settings.option``."""
    import dataclasses
    import pkgutil

    found = {}
    for info in pkgutil.walk_packages(widthkit.__path__, "widthkit."):
        mod = importlib.import_module(info.name)
        for obj in vars(mod).values():
            if (isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__.startswith("widthkit")
                    and any("help" in f.metadata for f in dataclasses.fields(obj))):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_setting_has_one_home():
    """Device, precision, threads and the forward batch size are fields of the runtime config alone; the BN mode
    of the evaluation config alone; nothing else declares them (the redesign's 'one definition per concern')."""
    import collections
    import dataclasses

    from widthkit.runtime import RUNTIME_FIELDS

    owners = collections.defaultdict(list)
    for name, cls in _config_classes().items():
        for f in dataclasses.fields(cls):
            owners[f.name].append(name)
    for field in RUNTIME_FIELDS:
        assert owners[field] == ["widthkit.runtime.config.RuntimeConfig"], (field, owners[field])
    for field in ("bn_mode", "bn_subset"):
        assert owners[field] == ["widthkit.engine.config.EvalConfig"], (field, owners[field])


def _calls_of(names: set[str]) -> dict:
    """{function name: sorted files (relative to the package) that call it} over widthkit's source."""
    out = {n: set() for n in names}
    for module, path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
                if name in out:
                    out[name].add(str(path.relative_to(PACKAGE)))
    return {n: sorted(v) for n, v in out.items()}


def test_each_setting_is_resolved_and_validated_in_one_place():
    """The resolvers of the runtime settings are called from the runtime package only (its config resolves the
    device; torchrun's group is joined for that device), and each setting's choices are checked once."""
    calls = _calls_of({"resolve_device", "normalize_precision", "init_process_group"})
    assert calls["resolve_device"] == ["runtime/config.py"]
    assert all(f.startswith("runtime/") for f in calls["normalize_precision"])
    assert calls["init_process_group"] == ["runtime/distributed.py"]
    checks = _choice_checks()
    assert checks["precision"] == ["runtime/config.py"]
    # the Hessian operator, a public class of its own, accepts the subset keep/recompute of the modes
    assert checks["bn_mode"] == ["engine/config.py", "engine/curvature.py"]


def _choice_checks() -> dict:
    """{setting: files with a ``check_choice("<setting>", ...)``} for the settings with fixed choices."""
    out = {}
    for module, path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check_choice" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                out.setdefault(node.args[0].value, set()).add(str(path.relative_to(PACKAGE)))
    return {k: sorted(v) for k, v in out.items()}


def test_old_spellings_work_and_warn_once(capsys, monkeypatch):
    """--bn, --dataset, --bn_mode, --no-progress and --amp still work, each with one deprecation line."""
    monkeypatch.setattr(cli, "_WARNED", set())  # once per process: earlier tests may have used the old names
    p = rays_cmd.build_parser()
    args = p.parse_args(["--ckpt", "x.pt", "--bn", "keep", "--dataset", "digits", "--amp", "--no-progress"])
    assert (args.bn_mode, args.dataset, args.amp, args.quiet) == ("keep", "digits", True, True)
    err = capsys.readouterr().err
    for old, new in (("--bn", "--bn-mode"), ("--dataset", "--data"), ("--amp", "--precision bf16"),
                     ("--no-progress", "--quiet")):
        assert f"warning: {old} is deprecated; use {new}" in err, old
    p.parse_args(["--ckpt", "x.pt", "--bn", "keep", "--bn_mode", "batch"])
    err = capsys.readouterr().err
    assert "--bn is deprecated" not in err and err.count("--bn_mode is deprecated; use --bn-mode") == 1
    args = p.parse_args(["--ckpt", "x.pt", "--bn-mode", "keep", "--data", "digits", "--precision", "bf16"])
    assert capsys.readouterr().err == "" and cli.runtime_config(args).precision == "bf16"
