"""Scale-out through ``torchrun`` and ``torch.distributed``: one analysis, many processes.

Run any analysis command unchanged under ``torchrun --nproc_per_node=N -m widthkit.rays ...`` (or across
machines with torchrun's rendezvous). Each rank evaluates on its own local GPU (NCCL) or on CPU (gloo), as its resolved ``--device`` says.

How work is shared: the pending points (those not yet done in the HDF5 file) are cut into small chunks;
every rank takes the next chunk from a shared counter in a key-value store (``TCPStore.add`` is atomic), so
a fast rank simply takes more chunks. Rank 0 is the only writer: it evaluates chunks too, and between its
own chunks it collects the results the other ranks posted to the store (as ``.npz`` bytes, no pickle) and
writes them to the file. Every finished chunk is on disk as soon as rank 0 has seen it; if anything dies,
torchrun stops the job and re-running the same command (with any number of ranks) computes only the rest.
A chunk's numbers do not depend on which rank computed it, so the file equals a single-process run.
"""

from __future__ import annotations

import datetime as _dt
import io
import os
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

_STATE = {"store": None, "generation": 0}
TIMEOUT = _dt.timedelta(minutes=int(os.environ.get("WIDTHKIT_DIST_TIMEOUT_MIN", "30")))


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched_by_torchrun() else 1


def rank() -> int:
    """This process's rank: the process group's, or torchrun's RANK before the group is joined."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def is_writer() -> bool:
    """True on the one process that writes files and prints (rank 0, or the only process)."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join the process group when launched by torchrun (no-op otherwise), with the backend of the resolved
    ``device``: NCCL for ``cuda:N`` (this rank's GPU), gloo for ``cpu`` (also on a host with GPUs)."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", timeout=TIMEOUT)
    # a store of our own for the chunk counter and posted results (gloo/NCCL do not do work queues)
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = [0]
    if rank() == 0:
        store = dist.TCPStore(host, 0, world_size(), is_master=True, timeout=TIMEOUT, wait_for_workers=False)
        port = [store.port]
    dist.broadcast_object_list(port, src=0, device=_comm_device())
    if rank() != 0:
        store = dist.TCPStore(host, port[0], world_size(), is_master=False, timeout=TIMEOUT)
    _STATE["store"] = store


def shutdown() -> None:
    # No barrier: after the grid, rank 0 alone refines widths and draws figures, which can outlast any timeout;
    # the other ranks simply leave (every chunk they computed was collected before evaluate_shared returned).
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _STATE["store"] = None


def _comm_device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def check_identical(name: str, value: float) -> None:
    """Refuse to go on if ranks disagree on ``value`` (e.g. a checksum of the directions)."""
    if world_size() == 1:
        return
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) != 1:
        raise RuntimeError(
            f"ranks disagree on {name} ({values}): every rank must see the same checkpoints, data and code"
        )


def _pack(ids: np.ndarray, values: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, __ids__=ids, **values)
    return buf.getvalue()


def _unpack(raw: bytes) -> tuple[np.ndarray, dict]:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        ids = z["__ids__"]
        return ids, {k: z[k] for k in z.files if k != "__ids__"}


def evaluate_shared(ev, origin, basis, coords_of: Callable[[np.ndarray], np.ndarray], pending: np.ndarray,
                    on_results: Callable[[np.ndarray, dict], None]) -> None:
    """Evaluate the ``pending`` grid points (flat ids), on this process or shared between all ranks.

    ``on_results(ids, values)`` is called on the writing rank only, for every chunk, whoever computed it.
    """
    chunk = ev.config.chunk_size
    if world_size() == 1:
        ev.evaluate(origin, basis, coords_of(pending), ids=pending, on_chunk=on_results)
        return
    check_identical("the origin and directions", float(origin.double().sum()) + float(basis.double().abs().sum()))
    store = _STATE["store"]
    _STATE["generation"] += 1
    prefix = f"wk/{_STATE['generation']}"
    chunks = [pending[i:i + chunk] for i in range(0, len(pending), chunk)]
    outstanding = set(range(len(chunks)))

    def collect(block: bool):
        for k in sorted(outstanding):
            key = f"{prefix}/res/{k}"
            if block:
                store.wait([key])
            elif not store.check([key]):
                continue
            ids, values = _unpack(store.get(key))
            store.delete_key(key)
            outstanding.discard(k)
            on_results(ids, values)

    while True:
        k = store.add(f"{prefix}/next", 1) - 1  # the next chunk nobody has taken yet
        if k >= len(chunks):
            break
        ids = chunks[k]
        values = ev.evaluate(origin, basis, coords_of(ids), ids=ids)
        if is_writer():
            outstanding.discard(k)
            on_results(ids, values)
            collect(block=False)
        else:
            store.set(f"{prefix}/res/{k}", _pack(ids, values))
    if is_writer():
        collect(block=True)
    barrier()
