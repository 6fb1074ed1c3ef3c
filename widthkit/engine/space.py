"""The flat weight vector θ of a model.

θ is the concatenation, in ``model.named_parameters()`` order, of every parameter: conv and linear weights,
biases, and the affine scale/shift of normalisation layers. BatchNorm running statistics are buffers, not
θ: they are either kept from the checkpoint or recomputed at each point (see :mod:`widthkit.evaluator`).

>>> layout = ThetaLayout.from_model(model)
>>> theta = layout.flatten(model)            # (D,) float32
>>> state = layout.unflatten(theta)          # {name: tensor shaped like the parameter}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Mapping

import torch
from torch import nn

Kind = Literal["weight", "bias", "norm"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Entry:
    """One parameter tensor's place in θ: ``theta[offset:offset + numel].view(shape)``."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int
    kind: Kind  # "weight" (conv/linear, ≥2-D), "bias" (1-D, not a norm layer), "norm" (norm affine)

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.numel)


@dataclass(frozen=True)
class ThetaLayout:
    """Which tensors make up θ, in which order, with which shapes."""

    entries: tuple[Entry, ...]

    @classmethod
    def from_model(cls, model: nn.Module) -> "ThetaLayout":
        norm_params = {
            f"{mod_name}.{p_name}" if mod_name else p_name
            for mod_name, mod in model.named_modules()
            if isinstance(mod, _NORM_TYPES)
            for p_name, _ in mod.named_parameters(recurse=False)
        }
        entries, offset = [], 0
        for name, p in model.named_parameters():
            if name in norm_params:
                kind: Kind = "norm"
            elif p.dim() <= 1:
                kind = "bias"
            else:
                kind = "weight"
            entries.append(Entry(name, tuple(p.shape), offset, p.numel(), kind))
            offset += p.numel()
        if not entries:
            raise ValueError("the model has no parameters: there is no weight space to explore")
        return cls(tuple(entries))

    @property
    def size(self) -> int:
        """D, the number of entries of θ."""
        last = self.entries[-1]
        return last.offset + last.numel

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def flatten(self, source: nn.Module | Mapping[str, torch.Tensor], dtype=torch.float32) -> torch.Tensor:
        """θ as one (D,) tensor (a copy) from a model or a state dict holding these parameter names."""
        if isinstance(source, nn.Module):
            params = dict(source.named_parameters())
        else:
            params = source
        missing = [e.name for e in self.entries if e.name not in params]
        if missing:
            raise KeyError(f"cannot build θ: missing parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        parts = []
        for e in self.entries:
            t = params[e.name].detach()
            if tuple(t.shape) != e.shape:
                raise ValueError(f"parameter {e.name!r} has shape {tuple(t.shape)}, expected {e.shape}")
            parts.append(t.reshape(-1).to(dtype))
        devices = {p.device for p in parts}
        if len(devices) > 1:
            parts = [p.cpu() for p in parts]
        return torch.cat(parts)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a (D,) vector shaped like each parameter: {name: tensor}."""
        self.check(theta)
        return {e.name: theta[e.slice].view(e.shape) for e in self.entries}

    def mask(self, kinds: tuple[Kind, ...] | list[Kind], device=None) -> torch.Tensor:
        """(D,) bool, True on the entries of θ whose kind is in ``kinds``."""
        m = torch.zeros(self.size, dtype=torch.bool, device=device)
        for e in self.entries:
            if e.kind in kinds:
                m[e.slice] = True
        return m

    def check(self, theta: torch.Tensor) -> None:
        if theta.dim() != 1 or theta.numel() != self.size:
            raise ValueError(f"expected a flat weight vector of {self.size} entries, got shape {tuple(theta.shape)}")

    def describe(self) -> list[dict]:
        """JSON-friendly description of the layout (stored in every HDF5 file)."""
        return [
            {"name": e.name, "shape": list(e.shape), "offset": e.offset, "kind": e.kind} for e in self.entries
        ]


def bind_flat_parameters(model: nn.Module, layout: ThetaLayout, flat: torch.Tensor) -> None:
    """Make every parameter of ``model`` (a private copy!) a view into ``flat``.

    After this, writing a new θ is one in-place operation on ``flat``. Only ever call it on a model the
    caller does not own.
    """
    layout.check(flat)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for e in layout:
            p = params[e.name]
            view = flat[e.slice].view(e.shape)
            view.copy_(p.detach())
            p.data = view
