"""HDF5 storage of analysis grids: self-describing, resumable, safe against a kill at any moment.

One file per analysis. Layout (see docs/INTERFACES.md for the per-kind datasets)::

    /                      attrs: schema, widthkit_version, kind, config (JSON), torch_version, created
    /<axis datasets>       e.g. distances (S,), directions (N, D) — attr "dims" names the axes
    /<group>/              one per evaluated model (rays: "sgd", "swa"; line: "line"; plane: "plane")
        train_loss ...     one float64 dataset per metric, shaped like the grid, NaN where not computed
        done               uint8 mask shaped like the grid
                           group attrs: checkpoint, sha256, role, label, ...

How a kill cannot lose finished work: the file is created complete (every dataset allocated, metrics NaN,
``done`` all 0) under a temporary name and renamed into place. Afterwards results are only ever written as
data into those preallocated contiguous datasets — no HDF5 metadata changes — metric values first, flushed,
then the ``done`` flags. The file is opened for each chunk and closed right after, so between chunks it is
closed and consistent; a kill during a chunk's write leaves that chunk's ``done`` flags unset and it is
recomputed on resume. A lock file next to the data (``.NAME.lock``, held with ``flock`` for the whole command:
grid, widths and figures; removed when released) turns a second concurrent writer into a clear error instead
of corruption. Attributes added to a finished file (width tables) are written into a fresh copy that then
replaces it, so a full disk or a kill at that moment leaves the finished grid as it was.

Every axis dataset carries ``long_name`` and ``units`` attributes saying what its coordinates mean (absolute
weight-space distance, multiples of filter-normalised directions, t along a line, ...); figures take their
labels from them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Mapping

import h5py
import numpy as np

from ..fileio import WriterLock, temp_path, to_json

SCHEMA = 1
KINDS = ("rays", "line", "plane", "ensemble")
# Root datasets that can be huge (one row per direction over all of θ; also "directions_<group>" when each
# model has its own scaled directions): read() loads them only on request.
LARGE_DATASETS = ("directions", "basis")


class StoreError(RuntimeError):
    """The file cannot be used as asked (locked, foreign, from an incompatible run)."""


class ConfigMismatch(StoreError, ValueError):
    """An existing file was made with a different configuration."""


# Config keys that newer versions record and older files lack: a file without one still resumes.
ADDED_LATER = frozenset({"data.fingerprint"})


def diff_configs(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ between two (nested) configs (a key of
    :data:`ADDED_LATER` that the old config lacks is no difference)."""
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        if name in ADDED_LATER and k not in old:
            continue
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_configs(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def _versions() -> dict:
    import torch

    from .._version import __version__

    return {"widthkit_version": str(__version__), "torch_version": str(torch.__version__),
            "h5py_version": str(h5py.__version__)}


class AnalysisFile:
    """A writable analysis file, created or resumed by :func:`open_analysis`. Holds the lock until closed.

    Ranks other than the writer under torchrun get one with ``lock=None``: they read its state, never write.
    """

    def __init__(self, path: Path, lock: WriterLock | None, groups: list[str], metrics: list[str], grid_shape: tuple):
        self.path = path
        self._lock = lock
        self.groups = groups
        self.metrics = metrics
        self.grid_shape = grid_shape
        self.resumed = False

    # -- state ---------------------------------------------------------------------------------------
    def done(self, group: str) -> np.ndarray:
        with h5py.File(self.path, "r", locking=False) as f:
            return f[group]["done"][...].astype(bool)

    def pending(self, group: str) -> np.ndarray:
        """Flat (C-order) indices of the grid points of ``group`` not yet computed."""
        return np.flatnonzero(~self.done(group).reshape(-1))

    def n_done(self) -> int:
        return sum(int(self.done(g).sum()) for g in self.groups)

    @property
    def n_points(self) -> int:
        return int(np.prod(self.grid_shape)) * len(self.groups)

    def complete(self) -> bool:
        return all(self.done(g).all() for g in self.groups)

    # -- writing -------------------------------------------------------------------------------------
    def write(self, group: str, flat_ids, values: Mapping[str, np.ndarray]) -> None:
        """Store results for grid points ``flat_ids`` of ``group``, then mark them done (in that order)."""
        flat_ids = np.asarray(flat_ids, dtype=np.int64)
        missing = [m for m in self.metrics if m not in values]
        if missing:
            raise ValueError(f"results for {group!r} lack metrics {missing}")
        with h5py.File(self.path, "r+", locking=False) as f:
            g = f[group]
            for m in self.metrics:
                arr = g[m][...]
                arr.reshape(-1)[flat_ids] = np.asarray(values[m], dtype=np.float64)
                g[m][...] = arr
            f.flush()  # values reach the file before the flags that vouch for them
            done = g["done"][...]
            done.reshape(-1)[flat_ids] = 1
            g["done"][...] = done

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def update_attrs(path, attrs: Mapping[str, Any], group: str | None = None) -> None:
    """Set attributes of a finished analysis file (e.g. width tables), under the writer lock.

    The file is copied object by object into a fresh file beside it, the attributes are set there, and the
    copy replaces the original: a full disk or a kill leaves the original whole, and repeated updates do
    not grow the file (attributes rewritten in place leave dead space behind).
    """
    path = Path(path)
    with WriterLock(path):
        tmp = temp_path(path)
        try:
            _rewrite_with_attrs(path, tmp, attrs, group)
        except OSError as err:
            raise StoreError(
                f"could not add {sorted(attrs)} to {path} ({_os_reason(err)}); "
                f"the file and its finished grid are unchanged. The update writes a copy of the file "
                f"({path.stat().st_size / 2**20:.1f} MiB) beside it and swaps it in: free that much space and run the "
                "command again"
            ) from None
        finally:
            tmp.unlink(missing_ok=True)


def _rewrite_with_attrs(path: Path, tmp: Path, attrs: Mapping[str, Any], group: str | None) -> None:
    """Copy ``path`` object by object into ``tmp`` with ``attrs`` set, flush it to disk, swap it in."""
    with h5py.File(path, "r", locking=False) as src, h5py.File(tmp, "w", track_order=True) as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for name in src:
            src.copy(src[name], dst, name=name)
        obj = dst if group is None else dst[group]
        for k, v in attrs.items():
            obj.attrs[k] = _attr_value(v)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _attr_value(v):
    return v if isinstance(v, (str, int, float, np.number)) else to_json(v)


def open_analysis(
    path,
    kind: str,
    config: Mapping,
    axes: Mapping[str, tuple[np.ndarray, list[str]]],
    groups: Mapping[str, Mapping[str, Any]],
    grid_shape: tuple[int, ...],
    metrics: list[str],
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> AnalysisFile:
    """Create a new analysis file, or resume an existing one made with the same configuration.

    Args:
        path: the ``.h5`` file.
        kind: ``"rays"``, ``"line"``, ``"plane"`` or ``"ensemble"``.
        config: the resolved configuration (JSON-able). Resuming requires it to be identical.
        axes: root datasets ``{name: (array, dim_names[, attrs])}`` (coordinates, directions, basis, ...);
            ``attrs`` such as ``{"long_name": "distance along the ray", "units": "weight-space L2"}`` say what
            the coordinates mean and become the figures' axis labels.
        groups: ``{group_name: attrs}`` — one group per evaluated model.
        grid_shape: shape of every metric dataset, e.g. ``(n_directions, n_steps)`` or ``(nx, ny)``.
        metrics: metric names (one float64 dataset each).
        attrs: extra root attributes (JSON-encoded when not scalars).
        overwrite: start afresh even if a file exists.

    Raises:
        ConfigMismatch: the file exists with another configuration (names the differing keys).
        StoreError: the file is locked by another writer, or is not a widthkit file of this schema.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown analysis kind {kind!r}; valid: {KINDS}")
    path = Path(path)
    check_file_path(path, kind)
    lock = WriterLock(path).acquire()
    try:
        af = AnalysisFile(path, lock, list(groups), list(metrics), tuple(int(s) for s in grid_shape))
        config_json = to_json(config)
        if path.exists() and not overwrite:
            _check_resumable(path, kind, config_json, axes, groups, grid_shape, metrics)
            af.resumed = True
            return af
        _create(path, kind, config_json, axes, groups, af.grid_shape, metrics, attrs or {})
        return af
    except BaseException:
        lock.release()
        raise


def check_file_path(path: Path, kind: str) -> None:
    """``ValueError`` when ``path``, meant to be an analysis file, names an existing folder."""
    if path.is_dir():
        raise ValueError(f"out={str(path)!r} is a folder; give the analysis file's name, such as "
                         f"{str(path / (kind + '.h5'))!r}")


def _axis_spec(spec) -> tuple[np.ndarray, list[str], dict]:
    """``(array, dims)`` or ``(array, dims, {"long_name": ..., "units": ...})`` -> all three."""
    arr, dims, *rest = spec
    return arr, list(dims), dict(rest[0]) if rest else {}


def _create(path, kind, config_json, axes, groups, grid_shape, metrics, attrs):
    tmp = temp_path(path)
    try:
        with h5py.File(tmp, "w", track_order=True) as f:
            f.attrs["schema"] = SCHEMA
            f.attrs["kind"] = kind
            f.attrs["config"] = config_json
            for k, v in _versions().items():
                f.attrs[k] = v
            f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            for k, v in attrs.items():
                f.attrs[k] = _attr_value(v)
            for name, spec in axes.items():
                arr, dims, meta = _axis_spec(spec)
                ds = f.create_dataset(name, data=np.asarray(arr), track_times=False)
                ds.attrs["dims"] = to_json(list(dims))
                for k, v in meta.items():
                    ds.attrs[k] = _attr_value(v)
            for gname, gattrs in groups.items():
                g = f.create_group(gname, track_order=True)
                for k, v in gattrs.items():
                    g.attrs[k] = _attr_value(v)
                for m in metrics:
                    # contiguous and written in full now, so later writes touch data only, never metadata
                    g.create_dataset(m, data=np.full(grid_shape, np.nan), track_times=False)
                g.create_dataset("done", data=np.zeros(grid_shape, dtype=np.uint8), track_times=False)
        os.replace(tmp, path)
    except OSError as err:
        size = sum(np.asarray(_axis_spec(a)[0]).nbytes for a in axes.values()) \
            + len(groups) * (len(metrics) * 8 + 1) * int(np.prod(grid_shape))
        raise StoreError(
            f"could not create {path}: {_os_reason(err)}; nothing was written. The file needs about "
            f"{size / 2**20:.1f} MiB: free that much space or choose another --out"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _os_reason(err: OSError) -> str:
    """The plain reason of an OS error (h5py wraps errno in a multi-line report)."""
    if err.errno:
        return os.strerror(err.errno)
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:120]


def _check_resumable(path, kind, config_json, axes, groups, grid_shape, metrics):
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise StoreError(
            f"{path} exists but is not a readable HDF5 file ({e}); move it away or pass --overwrite to start afresh"
        ) from None
    with f:
        if "schema" not in f.attrs or "kind" not in f.attrs:
            raise StoreError(f"{path} is not a widthkit analysis file; choose another --out or pass --overwrite")
        if int(f.attrs["schema"]) != SCHEMA:
            raise StoreError(
                f"{path} was written with schema {int(f.attrs['schema'])} (an older widthkit); this version writes "
                f"schema {SCHEMA}. Pass --overwrite to recompute it, or --out to keep it"
            )
        if f.attrs["kind"] != kind:
            raise ConfigMismatch(
                f"{path} holds a {f.attrs['kind']!r} analysis, not {kind!r}; choose another --out or pass --overwrite"
            )
        old = json.loads(f.attrs["config"])
        new = json.loads(config_json)
        mismatch = config_mismatch(path, old, new)
        if mismatch:
            raise mismatch
        for gname in groups:
            if gname not in f:
                raise ConfigMismatch(f"{path} has no results group {gname!r}; pass --overwrite to start afresh")
            for m in list(metrics) + ["done"]:
                if m not in f[gname] or tuple(f[gname][m].shape) != tuple(grid_shape):
                    raise ConfigMismatch(
                        f"{path}: dataset {gname}/{m} is missing or not shaped {tuple(grid_shape)}; "
                        "pass --overwrite to start afresh"
                    )
            for k, v in groups[gname].items():
                if k == "sha256" and k in f[gname].attrs and f[gname].attrs[k] != v:
                    raise ConfigMismatch(
                        f"{path}: the checkpoint behind {gname!r} changed since this file was started (SHA-256 "
                        f"differs); pass --overwrite to start afresh"
                    )
        for name, spec in axes.items():
            arr = _axis_spec(spec)[0]
            if name not in f:
                raise ConfigMismatch(f"{path} lacks the dataset {name!r}; pass --overwrite to start afresh")
            stored = f[name][...]
            if stored.shape != np.shape(arr) or not np.array_equal(stored, np.asarray(arr), equal_nan=True):
                raise ConfigMismatch(
                    f"{path}: the stored {name!r} differ from the ones this run computes (same config, different "
                    "weights or code?); pass --overwrite to start afresh"
                )


def config_mismatch(path, old: Mapping, new: Mapping) -> ConfigMismatch | None:
    """The error for resuming ``path`` (made with config ``old``) with config ``new``, or None when they agree.
    Changed data (its fingerprint) is said in words: the file's points were computed on other images."""
    differ = diff_configs(old, new)
    if not differ:
        return None
    changed = [k.rpartition(".")[2] for k in differ if k.startswith("data.fingerprint")]
    if changed and len(changed) == len(differ):
        return ConfigMismatch(
            f"the data changed since {path} was started (the {' and '.join(changed)} split's files or "
            f"contents differ from those its points were computed on); pass --overwrite to start afresh on the "
            "data as it is now, or write to another --out")
    details = ", ".join(f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in differ[:8])
    return ConfigMismatch(
        f"{path} was made with a different configuration ({details}); re-run with the same settings to "
        "resume it, pass --overwrite to start afresh, or write to another --out")


def _lookup(d: Mapping, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, Mapping) or part not in d:
            return "<absent>"
        d = d[part]
    return d


def decode_attr(v):
    """An HDF5 attribute as Python: bytes to str, JSON text to objects (with inf/nan restored), numpy scalars to numbers."""
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, str) and v[:1] in "[{":
        try:
            return _desanitize(json.loads(v))
        except json.JSONDecodeError:
            return v
    if isinstance(v, np.generic):
        return v.item()
    return v


def _desanitize(obj):
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _desanitize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_desanitize(v) for v in obj]
    return obj


def open_for_reading(path: Path, what: str) -> h5py.File:
    """``path`` opened read-only (no HDF5 file lock: a reader never blocks a writer); a missing file is
    ``FileNotFoundError``, anything h5py cannot open a :class:`StoreError` naming the file."""
    if not path.exists():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise StoreError(f"{path} is not a readable HDF5 file: {e}") from None


def read(path, load_large: bool = False) -> dict:
    """Read an analysis file into plain Python/numpy values.

    Returns ``{"kind", "config", "attrs", "axes": {name: array}, "axis_attrs": {name: {"long_name", "units"}},
    "models": {group: {"metrics": {m: arr},
    "done": bool arr, "attrs": {...}}}, "path"}``. Large root datasets (``directions``, ``basis``) are
    replaced by ``<name>_shape`` unless ``load_large``. Root attributes ``point_labels`` and ``widths``
    are decoded into ``axes["point_labels"]`` and ``data["widths"]``.
    """
    path = Path(path)
    with open_for_reading(path, "analysis") as f:
        if "kind" not in f.attrs:
            raise StoreError(f"{path} is not a widthkit analysis file (no 'kind' attribute)")
        attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
        out = {"kind": attrs["kind"], "config": attrs.get("config", {}), "attrs": attrs, "axes": {},
               "models": {}, "path": str(path)}
        out["axis_attrs"] = {}
        for name, obj in f.items():
            if isinstance(obj, h5py.Dataset):
                out["axis_attrs"][name] = {k: decode_attr(v) for k, v in obj.attrs.items() if k != "dims"}
                if name.split("_")[0] in LARGE_DATASETS and not load_large:
                    out["axes"][f"{name}_shape"] = tuple(obj.shape)
                else:
                    out["axes"][name] = obj[...]
            else:
                metrics = {m: obj[m][...] for m in obj if m != "done" and isinstance(obj[m], h5py.Dataset)}
                out["models"][name] = {
                    "metrics": metrics,
                    "done": obj["done"][...].astype(bool),
                    "attrs": {k: decode_attr(v) for k, v in obj.attrs.items()},
                }
        if "point_labels" in attrs:
            out["axes"]["point_labels"] = attrs["point_labels"]
        if "widths" in attrs:
            out["widths"] = attrs["widths"]
    return out


def completeness(data: Mapping) -> tuple[int, int]:
    """(points computed, points in the grid) over every group of an analysis dict (see :func:`read`): a
    killed run's file is partial until the same command resumes it."""
    masks = [np.asarray(m["done"], dtype=bool) for m in data["models"].values() if "done" in m]
    return sum(int(m.sum()) for m in masks), sum(int(m.size) for m in masks)


def recorded_attr(path, name: str):
    """One decoded root attribute of an existing analysis file, or None (no file, not readable, absent)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return decode_attr(f.attrs[name]) if name in f.attrs else None
    except (OSError, KeyError):
        return None
