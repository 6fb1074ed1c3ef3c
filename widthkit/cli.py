"""What the commands share: flags generated from the typed configs, progress bars, one-line user errors.

Every setting is a dataclass field declared with :func:`widthkit.settings.option`; :func:`add_config_flags`
turns each field into one flag (``eval_batch_size`` -> ``--eval-batch-size``) with its help text, and
:func:`config_values` reads them back. The commands therefore cannot disagree on a name or a default, and a
value is validated once, by the config itself (a bad one becomes ``error: ...`` and exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .settings import base_type, choices_of, field_types


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}); e.g. '{{\"depth\": 56}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"depth\": 56}}', got {text!r}")
    return value


class _Auto:
    """An optional int flag given as 'auto': the field goes back to None (its computed default)."""

    def __repr__(self) -> str:
        return "auto"


AUTO = _Auto()


def _int_or_auto(text: str):
    if text.strip().lower() == "auto":
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def flag_name(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


_WARNED: set[str] = set()


def warn_deprecated(old: str, new: str) -> None:
    """One line on stderr, once per process and spelling: ``old`` still works but ``new`` is its name."""
    if old not in _WARNED:
        _WARNED.add(old)
        print(f"warning: {old} is deprecated; use {new}", file=sys.stderr, flush=True)


def _deprecated_action(parser, action, new: str):
    """The argparse action class ``action`` (a name such as ``"append"``, a class, or None for store) that
    also warns that the spelling used is deprecated in favour of ``new``."""
    base = parser._registry_get("action", action, action) if not isinstance(action, type) else action

    class Deprecated(base):
        def __call__(self, parser, namespace, values, option_string=None):
            warn_deprecated(option_string, new)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls, *, prefix: str = "",
                     layered: bool = False, skip=()) -> None:
    """One flag per field of the config dataclass ``cls``.

    Args:
        parser: a parser or an argument group.
        prefix: prepended to every flag and dest (``line_`` -> ``--line-steps``), for commands that hold two
            configs with a field of the same name.
        layered: flags default to None (unset) so that a recipe's values stay unless a flag is given; else
            the field's own default, shown in the help.
        skip: field names that get no flag.

    A field has one flag. Old spellings (``option(..., old=("--bn",))`` and the ``--snake_case`` form of every
    multi-word name) still work and print one deprecation warning; a field declared ``deprecated=True`` (the
    old ``amp``) warns whenever it is given.
    """
    hints = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        cli = dict(f.metadata.get("cli", {}))
        kind, optional = base_type(hints[f.name])
        choices = choices_of(hints[f.name])
        primary = cli.pop("flag", flag_name(f.name, prefix))
        old = [] if prefix else list(cli.pop("old", ()))
        cli.pop("old", None)
        deprecated = cli.pop("deprecated", False)
        if not prefix and "_" in f.name and kind is not bool:  # --swa_lr: the TOML key, an old spelling
            old.append("--" + f.name)
        default = None if layered else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = f.metadata.get("help", "")
        if choices and not all(str(c) in help_text for c in choices):
            help_text += f": {', '.join(map(str, choices))}"
        if not layered and default not in (None, (), False, ""):
            shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" [default: {shown}]"
        kw = dict(dest=prefix + f.name, default=default, help=help_text)
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kw.update(type=_json_dict, metavar="JSON")
        elif cli.get("action") == "append":
            kw["default"] = None
        elif optional and kind is int and layered:  # 'auto' sets it back to None over a recipe's value
            kw.update(type=_int_or_auto, metavar="INT|auto")
        elif choices:
            kw.update(type=type(choices[0]), metavar="|".join(map(str, choices)))
        elif kind in (int, float, str):
            kw.update(type=kind, metavar=kind.__name__.upper())
        kw.update(cli)
        if deprecated:
            kw["action"] = _deprecated_action(parser, kw.get("action"), deprecated)
        parser.add_argument(primary, **kw)
        if old:
            parser.add_argument(*old, **{**kw, "help": argparse.SUPPRESS,
                                         "action": _deprecated_action(parser, kw.get("action"), primary)})


def config_values(args: argparse.Namespace, cls, *, prefix: str = "", layered: bool = False, skip=()) -> dict:
    """The values of ``cls``'s flags in ``args`` (with ``layered``, only the flags that were given)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        value = getattr(args, prefix + f.name)
        if value is AUTO:
            value = None
        elif layered and value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        out[f.name] = value
    return out


def add_figure_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--figures", help="folder for figures (default: figures/)")
    p.add_argument("--format", default="png,pdf", help="figure formats, comma-separated: png,pdf,svg (default png,pdf)")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """Where an analysis command writes its file and figures."""
    p.add_argument("--out", help="HDF5 file to write (default: analyses/<kind>-<labels>.h5)")
    p.add_argument("--overwrite", action="store_true", help="start afresh when --out holds a different run")
    add_figure_flags(p)
    p.add_argument("--no-plot", action="store_true", help="do not render figures")
    add_quiet_flag(p)


def add_quiet_flag(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars (``--no-progress``, the trainer's old spelling, still works)."""
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-progress", dest="quiet", action=_deprecated_action(p, "store_true", "--quiet"),
                   help=argparse.SUPPRESS)


def formats_of(args) -> tuple[str, ...]:
    return tuple(f.strip() for f in args.format.split(",") if f.strip())


def figure_options(args):
    """The figure flags as :class:`~widthkit.report.summary.FigureOptions`."""
    from .report.summary import FigureOptions

    return FigureOptions(None if args.no_plot else Path(args.figures or "figures"), formats_of(args))


def run_command(analysis: Callable, kind: str, args, geometry_cls, make_after: Callable | None = None) -> int:
    """The body of an analysis command: configs built (and validated) from the flags, the analysis run with a
    progress bar, its ``after`` step (``make_after(figure options)``; default: draw the figures) done under the
    writer lock, the file reported."""
    from .engine.config import EvalConfig
    from .fileio import check_writable
    from .report.summary import finish_figures

    def finish_after(figures):
        return finish_figures(figures, log)

    geometry = geometry_cls(**config_values(args, geometry_cls))
    config = EvalConfig(**config_values(args, EvalConfig))
    runtime = runtime_config(args)
    out = Path(args.out or default_out(kind, args.ckpt or []))
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name such as {out / (kind + '.h5')}")
    figures = figure_options(args)
    for folder in (out.parent, figures.folder):  # before any point is computed, not after
        if folder is not None:
            check_writable(folder)
    progress, close = progress_bar(not args.quiet, kind)
    timer = Timer()
    try:
        res = analysis(models_from(args.ckpt or []), config=config, runtime=runtime, out=out, overwrite=args.overwrite,
                       progress=progress,
                       arch=args.arch, which=args.which, after=(make_after or finish_after)(figures),
                       **dataclasses.asdict(geometry))
    finally:
        close()
    if res is not None:
        log(f"{kind}: {res.path} ({timer})")
    return 0


def analysis_parser(prog: str, doc: str, how_many: str, *configs, ckpt_required: bool = True) -> argparse.ArgumentParser:
    """The parser of an analysis command: ``--ckpt``, a group of flags per ``(title, config class)``, the
    evaluation flags (:class:`~widthkit.engine.config.EvalConfig`), the runtime flags
    (:class:`~widthkit.runtime.RuntimeConfig`) and the output flags."""
    from .engine.config import EvalConfig

    p = argparse.ArgumentParser(prog=f"python -m widthkit.{prog}", description=doc.split("\n\n")[0])
    add_ckpt_flags(p, how_many, required=ckpt_required)
    for title, cls in (*configs, ("evaluation", EvalConfig)):
        add_config_flags(p.add_argument_group(title), cls)
    add_runtime_flags(p)
    add_output_flags(p)
    return p


def add_runtime_flags(p: argparse.ArgumentParser, skip=()) -> None:
    """The runtime flags (:class:`~widthkit.runtime.RuntimeConfig`: ``--device``, ``--precision``,
    ``--threads``, ``--eval-batch-size``, the speed levers), the same in every command."""
    from .runtime import RuntimeConfig

    add_config_flags(p.add_argument_group("runtime (where and how it runs; recorded in provenance)"), RuntimeConfig,
                     skip=skip)


def runtime_config(args: argparse.Namespace, skip=()):
    """The :class:`~widthkit.runtime.RuntimeConfig` of the parsed runtime flags (validated)."""
    from .runtime import RuntimeConfig

    return RuntimeConfig(**config_values(args, RuntimeConfig, skip=skip))


def add_ckpt_flags(p: argparse.ArgumentParser, how_many: str, required: bool = True) -> None:
    p.add_argument("--ckpt", action="append", required=required, metavar="PATH",
                   help=f"checkpoint file ({how_many}); repeat the flag for several. LABEL=PATH sets the label; "
                        "PATH#swa / PATH#sgd picks one model of a file that holds both")
    p.add_argument("--arch", help="architecture for bare state dicts (default: recorded in the file, or detected)")
    p.add_argument("--which", choices=("swa", "sgd"), help="pick the SWA or SGD weights of a file holding both")


def parse_ckpt(spec: str) -> tuple[str | None, str]:
    """``--ckpt`` value -> (label or None, path): ``LABEL=PATH`` names it, unless the whole text is a file."""
    if "=" in spec and not Path(spec).exists():
        label, _, path = spec.partition("=")
        return label or None, path
    return None, spec


def models_from(ckpts: list[str]) -> dict | list:
    """``--ckpt LABEL=PATH`` gives labels; plain paths get their labels from the checkpoints' roles."""
    parsed = [parse_ckpt(c) for c in ckpts]
    if any(label for label, _ in parsed):
        return {label or Path(path).stem: path for label, path in parsed}
    return [path for _, path in parsed]


def default_out(kind: str, ckpts: list[str]) -> Path:
    """``analyses/<kind>-<labels>.h5``: the labels (or checkpoint file stems) made into one file name, so that
    no typed label (``../../x/NAME=ck.pt``) can place it outside ``analyses/``."""
    from .fileio import safe_name

    stems = []
    for label, path in map(parse_ckpt, ckpts):
        pick = f"-{path.rpartition('#')[2]}" if path.endswith(("#swa", "#sgd")) else ""
        stems.append(label or Path(path).stem + pick)
    return Path("analyses") / safe_name(f"{kind}-{'-'.join(stems)}.h5" if stems else f"{kind}.h5")


def progress_bar(enabled: bool, desc: str):
    """A ``progress(done, total)`` callback drawing a tqdm bar with the time left (writer rank only), and a
    function that closes it."""
    from .runtime import distributed

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


def log(msg: str = "") -> None:
    """Print on the writing process only (rank 0 under torchrun)."""
    from .runtime import distributed

    if distributed.is_writer():
        print(msg, flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a scheduler stopping a job, torchrun stopping the other ranks) raised as an
    interruption: it unwinds like Ctrl-C, so locks are released and temporary files removed on the way out."""


_HANDLER_PID = [0]  # the process that installed the handler


def _terminate(signum, frame):
    if os.getpid() != _HANDLER_PID[0]:
        # a forked child (a data-decoding worker) inherited the handler: die of the signal as a child should,
        # without a traceback of its own (its builder reports what happened)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the clean-up short
    raise Terminated()


def run(body: Callable[[], int], saved: str = "every finished chunk of points is in the file") -> int:
    """Run a command body: tune the allocator, join torchrun's process group, turn user errors into one line.

    User errors (bad values, missing files, full disks and read-only folders, store refusals, out of memory,
    ranks that disagree) print ``error: ...`` and return 2; programming errors keep their traceback. Ctrl-C
    (exit status 130) and SIGTERM (143) print one line: ``saved`` (what the command keeps of its finished work)
    and how to resume.
    """
    from .runtime import distributed
    from .fileio import OutputBusy
    from .report.store import StoreError
    from .runtime import tune_allocator

    main_thread = threading.current_thread() is threading.main_thread()
    _HANDLER_PID[0] = os.getpid()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    tune_allocator()
    try:
        code = body()
        distributed.shutdown()
        return code
    except KeyboardInterrupt as e:
        how, code = ("terminated (SIGTERM)", 128 + signal.SIGTERM) if isinstance(e, Terminated) \
            else ("interrupted", 130)
        print(f"\n{how}: {saved}; run the same command again to resume", file=sys.stderr, flush=True)
        return code
    except (ValueError, OSError, StoreError, OutputBusy, RuntimeError) as e:
        # OSError: a full disk, a read-only folder, a missing file: the message names the path
        if isinstance(e, RuntimeError) and not isinstance(e, (StoreError, OutputBusy)) \
                and "out of memory" not in str(e).lower() and "ranks disagree" not in str(e):
            raise
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    finally:
        if main_thread:  # None: a handler not installed from Python, which cannot be put back: the default
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def user_message(e: BaseException) -> str:
    """The one line a user error prints: its own message, or for an OS error the file, the reason and the fix."""
    if not (isinstance(e, OSError) and e.errno and e.filename):
        return str(e)
    reason = e.strerror or os.strerror(e.errno)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"cannot write {e.filename}: {reason}; free some space there (or write elsewhere) and run the same "
                "command again: what was finished is kept")
    if e.errno == errno.EROFS:
        folder = e.filename if os.path.isdir(e.filename) else os.path.dirname(e.filename) or "."
        return f"cannot write to {folder} ({reason}); choose another folder (--out, --figures, --root)"
    return f"{e.filename}: {reason}"


def callable_module(module_name: str, fn: Callable) -> None:
    """Let ``widthkit.rays(...)`` call the analysis while ``python -m widthkit.rays`` runs the command.

    The command modules share their names with the Python API functions, and importing a submodule rebinds
    the package attribute (``widthkit.rays``) to the module; a module that forwards calls keeps both working.
    """
    import types

    class _CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def __str__(self):
        return f"{self.seconds:.1f} s"
