"""The geometry of each analysis (which points are evaluated) and the width settings, as typed configs.

Together with :class:`~widthkit.engine.config.EvalConfig` (how a point is evaluated) these are the only
settings of the analysis commands: every field is a flag (``dirs`` -> ``--dirs``), a keyword of the Python
call (``widthkit.rays(..., dirs=10)``) and a key of the HDF5 file's ``config``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.directions import Norm, validate_exclude, validate_norm
from ..settings import check_int, check_number, option

_NORM_HELP = "direction normalisation"
_EXCLUDE_HELP = "parameter kinds left out of the directions: bias, norm, biasbn (both) or none"


@dataclass
class RaysConfig:
    """Rays from each model along the same random directions (Izmailov et al. 2018, section 3.4)."""

    dirs: int = option(10, "number of random directions, the same for every checkpoint")
    max_dist: float | None = option(None, "largest distance along a ray (default: ‖θ‖/2 of the first checkpoint, "
                                          "rounded up to 1, 2 or 5·10^k, for unit directions; 1 otherwise)")
    steps: int = option(21, "grid points per ray, distance 0 included")
    two_sided: bool = option(False, "rays from -max_dist to +max_dist: each side's width and their asymmetry")
    norm: Norm = option("unit", _NORM_HELP + " (unit: uniform on the sphere, absolute distances)")
    exclude: tuple[str, ...] = option((), _EXCLUDE_HELP + " (default none)", metavar="KINDS")

    def __post_init__(self):
        validate_norm(self.norm)
        self.exclude = validate_exclude(self.exclude)
        check_int("dirs", self.dirs, optional=False)
        check_int("steps", self.steps, minimum=2, optional=False)
        check_number("max_dist", self.max_dist, positive=True)


@dataclass
class LineConfig:
    """Points on the line θ(t) = w₁ + t·(w₂ − w₁) through two models (the paper's SGD–SWA figure)."""

    t_min: float = option(-1.0, "start of the line, in units of ‖w₂ − w₁‖ (t = 0: first checkpoint, 1: second)")
    t_max: float = option(2.0, "end of the line")
    steps: int = option(31, "grid points on the line")

    def __post_init__(self):
        check_number("t_min", self.t_min, optional=False)
        check_number("t_max", self.t_max, optional=False)
        if not self.t_max > self.t_min:
            raise ValueError(f"need t_max > t_min, got [{self.t_min}, {self.t_max}]")
        check_int("steps", self.steps, minimum=2, optional=False)


@dataclass
class PlaneConfig:
    """A grid on a plane: through three models (Izmailov et al. 2018, Figure 1) or random around one."""

    resolution: tuple[int, ...] = option((21, 21), "grid points along x and y: one number for both, or two",
                                         nargs="+", type=int, metavar="N")
    margin: float = option(0.2, "through three checkpoints: margin beyond the points, as a fraction of their span")
    random: bool = option(False, "a random plane around one checkpoint (Li et al. 2018) instead")
    span: float = option(1.0, "random plane: coordinates in [-span, span], multiples of the directions")
    norm: Norm = option("filter", "random plane: " + _NORM_HELP)
    exclude: tuple[str, ...] = option(("bias", "norm"), "random plane: " + _EXCLUDE_HELP + " (default biasbn)",
                                      metavar="KINDS")

    def __post_init__(self):
        res = tuple(int(r) for r in (self.resolution if isinstance(self.resolution, (tuple, list)) else [self.resolution]))
        self.resolution = res * 2 if len(res) == 1 else res
        if len(self.resolution) != 2 or min(self.resolution) < 2:
            raise ValueError(f"resolution needs one or two numbers >= 2 (e.g. 21 or 31 21), got {self.resolution}")
        check_number("margin", self.margin, minimum=0, optional=False)
        check_number("span", self.span, positive=True, optional=False)
        validate_norm(self.norm)
        self.exclude = validate_exclude(self.exclude)


@dataclass
class WidthConfig:
    """Which widths a rays analysis reports (see :mod:`widthkit.report.width`)."""

    threshold: tuple[str, ...] = option(
        (), "width threshold METRIC=LEVEL, repeatable: test_err=+5 (5 points above the start), train_loss=+0.5, "
            "test_err=20 (absolute), train_loss=x2 (default: test_err=+5 and train_loss_l2=+0.5, or train_loss=+0.5 "
            "without weight decay)", action="append", metavar="METRIC=LEVEL")
    refine: bool = option(True, "refine each width by bisection along its ray (a few evaluations per ray)")
    tol: float | None = option(None, "bisection tolerance in distance units (default: 1/100 of a step)")

    def __post_init__(self):
        from ..report.width import parse_threshold

        self.threshold = tuple(self.threshold or ())
        for t in self.threshold:
            parse_threshold(t)
        check_number("tol", self.tol, positive=True)
