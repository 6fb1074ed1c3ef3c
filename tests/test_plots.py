"""Tests of widthkit.report.figures and widthkit.report.render: labels with units (from the stored axis
attributes for files), what is drawn where (checked against the input arrays and hand-computed values), plane
orientation, NaN handling, the file-level helpers' outputs and figure hygiene."""

import types

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from widthkit.report import figures, render, store

BLUE = mcolors.to_rgba("tab:blue")
GREEN = mcolors.to_rgba("tab:green")


@pytest.fixture(autouse=True)
def _figures(request):
    """Close whatever a test opened; fail a test of a class marked ``closes_its_figures`` that leaves any."""
    before = set(plt.get_fignums())
    yield
    leaked = set(plt.get_fignums()) - before
    plt.close("all")
    if getattr(request.cls, "closes_its_figures", False) and leaked:
        pytest.fail(f"test left {len(leaked)} matplotlib figure(s) open")


def by_gid(ax, prefix):
    return [a for a in ax.get_children() if (a.get_gid() or "").startswith(prefix)]


def rgba(color):
    return mcolors.to_rgba(color)


# --------------------------------------------------------------------------------------------- helpers


def test_metric_labels_carry_units():
    assert figures.metric_label("test_err") == "test error (%)"
    assert figures.metric_label("train_loss") == "train loss (nats)"
    for m in ("train_err", "test_err"):
        assert figures.metric_label(m).endswith("(%)")
    for m in ("train_loss", "test_loss", "train_loss_l2"):
        assert figures.metric_label(m).endswith("(nats)")
    with pytest.raises(ValueError, match=r"unknown metric 'accuracy'; valid metrics: train_loss, train_loss_l2"):
        figures.metric_label("accuracy")


def test_checkpoint_colors_swa_blue_sgd_green_case_insensitive():
    c = figures.checkpoint_colors(["swa", "SGD", "Swa (300 ep)", "start", "end"])
    assert rgba(c["swa"]) == BLUE and rgba(c["Swa (300 ep)"]) == BLUE and rgba(c["SGD"]) == GREEN
    # the others take tab10 in order, skipping the colours already used
    tab10 = [mcolors.to_hex(x) for x in plt.get_cmap("tab10").colors]
    assert [c["start"], c["end"]] == [tab10[1], tab10[3]]
    assert figures.checkpoint_colors(["SWA"], colors={"SWA": "red"}) == {"SWA": "red"}
    assert rgba(figures.checkpoint_colors(["swag"])["swag"]) != BLUE  # the first word must be exactly "swa"


# --------------------------------------------------------------------------------------------- rays


def ray_data(n_swa=4, n_sgd=3, steps=6):
    d = np.linspace(0.0, 10.0, steps)
    rng = np.random.default_rng(1)
    swa = 5 + d[None, :] * rng.uniform(1, 2, size=(n_swa, 1))
    sgd = 6 + d[None, :] * rng.uniform(2, 4, size=(n_sgd, 1))
    return d, {"SWA": swa, "SGD": sgd}


def test_plot_rays_lines_labels_colours():
    d, curves = ray_data()
    ax = figures.plot_rays(d, curves, metric="test_err")
    assert len(plt.get_fignums()) == 1
    assert ax.get_xlabel() == "distance in weight space (‖θ−θ₀‖₂)"
    assert ax.get_ylabel() == "test error (%)"
    assert len(ax.get_lines()) == 4 + 3 + 2  # N thin per checkpoint + one mean each
    for label, n, color in (("SWA", 4, BLUE), ("SGD", 3, GREEN)):
        thin = by_gid(ax, f"ray:{label}:")
        assert len(thin) == n
        (mean,) = by_gid(ax, f"mean:{label}")
        assert all(rgba(line.get_color())[:3] == color[:3] for line in thin + [mean])
        assert all(line.get_alpha() < 1 and line.get_linewidth() < mean.get_linewidth() for line in thin)
        for i, line in enumerate(thin):
            np.testing.assert_array_equal(line.get_ydata(), curves[label][i])
        hand_mean = [sum(curves[label][i, s] for i in range(n)) / n for s in range(d.size)]
        np.testing.assert_allclose(mean.get_ydata(), hand_mean, rtol=1e-12)
    (legend,) = ax.figure.legends  # a figure of its own: the legend goes under the plot
    assert [t.get_text() for t in legend.get_texts()] == ["SWA", "SGD"] and ax.get_legend() is None
    assert ax.get_xlim() == (0.0, 10.0)


@pytest.mark.parametrize("metric", ["train_loss", "train_loss_l2", "test_loss", "train_err", "test_err"])
def test_plot_rays_ylabel_per_metric(metric):
    d, curves = ray_data(1, 1)
    _, ax = plt.subplots()
    out = figures.plot_rays(d, curves, ax=ax, metric=metric)
    assert out is ax and len(plt.get_fignums()) == 1  # drew on the given Axes, no new figure
    assert ax.get_ylabel() == figures.METRIC_LABELS[metric]
    assert ("(%)" if metric.endswith("err") else "(nats)") in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SWA", "SGD"]  # inside a given Axes


def test_plot_rays_nan_not_drawn_and_mean_undefined_there():
    d, curves = ray_data()
    curves["SGD"][1, 3:] = np.nan  # not computed yet
    ax = figures.plot_rays(d, curves, legend=False)
    ray = by_gid(ax, "ray:SGD:1")[0].get_ydata()
    assert np.isnan(ray[3:]).all() and np.isfinite(ray[:3]).all()
    mean = by_gid(ax, "mean:SGD")[0].get_ydata()
    assert np.isnan(mean[3:]).all()
    np.testing.assert_allclose(mean[:3], curves["SGD"][:, :3].mean(axis=0))
    ax.figure.canvas.draw()
    assert np.isfinite(ax.get_ylim()).all()
    assert ax.get_legend() is None and ax.figure.legends == []


def test_plot_rays_shared_threshold_and_widths_on_it():
    d, curves = ray_data(3, 2)
    widths = {"SWA": [2.0, np.inf, 3.5], "SGD": [1.0, np.nan]}  # inf: never crossed; NaN: unknown
    ax = figures.plot_rays(d, curves, threshold_level=20.0, widths=widths)
    (line,) = [a for a in by_gid(ax, "threshold") if hasattr(a, "get_linestyle")]
    assert line.get_ydata()[0] == 20.0 and line.get_linestyle() == "--"
    assert "threshold 20%" in [t.get_text() for t in ax.texts]
    (swa,) = by_gid(ax, "widths:SWA")
    np.testing.assert_array_equal(swa.get_offsets(), [[2.0, 20.0], [3.5, 20.0]])
    np.testing.assert_array_equal(by_gid(ax, "widths:SGD")[0].get_offsets(), [[1.0, 20.0]])
    texts = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert texts == ["SWA", "SGD", "SWA width, mean 2.75 (2/3 crossed)", "SGD width, mean 1 (1/2 crossed)"]


def test_plot_rays_per_checkpoint_thresholds_and_widths_on_the_curve():
    d = np.linspace(0.0, 10.0, 11)
    curves = {"SWA": np.vstack([d, 2 * d]), "SGD": np.vstack([d])}
    ax = figures.plot_rays(d, curves, threshold_level={"SWA": [4.0, 4.0], "SGD": 3.0},
                         widths={"SWA": [4.0, 2.0], "SGD": [3.0]})
    swa_line = [a for a in by_gid(ax, "threshold:SWA") if hasattr(a, "get_linestyle")][0]
    assert rgba(swa_line.get_color()) == BLUE and swa_line.get_ydata()[0] == 4.0
    assert [a for a in by_gid(ax, "threshold:SGD") if hasattr(a, "get_linestyle")][0].get_ydata()[0] == 3.0

    # per-direction levels (a relative threshold): no line, markers at each ray's own level
    ax = figures.plot_rays(d, curves, threshold_level={"SWA": [4.0, 8.0]}, widths={"SWA": [4.0, 4.0]})
    assert by_gid(ax, "threshold") == []
    np.testing.assert_array_equal(by_gid(ax, "widths:SWA")[0].get_offsets(), [[4.0, 4.0], [4.0, 8.0]])

    # no threshold: the marker sits on the ray itself (ray values 2*d at d=2.5 -> 5)
    ax = figures.plot_rays(d, curves, widths={"SWA": [1.5, 2.5]})
    np.testing.assert_allclose(by_gid(ax, "widths:SWA")[0].get_offsets(), [[1.5, 1.5], [2.5, 5.0]])


def test_plot_rays_rejects_bad_input():
    d, curves = ray_data()
    with pytest.raises(ValueError, match=r"curves must be a non-empty dict"):
        figures.plot_rays(d, {})
    with pytest.raises(ValueError, match=r"curves\['SWA'\] has shape \(6,\), expected \(N, S=6\).*values\[None, :\]"):
        figures.plot_rays(d, {"SWA": curves["SWA"][0]})
    with pytest.raises(ValueError, match=r"expected \(N, S=5\)"):
        figures.plot_rays(d[:5], curves)
    with pytest.raises(ValueError, match=r"distances must be a 1-D array"):
        figures.plot_rays(d[None], curves)
    with pytest.raises(ValueError, match=r"unknown metric 'err'"):
        figures.plot_rays(d, curves, metric="err")
    with pytest.raises(ValueError, match=r"widths has labels \['swa2'\] that match no curve; curve labels: "):
        figures.plot_rays(d, curves, widths={"swa2": [1.0]})
    with pytest.raises(ValueError, match=r"widths\['SWA'\] has shape \(2,\), expected one width per direction \(4,\)"):
        figures.plot_rays(d, curves, widths={"SWA": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"threshold_level has labels \['SGDX'\]"):
        figures.plot_rays(d, curves, threshold_level={"SGDX": 1.0})
    with pytest.raises(ValueError, match=r"threshold_level\['SWA'\] has shape \(2,\); give one level or one per"):
        figures.plot_rays(d, curves, threshold_level={"SWA": [1.0, 2.0]})


def test_plot_rays_panel_new_figure():
    d, curves = ray_data()
    by_metric = {"test_err": curves, "train_loss": {k: v / 10 for k, v in curves.items()}}
    axes = figures.plot_rays_panel(d, by_metric, bn_mode="recompute", norm="unit",
                                 widths_by_metric={"test_err": {"SGD": [1.0, 2.0, 3.0]}},
                                 threshold_by_metric={"test_err": 10.0})
    assert isinstance(axes, np.ndarray) and axes.shape == (2,)
    assert [a.get_ylabel() for a in axes] == ["test error (%)", "train loss (nats)"]
    assert all(len(a.get_lines()) == 9 for a in axes[1:]) and len(axes[0].get_lines()) == 10  # + threshold
    fig = axes[0].figure
    assert fig.get_suptitle() == "3/4 random unit directions, BN statistics recomputed at each point"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["SWA", "SGD", "SGD width, mean 2"]
    assert all(a.get_legend() is None for a in axes)
    assert fig.get_size_inches()[0] == pytest.approx(2 * 4.5)


def test_plot_rays_panel_given_axes_and_caption():
    d, curves = ray_data(3, 3)
    fig, given = plt.subplots(1, 2)
    axes = figures.plot_rays_panel(d, {"test_err": curves, "train_err": curves}, axes=given, bn_mode="keep")
    assert list(axes) == list(given) and len(plt.get_fignums()) == 1
    assert fig.get_suptitle() == "3 random directions, BN statistics of the checkpoint"
    assert axes[0].get_legend() is not None and axes[1].get_legend() is None
    fig, given = plt.subplots(1, 2)
    figures.plot_rays_panel(d, {"test_err": curves}, axes=given[:1], title="")
    assert fig.get_suptitle() == ""
    with pytest.raises(ValueError, match=r"got 2 axes for 1 metrics \['test_err'\]; pass one Axes per metric"):
        figures.plot_rays_panel(d, {"test_err": curves}, axes=given)
    with pytest.raises(ValueError, match=r"widths_by_metric has metrics \['train_loss'\] without a panel"):
        figures.plot_rays_panel(d, {"test_err": curves}, widths_by_metric={"train_loss": {}})
    with pytest.raises(ValueError, match=r"curves_by_metric must be a non-empty dict"):
        figures.plot_rays_panel(d, {})
    with pytest.raises(ValueError, match=r"unknown metric 'loss'"):
        figures.plot_rays_panel(d, {"loss": curves})


# --------------------------------------------------------------------------------------------- line


def line_data():
    t = np.linspace(-0.5, 1.5, 9)  # t = 0 and t = 1 are grid points
    return t, {"test_err": 5 + 4 * (t - 0.2) ** 2, "train_loss": 0.1 + (t - 0.8) ** 2}


def test_plot_line_twin_axes_markers_labels():
    t, values = line_data()
    ax_err, ax_loss = figures.plot_line(t, values, {"SWA": 0.0, "SGD": 1.0})
    assert len(plt.get_fignums()) == 1 and ax_err.figure is ax_loss.figure
    assert ax_err.get_ylabel() == "test error (%)" and ax_loss.get_ylabel() == "train loss (nats)"
    assert ax_loss.get_shared_x_axes().joined(ax_err, ax_loss)  # twin y axes over one x axis
    assert ax_err.get_xlabel() == "t along the line (SWA at t=0, SGD at t=1)"
    np.testing.assert_array_equal(by_gid(ax_err, "metric:test_err")[0].get_ydata(), values["test_err"])
    np.testing.assert_array_equal(by_gid(ax_loss, "metric:train_loss")[0].get_ydata(), values["train_loss"])
    for label, tp, marker, color in (("SWA", 0.0, "o", BLUE), ("SGD", 1.0, "s", GREEN)):
        for ax, m, expected in ((ax_err, "test_err", 5 + 4 * (tp - 0.2) ** 2),
                                (ax_loss, "train_loss", 0.1 + (tp - 0.8) ** 2)):
            (mk,) = by_gid(ax, f"marker:{label}:{m}")
            assert mk.get_marker() == marker and rgba(mk.get_color()) == color
            assert mk.get_xdata()[0] == tp and mk.get_ydata()[0] == pytest.approx(expected)
    for label, color in (("SWA", BLUE), ("SGD", GREEN)):
        (text,) = by_gid(ax_err, f"label:{label}")
        assert text.get_text() == label and rgba(text.get_color()) == color
    (legend,) = ax_err.figure.legends  # a figure of its own: the legend goes under the plot
    assert [tx.get_text() for tx in legend.get_texts()] == ["test error (%)", "train loss (nats)"]
    _, host = plt.subplots()
    ax_err, ax_loss = figures.plot_line(t, values, {"SWA": 0.0, "SGD": 1.0}, ax=host)
    assert ax_err is host and ax_loss.get_shared_x_axes().joined(host, ax_loss)
    legend = ax_loss.get_legend()  # inside, on the twin (drawn above its host)
    assert [tx.get_text() for tx in legend.get_texts()] == ["test error (%)", "train loss (nats)"]


def test_plot_line_two_given_axes_nan_and_single_unit():
    t, values = line_data()
    values["test_err"][-2:] = np.nan
    fig, (a, b) = plt.subplots(1, 2)
    ax_err, ax_loss = figures.plot_line(t, values, {"A": 0.25, "B": 1.5}, ax=(a, b), xlabel="t")
    assert (ax_err, ax_loss) == (a, b) and len(fig.axes) == 2 and a.get_xlabel() == "t"
    assert b.get_legend() is not None and fig.legends == []
    assert np.isnan(by_gid(a, "metric:test_err")[0].get_ydata()[-2:]).all()
    # 1.5 lies in the NaN tail of test_err: no marker there; 0.25 between grid points: interpolated
    assert by_gid(a, "marker:B:test_err") == [] and len(by_gid(b, "marker:B:train_loss")) == 1
    expected = np.interp(0.25, t, values["test_err"])
    assert by_gid(a, "marker:A:test_err")[0].get_ydata()[0] == pytest.approx(expected)

    ax_err, ax_loss = figures.plot_line(t, {"test_err": values["test_err"], "train_err": values["test_err"] + 1})
    assert ax_loss is None and ax_err.get_ylabel() == "error (%)"
    ax_err, ax_loss = figures.plot_line(t, {"test_loss": values["train_loss"]})
    assert ax_err is None and ax_loss.get_ylabel() == "test loss (nats)"


def test_plot_line_distance_axis_only_when_affine():
    t, values = line_data()
    ax, _ = figures.plot_line(t, values, {"SWA": 0, "SGD": 1}, distances=12.5 * t)
    (top,) = ax.child_axes
    assert top.get_xlabel() == "distance along the line (weight-space units)"
    ax, _ = figures.plot_line(t, values, {"SWA": 0, "SGD": 1}, distances=12.5 * np.abs(t))
    assert ax.child_axes == []


def test_plot_line_rejects_bad_input():
    t, values = line_data()
    with pytest.raises(ValueError, match=r"values\['test_err'\] has shape \(8,\), expected \(9,\) like t"):
        figures.plot_line(t, {"test_err": values["test_err"][:-1]})
    with pytest.raises(ValueError, match=r"unknown metric 'acc'"):
        figures.plot_line(t, {"acc": t})
    with pytest.raises(ValueError, match=r"values must be a non-empty dict"):
        figures.plot_line(t, {})
    with pytest.raises(ValueError, match=r"points\['SWA'\] = nan; each checkpoint needs a finite t"):
        figures.plot_line(t, values, {"SWA": float("nan")})
    with pytest.raises(ValueError, match=r"ax must be None, one Axes .* or two Axes"):
        figures.plot_line(t, values, ax=[plt.subplots()[1]] * 3)
    with pytest.raises(ValueError, match=r"distances has shape \(2,\), expected \(9,\) like t"):
        figures.plot_line(t, values, distances=[0.0, 1.0])


# --------------------------------------------------------------------------------------------- plane


def plane_grid():
    x = np.array([-1.0, 0.0, 1.0, 2.0, 3.0])
    y = np.array([-2.0, 0.0, 2.0])
    ix, iy = np.meshgrid(np.arange(5), np.arange(3), indexing="ij")
    return x, y, 1.0 + 10.0 * ix + iy  # asymmetric: depends on ix and iy differently, Z[ix, iy]


def test_plot_plane_heatmap_orientation_cell_by_cell():
    x, y, Z = plane_grid()
    Z[4, 0] = np.nan
    ax = figures.plot_plane(x, y, Z, kind="heatmap")
    (mesh,) = by_gid(ax, "plane:heatmap")
    values = mesh.get_array()
    corners = mesh.get_coordinates()  # (Y+1, X+1, 2) cell corners
    assert values.shape == (3, 5)
    for ix in range(5):
        for iy in range(3):
            cell = corners[iy:iy + 2, ix:ix + 2].reshape(-1, 2)
            np.testing.assert_allclose(cell.mean(axis=0), [x[ix], y[iy]])  # cell centred on (x[ix], y[iy])
            if np.isnan(Z[ix, iy]):
                assert values.mask[iy, ix]
            else:
                assert values[iy, ix] == Z[ix, iy] and not values.mask[iy, ix]


def test_plot_plane_contour_orientation():
    # square grid (a transposed plot would not fail on shapes) with Z growing along x only
    x = np.linspace(0.0, 4.0, 9)
    y = np.linspace(10.0, 14.0, 9)
    Z = np.repeat(np.exp(x)[:, None], 9, axis=1)
    ax = figures.plot_plane(x, y, Z, levels="linear", n_levels=5)
    (cs,) = by_gid(ax, "plane:contourf")
    bands = [p.vertices for p in cs.get_paths() if len(p.vertices)]
    top = bands[-1]  # highest band: exp(x) > 0.75 * max -> x > ln(0.75 e^4 + 0.25) ≈ 3.71
    assert top[:, 0].min() > 3.6 and np.ptp(top[:, 1]) == pytest.approx(4.0)
    bottom = bands[0]
    assert bottom[:, 0].max() < 3.0 and np.ptp(bottom[:, 1]) == pytest.approx(4.0)


def test_plot_plane_labels_colorbar_points_levels():
    x, y, Z = plane_grid()
    Z[0, 2] = np.nan
    P = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]])
    ax = figures.plot_plane(x, y, Z, P, ["SGD", "SWA", "start"], metric="train_loss", n_levels=7)
    assert ax.get_xlabel() == "distance along u (weight-space units)"
    assert ax.get_ylabel() == "distance along v (weight-space units)"
    assert ax.get_aspect() == 1.0
    (cbar_ax,) = [a for a in ax.figure.axes if a is not ax]
    assert cbar_ax.get_ylabel() == "train loss (nats)"
    (cs,) = by_gid(ax, "plane:contourf")
    np.testing.assert_allclose(cs.levels, figures.contour_levels(Z, "log", 7)[0])
    for (px, py), label, color in zip(P, ["SGD", "SWA"], [GREEN, BLUE]):
        (mk,) = by_gid(ax, f"point:{label}")
        assert (mk.get_xdata()[0], mk.get_ydata()[0]) == (px, py) and rgba(mk.get_color()) == color
    assert by_gid(ax, "point:SGD")[0].get_marker() == "o" and by_gid(ax, "point:SWA")[0].get_marker() == "s"
    assert [t.get_text() for t in ax.texts] == ["SGD", "SWA", "start"]
    ax.figure.canvas.draw()  # NaN cells render (masked) without error


def test_contour_levels_log_above_minimum_by_hand():
    Z = np.array([[3.0, np.nan], [4.0, 1003.0]])
    bounds, norm = figures.contour_levels(Z, "log", n_levels=5, decades=3)
    np.testing.assert_allclose(bounds, [3.0, 3.0 + 1.0, 3.0 + 10.0, 3.0 + 100.0, 1003.0])
    assert norm(3.0) == pytest.approx(0.0) and norm(1003.0) == pytest.approx(1.0)
    # equal colour steps per band: norm = log(Z - zmin + 1) / log(1001)
    np.testing.assert_allclose(norm(bounds[1:4]), np.log(np.array([2.0, 11.0, 101.0])) / np.log(1001.0))
    lin, _ = figures.contour_levels(Z, "linear", n_levels=3)
    np.testing.assert_allclose(lin, [3.0, 503.0, 1003.0])
    given, _ = figures.contour_levels(Z, [0.0, 1.0, 2000.0])
    np.testing.assert_array_equal(given, [0.0, 1.0, 2000.0])
    const, _ = figures.contour_levels(np.full((2, 2), 7.0))
    assert const.size == 2 and const[0] < 7.0 < const[1]


def test_plane_rejects_bad_input():
    x, y, Z = plane_grid()
    with pytest.raises(ValueError, match=r"Z has shape \(3, 5\), expected \(len\(x\), len\(y\)\) = \(5, 3\) "
                                         r"\(it looks transposed: planes are indexed Z\[ix, iy\]; pass Z.T\)"):
        figures.plot_plane(x, y, Z.T)
    with pytest.raises(ValueError, match=r"x must be finite and strictly increasing"):
        figures.plot_plane(x[::-1], y, Z)
    with pytest.raises(ValueError, match=r"unknown kind 'surface'; valid: contourf, heatmap"):
        figures.plot_plane(x, y, Z, kind="surface")
    with pytest.raises(ValueError, match=r"got 1 labels for 2 points"):
        figures.plot_plane(x, y, Z, [[0, 0], [1, 1]], ["SGD"])
    with pytest.raises(ValueError, match=r"points must be \(K, 2\) plane coordinates, got shape \(3,\)"):
        figures.plot_plane(x, y, Z, [0, 0, 1])
    with pytest.raises(ValueError, match=r"Z has no finite value \(nothing computed yet\?\)"):
        figures.plot_plane(x, y, np.full_like(Z, np.nan))
    with pytest.raises(ValueError, match=r"unknown levels 'geometric'; valid: log, linear or an array"):
        figures.plot_plane(x, y, Z, levels="geometric")
    with pytest.raises(ValueError, match=r"n_levels must be an integer >= 2"):
        figures.plot_plane(x, y, Z, n_levels=1)
    with pytest.raises(ValueError, match=r"levels must be finite and strictly increasing"):
        figures.plot_plane(x, y, Z, levels=[3.0, 1.0])
    with pytest.raises(ValueError, match=r"decades must be a positive number"):
        figures.contour_levels(Z, decades=0)


def test_plot_plane_surface():
    x, y, Z = plane_grid()
    ax = figures.plot_plane_surface(x, y, Z, [[0.5, 1.0]], ["SWA"], metric="test_err")
    assert ax.name == "3d" and ax.get_zlabel() == "test error (%)"
    (surface,) = by_gid(ax, "plane:surface")
    marker = [c for c in ax.collections if c is not surface][0]
    # bilinear interpolation by hand at x=0.5 (between ix=1,2), y=1.0 (between iy=1,2): 1 + 10*1.5 + 1.5
    np.testing.assert_allclose(marker._offsets3d[2], [17.5])
    with pytest.raises(ValueError, match=r"ax must be a 3D Axes: create it with fig.add_subplot\(projection='3d'\)"):
        figures.plot_plane_surface(x, y, Z, ax=plt.subplots()[1])


# --------------------------------------------------------------------------------------------- file level


def rays_dict(l2=True):
    d, curves = ray_data(3, 3)
    done = np.ones((3, d.size), bool)
    done_sgd = done.copy()
    done_sgd[0, -1] = False
    models = {}
    for name, label, c, dn in (("sgd", "SGD", curves["SGD"], done_sgd), ("swa", "SWA", curves["SWA"], done)):
        metrics = {"train_loss": c / 10, "train_err": c, "test_loss": c / 9, "test_err": c}
        if l2:
            metrics["train_loss_l2"] = c / 10 + 0.5
        models[name] = {"metrics": metrics, "done": dn, "attrs": {"label": label, "role": name}}
    return {"kind": "rays", "config": {"eval": {"bn_mode": "recompute"}, "directions": {"norm": "filter"}},
            "attrs": {}, "axes": {"distances": d, "directions_shape": (3, 500)}, "models": models,
            "widths": {"sgd": {"metric": "test_err", "level": 12.0, "widths": [1.0, 2.0, np.inf]},
                       "SWA": {"metric": "test_err", "level": 12.0, "widths": [3.0, 4.0, 5.0]}}}


def line_dict():
    t, values = line_data()
    values["train_loss_l2"] = values["train_loss"] + 0.3
    return {"kind": "line", "config": {"bn_mode": "keep"}, "attrs": {},
            "axes": {"t": t, "distances": 20 * t, "points": np.array([0.0, 1.0]), "point_labels": ["SWA", "SGD"]},
            "models": {"line": {"metrics": values, "done": np.ones(t.size, bool), "attrs": {}}}}


def plane_dict():
    x, y, Z = plane_grid()
    return {"kind": "plane", "config": {"bn_mode": "batch"}, "attrs": {},
            "axes": {"x": x, "y": y, "points": np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 2.0]]),
                     "point_labels": ["SGD", "SWA", "start"]},
            "models": {"plane": {"metrics": {"test_err": Z, "train_loss": Z / 10, "test_loss": Z / 9},
                                 "done": np.ones(Z.shape, bool), "attrs": {}}}}


def assert_figure_files(paths, expected):
    assert [str(p) for p in expected] == paths
    for p in expected:
        data = p.read_bytes()
        magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}[p.suffix[1:]]
        assert len(data) > 1000 and data.startswith(magic)


class TestFileLevel:
    closes_its_figures = True

    @pytest.mark.parametrize("make, names", [
        (rays_dict, ["fig"]), (line_dict, ["fig"]), (plane_dict, ["fig_test_err", "fig_train_loss"])])
    def test_writes_png_and_pdf(self, tmp_path, make, names):
        paths = render.plot_analysis(make(), tmp_path / "sub" / "fig")
        assert_figure_files(paths, [tmp_path / "sub" / f"{n}.{f}" for n in names for f in ("png", "pdf")])
        assert plt.get_fignums() == []

    def test_png_dpi_and_svg(self, tmp_path):
        from PIL import Image

        paths = render.plot_analysis(line_dict(), tmp_path / "line", formats=("png", "svg"))
        assert_figure_files(paths, [tmp_path / "line.png", tmp_path / "line.svg"])
        assert Image.open(paths[0]).info["dpi"] == pytest.approx((150, 150), abs=0.1)

    def test_rays_figure_content(self, tmp_path, monkeypatch):
        seen = {}
        original = render.plot_rays_panel

        def spy(distances, curves, widths, thresholds, **kw):
            seen.update(curves=curves, widths=widths, thresholds=thresholds, **kw)
            return original(distances, curves, widths, thresholds, **kw)

        monkeypatch.setattr(render, "plot_rays_panel", spy)
        render.plot_analysis(rays_dict(), tmp_path / "r", formats=("png",))
        assert list(seen["curves"]) == ["test_err", "train_loss_l2"]  # paper default, L2 term when stored
        sgd = seen["curves"]["test_err"]["SGD"]
        assert np.isnan(sgd[0, -1]) and np.isfinite(sgd).sum() == sgd.size - 1  # done mask applied
        assert list(seen["curves"]["test_err"]) == ["SGD", "SWA"]
        assert seen["widths"] == {"test_err": {"SGD": pytest.approx([1.0, 2.0, np.inf]), "SWA": pytest.approx([3, 4, 5])}}
        assert seen["thresholds"] == {"test_err": 12.0}  # one shared level, one line
        assert seen["title"] == ("Rays from SGD and SWA: 3 random filter-normalised directions, "
                                 "BN statistics recomputed at each point")
        assert seen["xlabel"] == "distance in weight space (‖θ−θ₀‖₂)"  # no axis_attrs: the default

        seen.clear()
        data = rays_dict(l2=False)
        data["widths"] = {"swa": {"metric": "train_loss", "level": [1.0, 2.0, 3.0], "widths": [1.0, 1.0, 1.0]}}
        render.plot_analysis(data, tmp_path / "r", formats=("png",), metric=["train_loss", "train_err"])
        assert list(seen["curves"]) == ["train_loss", "train_err"]
        assert list(seen["widths"]) == ["train_loss"] and list(seen["widths"]["train_loss"]) == ["SWA"]
        np.testing.assert_array_equal(seen["thresholds"]["train_loss"]["SWA"], [1.0, 2.0, 3.0])  # per ray

    def test_line_and_plane_titles(self, tmp_path, monkeypatch):
        seen = []
        for name in ("plot_line", "plot_plane"):
            original = getattr(render, name)

            def spy(*args, _original=original, **kw):
                seen.append((args, kw))
                return _original(*args, **kw)

            monkeypatch.setattr(render, name, spy)
        render.plot_analysis(line_dict(), tmp_path / "l", formats=("png",))
        (args, kw), = seen
        assert list(args[1]) == ["test_err", "train_loss_l2"] and args[2] == {"SWA": 0.0, "SGD": 1.0}
        assert kw["title"] == "Line through SWA and SGD, BN statistics of the checkpoint"
        seen.clear()
        render.plot_analysis(plane_dict(), tmp_path / "p", formats=("png",), metric="test_loss")
        (args, kw), = seen
        assert kw["metric"] == "test_loss" and kw["title"] == "Plane through SGD, SWA, start\nBN in batch mode"

    def test_rejects_bad_input(self, tmp_path):
        with pytest.raises(ValueError, match=r"unknown figure format\(s\) \['jpg'\]; valid: png, pdf, svg"):
            render.plot_analysis(rays_dict(), tmp_path / "x", formats=("png", "jpg"))
        with pytest.raises(ValueError, match=r"formats is empty; name at least one of png, pdf, svg"):
            render.plot_analysis(rays_dict(), tmp_path / "x", formats=())
        with pytest.raises(ValueError, match=r"unknown analysis kind 'cube'; valid: rays, line, plane"):
            render.plot_analysis({**rays_dict(), "kind": "cube"}, tmp_path / "x")
        with pytest.raises(ValueError, match=r"analysis dict lacks \['models'\]; pass the dict widthkit.report.store.read"):
            render.plot_analysis({"kind": "rays", "axes": {}}, tmp_path / "x")
        with pytest.raises(ValueError, match=r"rays analysis lacks axes\['distances'\]; axes present: \[\]"):
            render.plot_analysis({**rays_dict(), "axes": {}}, tmp_path / "x")
        with pytest.raises(ValueError, match=r"metric\(s\) \['train_loss_l2'\] not in this analysis; available: "):
            render.plot_analysis(plane_dict(), tmp_path / "x", metric="train_loss_l2")
        with pytest.raises(ValueError, match=r"widths entry 'adam' matches no model"):
            data = rays_dict()
            data["widths"]["adam"] = {"metric": "test_err", "level": 1.0, "widths": [1.0, 1.0, 1.0]}
            render.plot_analysis(data, tmp_path / "x")
        assert list(tmp_path.iterdir()) == []

    def test_plot_file_on_a_real_store_file_half_computed(self, tmp_path):
        data = plane_dict()
        x, y, P = data["axes"]["x"], data["axes"]["y"], data["axes"]["points"]
        Z = data["models"]["plane"]["metrics"]["test_err"]
        path = tmp_path / "plane.h5"
        with store.open_analysis(path, "plane", {"bn_mode": "keep"},
                                 axes={"x": (x, ["x"]), "y": (y, ["y"]), "points": (P, ["point", "coord"])},
                                 groups={"plane": {"label": "plane"}}, grid_shape=Z.shape,
                                 metrics=["test_err", "train_loss"],
                                 attrs={"point_labels": ["SGD", "SWA", "start"]}) as af:
            first = np.arange(Z.size // 2)
            af.write("plane", first, {"test_err": Z.reshape(-1)[first], "train_loss": Z.reshape(-1)[first] / 10})
        paths = render.plot_file(path, out_dir=tmp_path / "figs", formats=("png",), metric="train_loss")
        assert_figure_files(paths, [tmp_path / "figs" / "plane_train_loss.png"])

    def test_closes_figures_on_error(self, tmp_path, monkeypatch):
        def broken(self, *a, **k):
            raise OSError("disk full")

        monkeypatch.setattr(Figure, "savefig", broken)
        with pytest.raises(OSError, match="disk full"):
            render.plot_analysis(plane_dict(), tmp_path / "p")
        assert plt.get_fignums() == []

    def test_leaves_the_callers_figures_and_data_alone(self, tmp_path):
        mine = plt.figure()
        data = rays_dict()
        before = {n: {m: v.copy() for m, v in model["metrics"].items()} for n, model in data["models"].items()}
        render.plot_analysis(data, tmp_path / "r", formats=("png",))
        assert plt.get_fignums() == [mine.number]
        for n, model in data["models"].items():
            for m, v in model["metrics"].items():
                np.testing.assert_array_equal(v, before[n][m])
        plt.close(mine)

    def test_plot_file_reads_through_store(self, tmp_path, monkeypatch):
        calls = []

        def read(path):
            calls.append(path)
            return plane_dict()

        monkeypatch.setattr(render, "store", types.SimpleNamespace(read=read, completeness=store.completeness))
        h5 = tmp_path / "plane_run.h5"
        paths = render.plot_file(h5, formats="png", metric="test_err")
        assert calls == [h5] and paths == [str(tmp_path / "plane_run_test_err.png")]
        paths = render.plot_file(str(h5), out_dir=tmp_path / "figs", formats=("pdf",), metric="test_err")
        assert_figure_files(paths, [tmp_path / "figs" / "plane_run_test_err.pdf"])


# --------------------------------------------------------------------------------------------- stored units

FILTER_UNITS = "multiples of filter-normalised directions"
RANDOM_PLANE_TITLE = "Random plane around SWA (filter-normalised directions)"


def write_analysis(path, kind, config, axes, values, attrs=None):
    """A complete analysis file made through the store: ``values`` is {group: {metric: grid array}}."""
    groups = {g: {"label": g.upper()} for g in values}
    first = next(iter(values.values()))
    shape = next(iter(first.values())).shape
    af = store.open_analysis(path, kind, config, axes, groups, shape, list(first), attrs=attrs)
    try:
        for g, metrics in values.items():
            af.write(g, np.arange(int(np.prod(shape))), {m: v.reshape(-1) for m, v in metrics.items()})
    finally:
        af.close()
    return path


def rays_file(path, norm="filter"):
    d, curves = ray_data(3, 3)
    units = "weight-space L2" if norm == "unit" else f"multiples of {norm}-normalised directions"
    axes = {"distances": (d, ["step"], {"long_name": "distance from θ₀ along the ray", "units": units}),
            "directions": (np.zeros((3, 8)), ["direction", "theta"])}
    config = {"kind": "rays", "rays": {"norm": norm, "dirs": 3}, "eval": {"bn_mode": "recompute"}}
    values = {g: {"test_err": c, "train_loss": c / 10} for g, c in (("sgd", curves["SGD"]), ("swa", curves["SWA"]))}
    return write_analysis(path, "rays", config, axes, values)


def random_plane_file(path):
    x, y, Z = plane_grid()
    units = "multiples of filter-normalised random directions"
    axes = {"x": (x, ["x"], {"long_name": "along random direction 1", "units": units}),
            "y": (y, ["y"], {"long_name": "along random direction 2", "units": units}),
            "points": (np.zeros((1, 2)), ["checkpoint", "xy"],
                       {"long_name": "plane coordinates of the checkpoints", "units": units})}
    config = {"kind": "plane", "plane": {"random": True, "norm": "filter"}, "eval": {"bn_mode": "keep"}}
    return write_analysis(path, "plane", config, axes, {"plane": {"test_err": Z, "train_loss": Z / 10}},
                          attrs={"point_labels": ["SWA"], "title": RANDOM_PLANE_TITLE})


def line_file(path):
    t, values = line_data()
    axes = {"t": (t, ["step"], {"long_name": "t along the line (SWA at 0, SGD at 1)",
                                "units": "multiples of ‖SGD − SWA‖"}),
            "distances": (20 * t, ["step"], {"long_name": "distance from SWA", "units": "weight-space L2"}),
            "points": (np.array([0.0, 1.0]), ["checkpoint"], {"long_name": "t of the checkpoints"})}
    config = {"kind": "line", "line": {"steps": t.size}, "eval": {"bn_mode": "keep"}}
    return write_analysis(path, "line", config, axes, {"line": values}, attrs={"point_labels": ["SWA", "SGD"]})


def flat(text):
    """A label or title with its line breaks (long texts are wrapped to fit their Axes) as spaces."""
    return " ".join(text.split())


def close(*figs):
    for fig in figs:
        plt.close(fig)


class TestStoredUnits:
    closes_its_figures = True

    @pytest.mark.timeout(60)
    def test_rays_filter_normalised_labels_and_title(self, tmp_path):
        data = store.read(rays_file(tmp_path / "rays.h5"))
        ax = render.draw(data)
        try:
            assert flat(ax.get_xlabel()) == f"distance from θ₀ along the ray ({FILTER_UNITS})"
            assert ax.get_xlabel().split("\n") == ["distance from θ₀ along the ray", f"({FILTER_UNITS})"]
            assert "‖θ−θ₀‖₂" not in ax.get_xlabel() and ax.get_ylabel() == "test error (%)"  # default test_err
            assert flat(ax.get_title()) == ("Rays from SGD and SWA 3 random filter-normalised directions, "
                                            "BN statistics recomputed at each point")
        finally:
            close(ax.figure)
        figs = render.figures_of(data)
        try:
            ((suffix, fig),) = figs
            assert suffix == "" and len(fig.axes) == 2  # test error and train loss panels
            for a in fig.axes:
                assert FILTER_UNITS in flat(a.get_xlabel()) and "‖θ−θ₀‖₂" not in a.get_xlabel()
            assert "filter-normalised directions" in fig.get_suptitle()
            assert "BN statistics recomputed at each point" in fig.get_suptitle()
        finally:
            close(*(f for _, f in figs))

    @pytest.mark.timeout(60)
    def test_rays_unit_directions_say_weight_space(self, tmp_path):
        ax = render.draw(rays_file(tmp_path / "rays.h5", norm="unit"), metric="train_loss")  # a path works too
        try:
            assert flat(ax.get_xlabel()) == "distance from θ₀ along the ray (weight-space L2)"
            assert ax.get_ylabel() == "train loss (nats)" and "3 random unit directions" in flat(ax.get_title())
        finally:
            close(ax.figure)

    @pytest.mark.timeout(60)
    @pytest.mark.parametrize("plane_kind", ["contour", "heatmap", "surface"])
    def test_random_plane_labels_and_stored_title(self, tmp_path, plane_kind):
        data = store.read(random_plane_file(tmp_path / "plane.h5"))
        figs = render.figures_of(data, plane_kind=plane_kind)
        try:
            assert [s for s, _ in figs] == [f"_{m}" if plane_kind == "contour" else f"_{m}_{plane_kind}"
                                            for m in ("test_err", "train_loss")]
            for _, fig in figs:
                ax = fig.axes[0]
                for label, n in ((ax.get_xlabel(), 1), (ax.get_ylabel(), 2)):
                    assert flat(label) == f"along random direction {n} (multiples of filter-normalised random directions)"
                title = ax.get_title()
                assert flat(title) == f"{RANDOM_PLANE_TITLE} BN statistics of the checkpoint"
                assert title.endswith("\nBN statistics of the checkpoint")  # the stored title, then the BN mode
                texts = [ax.get_xlabel(), ax.get_ylabel(), title]
                assert not any("weight-space units" in t or "Plane through" in t for t in texts)
        finally:
            close(*(f for _, f in figs))

    @pytest.mark.timeout(60)
    def test_random_plane_draw_default_train_loss(self, tmp_path):
        data = store.read(random_plane_file(tmp_path / "plane.h5"))
        ax = render.draw(data)
        try:
            (cbar,) = [a for a in ax.figure.axes if a is not ax]
            assert cbar.get_ylabel() == "train loss (nats)"
            assert "random direction 1" in ax.get_xlabel() and "filter-normalised" in ax.get_xlabel()
            assert flat(ax.get_title()).startswith(RANDOM_PLANE_TITLE) and "Plane through" not in ax.get_title()
            fig = plt.figure()
            ax3d = render.draw(data, metric="test_err", ax=fig.add_subplot(projection="3d"))
            assert ax3d.name == "3d" and "random direction 2" in ax3d.get_ylabel()
            close(fig)
        finally:
            close(ax.figure)

    @pytest.mark.timeout(60)
    def test_line_labels_from_stored_units(self, tmp_path):
        data = store.read(line_file(tmp_path / "line.h5"))
        ax = render.draw(data)
        try:
            assert flat(ax.get_xlabel()) == "t along the line (SWA at 0, SGD at 1) (multiples of ‖SGD − SWA‖)"
            assert ax.get_ylabel() == "test error (%)"  # the error axes of the twin pair
            (top,) = ax.child_axes
            assert top.get_xlabel() == "distance from SWA (weight-space L2)"
            assert flat(ax.get_title()) == "Line through SWA and SGD, BN statistics of the checkpoint"
        finally:
            close(ax.figure)
        _, given = plt.subplots()
        loss_ax = render.draw(data, metric="train_loss", ax=given)
        assert loss_ax is given and given.get_ylabel() == "train loss (nats)"
        close(given.figure)

    @pytest.mark.timeout(60)
    def test_plot_file_writes_the_random_plane(self, tmp_path):
        path = random_plane_file(tmp_path / "plane.h5")
        paths = render.plot_file(path, formats=("png",), metric="train_loss")
        assert_figure_files(paths, [tmp_path / "plane_train_loss.png"])
        assert plt.get_fignums() == []

    @pytest.mark.timeout(60)
    def test_hand_built_dicts_fall_back_to_default_labels(self):
        ax = render.draw(rays_dict())
        ax_line = render.draw(line_dict())
        ax_plane = render.draw(plane_dict(), metric="test_loss")
        try:
            assert ax.get_xlabel() == "distance in weight space (‖θ−θ₀‖₂)"
            assert ax_line.get_xlabel() == "t along the line (SWA at t=0, SGD at t=1)"
            assert ax_line.child_axes[0].get_xlabel() == "distance along the line (weight-space units)"
            assert ax_plane.get_xlabel() == "distance along u (weight-space units)"
            assert ax_plane.get_title() == "Plane through SGD, SWA, start\nBN in batch mode"  # short: not wrapped
        finally:
            close(ax.figure, ax_line.figure, ax_plane.figure)

    @pytest.mark.timeout(60)
    def test_draw_and_figures_of_reject_bad_input(self):
        with pytest.raises(ValueError, match=r"draw shows one metric; got \['test_err', 'train_loss'\]"):
            render.draw(rays_dict(), metric=["test_err", "train_loss"])
        with pytest.raises(ValueError, match=r"metric\(s\) \['train_loss_l2'\] not in this analysis"):
            render.draw(plane_dict(), metric="train_loss_l2")
        with pytest.raises(ValueError, match=r"unknown plane figure 'mesh'; valid: contour, heatmap, surface"):
            render.figures_of(plane_dict(), plane_kind="mesh")
        with pytest.raises(ValueError, match=r"data\['config'\] must be a dict .*got str"):
            render.draw({**line_dict(), "config": '{"bn_mode": "keep"}'})
        with pytest.raises(ValueError, match=r"point_labels must be a list of 2 names .*got '\[\"SWA\", \"SGD\"\]'"):
            bad = line_dict()
            bad["axes"]["point_labels"] = '["SWA", "SGD"]'
            render.draw(bad)
        assert plt.get_fignums() == []

    @pytest.mark.timeout(60)
    def test_figures_of_closes_its_figures_on_error(self, monkeypatch):
        calls = []
        original = render.plot_plane

        def second_fails(*args, **kw):
            calls.append(kw["metric"])
            if len(calls) == 2:
                raise RuntimeError("boom")
            return original(*args, **kw)

        monkeypatch.setattr(render, "plot_plane", second_fails)
        with pytest.raises(RuntimeError, match="boom"):
            render.figures_of(plane_dict())
        assert calls == ["test_err", "train_loss"] and plt.get_fignums() == []


def test_wrap_text_breaks_before_the_units_then_at_commas_then_at_spaces():
    label = "along random direction 1 (multiples of filter-normalised random directions)"
    assert figures.wrap_text(label, 80) == label
    assert figures.wrap_text(label, 50) == "along random direction 1\n(multiples of filter-normalised random directions)"
    assert figures.wrap_text("Line through A and B, BN in batch mode", 25) == "Line through A and B,\nBN in batch mode"
    wrapped = figures.wrap_text(label, 30)
    assert flat(wrapped) == label and all(len(line) <= 30 for line in wrapped.split("\n"))
    assert figures.wrap_text("a-very-long-single-word", 5) == "a-very-long-single-word"  # words are not split


@pytest.mark.timeout(60)
def test_long_labels_are_wrapped_to_fit_their_axes():
    d, curves = ray_data(1, 1)
    long_label = "distance from θ₀ along the ray (multiples of filter-normalised directions)"
    ax = figures.plot_rays(d, curves, xlabel=long_label, ylabel="y " * 60, title="t " * 60)
    fig = ax.figure
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    assert flat(ax.get_xlabel()) == long_label and flat(ax.get_ylabel()) == flat("y " * 60)
    assert ax.get_xlabel().count("\n") >= 1 and ax.get_title().count("\n") >= 1
    assert ax.xaxis.label.get_window_extent(renderer).width <= box.width
    assert ax.yaxis.label.get_window_extent(renderer).height <= box.height
    assert ax.title.get_window_extent(renderer).width <= box.width
    plt.close(fig)


def test_uses_a_non_interactive_backend():
    assert matplotlib.get_backend().lower() == "agg"
