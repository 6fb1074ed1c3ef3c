"""The precision policy: fp32 / TF32 / bf16, applied explicitly around every computation and recorded."""

from __future__ import annotations

import contextlib

import torch


PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def normalize_precision(precision) -> str:
    """A precision policy name (``"fp32"``, ``"tf32"``, ``"bf16"``) from a name or from the old boolean ``amp``
    flag (True -> ``"bf16"``, False -> ``"fp32"``); anything else is a ``ValueError``."""
    if isinstance(precision, bool):
        return "bf16" if precision else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid choices: {', '.join(PRECISIONS)}")
    return precision


def autocast(device: torch.device, precision=False, cache_enabled: bool | None = None):
    """bf16 autocast for forward passes when ``precision`` is ``"bf16"`` (or True, the old ``amp`` flag), on
    CUDA or CPU; otherwise nothing. Weights stay float32: autocast casts per op, the parameters are untouched."""
    if normalize_precision(precision) == "bf16":
        kw = {} if cache_enabled is None else {"cache_enabled": cache_enabled}
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, **kw)
    return contextlib.nullcontext()


# -- the precision policy: TF32 on or off explicitly, never by accident ---------------------------------------
# torch >= 2.9 sets TF32 per backend and operation (``torch.backends.cuda.matmul.fp32_precision = "tf32" |
# "ieee"``); the older flags (``allow_tf32``, ``set_float32_matmul_precision``) still work but reading them
# raises once the new API has been used in the process. So the policy reads and writes the new API where it
# exists and puts back exactly the values it found (after which the old flags read as before).

def _fp32_leaves(device_type: str) -> dict:
    """{name: backend object with ``fp32_precision``} that decide float32 math on this device type, or {}
    on a torch without the per-backend API."""
    b = torch.backends
    try:
        leaves = ({"matmul": b.cuda.matmul, "conv": b.cudnn.conv} if device_type == "cuda"
                  else {"matmul": b.mkldnn.matmul, "conv": b.mkldnn.conv})
        for leaf in leaves.values():
            leaf.fp32_precision  # noqa: B018 - probe: AttributeError on torch < 2.9
        return leaves
    except AttributeError:
        return {}


def _resolved(value: str, parents) -> str:
    """A per-backend ``fp32_precision`` with ``"none"`` resolved through its parents (then "ieee")."""
    for parent in parents:
        if value != "none":
            break
        value = parent.fp32_precision
    return "ieee" if value == "none" else value


def tf32_state() -> dict:
    """Whether float32 CUDA matmuls and cuDNN convolutions may use TF32 right now, read without touching the
    flags (and without the error torch raises when old and new flag APIs have been mixed)."""
    b = torch.backends
    leaves = _fp32_leaves("cuda")
    if leaves:
        return {"matmul": _resolved(leaves["matmul"].fp32_precision, [b]) == "tf32",
                "conv": _resolved(leaves["conv"].fp32_precision, [b.cudnn, b]) == "tf32"}
    return {"matmul": bool(b.cuda.matmul.allow_tf32), "conv": bool(b.cudnn.allow_tf32)}


@contextlib.contextmanager
def precision_policy(precision, device):
    """Apply a precision policy's math flags for the duration of the block and restore them on exit.

    On CUDA, ``"tf32"`` allows TF32 for float32 matmuls and cuDNN convolutions, ``"fp32"`` and ``"bf16"``
    forbid it (bf16's forward passes run under :func:`autocast`; whatever autocast leaves in float32 is then
    computed in full float32). On CPU every policy pins oneDNN's float32 matmuls and convolutions to IEEE
    float32 (a process-wide ``set_float32_matmul_precision("medium")`` would otherwise make them bf16), and
    ``"tf32"`` has no effect: CPUs here compute it as ``"fp32"``. Only the flags of ``device``'s type are
    touched, so a CPU run never changes the CUDA flags.
    """
    dev = torch.device(device)
    precision = normalize_precision(precision)
    mode = "tf32" if precision == "tf32" and dev.type == "cuda" else "ieee"
    leaves = _fp32_leaves(dev.type)
    if leaves:
        saved = {name: leaf.fp32_precision for name, leaf in leaves.items()}
        try:
            for leaf in leaves.values():
                leaf.fp32_precision = mode
            yield
        finally:
            for name, leaf in leaves.items():
                leaf.fp32_precision = saved[name]
        return
    # torch < 2.9: the old flags
    b = torch.backends
    if dev.type == "cuda":
        saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
        try:
            b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = mode == "tf32"
            yield
        finally:
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved
    else:
        saved_fmp = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("highest")
            yield
        finally:
            torch.set_float32_matmul_precision(saved_fmp)


def precision_record(precision, device) -> dict:
    """What :func:`precision_policy` makes of ``precision`` on ``device``, as recorded in provenance."""
    dev = torch.device(device)
    precision = normalize_precision(precision)
    rec = {"precision": precision, "autocast": "bfloat16" if precision == "bf16" else None}
    if dev.type == "cuda":
        rec.update(tf32_matmul=precision == "tf32", tf32_conv=precision == "tf32")
        rec["precision_effect"] = {
            "fp32": "float32 throughout: TF32 off for matmuls and cuDNN convolutions",
            "tf32": "TF32 tensor cores for float32 matmuls and cuDNN convolutions (inputs rounded to 10 mantissa "
                    "bits, float32 accumulation)",
            "bf16": "bf16 autocast for forward passes; weights and perturbations float32, sums float64; TF32 off",
        }[precision]
    else:
        rec["precision_effect"] = {
            "fp32": "float32 throughout (oneDNN float32 math pinned to IEEE)",
            "tf32": "no effect on CPU: computed as fp32 (float32 throughout)",
            "bf16": "bf16 autocast (CPU) for forward passes; weights and perturbations float32, sums float64",
        }[precision]
    return rec


