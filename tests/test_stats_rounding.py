"""Paired tests across seeds and across directions treat differences equal up to float rounding as equal:
no p-value for a t statistic that only rounding makes finite, ties and zeros a rank test sees as such; scipy's
answers where the input is not degenerate."""

import math

import numpy as np
import pytest
from scipy import stats

from widthkit.report.summary import aggregate_seeds, paired_test, write_seed_report
from widthkit.report.width import compare, without_rounding

# Each of 3 seeds: SWA got exactly one more of the 359 digits test images right than SGD (accuracy in %)
SGD = [100 - 100 * 7 / 359, 100 - 100 * 4 / 359, 100 - 100 * 6 / 359]
SWA = [100 - 100 * 6 / 359, 100 - 100 * 3 / 359, 100 - 100 * 5 / 359]


def test_one_more_image_right_on_every_seed_gives_no_p_value():
    d = np.array(SWA) - np.array(SGD)
    assert d.max() - d.min() > 0  # the differences are not equal as floats: only rounding tells them apart
    t = paired_test(SGD, SWA)
    assert t["t"] is None and t["t_pvalue"] is None  # today: t = 5.9e13, p = 2.89e-28
    assert t["notes"] == [f"all seeds moved by the same amount (difference {100 / 359:+.6g}): the t statistic is "
                          "undefined, no p-value"]
    assert t["mean_diff"] == pytest.approx(100 / 359, rel=1e-12) and t["std_diff"] == 0.0
    # the signed-rank test of three positive differences: the smallest two-sided p it can give, 2/2³
    assert t["wilcoxon_pvalue"] == pytest.approx(0.25) and t["wilcoxon_min_pvalue"] == 0.25
    # the same accuracies differing by rounding only: nothing to test
    same = paired_test(SGD, [v * (1 + 1e-15) for v in SGD])
    assert same["t_pvalue"] is None and same["wilcoxon_pvalue"] is None
    assert same["notes"] == ["every seed gave the same value: no difference to test"]


def test_the_seed_report_says_so_instead_of_a_p_value(tmp_path):
    class Cfg:
        model, dataset, epochs, lr, weight_decay, swa_start_epoch, swa_schedule, swa_lr, swa_end_epoch = (
            "digits_cnn", "digits", 4, 0.05, 5e-4, 2, "constant", 0.01, 4)

        @staticmethod
        def resolved():
            return {}

    seeds = [{"seed": s, "sgd": a, "swa": {1.0: b}, "widths": []} for s, a, b in zip(range(3), SGD, SWA)]
    agg = aggregate_seeds(seeds)
    assert agg["accuracy_tests"][1.0]["t_pvalue"] is None
    text = write_seed_report(tmp_path / "report.md", "r", Cfg, agg, None, {}, {}, 1.0).read_text()
    assert "at 1 budget +0.28 (no t-test: all seeds moved by the same amount (difference +0.278552)" in text
    assert "e-28" not in text


@pytest.mark.parametrize("seed", range(5))
def test_paired_test_agrees_with_scipy_on_ordinary_differences(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(90, 1, size=5)
    b = a + rng.normal(0.5, 0.4, size=5)
    t = paired_test(a, b)
    ref = stats.ttest_rel(b, a)
    assert t["t"] == pytest.approx(ref.statistic, rel=1e-12) and t["t_pvalue"] == pytest.approx(ref.pvalue, rel=1e-12)
    w = stats.wilcoxon(b - a)
    assert t["wilcoxon_pvalue"] == pytest.approx(w.pvalue, rel=1e-12)
    assert t["mean_diff"] == pytest.approx(np.mean(b - a), rel=1e-12)
    assert t["std_diff"] == pytest.approx(np.std(b - a, ddof=1), rel=1e-12) and t["notes"] == []


def test_wilcoxon_over_directions_sees_grid_steps_as_ties():
    """Widths on a grid (no refinement): one step wider or narrower along each direction. As floats the steps
    differ in the last bit (0.3 − 0.2 ≠ 0.2 − 0.1), which breaks the ties a rank test must see."""
    grid = np.linspace(0.0, 1.0, 11)
    ia = np.array([2, 5, 7, 3, 8, 4, 6])
    steps = np.array([1, 1, 1, -1, 1, 2, 1])
    a, b = grid[ia], grid[ia + steps]
    raw = b - a
    assert len(set(np.abs(raw[steps != 2]).tolist())) > 1  # ties broken by rounding
    exact = steps * 0.1  # the differences as exact multiples of one step
    comp = compare(a, np.ones(7, bool), b, np.ones(7, bool), names=("SGD", "SWA"))
    assert comp["wilcoxon"]["pvalue"] == pytest.approx(stats.wilcoxon(exact).pvalue, rel=1e-12)
    assert comp["wilcoxon"]["pvalue"] != pytest.approx(stats.wilcoxon(raw).pvalue, rel=1e-6)  # what rounding gave
    # differences that are not equal are left as they are: scipy's answer on them
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.5, 2, 12), rng.uniform(0.5, 2, 12)
    comp = compare(a, np.ones(12, bool), b, np.ones(12, bool), names=("SGD", "SWA"))
    assert comp["wilcoxon"]["pvalue"] == pytest.approx(stats.wilcoxon(b - a).pvalue, rel=1e-12)


def test_without_rounding_zeros_and_ties():
    d = without_rounding([1e-12, -3e-13, 0.1 + 1e-17, -0.1, 0.10000000000000003, 0.25], scale=1.0)
    assert d[0] == 0 and d[1] == 0
    assert d[2] == d[4] == -d[3] and d[5] == 0.25
    np.testing.assert_array_equal(without_rounding([0.5, -0.2], 1.0), [0.5, -0.2])
    assert not math.isnan(without_rounding([1.0], math.inf)[0])
