"""What the analysis commands share: flags (defined once), progress bars, error reporting, output paths."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

from .analysis import DataSpec, EvalSettings
from .evaluator import BN_MODES


def add_analysis_flags(p: argparse.ArgumentParser, n_ckpt: str) -> None:
    """Flags of every analysis command (rays, line, plane)."""
    p.add_argument("--ckpt", action="append", required=True, metavar="PATH",
                   help=f"checkpoint file ({n_ckpt}); repeat the flag for several. LABEL=PATH sets the label; "
                        "PATH#swa / PATH#sgd picks one model of a file that holds both")
    p.add_argument("--arch", help="architecture for bare state dicts (default: recorded in the file, or detected)")
    p.add_argument("--which", choices=("swa", "sgd"), help="pick the SWA or SGD weights of a file holding both")
    p.add_argument("--data", help="dataset: digits, cifar10, cifar100, imagefolder:PATH (default: the checkpoint's)")
    p.add_argument("--data-root", help="folder holding cifar-10-batches-py/ or cifar-100-python/ (default $WIDTHKIT_DATA or ./data)")
    p.add_argument("--train-subset", type=int, help="evaluate train metrics on a fixed random subset of N images")
    p.add_argument("--test-subset", type=int, help="evaluate test metrics on a fixed random subset of N images")
    p.add_argument("--bn", choices=BN_MODES, default="recompute",
                   help="BatchNorm statistics at each point: recompute from training data (paper), keep the "
                        "checkpoint's, or per batch (default: recompute)")
    p.add_argument("--bn-subset", type=int, help="recompute BN statistics from N random training images (default: all)")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: 64 on CPU, 4096 on CUDA)")
    p.add_argument("--weight-decay", type=float,
                   help="adds train_loss_l2 = CE + wd/2·||θ||² (default: the weight decay recorded in the checkpoint)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast for forward passes (CUDA only)")
    p.add_argument("--points-in-flight", type=int, default=1,
                   help="evaluate K points per forward pass (torch.func.vmap; --bn keep only). Slower on CPU; "
                        "measure on your GPU with benchmarks/bench_eval.py --points-in-flight (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions and subsets (default 0)")
    p.add_argument("--chunk-size", type=int, default=4, help="points evaluated between two saves (default 4)")
    p.add_argument("--out", help="HDF5 file to write (default: analyses/<kind>-<labels>.h5)")
    p.add_argument("--overwrite", action="store_true", help="start afresh when --out holds a different run")
    add_figure_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_figure_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--figures", help="folder for figures (default: figures/)")
    p.add_argument("--format", default="png,pdf", help="figure formats, comma-separated: png,pdf,svg (default png,pdf)")
    p.add_argument("--no-plot", action="store_true", help="do not render figures")


def parse_ckpt(spec: str) -> tuple[str | None, str]:
    """``--ckpt`` value -> (label or None, path): ``LABEL=PATH`` names it, unless the whole text is a file."""
    if "=" in spec and not Path(spec).exists():
        label, _, path = spec.partition("=")
        return label or None, path
    return None, spec


def models_from(args) -> dict | list:
    """``--ckpt LABEL=PATH`` gives labels; plain paths get their labels from the checkpoints' roles."""
    parsed = [parse_ckpt(c) for c in args.ckpt]
    if any(label for label, _ in parsed):
        return {label or Path(path).stem: path for label, path in parsed}
    return [path for _, path in parsed]


def settings_from(args) -> EvalSettings:
    from . import distributed

    return EvalSettings(bn=args.bn, bn_subset=args.bn_subset, batch_size=args.batch_size,
                        weight_decay=args.weight_decay, device=distributed.local_device(args.device),
                        amp=args.amp, seed=args.seed, points_in_flight=args.points_in_flight)


def data_spec_from(args) -> DataSpec:
    return DataSpec(name=args.data, root=args.data_root, train_subset=args.train_subset, test_subset=args.test_subset)


def default_out(kind: str, ckpts: list[str]) -> Path:
    stems = []
    for label, path in map(parse_ckpt, ckpts):
        pick = f"-{path.rpartition('#')[2]}" if path.endswith(("#swa", "#sgd")) else ""
        stems.append(label or Path(path).stem + pick)
    return Path("analyses") / f"{kind}-{'-'.join(stems)}.h5"


def progress_bar(enabled: bool, desc: str):
    """A ``progress(done, total)`` callback drawing a tqdm bar with the time left (writer rank only)."""
    from . import distributed

    if not enabled or not distributed.is_writer():
        return None, lambda: None
    from tqdm import tqdm

    state = {"bar": None}

    def progress(done: int, total: int):
        if state["bar"] is None:
            state["bar"] = tqdm(total=total, initial=done, desc=desc, unit="pt", dynamic_ncols=True)
        else:
            state["bar"].update(done - state["bar"].n)

    def close():
        if state["bar"] is not None:
            state["bar"].close()

    return progress, close


def run_analysis(kind: str, args, call: Callable, out_kind: str | None = None):
    """The shared body of rays/line/plane: default output path, progress bar, timing, report, figures.

    ``call(models, common)`` runs the analysis, where ``common`` holds the keyword arguments every analysis
    takes (settings, data, output, progress, ...). Returns the :class:`~widthkit.analysis.Analysis`, or None
    on a rank that does not write.
    """
    log = log_fn()
    out = default_out(out_kind or kind, args.ckpt) if args.out is None else args.out
    progress, close = progress_bar(not args.quiet, kind)
    timer = Timer()
    common = dict(settings=settings_from(args), data_spec=data_spec_from(args), out=out, overwrite=args.overwrite,
                  progress=progress, chunk_size=args.chunk_size, arch=args.arch, which=args.which)
    try:
        res = call(models_from(args), common)
    finally:
        close()
    if res is not None:
        log(f"{kind}: {res.path} ({timer})")
    return res


def report_widths(res, reports, log) -> Path:
    """Print the width tables and write them as JSON next to the HDF5 file (``*.widths.json``)."""
    for r in reports:
        log("")
        log(r["table"])
    json_path = res.path.with_suffix(".widths.json")
    write_json(json_path, [{k: v for k, v in r.items() if k != "table"} for r in reports])
    log(f"\nwidths: {json_path}")
    return json_path


def render(path: Path, args, log) -> list[str]:
    from .plots import plot_file

    if args.no_plot:
        return []
    fig_dir = Path(args.figures) if args.figures else Path("figures")
    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    files = plot_file(path, out_dir=fig_dir, formats=formats)
    for f in files:
        log(f"figure: {f}")
    return files


def tune_allocator() -> bool:
    """Keep glibc from returning large activation buffers to the OS after every op (and faulting them back in).

    A process-wide setting, so only entry points (the commands, the benchmarks) call it, never the library.
    Measured on 2 CPU cores: ResNet-56 evaluation at batch 64 went from 134 to 213-249 images/s
    (benchmarks/RESULTS.md). ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set by the user take
    precedence. Returns False where glibc's ``mallopt`` is not available.
    """
    import ctypes
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # buffers below 32 MiB (glibc's maximum) come from the heap; keep up to 1 GiB of freed heap
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False


def run(main_fn: Callable[[], int]) -> int:
    """Run a command body: join torchrun's process group, turn user errors into one clear line."""
    from . import distributed
    from .store import StoreError

    tune_allocator()
    try:
        distributed.init()
        code = main_fn()
        distributed.shutdown()
        return code
    except KeyboardInterrupt:
        print("\ninterrupted: every finished chunk is saved; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, StoreError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, StoreError) and "out of memory" not in str(e).lower() \
                and "ranks disagree" not in str(e):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def log_fn(quiet: bool = False):
    from . import distributed

    def log(msg: str):
        if distributed.is_writer():
            print(msg, flush=True)

    return log


def write_json(path: Path, obj) -> None:
    from .store import to_json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json.loads(to_json(obj)), indent=2) + "\n")
    tmp.replace(path)


def make_callable(module_name: str, fn: Callable) -> None:
    """Let ``widthkit.rays(...)`` call the analysis while ``python -m widthkit.rays`` runs the CLI.

    The command modules share their names with the Python API functions; importing a submodule would
    otherwise replace the package attribute ``widthkit.rays`` (the function) by the module.
    """
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
    sys.modules[module_name].api = fn


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __str__(self):
        return f"{time.perf_counter() - self.t0:.1f} s"
