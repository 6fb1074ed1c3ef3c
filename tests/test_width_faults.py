"""Widths when the model breaks (non-finite values) and when the file is partial (a killed run).

Rule under test (widthkit.report.width module docstring): a computed point (``done`` set) whose metric -- or,
for an error metric, whose same-split loss -- is NaN or +-inf counts as crossed; the grid width is then the
last finite distance below the level; bisection counts non-finite evaluations as crossed; a broken start gives
width 0; points not computed yet are unknown. The width report uses complete rays only (every step done).

Expected answers are worked out by hand in the comments, on grids where the crossing is known exactly.
"""

import importlib
import json
import math

import h5py
import numpy as np
import pytest
from scipy import stats

import widthkit
from widthkit.fileio import to_json
from widthkit.report.store import open_analysis, read
from widthkit.report.width import (
    NO_RAY,
    compare,
    format_table,
    nonfinite_points,
    refine_width,
    refine_widths,
    summarize,
    width_at,
    width_on_grid,
)

rays_cli = importlib.import_module("widthkit.rays")
nan, inf = np.nan, np.inf
METRICS = ["train_loss", "train_err", "test_loss", "test_err"]
PARTIAL_SWA = "partial file: 4 of 10 directions complete for SWA; widths use those"


# ----------------------------------------------------------------------------------------------- grids


def test_grid_rule_on_hand_built_rays():
    d = np.arange(5.0)  # 0 1 2 3 4, level 5
    values = np.array([
        [0.0, 2.0, 4.0, nan, nan],    # broken at 3: bracket (2, 3), width = lower end 2
        [0.0, 2.0, 6.0, nan, nan],    # finite crossing first: 1 + (5-2)/(6-2) = 1.75; later NaN harmless
        [0.0, inf, 1.0, 1.0, 1.0],    # broken at 1: width 0 (the start is the last finite point below)
        [0.0, -inf, 1.0, 1.0, 1.0],   # -inf is broken too
        [nan, 1.0, 1.0, 1.0, 1.0],    # broken at the start: width 0, bracket (0, 0)
        [0.0, 1.0, nan, 9.0, 9.0],    # point 2 not computed: unknown
        [0.0, 1.0, 9.0, 9.0, 9.0],    # point 2 holds a value but no done flag (killed mid-write): unknown
        [0.0, 1.0, 2.0, 3.0, 4.0],    # last point not computed, no crossing yet: unknown
        [0.0, 1.0, 2.0, 3.0, 4.0],    # all computed, never crosses: +inf
        [0.0, 6.0, nan, nan, nan],    # crosses at 5/6, the rest not computed: decided
    ])
    done = np.ones(values.shape, bool)
    done[5, 2] = done[6, 2] = done[7, 4] = False
    done[9, 2:] = False
    g = width_on_grid(d, values, 5.0, done=done)
    np.testing.assert_array_equal(g.widths, [2.0, 1.75, 0.0, 0.0, 0.0, nan, nan, nan, inf, 5 / 6])
    assert g.crossed.tolist() == [True] * 5 + [False] * 4 + [True]
    assert g.complete.tolist() == [True] * 5 + [False] * 3 + [True, True]
    assert g.at_nonfinite.tolist() == [True, False, True, True, True] + [False] * 5
    np.testing.assert_array_equal(g.bracket[:5], [[2, 3], [1, 2], [0, 1], [0, 1], [0, 0]])
    assert np.isnan(g.bracket[5:8]).all() and g.bracket[8].tolist() == [4.0, inf]
    # without done flags NaN means "not computed" (the old contract) and -inf is refused
    legacy = width_on_grid(d, values[[0, 1, 2, 4]], 5.0)
    np.testing.assert_array_equal(legacy.widths, [nan, 1.75, 0.0, nan])
    with pytest.raises(ValueError, match="-inf.*pass done="):
        width_on_grid(d, values[3:4], 5.0)
    with pytest.raises(ValueError, match="done must be a mask shaped like the values \\(10, 5\\)"):
        width_on_grid(d, values, 5.0, done=done[:, :4])


def test_broken_start_is_width_zero_even_with_unknown_level():
    d = np.arange(3.0)
    g = width_on_grid(d, [[nan, 1.0, 2.0], [1.0, 2.0, 3.0]], [nan, nan], done=np.ones((2, 3), bool))
    assert g.widths[0] == 0.0 and g.crossed[0] and g.complete[0]
    assert np.isnan(g.widths[1]) and not g.complete[1]  # a finite ray with an unknown level stays unknown


def test_width_at_error_metric_is_broken_where_its_loss_is():
    d = np.arange(4.0)
    # test_err keeps a finite value where the logits were NaN (the argmax of NaN): 82.5 is garbage there
    metrics = {
        "test_err": np.array([[5.0, 6.0, 82.5, 82.5], [5.0, 6.0, 82.5, 82.5]]),
        "test_loss": np.array([[0.2, 0.3, nan, nan], [0.2, 0.3, 0.9, 1.0]]),
        "train_loss": np.array([[0.1, 0.2, 0.3, 0.4], [0.1, nan, nan, nan]]),  # other split: irrelevant
    }
    done = np.ones((2, 4), bool)
    g = width_at("test_err=+5", d, metrics, done=done)  # level 10
    # ray 0: broken at 2 (test_loss NaN) -> width 1; ray 1: finite, 1 + (10-6)/(82.5-6)
    np.testing.assert_allclose(g.widths, [1.0, 1 + 4 / 76.5], rtol=1e-12)
    assert g.at_nonfinite.tolist() == [True, False]
    # without done the arrays are taken at face value (the old contract): interpolation toward 82.5
    np.testing.assert_allclose(width_at("test_err=+5", d, metrics).widths, [1 + 4 / 76.5] * 2, rtol=1e-12)
    # a loss threshold on the broken split: train_loss=x2 on ray 1 starts at 0.1, broken at 1 -> width 0
    g = width_at("train_loss=x2", d, metrics, done=done)
    np.testing.assert_allclose(g.widths, [1.0, 0.0])  # ray 0: level 0.2 reached exactly at d=1
    broken = nonfinite_points("test_err", metrics, done)
    assert broken.tolist() == [[False, False, True, True], [False, False, False, False]]
    assert nonfinite_points("train_loss", metrics).sum() == 3
    done[0, 3] = False  # a point not computed is never counted as broken
    assert nonfinite_points("test_err", metrics, done).sum() == 1


def test_relative_threshold_with_a_broken_start():
    d = np.arange(3.0)
    metrics = {"test_err": np.array([[nan, 1.0, 2.0]]), "test_loss": np.array([[nan, 0.1, 0.2]])}
    g = width_at("test_err=+5", d, metrics, done=np.ones((1, 3), bool))
    assert g.widths.tolist() == [0.0] and g.crossed[0] and np.isnan(g.level[0])


# ----------------------------------------------------------------------------------------------- bisection


def test_bisection_counts_non_finite_as_crossed():
    """f(t) = t up to t = 0.37 and NaN beyond (the model breaks there); the level 5 is never reached by a
    finite value, so the crossing is where the model breaks: 0.37."""
    f = lambda t: t if t < 0.37 else nan  # noqa: E731
    d = np.array([0.0, 0.5, 1.0])
    g = width_on_grid(d, [[0.0, nan, nan]], 5.0, done=np.ones((1, 3), bool))
    assert g.widths.tolist() == [0.0] and g.bracket.tolist() == [[0.0, 0.5]] and g.at_nonfinite[0]
    tol = 1e-4
    widths, n = refine_widths(lambda rays, t: np.array([f(x) for x in t]), g.bracket, g.level, tol=tol)
    assert 0.37 <= widths[0] < 0.37 + tol
    assert n.tolist() == [math.ceil(math.log2(0.5 / tol))]
    assert refine_width(f, 0.0, 0.5, 5.0, tol=tol) == (widths[0], n[0])
    # a finite crossing before the break is still found: f = 20 t crosses 5 at 0.25
    g2 = lambda t: 20 * t if t < 0.37 else inf  # noqa: E731
    w, _ = refine_width(g2, 0.0, 0.5, 5.0, tol=tol)
    assert 0.25 <= w < 0.25 + tol


# ----------------------------------------------------------------------------------------------- statistics


def test_no_usable_ray_never_fails_the_statistics():
    s = summarize([], [], 8.0)
    assert s["n"] == 0 and s["n_crossed"] == 0 and s["median"] is None and s["mean"] is None
    assert not any(s["lower_bound"].values())
    c = compare(np.array([]), np.array([], bool), [], [], names=("SGD", "SWA"), max_distance=8.0)
    assert c["n"] == 0 and c["wider"] == {"SGD": 0, "SWA": 0} and c["median_ratio"] is None
    assert c["wilcoxon"]["pvalue"] is None and "no directions to compare" in c["wilcoxon"]["notes"][0]
    full = summarize([1.0, 3.0], [True, True], 8.0)
    table = format_table({"SGD": full, "SWA": s}, c, notes=["a note"])
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["SGD", "2", "2"]
    assert lines[2].split()[0] == "SWA" and NO_RAY in lines[2] and "0/0" in lines[2]
    assert lines[3] == "SWA vs SGD: no direction is complete for both; no paired comparison"
    assert lines[4] == "a note"
    json.dumps([s, c], allow_nan=False)


# ----------------------------------------------------------------------------------------------- files


def _rays_file(path, d, n_dirs, values, written):
    """A rays file made through the store, as a run would: ``values`` {group: {metric: (N, S)}}, ``written``
    {group: flat indices of the points the run got to} (the rest stays NaN with no done flag)."""
    af = open_analysis(
        path, "rays", {"rays": {"dirs": n_dirs, "steps": len(d), "max_dist": float(d[-1])}},
        axes={"distances": (d, ["step"], {"long_name": "distance along the ray", "units": "weight-space L2"}),
              "directions": (np.zeros((n_dirs, 5), np.float32), ["direction", "theta"])},
        groups={"sgd": {"label": "SGD"}, "swa": {"label": "SWA"}}, grid_shape=(n_dirs, len(d)), metrics=METRICS)
    try:
        for group, ids in written.items():
            ids = np.asarray(ids, dtype=np.int64)
            af.write(group, ids, {m: np.asarray(values[group][m], float).reshape(-1)[ids] for m in METRICS})
    finally:
        af.close()
    return path


def _metrics_from_err(err, loss=None):
    """All four metrics from a test-error grid (the others finite and irrelevant to test_err thresholds)."""
    loss = np.full(err.shape, 0.3) if loss is None else loss
    return {"test_err": err, "test_loss": loss, "train_err": err, "train_loss": np.full(err.shape, 0.2)}


def _ray_ids(n_steps, ray, steps):
    return [ray * n_steps + s for s in steps]


def _partial_file(path):
    """10 directions, 5 steps to 8. test_err = 10 + slope * d, so at test_err=+5 (level 15) the width is
    5 / slope, exact on the grid, or never when 8 * slope < 5.

    SGD: every point computed. slopes 1 2 2.5 1.25 0.5 5 0.8 1.6 0.625 4 -> widths 5 2.5 2 4 inf 1 6.25
    3.125 8 1.25 (0.625: 15 exactly at d = 8).
    SWA: rays 0-3 complete (slopes 0.8 1 2 0.625 -> widths 6.25 5 2.5 8); ray 4 up to step 2; ray 6 up to
    step 1, where it already reaches 15 (decided, but incomplete: it must not count); the rest not started.
    """
    d = np.linspace(0.0, 8.0, 5)
    sgd = 10 + np.array([1, 2, 2.5, 1.25, 0.5, 5, 0.8, 1.6, 0.625, 4])[:, None] * d
    swa = 10 + np.array([0.8, 1, 2, 0.625, 1, 1, 2.5, 1, 1, 1])[:, None] * d
    swa_ids = [i for r in range(4) for i in _ray_ids(5, r, range(5))] + _ray_ids(5, 4, range(3)) + \
        _ray_ids(5, 6, range(2))
    return _rays_file(path, d, 10, {"sgd": _metrics_from_err(sgd), "swa": _metrics_from_err(swa)},
                      {"sgd": range(50), "swa": swa_ids})


def test_partial_file_uses_complete_rays(tmp_path):
    res = widthkit.load(_partial_file(tmp_path / "partial.h5"))
    assert not res.complete()
    r = res.widths("test_err=+5")
    assert r["complete"] == {"SGD": 10, "SWA": 4} and r["n_directions"] == 10
    assert r["computed"] == {"SGD": 50, "SWA": 25} and r["nonfinite"] == {"SGD": 0, "SWA": 0}
    np.testing.assert_allclose(r["per_direction"]["SGD"], [5, 2.5, 2, 4, inf, 1, 6.25, 3.125, 8, 1.25])
    np.testing.assert_allclose(r["per_direction"]["SWA"], [6.25, 5, 2.5, 8] + [nan] * 6)
    assert r["crossed"]["SWA"].tolist() == [True] * 4 + [False] * 6  # ray 6 crossed, but is not complete
    sgd, swa = r["summaries"]["SGD"], r["summaries"]["SWA"]
    assert (sgd["n"], sgd["n_crossed"]) == (10, 9)
    assert sgd["mean"] == pytest.approx(41.125 / 10) and sgd["lower_bound"]["mean"]  # inf counted as 8
    assert (swa["n"], swa["n_crossed"]) == (4, 4)
    assert swa["mean"] == pytest.approx(21.75 / 4) and swa["median"] == pytest.approx(5.625)
    # paired on directions 0-3, complete for both: SGD 5 2.5 2 4, SWA 6.25 5 2.5 8
    c = r["comparison"]
    assert c["n"] == 4 and c["ratio"] == pytest.approx([1.25, 2.0, 1.25, 2.0])
    assert c["wider"] == {"SGD": 0, "SWA": 4} and c["median_ratio"] == pytest.approx(1.625)
    assert c["wilcoxon"]["pvalue"] == pytest.approx(stats.wilcoxon([1.25, 2.5, 0.5, 4.0]).pvalue)
    lines = r["table"].splitlines()
    assert PARTIAL_SWA in lines and "the comparison uses the 4 directions complete for both" in lines
    assert not any("for SGD" in line for line in lines)
    assert "SWA wider than SGD on 4/4 directions" in r["table"]
    json.loads(to_json({k: v for k, v in r.items() if k != "table"}))


def test_partial_file_with_no_complete_ray_says_how_to_finish(tmp_path):
    d = np.linspace(0.0, 8.0, 5)
    err = _metrics_from_err(10 + d[None, :].repeat(10, axis=0))
    path = _rays_file(tmp_path / "early.h5", d, 10, {"sgd": err, "swa": err},
                      {"sgd": [r * 5 for r in range(10)] + [1, 2, 3], "swa": [0, 5]})  # no ray has all 5 steps
    with pytest.raises(ValueError, match=r"no ray of .*early\.h5 is complete yet \(15 of 100 points computed; a "
                                         r"width needs all 5 steps.*run the same command again to resume it"):
        widthkit.load(path).widths("test_err=+5")


def test_model_without_a_complete_ray_gets_a_row_not_an_exception(tmp_path):
    d = np.linspace(0.0, 8.0, 5)
    err = _metrics_from_err(10 + d[None, :].repeat(3, axis=0))  # width 5 on every ray
    path = _rays_file(tmp_path / "one.h5", d, 3, {"sgd": err, "swa": err}, {"sgd": range(15), "swa": [0, 1, 5]})
    res = widthkit.load(path)
    r = res.widths("test_err=+5")
    assert r["complete"] == {"SGD": 3, "SWA": 0} and r["summaries"]["SWA"]["n"] == 0
    np.testing.assert_allclose(r["per_direction"]["SGD"], [5.0] * 3)
    assert np.isnan(r["per_direction"]["SWA"]).all() and r["comparison"]["n"] == 0
    lines = r["table"].splitlines()
    assert lines[3].split()[0] == "SWA" and NO_RAY in lines[3]
    assert "SWA vs SGD: no direction is complete for both; no paired comparison" in lines
    assert "partial file: 0 of 3 directions complete for SWA; no widths for it yet" in lines
    res.record_widths([r])  # the report is stored with the file like any other
    assert np.isnan(read(path)["widths"]["SWA"]["widths"]).all()


def test_values_without_done_flags_are_not_used(tmp_path):
    """A kill between writing a chunk's values and its done flags: the values are there, the flags are not.
    The point is unknown, so the ray is not complete even though its value would cross."""
    d = np.linspace(0.0, 8.0, 5)
    err = _metrics_from_err(10 + d[None, :].repeat(2, axis=0))
    path = _rays_file(tmp_path / "kill.h5", d, 2, {"sgd": err, "swa": err}, {"sgd": range(10), "swa": range(5)})
    with h5py.File(path, "r+") as f:
        f["swa"]["test_err"][1, :] = 99.0  # values, no done flags
    r = widthkit.load(path).widths("test_err=+5")
    assert r["complete"] == {"SGD": 2, "SWA": 1}
    np.testing.assert_allclose(r["per_direction"]["SWA"], [5.0, nan])


def _broken_file(path):
    """3 directions, 4 steps to 3, level test_err=+5 = 15 on every ray (start 10).

    SGD: ray 0: 10 12 NaN NaN (test_loss NaN there) -> broken at 2, width 1;
         ray 1: 10 20 82.5 82.5 (test_loss NaN at 2, 3) -> finite crossing 0.5 first;
         ray 2: 10 11 82.5 82.5 (test_loss NaN at 2, 3: the 82.5 is garbage) -> broken at 2, width 1.
         6 of 12 computed points broken, 2 widths end at one.
    SWA: test_err = 10 + 2 d, finite -> width 2.5 on every ray.
    """
    d = np.arange(4.0)
    sgd_err = np.array([[10, 12, nan, nan], [10, 20, 82.5, 82.5], [10, 11, 82.5, 82.5]])
    sgd_loss = np.array([[0.3, 0.4, nan, nan]] * 3)
    swa_err = 10 + 2 * d[None, :].repeat(3, axis=0)
    return _rays_file(path, d, 3, {"sgd": _metrics_from_err(sgd_err, sgd_loss), "swa": _metrics_from_err(swa_err)},
                      {"sgd": range(12), "swa": range(12)})


def test_non_finite_points_in_a_file_count_as_crossed(tmp_path):
    r = widthkit.load(_broken_file(tmp_path / "broken.h5")).widths("test_err=+5")
    np.testing.assert_allclose(r["per_direction"]["SGD"], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(r["per_direction"]["SWA"], [2.5] * 3)
    assert r["crossed"]["SGD"].all() and r["complete"] == {"SGD": 3, "SWA": 3}
    assert r["nonfinite"] == {"SGD": 6, "SWA": 0} and r["computed"] == {"SGD": 12, "SWA": 12}
    assert r["summaries"]["SGD"]["mean"] == pytest.approx(2.5 / 3)
    assert r["comparison"]["wider"] == {"SGD": 0, "SWA": 3}
    lines = r["table"].splitlines()
    note = [line for line in lines if line.startswith("SGD: ")]
    assert note == ["SGD: 6 of 12 computed points have non-finite test_err (or test_loss) (counted as crossed); "
                    "2 width(s) end at one: the last finite distance below the level (less than a grid step "
                    "short; refine to bisect)"]
    assert not any(line.startswith("SWA: ") for line in lines)


def test_refine_on_a_file_bisects_toward_the_break(tmp_path):
    """The evaluators bisect: a fake one whose model breaks (test_loss NaN, test_err finite garbage) at 1.3 on
    SGD rays 0 and 2, and crosses 15 at 0.5 (test_err 10 + 10 t) on ray 1. SWA: 10 + 2 t, crossing 2.5."""
    res = widthkit.load(_broken_file(tmp_path / "broken.h5"))

    class FakeEvaluator:
        def __init__(self, slopes, breaks):
            self.slopes, self.breaks, self.points = np.asarray(slopes), np.asarray(breaks), 0

        def evaluate(self, theta, dirs, coords):
            ray, t = np.argmax(coords != 0, axis=1), coords.sum(axis=1)
            self.points += len(t)
            broken = t >= self.breaks[ray]
            err = np.where(broken, 82.5, 10 + self.slopes[ray] * t)
            loss = np.where(broken, nan, 0.3)
            return {"test_err": err, "test_loss": loss, "train_err": err, "train_loss": np.full(len(t), 0.2)}

    sgd_ev = FakeEvaluator([2.0, 10.0, 1.0], [1.3, 9.0, 1.3])
    res.evaluators = {"SGD": (sgd_ev, None, [0, 1, 2]), "SWA": (FakeEvaluator([2.0] * 3, [9.0] * 3), None, [0, 1, 2])}
    tol = 1e-3
    r = res.widths("test_err=+5", refine=True, tol=tol)
    w = r["per_direction"]["SGD"]
    assert 1.3 <= w[0] < 1.3 + tol and 1.3 <= w[2] < 1.3 + tol  # where the model breaks
    assert 0.5 <= w[1] < 0.5 + tol
    assert np.all((2.5 <= r["per_direction"]["SWA"]) & (r["per_direction"]["SWA"] < 2.5 + tol))
    assert r["evaluations"]["SGD"] == sgd_ev.points == 3 * math.ceil(math.log2(1 / tol))
    assert "end at one" not in r["table"]  # refined widths are not the grid's lower ends


# ----------------------------------------------------------------------------------------------- end to end


def _expected_grid_widths(d, err, loss, level):
    """Independent per-ray walk: the first point with a non-finite loss or error (broken: the last distance
    before it) or an error at or above the level (linear interpolation)."""
    out = []
    for e, l, lv in zip(err, loss, level):
        for j in range(len(d)):
            if not (np.isfinite(e[j]) and np.isfinite(l[j])):
                out.append(0.0 if j == 0 else d[j - 1])
                break
            if e[j] >= lv:
                out.append(0.0 if j == 0 else d[j - 1] + (lv - e[j - 1]) / (e[j] - e[j - 1]) * (d[j] - d[j - 1]))
                break
        else:
            out.append(inf)
    return np.array(out)


def test_digits_rays_far_out_report_non_finite_points(digits_ckpts, tmp_path):
    """A real checkpoint 1e30 away along random rays: the logits overflow (test_loss NaN), the report counts
    those points as crossed instead of failing or calling the rays wider than the grid."""
    res = widthkit.rays(digits_ckpts["sgd"], dirs=2, steps=3, max_dist=1e30, bn_mode="keep", train_subset=40,
                        test_subset=40, out=tmp_path / "far.h5", device="cpu")
    m = res.models["sgd"]
    d = res.data["axes"]["distances"]
    err, loss = m["metrics"]["test_err"], m["metrics"]["test_loss"]
    broken = m["done"] & ~(np.isfinite(err) & np.isfinite(loss))
    assert broken[:, 1:].all() and not broken[:, 0].any()  # the premise: 5e29 out the model is broken
    r = res.widths("test_err=+5")
    assert r["nonfinite"] == {"SGD": int(broken.sum())} and r["computed"] == {"SGD": 6}
    np.testing.assert_allclose(r["per_direction"]["SGD"], _expected_grid_widths(d, err, loss, err[:, 0] + 5))
    assert r["crossed"]["SGD"].all()
    assert f"SGD: {int(broken.sum())} of 6 computed points have non-finite test_err (or test_loss)" in r["table"]
    # bisection: the refined width w brackets the first broken-or-crossed distance to tol
    r = res.widths("test_err=+5", refine=True)
    ev, theta, dirs = res.evaluators["SGD"]
    for ray, w in enumerate(r["per_direction"]["SGD"]):
        coords = np.zeros((2, len(dirs)))
        coords[:, ray] = [w, max(w - r["tol"], 0.0)]
        at = ev.evaluate(theta, dirs, coords)
        level = err[ray, 0] + 5
        assert not np.isfinite(at["test_loss"][0]) or at["test_err"][0] >= level
        assert np.isfinite(at["test_loss"][1]) and at["test_err"][1] < level


def test_rays_command_far_out_prints_widths(digits_ckpts, tmp_path, capsys):
    """`python -m widthkit.rays --max-dist 1e30`: widths and the non-finite count, no "summaries is empty"."""
    code = rays_cli.main(["--ckpt", digits_ckpts["sgd"], "--max-dist", "1e30", "--dirs", "2", "--steps", "3",
                          "--bn-mode", "keep", "--train-subset", "40", "--test-subset", "40", "--quiet",
                          "--out", str(tmp_path / "far.h5"), "--no-plot", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "width at test_err=+5" in captured.out and "width at train_loss_l2=+0.5" in captured.out
    assert "computed points have non-finite test_err (or test_loss) (counted as crossed)" in captured.out
    assert "summaries is empty" not in captured.out + captured.err
