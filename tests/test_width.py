"""Tests for widthkit.width against closed forms, per-ray loops and scipy."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from widthkit.report.width import (
    METRICS,
    Threshold,
    compare,
    format_table,
    parse_threshold,
    refine_width,
    refine_widths,
    summarize,
    width_at,
    width_on_grid,
)

# ----------------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(
    "spec, metric, value, relative, factor",
    [
        ("test_err=+5", "test_err", 5.0, True, False),
        ("train_loss=+0.5", "train_loss", 0.5, True, False),
        ("test_err=20", "test_err", 20.0, False, False),
        ("train_loss=x2", "train_loss", 2.0, True, True),
        ("train_loss_l2=x1.5", "train_loss_l2", 1.5, True, True),
        ("test_loss=1e-05", "test_loss", 1e-5, False, False),
        ("train_err=+0.30000000000000004", "train_err", 0.1 + 0.2, True, False),
    ],
)
def test_parse_threshold_round_trip(spec, metric, value, relative, factor):
    t = parse_threshold(spec)
    assert t == Threshold(metric, value, relative, factor)
    assert str(t) == spec
    assert parse_threshold(str(t)) == t


def test_parse_threshold_accepts_spaces_star_and_instances():
    assert str(parse_threshold("  train_loss = *2 ")) == "train_loss=x2"
    assert str(parse_threshold("test_err = + 5")) == "test_err=+5"
    t = Threshold("test_err", 20, False)
    assert parse_threshold(t) is t


def test_threshold_level():
    start = np.array([1.0, 2.5, np.nan])
    np.testing.assert_array_equal(parse_threshold("test_err=+5").level(start), [6.0, 7.5, np.nan])
    np.testing.assert_array_equal(parse_threshold("train_loss=x2").level(start), [2.0, 5.0, np.nan])
    np.testing.assert_array_equal(parse_threshold("test_err=20").level(start), [20.0, 20.0, 20.0])
    level = parse_threshold("train_loss=+0.5").level(0.25)
    assert isinstance(level, float) and level == 0.75


@pytest.mark.parametrize(
    "spec",
    ["test_err", "test_err=", "test_err=+", "test_err=abc", "=5", "test_err=+-5", "test_err=x-2",
     "test_err=inf", "test_err=5%", 5, None],
)
def test_parse_threshold_bad_form(spec):
    with pytest.raises(ValueError, match="valid forms:.*test_err=\\+5.*test_err=20.*train_loss=x2"):
        parse_threshold(spec)


def test_parse_threshold_bad_metric_lists_metrics():
    with pytest.raises(ValueError, match="unknown metric 'val_err'.*" + ", ".join(METRICS)):
        parse_threshold("val_err=+5")


@pytest.mark.parametrize(
    "spec, message",
    [("train_loss=x1", "FACTOR > 1"), ("train_loss=x0.5", "FACTOR > 1"), ("test_err=+0", "DELTA > 0")],
)
def test_parse_threshold_uncrossable(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_threshold(spec)


def test_threshold_constructor_errors():
    with pytest.raises(ValueError, match="factor=True needs relative=True"):
        Threshold("test_err", 2.0, relative=False, factor=True)
    with pytest.raises(ValueError, match="must be finite"):
        Threshold("test_err", math.inf, relative=False)


# ----------------------------------------------------------------------------------------------- grid widths


def _loop_width(d, row, level):
    """Independent per-ray reference: walk the grid point by point."""
    if math.isnan(level):
        return math.nan, False, False
    for j, value in enumerate(row):
        if math.isnan(value):
            return math.nan, False, False
        if value >= level:
            if j == 0:
                return 0.0, True, True
            t = (level - row[j - 1]) / (value - row[j - 1])
            return d[j - 1] + t * (d[j] - d[j - 1]), True, True
    return math.inf, False, True


def test_linear_metric_is_exact():
    rng = np.random.default_rng(0)
    d = np.linspace(0, 20, 41)
    start, slope = rng.uniform(0, 2, 50), rng.uniform(0.1, 3, 50)
    values = start[:, None] + slope[:, None] * d
    exact = rng.uniform(0.3, 19.7, 50)
    level = start + slope * exact
    grid = width_on_grid(d, values, level)
    np.testing.assert_allclose(grid.widths, exact, rtol=1e-12, atol=1e-12)
    assert grid.crossed.all() and grid.complete.all()
    np.testing.assert_array_equal(grid.level, level)
    assert np.all((grid.bracket[:, 0] < exact) & (exact <= grid.bracket[:, 1] + 1e-12))
    np.testing.assert_allclose(grid.bracket[:, 1] - grid.bracket[:, 0], 0.5)


def test_quadratic_metric_within_grid_tolerance():
    d = np.linspace(0, 10, 21)  # spacing 0.5
    a = np.array([0.05, 0.3, 1.0, 4.0])
    level = 2.0
    exact = np.sqrt(level / a)
    grid = width_on_grid(d, a[:, None] * d**2, level)
    # the chord of a convex function lies above it, so interpolation crosses early, but within the cell
    assert np.all(grid.widths <= exact + 1e-12)
    assert np.all(grid.widths > exact - 0.5)
    assert np.all((grid.bracket[:, 0] < exact) & (exact <= grid.bracket[:, 1]))
    np.testing.assert_allclose(grid.widths, exact, atol=0.5 * 0.5)


def test_crossing_on_a_grid_point_and_first_crossing_only():
    d = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    values = np.array([[0.0, 1.0, 2.0, 3.0, 4.0],  # reaches 2 exactly at d=2
                       [0.0, 3.0, 0.0, 0.0, 9.0]])  # crosses at 1, dips back, crosses again
    grid = width_on_grid(d, values, [2.0, 1.5])
    assert grid.widths.tolist() == [2.0, 0.5]
    assert grid.bracket.tolist() == [[1.0, 2.0], [0.0, 1.0]]


def test_width_zero_when_starting_at_or_above_level():
    d = np.linspace(0, 1, 5)
    values = np.array([[3.0, 4, 5, 6, 7], [2.0, 0, 0, 0, 0]])
    grid = width_on_grid(d, values, 2.0)
    assert grid.widths.tolist() == [0.0, 0.0]
    assert grid.crossed.all()
    assert grid.bracket.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_never_crossing_is_inf_not_a_number():
    d = np.linspace(0, 10, 6)
    grid = width_on_grid(d, np.ones((2, 6)), 5.0)
    assert np.all(np.isposinf(grid.widths))
    assert not grid.crossed.any() and grid.complete.all()
    assert grid.bracket.tolist() == [[10.0, math.inf], [10.0, math.inf]]


def test_nan_handling():
    d = np.arange(5.0)
    nan = np.nan
    values = np.array([
        [0.0, 1.0, 5.0, nan, nan],   # NaN after the crossing: decided
        [0.0, nan, 5.0, 6.0, 7.0],   # NaN before the crossing: unknown
        [0.0, 1.0, 1.0, 1.0, nan],   # no crossing yet and a NaN left: unknown
        [nan, nan, nan, nan, nan],   # nothing computed
        [9.0, nan, nan, nan, nan],   # starts above: decided
    ])
    grid = width_on_grid(d, values, 3.0)
    np.testing.assert_array_equal(grid.widths, [1.5, nan, nan, nan, 0.0])
    assert grid.crossed.tolist() == [True, False, False, False, True]
    assert grid.complete.tolist() == [True, False, False, False, True]
    assert np.isnan(grid.bracket[1:4]).all()
    with pytest.raises(ValueError, match=r"rays \[1, 2, 3\] have NaN.*resume the run"):
        width_on_grid(d, values, 3.0, on_nan="raise")
    # an unknown (NaN) level, e.g. a relative threshold on a ray whose start is missing
    grid = width_on_grid(d, values[:1], np.array([nan]))
    assert np.isnan(grid.widths[0]) and not grid.complete[0]


def test_grid_matches_per_ray_loop():
    rng = np.random.default_rng(1)
    d = np.concatenate([[0.0], np.cumsum(rng.uniform(0.1, 1.0, 15))])
    values = rng.uniform(0, 10, (200, 16))
    values[rng.random(values.shape) < 0.05] = np.nan
    level = rng.uniform(0, 12, 200)
    level[::37] = np.nan
    original = values.copy()
    grid = width_on_grid(d, values, level)
    np.testing.assert_array_equal(values, original)  # the caller's array is left alone
    for i in range(200):
        w, c, ok = _loop_width(d, values[i], level[i])
        np.testing.assert_allclose(grid.widths[i], w, rtol=1e-12)
        assert (grid.crossed[i], grid.complete[i]) == (c, ok)


def test_infinite_value_gives_lower_end_of_bracket():
    grid = width_on_grid([0.0, 1.0, 2.0], [[0.0, 1.0, np.inf]], 5.0)
    assert grid.widths.tolist() == [1.0] and grid.bracket.tolist() == [[1.0, 2.0]]


@pytest.mark.parametrize(
    "distances, values, level, kw, message",
    [
        ([1.0, 2.0], [[0, 1]], 1.0, {}, "distances\\[0\\] must be 0"),
        ([0.0, 2.0, 1.0], [[0, 1, 2]], 1.0, {}, "strictly increasing"),
        ([0.0, np.nan], [[0, 1]], 1.0, {}, "finite"),
        ([[0.0, 1.0]], [[0, 1]], 1.0, {}, "1-D"),
        ([0.0, 1.0], [0, 1], 1.0, {}, "\\(N, S\\)"),
        ([0.0, 1.0], [[0, 1, 2]], 1.0, {}, "\\(N, S\\)"),
        ([0.0, 1.0], [[0, -np.inf]], 1.0, {}, "-inf"),
        ([0.0, 1.0], [[0, 1]], [1.0, 2.0], {}, "level must be a scalar or \\(N,\\)"),
        ([0.0, 1.0], [[0, 1]], np.inf, {}, "level must be finite"),
        ([0.0, 1.0], [[0, 1]], 1.0, {"on_nan": "skip"}, "on_nan must be one of \\('unknown', 'raise'\\)"),
    ],
)
def test_width_on_grid_errors(distances, values, level, kw, message):
    with pytest.raises(ValueError, match=message):
        width_on_grid(distances, values, level, **kw)


def test_width_at_uses_each_rays_start():
    d = np.linspace(0, 4, 5)
    err = np.array([[10.0, 12, 14, 16, 18], [20.0, 20, 30, 30, 30]])
    metrics = {"test_err": err, "train_loss": err / 10}
    grid = width_at("test_err=+5", d, metrics)
    np.testing.assert_allclose(grid.widths, [2.5, 1.5])
    np.testing.assert_array_equal(grid.level, [15.0, 25.0])
    grid = width_at(Threshold("train_loss", 1.5, relative=True, factor=True), d, metrics)
    np.testing.assert_allclose(grid.widths, [2.5, 2.0])  # levels 1.5 and 3.0
    with pytest.raises(ValueError, match="needs metric 'train_loss_l2'.*\\['test_err', 'train_loss'\\]"):
        width_at("train_loss_l2=+1", d, metrics)


# ----------------------------------------------------------------------------------------------- bisection


@pytest.mark.parametrize("tol", [1e-1, 1e-3, 1e-6])
def test_refine_width_accuracy_and_count(tol):
    a, level = 0.7, 3.0
    exact = math.sqrt(level / a)
    calls = []

    def f(t):
        calls.append(t)
        return a * t * t

    lo, hi = 2.0, 2.5
    width, n = refine_width(f, lo, hi, level, tol=tol)
    assert exact <= width < exact + tol
    assert f(width) >= level
    assert n == len(calls) - 1 == math.ceil(math.log2((hi - lo) / tol))


def test_refine_width_no_work_and_limits():
    assert refine_width(lambda t: 1 / 0, 1.5, 1.5, 2.0) == (1.5, 0)
    assert refine_width(lambda t: 1 / 0, 1.0, 1.0005, 2.0, tol=1e-3) == (1.0005, 0)
    with pytest.raises(ValueError, match="needs 20 evaluations, more than max_evals=10; raise tol or max_evals"):
        refine_width(lambda t: t, 0.0, 1.0, 0.5, tol=1e-6, max_evals=10)
    with pytest.raises(ValueError, match="tol must be a positive finite distance"):
        refine_width(lambda t: t, 0.0, 1.0, 0.5, tol=0)
    with pytest.raises(ValueError, match="max_evals must be a non-negative integer"):
        refine_width(lambda t: t, 0.0, 1.0, 0.5, max_evals=-1)
    with pytest.raises(ValueError, match="bracket must be finite with lo <= hi"):
        refine_width(lambda t: t, 1.0, 0.0, 0.5)
    with pytest.raises(ValueError, match="bracket must be finite"):
        refine_width(lambda t: t, 1.0, math.inf, 0.5)
    with pytest.raises(ValueError, match="level must be finite"):
        refine_width(lambda t: t, 0.0, 1.0, math.nan)
    # a non-finite f (the model broken there) counts as crossed: every midpoint is, so hi halves 10 times
    assert refine_width(lambda t: math.nan, 0.0, 1.0, 0.5) == (2.0**-10, 10)
    assert refine_width(lambda t: -math.inf, 0.0, 1.0, 0.5) == (2.0**-10, 10)


def test_refine_widths_batched_matches_scalar():
    d = np.linspace(0, 5, 11)
    a = np.array([0.2, 1.0, 3.0, 0.01, 0.5, 0.8])
    values = a[:, None] * d**2
    values[4, 0] = 9.0  # starts above: width 0
    values[5, 3] = np.nan  # unknown
    level = 1.0
    grid = width_on_grid(d, values, level)
    assert grid.crossed.tolist() == [True, True, True, False, True, False]

    calls = []

    def f_batch(rays, dist):
        calls.append(rays.copy())
        return a[rays] * dist**2

    tol = 1e-4
    widths, n_evals = refine_widths(f_batch, grid.bracket, grid.level, tol=tol)
    exact = np.sqrt(level / a)
    for i in (0, 1, 2):
        assert exact[i] <= widths[i] < exact[i] + tol
        scalar = refine_width(lambda t, i=i: a[i] * t * t, *grid.bracket[i], level, tol=tol)
        assert (widths[i], n_evals[i]) == scalar
    assert np.isposinf(widths[3]) and widths[4] == 0.0 and np.isnan(widths[5])
    assert n_evals[3:].tolist() == [0, 0, 0]
    assert len(calls) == n_evals.max() == math.ceil(math.log2(0.5 / tol))
    assert calls[0].tolist() == [0, 1, 2]  # one call per step evaluates every unfinished ray


def test_refine_widths_errors():
    br = np.array([[0.0, 1.0]])
    good = lambda rays, dist: dist  # noqa: E731
    with pytest.raises(ValueError, match="returned shape \\(2,\\) for 1 rays"):
        refine_widths(lambda rays, dist: np.zeros(2), br, 0.5)
    widths, n = refine_widths(lambda rays, dist: dist * np.nan, br, 0.5)  # non-finite counts as crossed
    assert widths.tolist() == [2.0**-10] and n.tolist() == [10]
    with pytest.raises(ValueError, match="brackets of rays \\[0\\] are not"):
        refine_widths(good, [[1.0, 0.0]], 0.5)
    with pytest.raises(ValueError, match="brackets must be \\(N, 2\\)"):
        refine_widths(good, [0.0, 1.0], 0.5)
    with pytest.raises(ValueError, match="levels must be a scalar or \\(N,\\)"):
        refine_widths(good, br, [0.5, 0.5])
    with pytest.raises(ValueError, match="levels of rays \\[0\\] are not finite"):
        refine_widths(good, br, np.nan)
    with pytest.raises(ValueError, match="raise tol or max_evals"):
        refine_widths(good, br, 0.5, tol=1e-9, max_evals=5)
    # refinement with an affine f returns the exact crossing to tol
    widths, n = refine_widths(good, br, 0.3, tol=1e-3)
    assert 0.3 <= widths[0] < 0.301 and n.tolist() == [10]


# ----------------------------------------------------------------------------------------------- summarize


def test_summarize_all_crossed_matches_numpy():
    w = np.array([4.0, 1.0, 3.0, 2.0, 10.0, 7.5])
    s = summarize(w, np.ones(6, bool), max_distance=20.0)
    assert s["n"] == 6 and s["n_crossed"] == 6
    assert s["mean"] == pytest.approx(27.5 / 6)
    assert s["median"] == pytest.approx(3.5)  # hand: sorted 1 2 3 4 7.5 10
    assert s["q25"] == pytest.approx(2.25) and s["q75"] == pytest.approx(6.625)
    for key, q in (("q25", 25), ("median", 50), ("q75", 75)):
        assert s[key] == pytest.approx(np.percentile(w, q))
    assert s["iqr"] == pytest.approx(6.625 - 2.25)
    assert (s["min"], s["max"]) == (1.0, 10.0)
    assert not any(s["lower_bound"].values())
    json.dumps(s, allow_nan=False)


def test_summarize_censored_hand_computed():
    w = np.array([1.0, 2.0, 3.0, np.inf, np.inf])
    c = np.array([True, True, True, False, False])
    s = summarize(w, c, max_distance=10.0)
    assert s["n_crossed"] == 3
    assert s["mean"] == pytest.approx(26 / 5) and s["lower_bound"]["mean"]
    assert (s["q25"], s["median"]) == (2.0, 3.0)
    assert not s["lower_bound"]["q25"] and not s["lower_bound"]["median"]
    assert s["q75"] == 10.0 and s["lower_bound"]["q75"]
    assert s["iqr"] == 8.0 and s["lower_bound"]["iqr"]
    assert s["max"] == 10.0 and s["lower_bound"]["max"] and not s["lower_bound"]["min"]
    json.dumps(s, allow_nan=False)


def test_summarize_quantile_between_crossed_and_censored_is_a_lower_bound():
    # n=4: median at position 1.5 (between 2 and 3), q75 at 2.25 (between 3 and a censored ray)
    s = summarize([3.0, 1.0, np.inf, 2.0], [True, True, False, True], max_distance=10.0)
    assert s["median"] == 2.5 and not s["lower_bound"]["median"]
    assert s["q75"] == pytest.approx(3 + 0.25 * 7) and s["lower_bound"]["q75"]


def test_summarize_all_censored():
    s = summarize([np.inf] * 3, [False] * 3, max_distance=8.0)
    assert s["n_crossed"] == 0
    assert s["median"] == s["mean"] == s["min"] == 8.0
    assert all(s["lower_bound"][k] for k in ("mean", "median", "q25", "q75", "min", "max"))
    assert s["iqr"] is None
    json.dumps(s, allow_nan=False)


@pytest.mark.parametrize(
    "widths, crossed, max_distance, message",
    [
        ([1.0, np.nan], [True, False], 5.0, "unknown \\(NaN\\) widths for rays \\[1\\].*widths\\[complete\\]"),
        ([1.0, 2.0], [1, 1], 5.0, "must be a bool array"),
        ([1.0, 2.0], [True], 5.0, "must be a bool array"),
        ([1.0, np.inf], [True, True], 5.0, "crossed rays need finite widths"),
        ([-1.0, 2.0], [True, True], 5.0, "finite widths >= 0"),
        ([[1.0]], [[True]], 5.0, "1-D array"),
        ([1.0, 2.0], [True, True], 0.0, "max_distance must be positive"),
        ([1.0, 6.0], [True, True], 5.0, "exceed max_distance=5.0"),
    ],
)
def test_summarize_errors(widths, crossed, max_distance, message):
    with pytest.raises(ValueError, match=message):
        summarize(np.asarray(widths, float), np.asarray(crossed), max_distance)


# ----------------------------------------------------------------------------------------------- compare

INF = np.inf


def _hand_case():
    a = np.array([1.0, 2.0, 3.0, 4.0, 0.0, 5.0, INF])
    ca = np.array([True, True, True, True, True, True, False])
    b = np.array([2.0, 2.0, 6.0, 3.0, 1.0, INF, INF])
    cb = np.array([True, True, True, True, True, False, False])
    return a, ca, b, cb


def test_compare_hand_case():
    a, ca, b, cb = _hand_case()
    r = compare(a, ca, b, cb, max_distance=10.0)
    assert r["names"] == ["sgd", "swa"] and r["n"] == 7
    assert r["ratio"] == [2.0, 1.0, 2.0, 0.75, "inf", 2.0, None]
    assert r["ratio_kind"] == ["exact"] * 5 + ["lower", "unknown"]
    assert r["ratio_text"] == ["2", "1", "2", "0.75", "inf", "> 2", "?"]
    assert r["wider"] == {"sgd": 1, "swa": 4}
    assert (r["ties"], r["undetermined"]) == (1, 1)
    assert r["median_ratio"] == 2.0 and r["median_ratio_censored"]
    test = r["wilcoxon"]
    diffs = np.array([1.0, 0.0, 3.0, -1.0, 1.0, 5.0, 0.0])  # b - a, censored at 10
    ref = stats.wilcoxon(diffs, alternative="two-sided")
    assert test["pvalue"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert test["statistic"] == pytest.approx(ref.statistic)
    assert test["n_nonzero"] == 5 and test["n_censored"] == 2
    assert test["min_possible_pvalue"] == 0.0625
    notes = " ".join(test["notes"])
    assert "max_distance=10" in notes and "cannot be below 0.0625" in notes
    text = json.dumps(r, allow_nan=False)
    assert json.loads(text) == r


def test_compare_many_directions_matches_scipy_and_upper_bound():
    rng = np.random.default_rng(3)
    a = rng.uniform(1, 5, 10)
    b = a * rng.uniform(0.8, 2.5, 10)
    ca, cb = np.ones(10, bool), np.ones(10, bool)
    r = compare(a, ca, b, cb, names=("sgd", "swa"))
    assert r["wilcoxon"]["pvalue"] == pytest.approx(stats.wilcoxon(b - a).pvalue, rel=1e-12)
    assert not any("cannot be below" in n for n in r["wilcoxon"]["notes"])
    np.testing.assert_allclose(r["ratio"], b / a)
    assert r["wider"]["swa"] == int((b > a).sum()) and r["wider"]["sgd"] == int((b < a).sum())
    assert r["median_ratio"] == pytest.approx(np.median(b / a)) and not r["median_ratio_censored"]
    assert r["max_distance"] is None
    # first solution never crossed, second did: ratio is an upper bound b / max
    r = compare([INF], [False], [4.0], [True], names=("a", "b"), max_distance=8.0)
    assert r["ratio"] == [0.5] and r["ratio_kind"] == ["upper"] and r["ratio_text"] == ["< 0.5"]
    assert r["wider"] == {"a": 1, "b": 0}
    json.dumps(r, allow_nan=False)


def test_compare_zero_differences_and_ties():
    r = compare([1.0, 2.0], [True, True], [1.0, 2.05], [True, True], tie_tol=0.1)
    assert r["ties"] == 2 and r["wider"] == {"sgd": 0, "swa": 0}
    r = compare([1.0, 2.0], [True, True], [1.0, 2.0], [True, True])
    assert r["wilcoxon"]["pvalue"] is None and "all paired differences are zero" in r["wilcoxon"]["notes"][0]
    json.dumps(r, allow_nan=False)


def test_compare_errors():
    a, ca, b, cb = _hand_case()
    with pytest.raises(ValueError, match="pass max_distance"):
        compare(a, ca, b, cb)
    with pytest.raises(ValueError, match="same directions: 'sgd' has 7, 'swa' has 6"):
        compare(a, ca, b[:6], cb[:6], max_distance=10.0)
    with pytest.raises(ValueError, match="names must be two distinct"):
        compare(a, ca, b, cb, names=("x", "x"), max_distance=10.0)
    with pytest.raises(ValueError, match="names must be two distinct"):
        compare(a, ca, b, cb, names=("ties", "x"), max_distance=10.0)
    with pytest.raises(ValueError, match="widths of 'swa' has unknown \\(NaN\\) widths"):
        compare(a, ca, np.where(cb, b, np.nan), np.zeros(7, bool), max_distance=10.0)
    with pytest.raises(ValueError, match="tie_tol must be"):
        compare(a, ca, b, cb, max_distance=10.0, tie_tol=-1)


# ----------------------------------------------------------------------------------------------- table


def test_format_table_shows_lower_bounds():
    d = np.linspace(0, 10, 11)
    sgd_vals = np.array([[0.0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]] * 3) * np.array([[1.0], [0.5], [2.0]])
    swa_vals = np.array([[0.0] * 11] * 3)
    swa_vals[0] = d * 0.4  # crosses 3 at 7.5; the others never cross
    level = 3.0
    g_sgd, g_swa = width_on_grid(d, sgd_vals, level), width_on_grid(d, swa_vals, level)
    s_sgd = summarize(g_sgd.widths, g_sgd.crossed, d[-1])
    s_swa = summarize(g_swa.widths, g_swa.crossed, d[-1])
    cmp_ = compare(g_sgd.widths, g_sgd.crossed, g_swa.widths, g_swa.crossed, max_distance=d[-1])
    table = format_table({"sgd": s_sgd, "swa": s_swa}, cmp_, title="test_err=20, 3 directions")
    lines = table.splitlines()
    assert lines[0] == "test_err=20, 3 directions"
    assert lines[1].split() == ["checkpoint", "mean", "median", "IQR", "[q25,", "q75]", "crossed/n"]
    assert lines[2].split()[0] == "sgd" and "3/3" in lines[2] and ">" not in lines[2]
    swa_line = lines[3]
    assert swa_line.startswith("swa") and "1/3" in swa_line
    assert "> 10" in swa_line  # median beyond the grid
    assert "> 9.17" in swa_line  # mean lower bound (7.5 + 10 + 10) / 3
    assert lines[4].startswith("swa wider than sgd on 3/3 directions")
    assert "Wilcoxon p = " in lines[4] and "min possible p 0.25" in lines[4]


def test_format_table_errors_and_unknown_iqr():
    s = summarize([np.inf], [False], 5.0)
    table = format_table({"swa": s})
    assert "> 5" in table and "? [> 5, > 5]" in table
    with pytest.raises(ValueError, match="summaries is empty"):
        format_table({})


def test_asymmetry_against_closed_form():
    """values = a·d² on the positive side, b·d² on the negative: widths √(L/a) and √(L/b), exactly on the grid
    refinement limit; checked within one grid step and the asymmetry against its closed form."""
    from widthkit.report.width import asymmetry

    d = np.linspace(-4, 4, 801)
    a = np.array([1.0, 4.0, 1.0])
    b = np.array([4.0, 1.0, 1.0])
    values = np.where(d >= 0, a[:, None] * d ** 2, b[:, None] * d ** 2) + 1.0
    r = asymmetry("train_loss=+1", d, {"train_loss": values})
    wp, wm = np.sqrt(1 / a), np.sqrt(1 / b)
    np.testing.assert_allclose(r["plus"], wp, atol=0.01)
    np.testing.assert_allclose(r["minus"], wm, atol=0.01)
    np.testing.assert_allclose(r["asymmetry"], (wp - wm) / (wp + wm), atol=0.01)
    assert r["median_abs_asymmetry"] == pytest.approx(1 / 3, abs=0.01) and r["n_defined"] == 3
    # a side that never crosses: width "inf", asymmetry undefined
    flat = np.where(d >= 0, d ** 2, 0.0)[None, :]
    r = asymmetry("train_loss=+1", d, {"train_loss": flat})
    assert r["minus"] == ["inf"] and r["asymmetry"] == [None] and r["n_defined"] == 0
    with pytest.raises(ValueError, match="two-sided rays with a grid point at distance 0"):
        asymmetry("train_loss=+1", np.linspace(-1, 1, 4), {"train_loss": np.zeros((1, 4))})
