"""Planes through iterates, marked checkpoints, PCA planes, trajectories and rays along principal or Hessian
directions: every coordinate, distance and direction checked against an independent numpy computation
(least squares, SVD of the centred iterates, a direct evaluation along the vectors)."""

import importlib
import re

import h5py
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

import widthkit
from widthkit import EvalConfig, Evaluator
from widthkit.analyses.subjects import resolve_data
from widthkit.engine import directions as directions_module
from widthkit.engine.directions import pca_basis, project
from widthkit.engine.space import ThetaLayout
from widthkit.inputs.checkpoints import load_checkpoint
from widthkit.report import figures, render
from widthkit.report.store import read
from widthkit.runtime import RuntimeConfig

plane_cli = importlib.import_module("widthkit.plane")
rays_cli = importlib.import_module("widthkit.rays")
train_cli = importlib.import_module("widthkit.train")

# small evaluation sets and grids keep every point cheap; the numbers are still real
FAST = dict(train_subset=160, test_subset=120, bn_mode="keep", resolution=3, device="cpu")
SMALL = ["--train-subset", "160", "--test-subset", "120", "--bn-mode", "keep", "--quiet", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (tiny) SWA run of the bundled trainer: swa.pt and its 5 averaged iterates swa_iter_00k.pt."""
    out = tmp_path_factory.mktemp("swa-run")
    assert train_cli.main(["--out", str(out), "--mode", "swa", "--epochs", "2", "--swa-start", "1",
                           "--swa-budget", "3", "--save-iterates", "--quiet", "--device", "cpu"]) == 0
    iterates = sorted(str(p) for p in out.glob("swa_iter_*.pt"))
    assert len(iterates) == 5
    return {"dir": out, "swa": str(out / "swa.pt"), "iterates": iterates}


def theta(path) -> np.ndarray:
    """θ of a checkpoint as float64 numpy, flattened independently of the analysis code."""
    model = load_checkpoint(path).model
    return ThetaLayout.from_model(model).flatten(model).double().numpy()


def lstsq_projection(p, origin, basis):
    """Coordinates of p's projection on origin + span(basis rows) and its distance, by numpy least squares."""
    c, *_ = np.linalg.lstsq(basis.T, p - origin, rcond=None)
    return c, np.linalg.norm(p - origin - c @ basis)


def same_up_to_sign(a, b, **tol):
    for u, v in zip(np.atleast_2d(a), np.atleast_2d(b)):
        np.testing.assert_allclose(u * np.sign(u @ v), v, **tol)


# --------------------------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("center", ["mean", "point"])
def test_pca_basis_equals_numpy_svd(center, monkeypatch):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(7, 300, generator=g) * torch.linspace(0.1, 3, 300)  # anisotropic: distinct singular values
    c = torch.randn(300, generator=g)
    Xd = X.double().numpy()
    ref = Xd.mean(0) if center == "mean" else c.double().numpy()
    U, S, Vt = np.linalg.svd(Xd - ref, full_matrices=False)
    monkeypatch.setattr(directions_module, "_PCA_CHUNK", 64)  # several column chunks, as for a large model
    origin, basis, var, ratio = pca_basis(X, "mean" if center == "mean" else c, k=3)
    np.testing.assert_allclose(origin.double().numpy(), ref, rtol=1e-6, atol=1e-6)
    same_up_to_sign(basis.double().numpy(), Vt[:3], rtol=0, atol=2e-6)
    np.testing.assert_allclose(basis.double().numpy() @ basis.double().numpy().T, np.eye(3), atol=1e-6)
    np.testing.assert_allclose(var.numpy(), S[:3] ** 2 / (6 if center == "mean" else 7), rtol=1e-9)
    np.testing.assert_allclose(ratio.numpy(), S[:3] ** 2 / (S ** 2).sum(), rtol=1e-9)
    # the sign convention: the last iterate lies ahead of the first along every direction
    assert ((Xd[-1] - Xd[0]) @ basis.double().numpy().T >= 0).all()


def test_pca_basis_refuses_too_few_directions():
    X = torch.randn(2, 50)
    with pytest.raises(ValueError, match=r"need 2 principal direction\(s\), but the iterates .* spread along only 1"):
        pca_basis(X, "mean", k=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        pca_basis(torch.full((3, 5), float("nan")), "mean", k=1)
    with pytest.raises(ValueError, match="center must be 'mean'"):
        pca_basis(X, "median", k=1)


@pytest.mark.parametrize("orthonormal", [True, False])
def test_project_equals_numpy_lstsq(orthonormal):
    g = torch.Generator().manual_seed(1)
    B = torch.randn(2, 200, generator=g)
    if orthonormal:
        B = torch.linalg.qr(B.double().T)[0].T.float()
    o = torch.randn(200, generator=g)
    P = torch.randn(4, 200, generator=g)
    coords, dist = project(P, o, B)
    for i in range(4):
        c, d = lstsq_projection(P[i].double().numpy(), o.double().numpy(), B.double().numpy())
        np.testing.assert_allclose(coords[i].numpy(), c, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(dist[i].item(), d, rtol=1e-9)
    on_plane = o + 0.3 * B[0] - 1.7 * B[1]  # a point of the plane: its own coordinates, distance ~0
    c, d = project(on_plane, o, B)
    np.testing.assert_allclose(c[0].numpy(), [0.3, -1.7], atol=1e-5)
    assert d.item() < 1e-4
    with pytest.raises(ValueError, match="linearly dependent"):
        project(P, o, torch.stack([B[0], 2 * B[0]]))


# --------------------------------------------------------------------------------------------- planes


def test_marks_on_the_plane_through_three_iterates(run):
    it = run["iterates"]
    res = widthkit.plane(it[:1] + it[2:3] + it[4:5], mark={"SWA": run["swa"], "last": it[3]}, margin=0.1, **FAST)
    d = read(res.path, load_large=True)
    w1, w2, w3 = (theta(p) for p in (it[0], it[2], it[4]))
    u = (w2 - w1) / np.linalg.norm(w2 - w1)  # the paper's basis, by hand
    v = (w3 - w1) - ((w3 - w1) @ u) * u
    v /= np.linalg.norm(v)
    basis = np.stack([u, v])
    np.testing.assert_allclose(d["axes"]["basis"], basis, atol=2e-6)
    assert d["attrs"]["mark_labels"] == ["SWA", "last"]
    for k, path in enumerate((run["swa"], it[3])):
        c, dist = lstsq_projection(theta(path), w1, basis)
        np.testing.assert_allclose(d["axes"]["marks"][k], c, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d["axes"]["mark_distances"][k], dist, rtol=1e-5)
        assert dist > 1e-3  # really off the plane: the distance is measured, not assumed zero
    assert d["axis_attrs"]["mark_distances"]["units"] == "weight-space L2"
    # the grid covers the defining points and the marks, with the margin
    everything = np.concatenate([d["axes"]["points"], d["axes"]["marks"]])
    lo, hi = everything.min(0), everything.max(0)
    np.testing.assert_allclose([d["axes"]["x"][0], d["axes"]["x"][-1]], [lo[0] - 0.1 * (hi - lo)[0], hi[0] + 0.1 * (hi - lo)[0]])
    np.testing.assert_allclose([d["axes"]["y"][0], d["axes"]["y"][-1]], [lo[1] - 0.1 * (hi - lo)[1], hi[1] + 0.1 * (hi - lo)[1]])
    proj = res.projections()
    assert [m["label"] for m in proj["marks"]] == ["SWA", "last"]
    assert proj["marks"][0]["distance"] == pytest.approx(float(d["axes"]["mark_distances"][0]))
    assert re.search(r"SWA\s+\S+\s+\S+\s+\S+", proj["table"])


def test_marks_on_a_random_plane_use_its_own_coordinates(run):
    """A random plane's filter-normalised directions are neither unit nor orthogonal: the mark is still the
    least-squares projection, in multiples of the directions, its distance in weight-space units."""
    res = widthkit.plane([run["swa"]], random=True, mark=[f"it1={run['iterates'][0]}"], **FAST)
    d = read(res.path, load_large=True)
    B = d["axes"]["basis"].astype(np.float64)
    assert abs(B[0] @ B[1]) > 1e-6 * np.linalg.norm(B[0]) * np.linalg.norm(B[1])
    c, dist = lstsq_projection(theta(run["iterates"][0]), theta(run["swa"]), B)
    np.testing.assert_allclose(d["axes"]["marks"][0], c, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d["axes"]["mark_distances"][0], dist, rtol=1e-5)
    assert d["attrs"]["mark_labels"] == ["it1"]
    assert d["axes"]["x"][-1] == 1.0  # the random plane keeps its span


def test_pca_plane_directions_variance_trajectory(run):
    it = run["iterates"]
    res = widthkit.plane({"SWA": run["swa"]}, pca=it, trajectory=list(reversed(it)), **FAST)
    d = read(res.path, load_large=True)
    X = np.stack([theta(p) for p in it])
    mean = X.mean(0)
    _, S, Vt = np.linalg.svd(X - mean, full_matrices=False)
    same_up_to_sign(d["axes"]["basis"], Vt[:2], rtol=0, atol=2e-6)
    np.testing.assert_allclose(d["axes"]["pca_explained_ratio"], S[:2] ** 2 / (S ** 2).sum(), rtol=1e-6)
    np.testing.assert_allclose(d["axes"]["pca_variances"], S[:2] ** 2 / (len(it) - 1), rtol=1e-6)
    B = d["axes"]["basis"].astype(np.float64)
    # the trajectory, in the order given, and SWA (a --ckpt model: marked) are projections
    for k, p in enumerate(reversed(it)):
        c, dist = lstsq_projection(theta(p), mean, B)
        np.testing.assert_allclose(d["axes"]["trajectory"][k], c, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d["axes"]["trajectory_distances"][k], dist, rtol=1e-4, atol=1e-6)
    assert d["attrs"]["trajectory_labels"] == [f"swa_iter_00{k}" for k in (5, 4, 3, 2, 1)]
    c, dist = lstsq_projection(theta(run["swa"]), mean, B)
    np.testing.assert_allclose(d["axes"]["marks"][0], c, atol=1e-5)
    assert d["attrs"]["mark_labels"] == ["SWA"] and d["axes"]["mark_distances"][0] < 1e-4  # SWA is their mean
    # the grid covers the projected iterates with the margin
    lo, hi = d["axes"]["trajectory"].min(0), d["axes"]["trajectory"].max(0)
    np.testing.assert_allclose(d["axes"]["x"][[0, -1]], [lo[0] - 0.2 * (hi - lo)[0], hi[0] + 0.2 * (hi - lo)[0]], rtol=1e-5)
    np.testing.assert_allclose(d["axes"]["y"][[0, -1]], [lo[1] - 0.2 * (hi - lo)[1], hi[1] + 0.2 * (hi - lo)[1]], rtol=1e-5)
    r = d["axes"]["pca_explained_ratio"]
    assert f"PC1 {r[0]:.1%}, PC2 {r[1]:.1%}" in d["attrs"]["title"]
    assert d["axis_attrs"]["x"]["long_name"] == f"PC1 ({r[0]:.1%} of the variance)"


def test_pca_plane_centred_on_a_checkpoint(run):
    it = run["iterates"]
    res = widthkit.plane(None, pca=it[:3], pca_center=it[4], **FAST)
    d = read(res.path, load_large=True)
    X = np.stack([theta(p) for p in it[:3]])
    c = theta(it[4])
    _, S, Vt = np.linalg.svd(X - c, full_matrices=False)
    same_up_to_sign(d["axes"]["basis"], Vt[:2], rtol=0, atol=2e-6)
    np.testing.assert_allclose(d["axes"]["pca_variances"], S[:2] ** 2 / 3, rtol=1e-6)
    assert d["attrs"]["point_labels"] == ["swa_iter_005"] and d["attrs"]["pca"]["center"] == "swa_iter_005"
    np.testing.assert_allclose(d["axes"]["points"], [[0.0, 0.0]])
    # centred on a model given by its label: that model is the plane's point, the others stay marks
    res = widthkit.plane({"SWA": run["swa"], "last": it[4]}, pca=it[:3], pca_center="LAST", **FAST)
    d2 = read(res.path, load_large=True)
    np.testing.assert_array_equal(d2["axes"]["basis"], d["axes"]["basis"])
    assert d2["attrs"]["point_labels"] == ["last"] and d2["attrs"]["mark_labels"] == ["SWA"]


def test_plane_takes_modules_as_iterates_and_marks(run):
    """In Python the iterates and marks may be nn.Modules: the same numbers as from their files."""
    it = run["iterates"]
    modules = [load_checkpoint(p).model for p in it]
    a = widthkit.plane(None, "digits", pca=modules, mark={"SWA": load_checkpoint(run["swa"]).model}, **FAST)
    b = widthkit.plane(None, pca=it, mark=[f"SWA={run['swa']}"], **FAST)
    da, db = read(a.path, load_large=True), read(b.path, load_large=True)
    for key in ("basis", "marks", "mark_distances", "pca_variances", "x", "y"):
        np.testing.assert_array_equal(da["axes"][key], db["axes"][key])
    np.testing.assert_array_equal(da["models"]["plane"]["metrics"]["train_loss"],
                                  db["models"]["plane"]["metrics"]["train_loss"])
    assert da["config"]["plane"]["mark"] == ["SWA=<DigitsCNN>"] and db["config"]["plane"]["pca"] == it


def test_plane_refuses_bad_geometry(run):
    it = run["iterates"]
    with pytest.raises(ValueError, match="2 iterate\\(s\\) do not span a plane about their mean: pass at least 3"):
        widthkit.plane(None, pca=it[:2], **FAST)
    with pytest.raises(ValueError, match="--pca and --random"):
        widthkit.plane([run["swa"]], pca=it, random=True, **FAST)
    with pytest.raises(ValueError, match="--pca-center 'nope' is neither 'mean', a checkpoint label \\(SWA\\)"):
        widthkit.plane({"SWA": run["swa"]}, pca=it, pca_center="nope", **FAST)
    with pytest.raises(ValueError, match="--trajectory: no file matches"):
        widthkit.plane(it[:3], trajectory=[str(run["dir"] / "nothing_*.pt")], **FAST)
    with pytest.raises(ValueError, match="exactly three checkpoints"):
        widthkit.plane(it[:2], mark={"SWA": run["swa"]}, **FAST)


# --------------------------------------------------------------------------------------------- rays


def _direct_rays(path, dirs, distances):
    """Metrics along each direction from the checkpoint, by the evaluator given the vectors explicitly."""
    ck = load_checkpoint(path)
    train, test, _ = resolve_data("digits", [], EvalConfig(train_subset=160, test_subset=120), "cpu")
    ev = Evaluator(ck.model, train, test, EvalConfig(bn_mode="keep", weight_decay=5e-4),
                   runtime=RuntimeConfig(device="cpu"))
    out = {}
    for i in range(len(dirs)):
        coords = np.zeros((len(distances), len(dirs)))
        coords[:, i] = distances
        for m, v in ev.evaluate(ev.theta0, torch.as_tensor(dirs, dtype=torch.float32), coords).items():
            out.setdefault(m, []).append(v)
    return {m: np.stack(v) for m, v in out.items()}


def test_rays_along_principal_directions_equal_rays_given_those_vectors(run):
    it = run["iterates"]
    res = widthkit.rays({"SWA": run["swa"], "last": it[-1]}, dirs=3, steps=4, max_dist=3.0,
                        dirs_from="pca:" + ",".join(it), train_subset=160, test_subset=120, bn_mode="keep",
                        device="cpu")
    d = read(res.path, load_large=True)
    X = np.stack([theta(p) for p in it])
    _, S, Vt = np.linalg.svd(X - X.mean(0), full_matrices=False)
    same_up_to_sign(d["axes"]["directions"], Vt[:3], rtol=0, atol=2e-6)
    assert "directions_last" not in d["axes"]  # the same vectors for every model
    np.testing.assert_allclose(d["axes"]["direction_variance"], S[:3] ** 2 / 4, rtol=1e-6)
    np.testing.assert_allclose(d["axes"]["direction_explained_ratio"], S[:3] ** 2 / (S ** 2).sum(), rtol=1e-6)
    assert d["attrs"]["directions_source"]["kind"] == "pca" and d["attrs"]["directions_source"]["checkpoints"] == it
    for group, path in (("swa", run["swa"]), ("last", it[-1])):
        direct = _direct_rays(path, d["axes"]["directions"], d["axes"]["distances"])
        for m in ("train_loss", "test_err", "train_loss_l2"):
            np.testing.assert_allclose(d["models"][group]["metrics"][m], direct[m], rtol=1e-6, atol=1e-9)
    assert "3 principal directions of 5 iterates" in render._rays_inputs(d, ["test_err"])["detail"]


def _curvature_file(path, groups, D, k=3, seed=0):
    g = np.random.default_rng(seed)
    vecs = {}
    with h5py.File(path, "w") as f:
        for name in groups:
            vecs[name] = g.standard_normal((k, D)).astype(np.float32) * 3  # not unit: widthkit normalises
            f.create_dataset(f"{name}/eigenvectors", data=vecs[name])
            f.create_dataset(f"{name}/eigenvalues", data=np.array([5.0, 2.0, 1.0][:k]))
    return vecs


def test_rays_along_each_models_hessian_eigenvectors(run, tmp_path):
    it = run["iterates"]
    D = theta(run["swa"]).size
    curv = tmp_path / "curv.h5"
    vecs = _curvature_file(curv, ["swa", "last"], D)
    res = widthkit.rays({"SWA": run["swa"], "last": it[-1]}, dirs=2, steps=3, max_dist=2.0,
                        dirs_from=f"hessian:{curv}", train_subset=160, test_subset=120, bn_mode="keep",
                        device="cpu")
    d = read(res.path, load_large=True)
    for key, group, path in (("directions", "swa", run["swa"]), ("directions_last", "last", it[-1])):
        unit = vecs[group][:2].astype(np.float64)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        np.testing.assert_allclose(d["axes"][key], unit, rtol=1e-6, atol=1e-8)
        direct = _direct_rays(path, d["axes"][key], d["axes"]["distances"])
        np.testing.assert_allclose(d["models"][group]["metrics"]["train_loss"], direct["train_loss"], rtol=1e-6)
    np.testing.assert_allclose(d["axes"]["direction_eigenvalue"], [5.0, 2.0])
    np.testing.assert_allclose(d["axes"]["direction_eigenvalue_last"], [5.0, 2.0])
    # fewer vectors than asked, a model the file lacks, vectors of another length: clear errors
    with pytest.raises(ValueError, match="holds 3 eigenvector\\(s\\) of SWA, fewer than the 4 directions asked for: "
                                         "pass --dirs 3"):
        widthkit.rays({"SWA": run["swa"]}, dirs=4, dirs_from=f"hessian:{curv}", train_subset=16, test_subset=16)
    with pytest.raises(ValueError, match="no /other/eigenvectors for other; groups with eigenvectors: \\['last', 'swa'\\]"):
        widthkit.rays({"other": run["swa"]}, dirs=2, dirs_from=f"hessian:{curv}", train_subset=16, test_subset=16)
    short = tmp_path / "short.h5"
    with h5py.File(short, "w") as f:
        f["swa/eigenvectors"] = np.ones((2, D - 1), dtype=np.float32)
    with pytest.raises(ValueError, match=f"shaped \\(2, {D - 1}\\), but SWA's θ has {D} entries"):
        widthkit.rays({"SWA": run["swa"]}, dirs=2, dirs_from=f"hessian:{short}", train_subset=16, test_subset=16)


def test_rays_dirs_from_is_validated():
    with pytest.raises(ValueError, match="expected pca:ITER1,ITER2"):
        widthkit.RaysConfig(dirs_from="svd:a.pt")
    with pytest.raises(ValueError, match="hessian: takes one curvature file"):
        widthkit.RaysConfig(dirs_from="hessian:a.h5,b.h5")
    with pytest.raises(ValueError, match="--norm and --exclude apply to random directions only"):
        widthkit.RaysConfig(dirs_from="pca:a.pt,b.pt", norm="filter")


# --------------------------------------------------------------------------------------------- figures


def test_plot_plane_draws_marks_and_trajectory():
    x, y = np.linspace(-1, 2, 7), np.linspace(-1, 1.5, 6)
    Z = np.add.outer(x ** 2, y ** 2) + 0.1
    traj = np.array([[-0.5, -0.5], [0.0, 0.2], [0.8, 0.4], [1.5, 1.0]])
    ax = figures.plot_plane(x, y, Z, [[0, 0]], ["A"], metric="train_loss", marks=[[0.5, 0.5], [9.0, 9.0]],
                            mark_labels=["SWA", "far"], mark_distances=[0.123, 4.0], trajectory=traj)
    swa = [a for a in ax.get_lines() if a.get_gid() == "mark:SWA"]
    assert len(swa) == 1 and swa[0].get_marker() == "*" and tuple(swa[0].get_xydata()[0]) == (0.5, 0.5)
    assert any(t.get_text() == "SWA\n0.12 off the plane" for t in ax.texts)
    assert not any(t.get_text().startswith("far") for t in ax.texts)  # outside the grid: clipped, no label
    assert ax.get_xlim() == (-1.0, 2.0) and ax.get_ylim() == (-1.0, 1.5)  # the far mark does not stretch the axes
    path = [a for a in ax.get_lines() if a.get_gid() == "trajectory"]
    assert len(path) == 1 and np.array_equal(path[0].get_xydata(), traj)
    legend = ax.figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["trajectory"]
    with pytest.raises(ValueError, match="got 1 labels for 2 marks"):
        figures.plot_plane(x, y, Z, marks=[[0, 0], [1, 1]], mark_labels=["SWA"])
    # given an Axes (a 3D one: the surface), the marks and the trajectory sit on the surface
    ax3 = plt.figure().add_subplot(projection="3d")
    figures.plot_plane_surface(x, y, Z, ax=ax3, marks=[[0.5, 0.5]], mark_labels=["SWA"], trajectory=traj)
    assert [c.get_gid() for c in ax3.collections if c.get_gid()][-1] == "mark:SWA"
    assert [a.get_gid() for a in ax3.get_lines()] == ["trajectory"]


def test_mark_labels_make_way_for_the_planes_own_labels():
    """A mark right beside a point (SGD next to the first iterate, as on the digits run): every label stays
    inside the plot and none covers another."""
    x, y = np.linspace(-0.2, 1.2, 8), np.linspace(-0.05, 0.3, 6)
    Z = np.add.outer(x, y) + 1
    ax = figures.plot_plane(x, y, Z, [[0, 0], [0.5, 0], [1.0, 0.25]], ["swa_iter_001", "swa_iter_008", "swa_iter_015"],
                            metric="train_loss", marks=[[0.04, 0.0], [0.5, 0.06]], mark_labels=["SGD", "SWA"],
                            mark_distances=[0.03, 0.033])
    fig = ax.figure
    fig.draw_without_rendering()
    r = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if (t.get_gid() or "").startswith(("point-label:", "mark-label:"))]
    assert len(labels) == 5
    boxes = [t.get_window_extent(r) for t in labels]
    frame = ax.get_window_extent(r)
    for i, a in enumerate(boxes):
        assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1 and frame.y0 - 1 <= a.y0 and a.y1 <= frame.y1 + 1
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (labels[i].get_text(), a, b)


def test_elongated_plane_is_drawn_not_to_scale_and_says_so():
    x, y = np.linspace(0, 10, 5), np.linspace(0, 1, 4)
    ax = figures.plot_plane(x, y, np.add.outer(x, y) + 1, metric="train_loss")
    assert ax.get_aspect() != 1.0 and any(t.get_gid() == "not-to-scale" for t in ax.texts)
    ax = figures.plot_plane(x, np.linspace(0, 5, 4), np.add.outer(x, y) + 1, metric="train_loss")
    assert ax.get_aspect() == 1.0 and not any(t.get_gid() == "not-to-scale" for t in ax.texts)


# --------------------------------------------------------------------------------------------- commands


def test_cli_iterate_plane_pca_plane_and_pca_rays(run, tmp_path, capsys):
    it, swa, folder = run["iterates"], run["swa"], str(run["dir"])
    figs = tmp_path / "figs"
    out = tmp_path / "iter.h5"
    code = plane_cli.main(["--ckpt", it[0], "--ckpt", it[2], "--ckpt", it[4], "--mark", f"SWA={swa}",
                           "--trajectory", *it, "--resolution", "4", "--out", str(out), "--figures", str(figs),
                           "--format", "png", *SMALL])
    printed = capsys.readouterr().out
    assert code == 0
    d = read(out, load_large=True)
    dist = float(d["axes"]["mark_distances"][0])
    row = re.search(r"^SWA\s+(\S+)\s+(\S+)\s+(\S+)$", printed, re.M)
    assert row and float(row.group(3)) == pytest.approx(dist, rel=1e-3)
    assert float(row.group(1)) == pytest.approx(float(d["axes"]["marks"][0, 0]), rel=1e-3, abs=1e-3)
    assert "trajectory: 5 iterates from swa_iter_001 to swa_iter_005" in printed
    assert d["config"]["plane"]["mark"] == [f"SWA={swa}"] and d["config"]["plane"]["trajectory"] == it
    pngs = sorted(figs.glob("iter_*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 10_000 for p in pngs)
    ax = render.draw(d)
    assert [a.get_gid() for a in ax.get_lines() if a.get_gid() in ("mark:SWA", "trajectory")] == ["trajectory", "mark:SWA"]
    # the same command again resumes the finished file: nothing recomputed, nothing changed
    created = d["attrs"]["created"]
    assert plane_cli.main(["--ckpt", it[0], "--ckpt", it[2], "--ckpt", it[4], "--mark", f"SWA={swa}",
                           "--trajectory", *it, "--resolution", "4", "--out", str(out), "--no-plot", *SMALL]) == 0
    again = read(out, load_large=True)
    assert again["attrs"]["created"] == created
    np.testing.assert_array_equal(again["axes"]["marks"], d["axes"]["marks"])
    capsys.readouterr()

    # the PCA plane of the run's folder (its iterates only: swa.pt and the trainer's state are left out)
    out = tmp_path / "pca.h5"
    code = plane_cli.main(["--pca", folder, "--trajectory", folder, "--ckpt", f"SWA={swa}", "--resolution", "4",
                           "--out", str(out), "--no-plot", *SMALL])
    printed = capsys.readouterr().out
    assert code == 0
    d = read(out)
    r = d["axes"]["pca_explained_ratio"]
    assert f"PCA plane of 5 iterates, centre iterate mean: explained variance PC1 {r[0]:.1%}, PC2 {r[1]:.1%}" in printed
    assert d["attrs"]["pca"]["checkpoints"] == it and len(d["axes"]["trajectory"]) == 5

    # rays along the iterates' principal directions
    out = tmp_path / "rays.h5"
    code = rays_cli.main(["--ckpt", swa, "--dirs-from", f"pca:{folder}", "--dirs", "2", "--steps", "3",
                          "--max-dist", "2", "--no-refine", "--out", str(out), "--no-plot", *SMALL])
    assert code == 0 and read(out)["axes"]["direction_variance"].shape == (2,)
    capsys.readouterr()

    # user errors: one line, exit status 2
    for argv, message in (
            (["--pca", *it[:2], "--out", str(tmp_path / "x.h5")], "do not span a plane about their mean"),
            (["--pca", *it, "--random", "--ckpt", swa], "--pca and --random are two different planes"),
            (["--resolution", "3"], "name the plane: --ckpt three times"),
            (["--ckpt", it[0], "--ckpt", it[1], "--ckpt", it[2], "--mark", "X=missing.pt"], "missing.pt")):
        assert plane_cli.main([*argv, "--no-plot", *SMALL]) == 2
        assert message in capsys.readouterr().err
    assert rays_cli.main(["--ckpt", swa, "--dirs-from", f"pca:{folder}", "--no-plot", *SMALL]) == 2
    assert "5 iterates span at most 4 principal direction(s) about their mean, fewer than the 10 asked for: " \
           "pass --dirs 4" in capsys.readouterr().err
