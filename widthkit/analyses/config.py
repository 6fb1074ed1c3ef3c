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
#: Where ``rays --dirs-from`` takes its directions from, instead of drawing random ones.
DIRECTION_SOURCES = ("pca", "hessian")


def parse_dirs_from(spec: str | None) -> tuple[str, tuple[str, ...]] | None:
    """``"pca:A.pt,B.pt"`` -> ``("pca", ("A.pt", "B.pt"))``; ``"hessian:curv.h5"`` -> ``("hessian", ("curv.h5",))``;
    None -> None. Only the syntax is checked here (the files when the analysis starts).

    ``pca:`` takes iterate checkpoints separated by commas; each may be a glob (``runs/swa_iter_*.pt``) or a
    folder (its checkpoints whose recorded role is ``iterate``).
    """
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise ValueError(f"dirs_from must be a text such as 'pca:ITER1,ITER2' or 'hessian:FILE.h5', got {spec!r}")
    kind, sep, rest = spec.partition(":")
    items = tuple(s.strip() for s in rest.split(",") if s.strip())
    if not sep or kind not in DIRECTION_SOURCES or not items:
        raise ValueError(f"--dirs-from {spec!r}: expected pca:ITER1,ITER2,... (iterate checkpoints, globs or a "
                         "folder of iterates) or hessian:FILE.h5 (a curvature file with /<model>/eigenvectors)")
    if kind == "hessian" and len(items) != 1:
        raise ValueError(f"--dirs-from {spec!r}: hessian: takes one curvature file, got {len(items)}")
    return kind, items
_EXCLUDE_HELP = "parameter kinds left out of the directions: bias, norm, biasbn (both) or none"


@dataclass
class RaysConfig:
    """Rays from each model along the same random directions (Izmailov et al. 2018, section 3.4)."""

    dirs: int = option(10, "number of directions: random ones, the same for every checkpoint, or the top ones "
                           "of --dirs-from")
    max_dist: float | None = option(None, "largest distance along a ray (default: ‖θ‖/2 of the first checkpoint, "
                                          "rounded up to 1, 2 or 5·10^k, for unit directions; 1 otherwise)")
    steps: int = option(21, "grid points per ray, distance 0 included")
    two_sided: bool = option(False, "rays from -max_dist to +max_dist: each side's width and their asymmetry")
    norm: Norm = option("unit", _NORM_HELP + " (unit: uniform on the sphere, absolute distances)")
    exclude: tuple[str, ...] = option((), _EXCLUDE_HELP + " (default none)", metavar="KINDS")
    dirs_from: str | None = option(None, "directions from elsewhere instead of random ones: pca:ITER1,ITER2,... "
                                         "(the top principal directions of these iterates, or a glob / folder of "
                                         "them; the same vectors for every model) or hessian:FILE.h5 (each "
                                         "model's own top Hessian eigenvectors); --dirs says how many",
                                   metavar="pca:ITERATES|hessian:FILE")

    def __post_init__(self):
        validate_norm(self.norm)
        self.exclude = validate_exclude(self.exclude)
        if parse_dirs_from(self.dirs_from) is not None and (self.norm != "unit" or self.exclude):
            raise ValueError(f"--dirs-from {self.dirs_from!r} gives unit vectors over all of θ; --norm and --exclude "
                             "apply to random directions only: drop them")
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
    """A grid on a plane: through three models (Izmailov et al. 2018, Figure 1), random around one (Li et al.
    2018), or spanned by the top two principal directions of iterates; further checkpoints marked at their
    projections, iterates drawn as a trajectory."""

    resolution: tuple[int, ...] = option((21, 21), "grid points along x and y: one number for both, or two",
                                         nargs="+", type=int, metavar="N")
    margin: float = option(0.2, "through three checkpoints: margin beyond the points, as a fraction of their span")
    random: bool = option(False, "a random plane around one checkpoint (Li et al. 2018) instead")
    span: float = option(1.0, "random plane: coordinates in [-span, span], multiples of the directions")
    norm: Norm = option("filter", "random plane: " + _NORM_HELP)
    exclude: tuple[str, ...] = option(("bias", "norm"), "random plane: " + _EXCLUDE_HELP + " (default biasbn)",
                                      metavar="KINDS")
    mark: tuple[str, ...] = option((), "a further checkpoint marked at its projection onto the plane, with its "
                                       "distance from it: LABEL=PATH (or PATH); repeat the flag for several",
                                   action="append", metavar="LABEL=PATH")
    pca: tuple[str, ...] = option((), "the plane of the top two principal directions of these iterates (files, "
                                      "globs or folders of iterates) instead of one through checkpoints; --ckpt "
                                      "checkpoints are then marked at their projections", nargs="+",
                                  metavar="ITERATE")
    pca_center: str = option("mean", "PCA plane: centred on the iterates' mean, or on a checkpoint (a --ckpt or "
                                     "--mark LABEL, or a PATH)", metavar="mean|LABEL|PATH")
    trajectory: tuple[str, ...] = option((), "iterates drawn, in this order, as a path of their projections onto "
                                             "the plane (files, globs or folders of iterates)", nargs="+",
                                         metavar="ITERATE")

    def __post_init__(self):
        for name in ("mark", "pca", "trajectory"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value or ())
            if not all(isinstance(v, str) and v.strip() for v in value):
                raise ValueError(f"{name} must be a list of checkpoint paths (LABEL=PATH for mark), got {value!r}; "
                                 f"in Python pass the models themselves to widthkit.plane({name}=...)")
            setattr(self, name, value)
        if not isinstance(self.pca_center, str) or not self.pca_center.strip():
            raise ValueError(f"pca_center must be 'mean', a checkpoint label or a path, got {self.pca_center!r}")
        if self.pca and self.random:
            raise ValueError("--pca and --random are two different planes: pass one of them")
        if self.pca_center != "mean" and not self.pca:
            raise ValueError(f"--pca-center {self.pca_center!r} applies to a PCA plane: add --pca ITERATE ...")
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
