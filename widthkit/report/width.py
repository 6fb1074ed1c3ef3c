"""Width of an optimum along random rays (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and
Better Generalization", section 3.4 and figure 3).

A ray starts at a solution theta_0 and runs along a unit direction d: theta(t) = theta_0 + t * d, with t >= 0 a
distance in weight-space units (the Euclidean norm over theta). The *width* of the optimum along d at a
threshold is the first distance t at which a metric (test error in %, train loss in nats, ...) rises to the
threshold level. The paper compares these widths for SGD and SWA solutions along the same 10 directions.

Everything here is plain numpy/scipy on arrays the evaluator or the HDF5 store produced; no I/O, no printing.

Conventions used throughout:

* ``distances``: (S,) float, strictly increasing, ``distances[0] == 0`` (the solution itself).
* ``values``: (N, S) float, one row per direction (ray).
* ``done``: (N, S) bool, the store's flags saying which points were computed. Without it (arrays of your own)
  NaN means "not computed yet" (the store's fill value) and ``+inf`` counts as above any level.
* A ray that never reaches the level within the grid has ``crossed=False`` and width ``+inf``: its true width
  is larger than ``max_distance = distances[-1]``. It is never reported as a finite number; statistics that
  depend on such rays are flagged as lower bounds and printed as ``"> x"``.
* A ray whose crossing cannot be decided because of points not computed yet has width NaN, ``crossed=False``
  and ``complete=False``.

Non-finite values (the rule, applied when ``done`` is given, as the width report does):

* A computed point (``done`` set) whose value is NaN or +-inf is *broken*: the model does not compute a number
  there (e.g. its logits overflowed far out along the ray). For an error metric the point is also broken when
  the loss of the same split is non-finite there (``test_err`` with ``test_loss``, ``train_err`` with
  ``train_loss``): the logits were non-finite, so the error count there means nothing.
  See :func:`nonfinite_points`.
* A broken point counts as having crossed every threshold at that point. The crossing is then bracketed by the
  last finite point below the level and the broken point. On the grid the width is the bracket's *lower end*
  (linear interpolation toward a non-finite value is meaningless), so it is short of the true crossing by less
  than one grid step; ``GridWidths.at_nonfinite`` marks these rays. :func:`refine_widths` bisects inside the
  bracket, counting non-finite evaluations as crossed.
* If the value at distance 0 is broken, the solution itself is: the ray's width is 0 (crossed) for every
  threshold, and a relative threshold's level is NaN there.
* A point not computed yet (``done`` unset) is unknown whatever it holds; a ray whose crossing depends on it has
  width NaN, as above. The width report (:meth:`widthkit.Analysis.widths`) uses only *complete* rays (every
  step computed), so that which rays count does not depend on where they cross.

>>> import numpy as np
>>> d = np.linspace(0.0, 10.0, 11)
>>> v = d[None, :]                       # one ray whose metric equals the distance
>>> grid = width_on_grid(d, v, level=2.5)
>>> float(grid.widths[0]), bool(grid.crossed[0])
(2.5, True)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Literal, Mapping, NamedTuple, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "METRICS",
    "Threshold",
    "parse_threshold",
    "GridWidths",
    "nonfinite_points",
    "width_on_grid",
    "width_at",
    "refine_width",
    "refine_widths",
    "summarize",
    "compare",
    "format_table",
    "partial_line",
    "NO_RAY",
    "SAME_SPLIT_LOSS",
    "nonfinite_line",
]

#: The default metrics a threshold may refer to (the store's dataset names). Losses in nats, errors in %
#: (0..100). Any other stored ``<split>_<metric>`` works too (``test_top5_err``, ``test_class_err_3``, ...).
METRICS = ("train_loss", "train_err", "test_loss", "test_err", "train_loss_l2")
_METRIC_NAME = re.compile(r"^(train|test)_[a-z0-9_]+$")

NAN_POLICIES = ("unknown", "raise")

#: Error metric -> the loss of the same split: where that loss is non-finite, the logits were, and the error
#: count there means nothing (see :func:`nonfinite_points`).
SAME_SPLIT_LOSS = {"test_err": "test_loss", "train_err": "train_loss"}


def same_split_loss(metric: str) -> str | None:
    """``test_err``/``test_top5_err``/``test_class_err_3`` -> ``test_loss`` (None for a loss)."""
    if metric in SAME_SPLIT_LOSS:
        return SAME_SPLIT_LOSS[metric]
    split, _, rest = metric.partition("_")
    return f"{split}_loss" if split in ("train", "test") and "err" in rest else None

_THRESHOLD_FORMS = (
    "'METRIC=+DELTA' (DELTA above the value at distance 0 on each ray, e.g. 'test_err=+5'), "
    "'METRIC=VALUE' (absolute level, e.g. 'test_err=20'), "
    "'METRIC=xFACTOR' (FACTOR times the value at distance 0, FACTOR > 1, e.g. 'train_loss=x2')"
)
_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?"
_SPEC = re.compile(rf"^\s*([A-Za-z_0-9]+)\s*=\s*(\+|x|X|\*)?\s*(-?{_NUMBER})\s*$")

# Fewer nonzero paired differences than this and a two-sided Wilcoxon p-value cannot get below 2/2**5 = 0.0625.
_WILCOXON_MIN_N = 6
#: Paired differences closer than this fraction of the largest |value| compared are float rounding, not a
#: difference (a float64 sum or a grid distance carries ~1e-16 of its magnitude; 1e-9 leaves a wide margin).
ROUNDING_REL = 1e-9


# --------------------------------------------------------------------------------------------- thresholds


def _format_number(x: float) -> str:
    """Shortest text that parses back to exactly ``x`` ("5" rather than "5.0")."""
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


@dataclass(frozen=True)
class Threshold:
    """A level a metric has to reach for a ray to count as having left the optimum.

    Attributes:
        metric: one of :data:`METRICS` (e.g. ``"test_err"``, in %; ``"train_loss"``, in nats).
        value: the absolute level (``relative=False``), the amount added to the ray's value at distance 0
            (``relative=True``), or the factor it is multiplied by (``relative=True, factor=True``).
        relative: whether the level is taken relative to the value at distance 0 on each ray.
        factor: whether a relative level is multiplicative rather than additive.

    ``str(threshold)`` gives the spec back: ``"test_err=+5"``, ``"test_err=20"``, ``"train_loss=x2"``.
    """

    metric: str
    value: float
    relative: bool
    factor: bool = False

    def __post_init__(self):
        if self.metric not in METRICS and not _METRIC_NAME.match(self.metric):
            raise ValueError(f"unknown metric {self.metric!r} in threshold; valid metrics: {', '.join(METRICS)}, or "
                             "any other stored train_/test_ metric (test_top5_err, ...)")
        value = float(self.value)
        if not math.isfinite(value):
            raise ValueError(f"threshold value must be finite, got {self.value!r}")
        if self.factor and not self.relative:
            raise ValueError("factor=True needs relative=True (a factor multiplies the value at distance 0)")
        if self.factor and value <= 1:
            raise ValueError(
                f"a factor threshold needs FACTOR > 1 to be crossed from below, got x{_format_number(value)}"
            )
        if self.relative and not self.factor and value <= 0:
            raise ValueError(
                f"a relative threshold needs DELTA > 0 to be crossed from below, got +{_format_number(value)}"
            )
        object.__setattr__(self, "value", value)
        object.__setattr__(self, "relative", bool(self.relative))
        object.__setattr__(self, "factor", bool(self.factor))

    def level(self, start_value):
        """The level for a ray whose metric is ``start_value`` at distance 0.

        Args:
            start_value: float or array (N,) (the metric at distance 0, same units as the metric).
                Ignored for absolute thresholds except for its shape.

        Returns:
            float for a scalar input, else an array shaped like ``start_value``. NaN where the start value is
            NaN and the threshold is relative (the level is then unknown).
        """
        start = np.asarray(start_value, dtype=np.float64)
        if not self.relative:
            level = np.full_like(start, self.value)
        elif self.factor:
            level = start * self.value
        else:
            level = start + self.value
        return float(level) if level.ndim == 0 else level

    def __str__(self) -> str:
        prefix = ("x" if self.factor else "+") if self.relative else ""
        return f"{self.metric}={prefix}{_format_number(self.value)}"


def parse_threshold(spec: str) -> Threshold:
    """Parse a threshold spec such as ``"test_err=+5"``, ``"train_loss=+0.5"``, ``"test_err=20"`` or
    ``"train_loss=x2"`` (``*2`` is accepted for ``x2``). See :class:`Threshold`.

    Raises:
        ValueError: the spec does not have one of the valid forms, or names an unknown metric.
    """
    if isinstance(spec, Threshold):
        return spec
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise ValueError(f"cannot parse threshold {spec!r}; valid forms: {_THRESHOLD_FORMS}")
    metric, op, number = match.groups()
    if op is not None and number.startswith("-"):
        raise ValueError(
            f"cannot parse threshold {spec!r}: a relative threshold must go up; valid forms: {_THRESHOLD_FORMS}"
        )
    return Threshold(metric=metric, value=float(number), relative=op is not None, factor=op in ("x", "X", "*"))


# --------------------------------------------------------------------------------------------- grid widths


class GridWidths(NamedTuple):
    """Widths read off a grid of distances, one entry per ray (N rays).

    Attributes:
        widths: (N,) distance of the first crossing (weight-space units); 0 when the ray starts at or above
            the level (or is broken at distance 0); +inf when it never crosses within the grid; NaN when points
            not computed yet make it unknown.
        crossed: (N,) bool, True when the crossing was found within the grid.
        bracket: (N, 2) the grid distances (lo, hi) around the crossing, with value(lo) < level <= value(hi)
            (or the point at hi broken); (0, 0) for width 0, (max_distance, inf) for rays that never cross,
            (NaN, NaN) for unknown rays. Pass it to :func:`refine_widths` to bisect inside each cell.
        level: (N,) the level each ray was compared against (metric units; NaN where unknown).
        complete: (N,) bool, False where points not computed yet leave the crossing undecided.
        at_nonfinite: (N,) bool, True where the crossing is at a non-finite (broken) grid point: the width is
            then the lower end of the bracket, less than one grid step short of the true crossing.
    """

    widths: np.ndarray
    crossed: np.ndarray
    bracket: np.ndarray
    level: np.ndarray
    complete: np.ndarray
    at_nonfinite: np.ndarray


def _check_distances(distances) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"distances must be a non-empty 1-D array (S,), got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("distances must be finite")
    if d[0] != 0:
        raise ValueError(
            f"a ray starts at its solution: distances[0] must be 0, got {d[0]!r}; include distance 0 in the grid"
        )
    if np.any(np.diff(d) <= 0):
        raise ValueError("distances must be strictly increasing")
    return d


def _check_values(values, n_steps: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != n_steps:
        raise ValueError(f"values must be (N, S) with S = len(distances) = {n_steps}, got shape {v.shape}")
    return v


def _check_done(done, shape: tuple) -> np.ndarray:
    """The store's ``done`` flags as a bool array shaped like the values it vouches for."""
    dn = np.asarray(done)
    if dn.shape != tuple(shape):
        raise ValueError(f"done must be a mask shaped like the values {tuple(shape)}, got shape {dn.shape}")
    if dn.dtype != bool and not np.isin(dn, (0, 1)).all():
        raise ValueError("done must hold only 0/1 or False/True flags (the store's 'done' dataset)")
    return dn.astype(bool)


def _marked_values(v: np.ndarray, done) -> np.ndarray:
    """``v`` (N, S) with points not computed yet set to NaN and broken (non-finite) computed points to +inf.

    Without ``done``, NaN already means "not computed" and +inf "above any level"; -inf is then refused, since a
    loss or an error cannot be -inf and it would otherwise read as "far below the level".
    """
    if done is None:
        if np.any(v == -np.inf):
            raise ValueError(
                "values contain -inf; losses and errors cannot be -inf (pass done= to count non-finite computed "
                "points as crossed)"
            )
        return v
    dn = _check_done(done, v.shape)
    return np.where(dn, np.where(np.isfinite(v), v, np.inf), np.nan)


def _check_level(level, n_rays: int) -> np.ndarray:
    lv = np.asarray(level, dtype=np.float64)
    if lv.ndim == 0:
        lv = np.full(n_rays, float(lv))
    if lv.shape != (n_rays,):
        raise ValueError(f"level must be a scalar or (N,) with N = {n_rays} rays, got shape {lv.shape}")
    if np.any(np.isinf(lv)):
        raise ValueError("level must be finite (or NaN where unknown), got an infinite level")
    return lv


def nonfinite_points(metric: str, metrics: Mapping[str, np.ndarray], done=None) -> np.ndarray:
    """Where the model is broken for ``metric``: computed points whose value is NaN or +-inf, or, for an error
    metric, whose loss on the same split (:data:`SAME_SPLIT_LOSS`) is.

    Args:
        metric: the metric a threshold refers to (e.g. ``"test_err"``).
        metrics: metric name -> array, all of one shape: (N, S) grids, or (K,) fresh evaluations.
        done: bool mask of that shape (the store's flags), or None when every point was computed.

    Returns:
        bool array of that shape; False wherever ``done`` is unset (a point not computed yet is unknown, not
        broken).
    """
    values = np.asarray(metrics[metric], dtype=np.float64)
    broken = ~np.isfinite(values)
    loss = same_split_loss(metric)
    if loss in metrics:
        broken |= ~np.isfinite(np.asarray(metrics[loss], dtype=np.float64))
    if done is not None:
        broken &= _check_done(done, values.shape)
    return broken


def width_on_grid(
    distances, values, level, *, on_nan: Literal["unknown", "raise"] = "unknown", done=None
) -> GridWidths:
    """First crossing of ``level`` from below along each ray, read off a distance grid.

    For each ray, the first grid index j with ``values[i, j] >= level[i]`` (or a broken point, see the module
    docstring) is found; the width is the linear interpolation between grid points j-1 and j (exact when the
    metric is linear on that cell), or grid point j-1 when point j is broken. The search runs along increasing
    distance, so later dips below the level do not matter (paper, sec. 3.4).

    Args:
        distances: (S,) strictly increasing, ``distances[0] == 0``, weight-space units.
        values: (N, S) the metric along each ray. ``+inf`` counts as above any level (the width is then the
            lower end of the bracket).
        level: scalar or (N,) the level per ray, in the metric's units (see :meth:`Threshold.level`); NaN
            where unknown (such a ray is decided only when it is broken at distance 0).
        on_nan: ``"unknown"``: rays whose crossing depends on a point not computed yet get width NaN,
            ``crossed=False``, ``complete=False`` (such points after the crossing are harmless); ``"raise"``:
            such rays raise ValueError.
        done: optional (N, S) bool, the store's flags. When given, points not done are unknown whatever they
            hold and done points with NaN or +-inf values are broken (crossed). When None, NaN means "not
            computed yet".

    Returns:
        :class:`GridWidths`.
    """
    if on_nan not in NAN_POLICIES:
        raise ValueError(f"on_nan must be one of {NAN_POLICIES}, got {on_nan!r}")
    d = _check_distances(distances)
    v = _marked_values(_check_values(values, d.size), done)
    n_rays, n_steps = v.shape
    lv = _check_level(level, n_rays)

    broken = np.isposinf(v)
    with np.errstate(invalid="ignore"):
        above = (v >= lv[:, None]) | broken  # NaN compares False
    has_above = above.any(axis=1)
    first = np.where(has_above, np.argmax(above, axis=1), n_steps)  # (N,) index of the first crossing, or S
    # NaNs strictly before the first crossing (or anywhere, when there is none) leave the answer undecided;
    # so does an unknown level, unless the ray is broken at distance 0 (width 0 whatever the level).
    nan_before = np.concatenate([np.zeros((n_rays, 1), bool), np.cumsum(np.isnan(v), axis=1) > 0], axis=1)
    complete = ~nan_before[np.arange(n_rays), first] & (~np.isnan(lv) | broken[:, 0])
    if on_nan == "raise" and not complete.all():
        bad = np.flatnonzero(~complete).tolist()
        raise ValueError(
            f"rays {bad} have NaN (not yet computed) values before their crossing; finish or resume the run, "
            "or pass on_nan='unknown'"
        )

    crossed = complete & has_above
    widths = np.full(n_rays, np.nan)
    bracket = np.full((n_rays, 2), np.nan)

    never = complete & ~has_above
    widths[never] = np.inf
    bracket[never] = (d[-1], np.inf)

    at_start = crossed & (first == 0)
    widths[at_start] = 0.0
    bracket[at_start] = 0.0

    inner = np.flatnonzero(crossed & (first > 0))
    j = first[inner]
    d_lo, d_hi = d[j - 1], d[j]
    v_lo, v_hi = v[inner, j - 1], v[inner, j]
    frac = (lv[inner] - v_lo) / (v_hi - v_lo)  # v_lo < level <= v_hi, so 0 < frac <= 1 (0 if v_hi is inf)
    widths[inner] = d_lo + frac * (d_hi - d_lo)
    bracket[inner, 0] = d_lo
    bracket[inner, 1] = d_hi
    at_nonfinite = crossed & broken[np.arange(n_rays), np.minimum(first, n_steps - 1)]
    return GridWidths(widths=widths, crossed=crossed, bracket=bracket, level=lv, complete=complete,
                      at_nonfinite=at_nonfinite)


def width_at(threshold, distances, metrics: Mapping[str, np.ndarray], *, done=None, **kw) -> GridWidths:
    """Widths at a threshold for one evaluated model of a rays analysis.

    Args:
        threshold: a :class:`Threshold` or a spec string such as ``"test_err=+5"``.
        distances: (S,) the rays' distance grid (``distances[0] == 0``).
        metrics: metric name -> (N, S) array, e.g. ``store.read(path)["models"]["swa"]["metrics"]``.
        done: optional (N, S) bool, the model's ``done`` flags (``store.read(path)["models"]["swa"]["done"]``):
            then non-finite computed points, including error points whose same-split loss is non-finite, count
            as crossed (see the module docstring). Without it, NaN means "not computed yet".
        **kw: passed to :func:`width_on_grid` (``on_nan``).

    Relative thresholds use each ray's own value at distance 0 (``values[:, 0]``); the level is NaN where that
    value is not finite.
    """
    threshold = parse_threshold(threshold)
    if threshold.metric not in metrics:
        raise ValueError(
            f"threshold {str(threshold)!r} needs metric {threshold.metric!r}, but the results hold "
            f"{sorted(metrics)}; choose one of those (train_loss_l2 exists only when weight decay was set)"
        )
    values = np.asarray(metrics[threshold.metric], dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"metric {threshold.metric!r} must be (N, S), got shape {values.shape}")
    if done is not None:
        values = np.where(nonfinite_points(threshold.metric, metrics, done), np.inf, values)
    start = values[:, 0]
    level = threshold.level(np.where(np.isfinite(start), start, np.nan))
    return width_on_grid(distances, values, level, done=done, **kw)


# --------------------------------------------------------------------------------------------- bisection


def _n_bisections(lo: float, hi: float, tol: float) -> int:
    """Number of halvings until ``hi - lo <= tol``, as the loop in :func:`refine_width` performs them."""
    n, gap = 0, hi - lo
    while gap > tol:
        gap /= 2
        n += 1
    return n


def _check_tol(tol: float, max_evals: int) -> None:
    if not (isinstance(tol, (int, float, np.floating)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive finite distance, got {tol!r}")
    if not (isinstance(max_evals, (int, np.integer)) and max_evals >= 0):
        raise ValueError(f"max_evals must be a non-negative integer, got {max_evals!r}")


def _too_many_evals(needed: int, gap: float, tol: float, max_evals: int) -> ValueError:
    return ValueError(
        f"reaching tol={tol!r} from a bracket of width {gap!r} needs {needed} evaluations, more than "
        f"max_evals={max_evals}; raise tol or max_evals"
    )


def refine_width(
    f: Callable[[float], float], lo: float, hi: float, level: float, *, tol: float = 1e-3, max_evals: int = 60
) -> tuple[float, int]:
    """Bisect for the crossing of ``level`` inside a bracket, on a scalar metric ``f(distance)``.

    The bracket must satisfy ``f(lo) < level <= f(hi)`` (or ``f(hi)`` non-finite; e.g. a row of
    :attr:`GridWidths.bracket`); it is trusted, not re-evaluated, since each evaluation is a pass over a data
    set. Each step evaluates the midpoint and keeps the half that still brackets a crossing, until
    ``hi - lo <= tol``; that takes ``ceil(log2((hi - lo) / tol))`` evaluations. A non-finite ``f`` (NaN or
    +-inf: the model is broken there) counts as crossed. If ``f`` is not monotone on the bracket, the result
    is *a* crossing inside it.

    Args:
        f: distance (weight-space units) -> metric value (float).
        lo, hi: the bracket, ``lo <= hi``, finite.
        level: the level (metric units).
        tol: the wanted accuracy, in weight-space units.
        max_evals: refuse (ValueError) brackets that would need more evaluations than this.

    Returns:
        ``(width, n_evals)``: ``width`` is the final upper end ``hi``, the smallest distance seen with
        ``f >= level`` (or ``f`` non-finite); a crossing lies in ``(width - tol, width]``.
    """
    _check_tol(tol, max_evals)
    lo, hi, level = float(lo), float(hi), float(level)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"bracket must be finite with lo <= hi, got ({lo!r}, {hi!r})")
    if not math.isfinite(level):
        raise ValueError(f"level must be finite, got {level!r}")
    needed = _n_bisections(lo, hi, tol)
    if needed > max_evals:
        raise _too_many_evals(needed, hi - lo, tol, max_evals)
    n_evals = 0
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        value = float(f(mid))
        n_evals += 1
        if not math.isfinite(value) or value >= level:
            hi = mid
        else:
            lo = mid
    return hi, n_evals


def refine_widths(
    f_batch: Callable[[np.ndarray, np.ndarray], np.ndarray],
    brackets,
    levels,
    *,
    tol: float = 1e-3,
    max_evals: int = 60,
) -> tuple[np.ndarray, np.ndarray]:
    """Bisection for many rays at once: one call of ``f_batch`` per step evaluates every unfinished ray.

    Rows of ``brackets`` are handled by what they hold, so ``GridWidths.bracket`` can be passed as it is:

    * finite ``lo < hi``: bisected as in :func:`refine_width` (needs ``f(lo) < level <= f(hi)``, or ``f(hi)``
      non-finite); a non-finite value of ``f_batch`` counts as crossed;
    * ``lo == hi``: already exact, width ``lo``, no evaluation;
    * ``hi == +inf`` (never crossed within the grid): width ``+inf``, no evaluation;
    * NaN (unknown): width NaN, no evaluation.

    Args:
        f_batch: ``f_batch(ray_indices (K,) int, distances (K,) float) -> values (K,)``: the metric of ray
            ``ray_indices[k]`` (a row index of ``brackets``) at ``distances[k]``. K shrinks as rays finish.
        brackets: (N, 2) ``(lo, hi)`` per ray, weight-space units.
        levels: scalar or (N,) level per ray (metric units).
        tol, max_evals: as in :func:`refine_width` (per ray).

    Returns:
        ``(widths (N,), n_evals (N,) int)``; ``n_evals.max()`` is the number of ``f_batch`` calls made.
    """
    _check_tol(tol, max_evals)
    br = np.asarray(brackets, dtype=np.float64)
    if br.ndim != 2 or br.shape[1] != 2:
        raise ValueError(f"brackets must be (N, 2), got shape {br.shape}")
    n_rays = br.shape[0]
    lv = np.asarray(levels, dtype=np.float64)
    lv = np.full(n_rays, float(lv)) if lv.ndim == 0 else lv
    if lv.shape != (n_rays,):
        raise ValueError(f"levels must be a scalar or (N,) with N = {n_rays}, got shape {lv.shape}")

    lo, hi = br[:, 0].copy(), br[:, 1].copy()
    unknown = np.isnan(lo) | np.isnan(hi)
    censored = ~unknown & (hi == np.inf) & np.isfinite(lo)
    valid = unknown | censored | (np.isfinite(lo) & np.isfinite(hi) & (lo <= hi))
    if not valid.all():
        bad = np.flatnonzero(~valid).tolist()
        raise ValueError(f"brackets of rays {bad} are not (lo <= hi) finite, (max, inf) or NaN: {br[bad].tolist()}")
    active = ~unknown & ~censored & (hi - lo > tol)
    if np.any(active & ~np.isfinite(lv)):
        bad = np.flatnonzero(active & ~np.isfinite(lv)).tolist()
        raise ValueError(f"levels of rays {bad} are not finite; cannot bisect towards an unknown level")
    needed = np.array([_n_bisections(a, b, tol) for a, b in zip(lo[active], hi[active])], dtype=int)
    if needed.size and needed.max() > max_evals:
        k = int(np.argmax(needed))
        gap = float(hi[active][k] - lo[active][k])
        raise _too_many_evals(int(needed.max()), gap, tol, max_evals)

    n_evals = np.zeros(n_rays, dtype=int)
    while active.any():
        rays = np.flatnonzero(active)
        mids = 0.5 * (lo[rays] + hi[rays])
        values = np.asarray(f_batch(rays, mids), dtype=np.float64)
        if values.shape != rays.shape:
            raise ValueError(f"f_batch returned shape {values.shape} for {rays.size} rays; it must return (K,)")
        n_evals[rays] += 1
        with np.errstate(invalid="ignore"):
            up = ~np.isfinite(values) | (values >= lv[rays])  # non-finite: the model is broken there, crossed
        hi[rays[up]] = mids[up]
        lo[rays[~up]] = mids[~up]
        active[rays] = hi[rays] - lo[rays] > tol

    widths = hi.copy()
    widths[censored] = np.inf
    widths[unknown] = np.nan
    return widths, n_evals


# --------------------------------------------------------------------------------------------- statistics


def _check_widths(widths, crossed, name: str = "widths") -> tuple[np.ndarray, np.ndarray]:
    """(N,) widths and crossed flags, checked; N may be 0 (a model with no complete ray)."""
    w = np.asarray(widths, dtype=np.float64)
    c = np.asarray(crossed)
    if w.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (N,), got shape {w.shape}")
    if c.size == 0 and c.shape == w.shape:
        c = c.astype(bool)  # [] has no dtype of its own
    if c.shape != w.shape or c.dtype != bool:
        raise ValueError(f"crossed for {name} must be a bool array shaped like it {w.shape}, got {c.dtype} {c.shape}")
    if np.isnan(w).any():
        bad = np.flatnonzero(np.isnan(w)).tolist()
        raise ValueError(
            f"{name} has unknown (NaN) widths for rays {bad}; finish or resume the run, or select the complete "
            "rays (widths[complete], crossed[complete])"
        )
    if np.any(c & ~np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{name}: crossed rays need finite widths >= 0")
    return w, c


def _check_max_distance(max_distance, w: np.ndarray, c: np.ndarray) -> float:
    m = float(max_distance)
    if not (math.isfinite(m) and m > 0):
        raise ValueError(f"max_distance must be positive and finite (the last grid distance), got {max_distance!r}")
    if np.any(w[c] > m * (1 + 1e-12)):
        raise ValueError(f"some crossed widths exceed max_distance={m!r}; pass the grid's last distance")
    return m


def _censored_quantile(sorted_w: np.ndarray, sorted_cens: np.ndarray, q: float) -> tuple[float, bool]:
    """numpy's default ("linear") quantile, and whether it leans on a censored (never crossed) ray."""
    pos = q * (sorted_w.size - 1)
    i = int(math.floor(pos))
    frac = pos - i
    j = min(i + 1, sorted_w.size - 1)
    value = sorted_w[i] + frac * (sorted_w[j] - sorted_w[i])
    return float(value), bool(sorted_cens[i] or (frac > 0 and sorted_cens[j]))


def _json_float(x):
    """float for JSON: NaN -> None, +-inf -> "inf"/"-inf"."""
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _empty_summary(max_distance: float) -> dict:
    """The :func:`summarize` dict of no rays: every statistic unknown (None)."""
    keys = ("mean", "median", "q25", "q75", "iqr", "min", "max")
    return {"n": 0, "n_crossed": 0, "max_distance": max_distance, **dict.fromkeys(keys),
            "lower_bound": dict.fromkeys(keys, False)}


def summarize(widths, crossed, max_distance: float) -> dict:
    """Summary statistics of widths over directions (paper sec. 3.4 reports them per solution).

    Rays that never crossed (``crossed=False``) are right-censored: their width is more than ``max_distance``.
    Each statistic is computed with those rays at ``max_distance`` and flagged in ``lower_bound`` when it
    depends on them; a flagged value v means "> v" (the mean always, when any ray is censored; a quantile
    when its order statistics include a censored ray; ``max`` then equals ``max_distance``). The IQR is a lower
    bound when only q75 is censored and unknown (None) when q25 is.

    Args:
        widths: (N,) widths in weight-space units (+inf or any value where not crossed; NaN is refused).
            N may be 0 (a model with no complete ray): then ``n == 0`` and every statistic is None.
        crossed: (N,) bool.
        max_distance: the grid's last distance (weight-space units).

    Returns:
        JSON-serialisable dict: ``n``, ``n_crossed``, ``max_distance``, ``mean``, ``median``, ``q25``, ``q75``,
        ``iqr``, ``min``, ``max`` (floats, or None when unknown), ``lower_bound`` {stat: bool}.
    """
    w, c = _check_widths(widths, crossed)
    m = _check_max_distance(max_distance, w, c)
    if w.size == 0:
        return _empty_summary(m)
    cens = ~c
    filled = np.where(c, w, m)
    order = np.lexsort((cens, filled))  # censored rays sort after crossed rays of equal width
    sw, sc = filled[order], cens[order]

    out: dict = {"n": int(w.size), "n_crossed": int(c.sum()), "max_distance": m}
    flags: dict = {}
    out["mean"], flags["mean"] = float(filled.mean()), bool(cens.any())
    for key, q in (("q25", 0.25), ("median", 0.5), ("q75", 0.75)):
        out[key], flags[key] = _censored_quantile(sw, sc, q)
    out["min"], flags["min"] = float(sw[0]), bool(sc[0])
    out["max"], flags["max"] = float(sw[-1]), bool(sc[-1])
    if flags["q25"]:
        out["iqr"], flags["iqr"] = None, False
    else:
        out["iqr"], flags["iqr"] = out["q75"] - out["q25"], flags["q75"]
    out["lower_bound"] = flags
    return out


def _ratio(a: float, ca: bool, b: float, cb: bool, m: float) -> tuple[float, str]:
    """Ratio b/a for one direction and what it is: exact, lower or upper bound, or unknown."""
    if ca and cb:
        if a == 0:
            return (1.0, "exact") if b == 0 else (math.inf, "exact")
        return b / a, "exact"
    if ca:  # b never crossed: b > m
        return (math.inf, "exact") if a == 0 else (m / a, "lower")
    if cb:  # a never crossed: a > m
        return b / m, "upper"
    return math.nan, "unknown"


def _ratio_text(r: float, kind: str) -> str:
    text = f"{r:.3g}"
    return {"lower": "> " + text, "upper": "< " + text, "unknown": "?"}.get(kind, text)


def without_rounding(diffs, scale: float, rel: float = ROUNDING_REL) -> np.ndarray:
    """Paired differences with float rounding taken out, for tests that look at signs, ties and spread.

    Args:
        diffs: (N,) differences b − a.
        scale: the largest |value| the differences were taken between (their rounding is a fraction of it).
        rel: differences within ``rel``·``scale`` count as equal.

    Returns:
        (N,) float64: |d| ≤ rel·scale set to 0; magnitudes that follow one another within rel·scale (sorted) set
        to their group's mean, signs kept. Otherwise the differences given: 0.3 − 0.2 and 0.2 − 0.1 on a grid
        differ in the last bit, and a rank test would rank as different what is one step each.
    """
    d = np.asarray(diffs, dtype=np.float64).copy()
    tol = rel * float(scale) if math.isfinite(scale) else 0.0
    d[np.abs(d) <= tol] = 0.0
    mags = np.abs(d)
    order = np.argsort(mags, kind="stable")
    start = 0
    for i in range(1, order.size + 1):
        if i == order.size or mags[order[i]] - mags[order[i - 1]] > tol:
            group = order[start:i]
            if group.size > 1:
                d[group] = np.sign(d[group]) * mags[group].mean()
            start = i
    return d


def _largest(*arrays) -> float:
    """The largest finite |value| in the arrays (0 when none)."""
    vals = np.concatenate([np.abs(np.asarray(a, dtype=np.float64)).ravel() for a in arrays])
    vals = vals[np.isfinite(vals)]
    return float(vals.max()) if vals.size else 0.0


def _wilcoxon(diffs: np.ndarray, n_censored: int, m: float, scale: float = 0.0) -> dict:
    diffs = without_rounding(diffs, scale)
    nonzero = int(np.count_nonzero(diffs))
    res: dict = {
        "test": "scipy.stats.wilcoxon, paired, two-sided, zero differences dropped (zero_method='wilcox'); "
                f"differences within {ROUNDING_REL:g} of the largest width count as equal",
        "n_nonzero": nonzero,
        "n_censored": n_censored,
        "statistic": None,
        "pvalue": None,
        "min_possible_pvalue": 2.0 / 2**nonzero if nonzero else None,
        "notes": [],
    }
    if n_censored:
        res["notes"].append(
            f"{n_censored} direction(s) never crossed within the grid; their widths enter as the censored value "
            f"max_distance={m:.6g} (their true widths are larger)"
        )
    if diffs.size == 0:
        res["notes"].append("no directions to compare; the test is undefined")
        return res
    if nonzero == 0:
        res["notes"].append("all paired differences are zero; the test is undefined")
        return res
    if nonzero < _WILCOXON_MIN_N:
        res["notes"].append(
            f"only {nonzero} nonzero difference(s): the two-sided p-value cannot be below "
            f"{2.0 / 2**nonzero:.3g}, so it cannot be small whatever the data"
        )
    r = stats.wilcoxon(diffs, alternative="two-sided")
    res["statistic"], res["pvalue"] = float(r.statistic), float(r.pvalue)
    return res


def compare(
    widths_a,
    crossed_a,
    widths_b,
    crossed_b,
    names: Sequence[str] = ("sgd", "swa"),
    *,
    max_distance: float | None = None,
    tie_tol: float = 0.0,
) -> dict:
    """Compare two solutions' widths along the same directions (e.g. SGD vs SWA, paper sec. 3.4, fig. 3).

    Args:
        widths_a, crossed_a: (N,) widths (weight-space units) and crossed flags of solution ``names[0]``.
        widths_b, crossed_b: (N,) the same for ``names[1]``, direction i paired with direction i. N may be 0
            (no direction usable for both): then ``n == 0``, every count is 0 and the statistics are None.
        names: the two solutions' names.
        max_distance: the grid's last distance; required when any ray never crossed (censored).
        tie_tol: widths of crossed rays within this distance count as ties.

    Returns:
        JSON-serialisable dict:

        * ``names``, ``n``;
        * ``ratio``: per direction b/a; with ``ratio_kind`` "exact", "lower" (b never crossed: true ratio
          is larger), "upper" (a never crossed) or "unknown" (neither crossed: value None); ``ratio_text``
          renders them ("> 2.1"); an exact infinite ratio (a == 0 < b) is the string "inf";
        * ``median_ratio``: median of the ratios with censored widths at ``max_distance``, and
          ``median_ratio_censored`` whether any were;
        * ``wider``: {name_a: count, name_b: count} of directions where that solution is strictly wider,
          ``ties``, ``undetermined`` (both never crossed);
        * ``wilcoxon``: paired signed-rank test on b - a (censored widths at ``max_distance``; differences equal
          up to float rounding count as ties, :func:`without_rounding`) with notes.
    """
    if (
        len(names) != 2
        or not all(isinstance(n, str) and n for n in names)
        or names[0] == names[1]
        or names[0] in ("ties", "undetermined")
        or names[1] in ("ties", "undetermined")
    ):
        raise ValueError(f"names must be two distinct non-empty strings (not 'ties'/'undetermined'), got {names!r}")
    a, ca = _check_widths(widths_a, crossed_a, f"widths of {names[0]!r}")
    b, cb = _check_widths(widths_b, crossed_b, f"widths of {names[1]!r}")
    if a.shape != b.shape:
        raise ValueError(
            f"paired comparison needs the same directions: {names[0]!r} has {a.size}, {names[1]!r} has {b.size}"
        )
    if not (ca.all() and cb.all()) and max_distance is None:
        raise ValueError("some rays never crossed the level; pass max_distance (the grid's last distance)")
    m = float("nan")
    if max_distance is not None:
        m = _check_max_distance(max_distance, a, ca)
        _check_max_distance(max_distance, b, cb)
    tie_tol = float(tie_tol)
    if not (math.isfinite(tie_tol) and tie_tol >= 0):
        raise ValueError(f"tie_tol must be a finite distance >= 0, got {tie_tol!r}")

    pairs = [_ratio(*args, m) for args in zip(a, ca, b, cb)]
    ratios, kinds = [r for r, _ in pairs], [k for _, k in pairs]
    fa, fb = np.where(ca, a, m), np.where(cb, b, m)
    diffs = fb - fa
    both = ca & cb
    ties = both & (np.abs(diffs) <= tie_tol)
    undetermined = ~ca & ~cb
    # One side censored: its true width is > max_distance >= the other's, so it is strictly wider.
    b_wider = ~ties & ~undetermined & ((both & (diffs > 0)) | (ca & ~cb))
    a_wider = ~ties & ~undetermined & ~b_wider
    with np.errstate(divide="ignore", invalid="ignore"):
        cens_ratios = np.where(fa == 0, np.where(fb == 0, 1.0, np.inf), fb / np.where(fa == 0, 1.0, fa))

    return {
        "names": list(names),
        "n": int(a.size),
        "max_distance": _json_float(m),
        "ratio": [_json_float(r) for r in ratios],
        "ratio_kind": list(kinds),
        "ratio_text": [_ratio_text(r, k) for r, k in zip(ratios, kinds)],
        "median_ratio": _json_float(np.median(cens_ratios)) if a.size else None,
        "median_ratio_censored": bool((~ca | ~cb).any()),
        "wider": {names[0]: int(a_wider.sum()), names[1]: int(b_wider.sum())},
        "ties": int(ties.sum()),
        "undetermined": int(undetermined.sum()),
        "wilcoxon": _wilcoxon(diffs, int((~ca | ~cb).sum()), m, _largest(fa, fb)),
    }


# --------------------------------------------------------------------------------------------- reporting

#: What a table row says for a model with no usable ray (a partial file before any direction is complete).
NO_RAY = "no complete ray"


def _stat_text(summary: dict, key: str) -> str:
    value = summary[key]
    if value is None:
        return "?"
    text = f"{value:.3g}"
    return "> " + text if summary["lower_bound"].get(key, False) else text


def _table_row(name: str, s: dict) -> tuple[str, ...]:
    """One row of :func:`format_table`: the statistics, or :data:`NO_RAY` for a summary of no rays."""
    if s["n"] == 0:
        return (name, NO_RAY, "", "", "0/0")
    return (
        name,
        _stat_text(s, "mean"),
        _stat_text(s, "median"),
        f"{_stat_text(s, 'iqr')} [{_stat_text(s, 'q25')}, {_stat_text(s, 'q75')}]",
        f"{s['n_crossed']}/{s['n']}",
    )


def format_table(
    summaries: Mapping[str, dict],
    comparison: dict | None = None,
    *,
    title: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """A plain-text width table for the terminal.

    Args:
        summaries: checkpoint name -> :func:`summarize` dict, in display order. A summary of no rays
            (``n == 0``) gets the row "no complete ray".
        comparison: optional :func:`compare` dict, printed as a line under the table.
        title: optional first line (e.g. the threshold and the number of directions).
        notes: lines printed last (e.g. :func:`partial_line`, :func:`nonfinite_line`).

    Returns:
        The table; values that are lower bounds (rays that never crossed) read ``"> x"``, e.g.
        ``"> 50"`` for a median beyond the grid's last distance.
    """
    if not summaries:
        raise ValueError("summaries is empty; pass {name: summarize(...)} for at least one checkpoint")
    header = ("checkpoint", "mean", "median", "IQR [q25, q75]", "crossed/n")
    rows = [_table_row(name, s) for name, s in summaries.items()]
    widths = [max(len(r[k]) for r in (header, *rows)) for k in range(len(header))]
    lines = [title] if title else []
    lines += ["  ".join(cell.ljust(wd) for cell, wd in zip(row, widths)).rstrip() for row in (header, *rows)]
    if comparison is not None:
        lines.append(_comparison_line(comparison))
    lines += list(notes)
    return "\n".join(lines)


def _comparison_line(comparison: dict) -> str:
    a, b = comparison["names"]
    if comparison["n"] == 0:
        return f"{b} vs {a}: no direction is complete for both; no paired comparison"
    wider = comparison["wider"]
    test = comparison["wilcoxon"]
    ratio = comparison["median_ratio"]
    ratio_text = "?" if ratio is None else (ratio if isinstance(ratio, str) else f"{ratio:.3g}")
    parts = [
        f"{b} wider than {a} on {wider[b]}/{comparison['n']} directions, {a} wider on {wider[a]}, "
        f"ties {comparison['ties']}, undetermined {comparison['undetermined']}",
        f"median ratio {b}/{a} {ratio_text}" + (" (censored)" if comparison["median_ratio_censored"] else ""),
    ]
    if test["pvalue"] is None:
        parts.append("Wilcoxon p = n/a")
    else:
        parts.append(f"Wilcoxon p = {test['pvalue']:.3g} (n={test['n_nonzero']})")
        if test["n_nonzero"] < _WILCOXON_MIN_N:
            parts.append(f"min possible p {test['min_possible_pvalue']:.3g}")
    return "; ".join(parts)


def partial_line(name: str, n_complete: int, n: int) -> str:
    """The table note for a partial file: how many of a model's ``n`` directions have every step computed."""
    use = "widths use those" if n_complete else "no widths for it yet"
    return f"partial file: {n_complete} of {n} directions complete for {name}; {use}"


def nonfinite_line(
    name: str, metric: str, n_nonfinite: int, n_computed: int, *, n_at_start: int = 0, n_grid_widths: int = 0
) -> str:
    """The table note for broken points of one model.

    Args:
        name: the model's label.
        metric: the threshold's metric; an error metric's note names its same-split loss too.
        n_nonfinite: computed points counted as crossed because non-finite (see :func:`nonfinite_points`).
        n_computed: computed points of the model.
        n_at_start: how many of them are at distance 0 (those rays have width 0).
        n_grid_widths: rays whose grid width ends at a broken point (:attr:`GridWidths.at_nonfinite`, not
            refined): their width is the last finite distance below the level, short by less than a grid step.
    """
    loss = same_split_loss(metric)
    what = f"{metric} (or {loss})" if loss else metric
    line = f"{name}: {n_nonfinite} of {n_computed} computed points have non-finite {what} (counted as crossed)"
    if n_at_start:
        line += f"; {n_at_start} at distance 0, where the width is 0"
    if n_grid_widths:
        line += (f"; {n_grid_widths} width(s) end at one: the last finite distance below the level "
                 "(less than a grid step short; refine to bisect)")
    return line


# --------------------------------------------------------------------------------------------- asymmetry


def asymmetry(threshold, distances, metrics: Mapping[str, np.ndarray]) -> dict:
    """How lopsided each ray's basin is: the width on the positive and on the negative side of θ₀.

    For two-sided rays (distances from −max to +max, with a grid point at 0), the width is measured outwards
    on each side, and ``asymmetry = (w₊ − w₋) / (w₊ + w₋)`` per direction: 0 for a symmetric basin, ±1 when
    one side is flat and the other a wall (Izmailov et al. 2018 observe SGD solutions near the edge of wide,
    flat regions; He et al. 2019 call such directions asymmetric valleys).

    Args:
        threshold: a :class:`Threshold` or spec; relative levels use the value at distance 0.
        distances: (S,) increasing, containing 0 (an odd number of symmetric steps).
        metrics: metric name -> (N, S) array.

    Returns:
        JSON-serialisable dict: ``plus``, ``minus`` (N widths; ``inf`` where that side never crosses),
        ``asymmetry`` (N; NaN where a side never crosses or is unknown), ``median_abs_asymmetry`` over the
        directions where it is defined, ``n_defined``, ``threshold``.
    """
    threshold = parse_threshold(threshold)
    d = np.asarray(distances, dtype=np.float64)
    zero = np.flatnonzero(d == 0)
    if d.ndim != 1 or zero.size != 1 or d[0] >= 0:
        raise ValueError("asymmetry needs two-sided rays with a grid point at distance 0 (e.g. --two-sided with "
                         "an odd --steps)")
    i0 = int(zero[0])
    if threshold.metric not in metrics:
        raise ValueError(f"threshold needs metric {threshold.metric!r}; the results hold {sorted(metrics)}")
    values = np.asarray(metrics[threshold.metric], dtype=np.float64)
    plus = width_at(threshold, d[i0:], {threshold.metric: values[:, i0:]})
    minus = width_at(threshold, -d[i0::-1], {threshold.metric: values[:, i0::-1]})
    wp, wm = plus.widths, minus.widths
    defined = plus.crossed & minus.crossed & plus.complete & minus.complete
    with np.errstate(invalid="ignore", divide="ignore"):
        asym = np.where(defined & (wp + wm > 0), (wp - wm) / (wp + wm), np.where(defined, 0.0, np.nan))
    return {
        "threshold": str(threshold),
        "plus": [_json_float(x) for x in wp],
        "minus": [_json_float(x) for x in wm],
        "asymmetry": [_json_float(x) for x in asym],
        "median_abs_asymmetry": _json_float(float(np.median(np.abs(asym[defined])))) if defined.any() else None,
        "n_defined": int(defined.sum()),
    }
