"""HDF5 files of curvature and sharpness runs: self-describing, resumable, safe against a kill at any moment.

One file per command run (``kind`` ``"curvature"`` or ``"sharpness"``)::

    /                         attrs: schema, widthkit_version, kind, config (JSON), provenance (JSON), operator
                              (JSON: examples, batch size, BN mode, L2 term, H·v method), torch_version, created
    /<axis datasets>          e.g. eff_dim_alpha (A,), rho_l2 (R,) -- attr "dims" names the axes
    /<group>/                 one per model (sgd, swa, ... as the rays command names them)
        eigenvalues (k,) float64, eigenvectors (k, D) float32, ...  (see docs/INTERFACES.md)
        done                  uint8 (units,): which estimators are finished, attr "units" (JSON names)
                              group attrs: label, checkpoint, sha256, role, arch

As in :mod:`widthkit.report.store`, the file is created whole (every dataset allocated, NaN where nothing is
known yet, ``done`` all 0) in memory and written with :func:`widthkit.fileio.atomic_write`; afterwards only data
are written into the preallocated contiguous datasets -- never metadata -- values first, flushed, then the
``done`` flags that vouch for them. A kill loses at most the estimator in flight (a density probe, a
sharpness measure); re-running the same command computes only what is not done. A different configuration
is refused (or ``--overwrite``). The :class:`~widthkit.fileio.WriterLock` is held while the file is open.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from ..fileio import WriterLock, atomic_write, to_json
from .store import ConfigMismatch, StoreError, config_mismatch, decode_attr, open_for_reading

SCHEMA = 1
KINDS = ("curvature", "sharpness")
# per-group datasets too large to read unless asked for
VECTOR_DATASETS = ("eigenvectors", "lambda_min_vector")

DatasetSpec = tuple  # (shape, dtype) or (shape, dtype, attrs)


def _attr(v):
    return v if isinstance(v, (str, int, float, np.number)) else to_json(v)


def _empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    return np.full(shape, np.nan, dtype=dtype) if dtype.kind == "f" else np.zeros(shape, dtype=dtype)


class ResultFile:
    """An open curvature/sharpness file (created or resumed by :func:`open_results`); holds the writer lock.

    Ranks other than the writer under torchrun never get one.
    """

    def __init__(self, path: Path, lock: WriterLock, units: Mapping[str, Sequence[str]]):
        self.path = path
        self._lock = lock
        self.units = {g: list(u) for g, u in units.items()}
        self.resumed = False

    def done(self, group: str) -> dict[str, bool]:
        """{unit: finished?} of a group."""
        with h5py.File(self.path, "r", locking=False) as f:
            flags = f[group]["done"][...]
        return {u: bool(flags[i]) for i, u in enumerate(self.units[group])}

    def read(self, group: str, name: str) -> np.ndarray:
        with h5py.File(self.path, "r", locking=False) as f:
            return f[group][name][...]

    def write(self, group: str, values: Mapping[str, Any], flags: Mapping[str, Any] | None = None,
              done: Sequence[str] = ()) -> None:
        """Write ``values`` (name -> whole array, or ``(index, array)`` for a part), flush, then ``flags`` (the
        same forms) and the ``done`` flags of the named units."""
        with h5py.File(self.path, "r+", locking=False) as f:
            g = f[group]
            _put(g, values)
            f.flush()  # values reach the file before the flags that vouch for them
            _put(g, flags or {})
            for unit in done:
                g["done"][self.units[group].index(unit)] = 1

    def close(self) -> None:
        self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _put(g: h5py.Group, values: Mapping[str, Any]) -> None:
    for name, value in values.items():
        ds = g[name]
        if isinstance(value, tuple):
            index, value = value
            ds[index] = np.asarray(value, dtype=ds.dtype)
        else:
            arr = np.asarray(value, dtype=ds.dtype)
            if arr.shape != ds.shape:
                raise ValueError(f"{g.name}/{name}: got shape {arr.shape}, the file holds {ds.shape}")
            ds[...] = arr


def open_results(path, kind: str, config: Mapping, groups: Mapping[str, Mapping], axes: Mapping[str, tuple],
                 attrs: Mapping[str, Any] | None = None, overwrite: bool = False) -> ResultFile:
    """Create a curvature/sharpness file, or resume one made with the same configuration.

    Args:
        path: the ``.h5`` file.
        kind: ``"curvature"`` or ``"sharpness"``.
        config: the resolved configuration (JSON-able); resuming requires it to be identical.
        groups: ``{group: {"attrs": {...}, "units": [names], "datasets": {name: (shape, dtype[, attrs])}}}``.
        axes: root datasets ``{name: (array, dims[, attrs])}``.
        attrs: extra root attributes (provenance, operator, ...): written on creation, kept on resume.
        overwrite: start afresh even if the file exists.

    Raises:
        ConfigMismatch: the file exists with another configuration, other models or other datasets.
        StoreError: not a widthkit curvature/sharpness file, or locked by another writer.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown result kind {kind!r}; valid: {KINDS}")
    path = Path(path)
    lock = WriterLock(path).acquire()
    try:
        rf = ResultFile(path, lock, {g: spec["units"] for g, spec in groups.items()})
        config_json = to_json(config)
        if path.exists() and not overwrite:
            _check_resumable(path, kind, config_json, groups)
            rf.resumed = True
        else:
            _create(path, kind, config_json, groups, axes, attrs or {})
        return rf
    except BaseException:
        lock.release()
        raise


def _create(path: Path, kind: str, config_json: str, groups, axes, attrs) -> None:
    import torch

    from .._version import __version__

    with h5py.File(f"{path.name}-in-memory", "w", driver="core", backing_store=False, track_order=True) as f:
        f.attrs["schema"] = SCHEMA
        f.attrs["kind"] = kind
        f.attrs["config"] = config_json
        f.attrs["widthkit_version"] = str(__version__)
        f.attrs["torch_version"] = str(torch.__version__)
        f.attrs["h5py_version"] = str(h5py.__version__)
        f.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for k, v in attrs.items():
            f.attrs[k] = _attr(v)
        for name, (arr, dims, *meta) in axes.items():
            ds = f.create_dataset(name, data=np.asarray(arr), track_times=False)
            ds.attrs["dims"] = to_json(list(dims))
            for k, v in (meta[0] if meta else {}).items():
                ds.attrs[k] = _attr(v)
        for gname, spec in groups.items():
            g = f.create_group(gname, track_order=True)
            for k, v in spec.get("attrs", {}).items():
                g.attrs[k] = _attr(v)
            for name, (shape, dtype, *meta) in spec["datasets"].items():
                # contiguous and written in full now, so that later writes touch data only, never metadata
                ds = g.create_dataset(name, data=_empty(shape, dtype), track_times=False)
                for k, v in (meta[0] if meta else {}).items():
                    ds.attrs[k] = _attr(v)
            done = g.create_dataset("done", data=np.zeros(len(spec["units"]), dtype=np.uint8), track_times=False)
            done.attrs["units"] = to_json(list(spec["units"]))
        f.flush()
        image = f.id.get_file_image()
    try:
        atomic_write(path, image)
    except OSError as err:
        raise StoreError(f"could not create {path}: {err.strerror or err}; nothing was written. The file needs "
                         f"about {len(image) / 2**20:.1f} MiB: free that much space or choose another --out") from None


def _check_resumable(path: Path, kind: str, config_json: str, groups) -> None:
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise StoreError(f"{path} exists but is not a readable HDF5 file ({e}); move it away or pass --overwrite "
                         "to start afresh") from None
    with f:
        if "schema" not in f.attrs or "kind" not in f.attrs:
            raise StoreError(f"{path} is not a widthkit file; choose another --out or pass --overwrite")
        if int(f.attrs["schema"]) != SCHEMA:
            raise StoreError(f"{path} was written with schema {int(f.attrs['schema'])}; this version writes schema "
                             f"{SCHEMA}. Pass --overwrite to recompute it, or --out to keep it")
        if f.attrs["kind"] != kind:
            raise ConfigMismatch(f"{path} holds a {f.attrs['kind']!r} result, not {kind!r}; choose another --out "
                                 "or pass --overwrite")
        old, new = json.loads(f.attrs["config"]), json.loads(config_json)
        mismatch = config_mismatch(path, old, new)
        if mismatch:
            raise mismatch
        for gname, spec in groups.items():
            if gname not in f:
                raise ConfigMismatch(f"{path} has no results group {gname!r}; pass --overwrite to start afresh")
            g = f[gname]
            for name, (shape, *_rest) in spec["datasets"].items():
                if name not in g or tuple(g[name].shape) != tuple(shape):
                    raise ConfigMismatch(f"{path}: dataset {gname}/{name} is missing or not shaped {tuple(shape)}; "
                                         "pass --overwrite to start afresh")
            sha = spec.get("attrs", {}).get("sha256")
            if sha and g.attrs.get("sha256") not in (None, sha):
                raise ConfigMismatch(f"{path}: the checkpoint behind {gname!r} changed since this file was started "
                                     "(SHA-256 differs); pass --overwrite to start afresh")


def read_curvature(path, load_vectors: bool = True) -> dict:
    """Read a curvature or sharpness file into plain Python/numpy values.

    Returns ``{"kind", "config", "attrs", "axes": {name: array}, "models": {group: {"attrs": {...},
    "values": {name: array, or float for a scalar}, "done": {unit: bool}, "notes": [str]}}, "path"}``.
    Eigenvectors (``eigenvectors`` (k, D), ``lambda_min_vector`` (D,)) are replaced by ``<name>_shape`` unless
    ``load_vectors``. A group whose ``done`` flags are not all set is partial: its values there are NaN.

    Residuals: ``eigen_residuals`` / ``lambda_min_residual`` are measured ‖Hy − λy‖,
    ``eigen_residuals_lanczos`` / ``lambda_min_residual_lanczos`` Lanczos' estimates. A file written before both
    were stored held the estimates under the first names: they are read under the second, and ``notes`` says so.
    """
    path = Path(path)
    with open_for_reading(path, "curvature/sharpness") as f:
        kind = decode_attr(f.attrs.get("kind"))
        if kind not in KINDS:
            raise StoreError(f"{path} is not a widthkit curvature or sharpness file (kind {kind!r})")
        attrs = {k: decode_attr(v) for k, v in f.attrs.items()}
        out = {"kind": kind, "config": attrs.get("config", {}), "attrs": attrs, "axes": {}, "models": {},
               "path": str(path)}
        for name, obj in f.items():
            if isinstance(obj, h5py.Dataset):
                out["axes"][name] = obj[...]
                continue
            values = {}
            for dname, ds in obj.items():
                if dname == "done":
                    continue
                if dname in VECTOR_DATASETS and not load_vectors:
                    values[f"{dname}_shape"] = tuple(ds.shape)
                    continue
                arr = ds[...]
                values[dname] = float(arr) if arr.shape == () else arr
            notes = _legacy_residuals(kind, values)
            units = decode_attr(obj["done"].attrs["units"])
            flags = obj["done"][...]
            out["models"][name] = {"attrs": {k: decode_attr(v) for k, v in obj.attrs.items()}, "values": values,
                                   "done": {u: bool(flags[i]) for i, u in enumerate(units)}, "notes": notes}
    return out


# residual datasets that files written before widthkit measured ‖Hy − λy‖ held Lanczos' estimates in
LEGACY_RESIDUALS = {"eigen_residuals": "eigen_residuals_lanczos", "lambda_min_residual": "lambda_min_residual_lanczos"}


def _legacy_residuals(kind: str, values: dict) -> list[str]:
    """A curvature file from before the residuals were measured (no ``eigen_residuals_lanczos``): its
    ``eigen_residuals`` and ``lambda_min_residual`` are Lanczos' estimates, so they are read under the names of
    the estimates and the measured ones are absent. Returns the note that says so (none for newer files)."""
    if kind != "curvature" or "eigen_residuals" not in values or "eigen_residuals_lanczos" in values:
        return []
    for old, new in LEGACY_RESIDUALS.items():
        if old in values:
            values[new] = values.pop(old)
    return ["written before residuals were measured: its residuals are Lanczos' estimates (eigen_residuals_lanczos, "
            "lambda_min_residual_lanczos); re-run with --overwrite to measure them"]


def completeness(data: Mapping) -> tuple[int, int]:
    """(units finished, units in the file) over every group of a :func:`read_curvature` dict."""
    flags = [v for m in data["models"].values() for v in m["done"].values()]
    return sum(flags), len(flags)
