"""The one runtime config: where and how computations run (device, precision, threads, batch, speed levers).

Every part that computes reads it: the evaluator, the Hessian-vector-product operator, the trainer and
torchrun's process group. Its fields are flags of every command (``--device``, ``--precision``, ...), with
one name and one validation each (here). None of them changes what a result *is* beyond the precision policy;
they are recorded in every output's provenance, not in its config, so a run resumed with another batch size
or device continues the same file.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from ..settings import check_choice, check_int, from_dict, option
from .device import resolve_device
from .precision import PRECISIONS

Precision = Literal["fp32", "tf32", "bf16"]
Auto = Literal["auto"]

_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def parse_auto_bool(text: str):
    """Command-line value of an auto/on/off setting: ``"auto"``, True or False."""
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    if t in _ON or t in _OFF:
        return t in _ON
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")


def parse_auto_int(text: str):
    """Command-line value of an auto-or-integer setting: ``"auto"`` or an int."""
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def _check_auto_bool(name: str, value) -> None:
    if not (value == "auto" and isinstance(value, str)) and not isinstance(value, bool):
        raise ValueError(f"{name} must be 'auto', True or False (on the command line: auto, on, off), got {value!r}")


@dataclass
class RuntimeConfig:
    """Where and how a computation runs. Every field is a flag of every command, with the same name."""

    device: str = option("auto", "auto (this rank's GPU when CUDA is available, else CPU), cpu, cuda, cuda:N")
    precision: Precision = option(
        "fp32", "float math: fp32 (TF32 off), tf32 (TF32 matmuls and cuDNN convolutions; no effect on CPU) or "
        "bf16 (bf16 autocast of forward passes; weights, perturbations and optimiser state float32, sums float64)")
    amp: bool = option(False, "deprecated: same as --precision bf16 (folded into precision, never stored)",
                       deprecated="--precision bf16")
    threads: int | None = option(None, "CPU threads per process (default: timed on a few batches at the start, "
                                       "torch's default vs one, the faster kept; a resumed run keeps its count)")
    eval_batch_size: int | None = option(
        None, "images per forward pass of evaluations, BN recomputation and Hessian-vector products (default: 64 "
              "on CPU; on CUDA the evaluator times 4096, 8192, 16384 (up to the memory limit) and keeps the most "
              "images/s, other forward passes use 4096)")
    points_in_flight: int | Auto = option(
        "auto", "evaluate K points per forward pass (torch.func.vmap over stacked weights; bn_mode keep or "
        "recompute); auto: 1 on CPU, on CUDA the fastest of 1, 4, 16 in a short measurement (K > 1 only "
        "when more than a tenth faster than K = 1)",
        type=parse_auto_int, metavar="K|auto")
    channels_last: Auto | bool = option(
        "auto", "channels-last (NHWC) inputs for convolutions; auto: on for CUDA conv nets, on CPU with bf16 only "
        "(where it was measured faster)", type=parse_auto_bool, metavar="auto|on|off")
    cuda_graphs: Auto | bool = option(
        "auto", "capture one point's forward passes in a CUDA graph and replay it per point; auto: on CUDA, "
        "falling back (with the reason logged) where capture fails; off on CPU", type=parse_auto_bool,
        metavar="auto|on|off")
    compile: Auto | bool = option(
        "auto", "torch.compile the evaluation forward pass (inductor's cache kept in the user's cache folder unless "
        "TORCHINDUCTOR_CACHE_DIR is set); auto: off on CPU; on CUDA compiled when the run's points would save more "
        "time than the compile takes (from a measured eager batch) and kept only if measured a tenth faster; on: "
        "needs points_in_flight 1 or auto", type=parse_auto_bool, metavar="auto|on|off", nargs="?", const=True)

    def __post_init__(self):
        if not isinstance(self.device, (str, torch.device)) or not str(self.device):
            raise ValueError(f"device must be a name such as 'auto', 'cpu', 'cuda:0', got {self.device!r}")
        self.device = str(self.device)
        check_choice("precision", self.precision, PRECISIONS)
        if not isinstance(self.amp, bool):
            raise ValueError(f"amp must be True or False, got {self.amp!r}")
        if self.amp:  # the old flag: fold it into the policy, so only precision is stored
            if self.precision == "tf32":
                raise ValueError("amp=True (--amp) means precision 'bf16' but precision 'tf32' was given; drop "
                                 "--amp and keep --precision")
            self.precision, self.amp = "bf16", False
        check_int("threads", self.threads)
        check_int("eval_batch_size", self.eval_batch_size)
        if self.points_in_flight != "auto":
            check_int("points_in_flight", self.points_in_flight, optional=False)
        for name in ("channels_last", "cuda_graphs", "compile"):
            _check_auto_bool(name, getattr(self, name))
        if self.compile is True and self.points_in_flight not in ("auto", 1):
            raise ValueError("compile=True needs points_in_flight 1 or 'auto' (the compiled forward pass "
                             f"evaluates one point at a time), got {self.points_in_flight}")

    @classmethod
    def from_dict(cls, values) -> "RuntimeConfig":
        return from_dict(cls, values, "runtime config")

    def replace(self, **changes) -> "RuntimeConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "amp"}

    def resolved_device(self) -> torch.device:
        """The concrete device (``cuda:N`` or ``cpu``; see :func:`widthkit.runtime.device.resolve_device`)."""
        return resolve_device(self.device)


RUNTIME_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RuntimeConfig))
