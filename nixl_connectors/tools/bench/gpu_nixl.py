"""NIXL 1.5 (UCX backend) on the CUDA workloads: two processes, VRAM registered on the owner's
device and the reader's device (both cuda:0 on one GPU), READ through prepped descriptor lists
with one descriptor per block (and layer), a notification on every transfer; the same reps,
warm-up and block policy as ours; every byte of every rep checked on the reader's device.

A layered workload is one tensor of ``num_layers x pool_blocks`` rows on each side (row
``layer * pool_blocks + block``): one registration, the same descriptors NIXL would get from
per-layer regions.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from typing import Any

import numpy as np

from .gpu_workloads import Devices
from .timing import Timings
from .workloads import BlockPolicy, Workload

log = logging.getLogger(__name__)

TIMING = ("make_prepped_xfer() + transfer() until check_xfer_state() is DONE (post to completion)"
          " + torch.cuda.synchronize(reader device)")
LOCAL_AGENT = "NIXL_INIT_AGENT"
SEED = 4242


def vram_descs(base: int, num_rows: int, row_bytes: int, dev: int) -> np.ndarray:
    """Nx3 uint64 (address, length, device id): one descriptor per row, no Python loop."""
    d = np.zeros((num_rows, 3), dtype=np.uint64)
    d[:, 0] = np.uint64(base) + np.arange(num_rows, dtype=np.uint64) * np.uint64(row_bytes)
    d[:, 1] = row_bytes
    d[:, 2] = dev
    return d


def request_rows(w: Workload, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(owner rows, reader rows) of one request as int32 NIXL indices: the request's blocks in
    every layer, layer after layer."""
    n, pool = w.num_blocks, w.pool_blocks
    if w.scattered:
        s, d = rng.permutation(pool)[:n], rng.permutation(pool)[:n]
    else:
        s = d = np.arange(n)
    layers = np.arange(w.num_layers, dtype=np.int64)[:, None] * pool
    return (layers + s).reshape(-1).astype(np.int32), (layers + d).reshape(-1).astype(np.int32)


def _mem(device: str) -> tuple[str, int]:
    """NIXL memory type and device id of a torch device ("cpu" for the tests on CPU machines)."""
    return ("VRAM", int(device.split(":")[1]) if ":" in device else 0) if device.startswith("cuda") else ("DRAM", 0)


def _use(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.set_device(device)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _agent(name: str):
    from .nixl_import import import_nixl

    nixl = import_nixl()
    return nixl.nixl_agent(name, nixl.nixl_agent_config(backends=["UCX"]))


def _owner(w: Workload, device: str, deadline_s: float, conn) -> None:
    try:
        import torch

        from ..blockfill import fill_pool_torch

        _use(device)
        mem, dev_id = _mem(device)
        t = torch.empty((w.pool_blocks * w.num_layers, w.block_bytes), dtype=torch.uint8, device=device)
        fill_pool_torch(t, w.block_bytes, SEED)
        _sync(device)
        agent = _agent("nixl-owner")
        agent.register_memory([(t.data_ptr(), t.numel(), dev_id, "")], mem)
        conn.send(("ready", agent.get_agent_metadata(), t.data_ptr()))
        conn.poll(deadline_s)  # until the parent says stop, goes away, or the run's deadline passes
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _reader(w: Workload, device: str, meta: bytes, rbase: int, remote_dev: int, deadline_s: float, conn) -> None:
    try:
        import torch

        from ..blockfill import mismatched_blocks_torch

        _use(device)
        mem, dev_id = _mem(device)
        rows, bb = w.pool_blocks * w.num_layers, w.block_bytes
        t = torch.zeros((rows, bb), dtype=torch.uint8, device=device)
        _sync(device)
        agent = _agent("nixl-reader")
        agent.register_memory([(t.data_ptr(), t.numel(), dev_id, "")], mem)
        remote = agent.add_remote_agent(meta)
        local_prep = agent.prep_xfer_dlist(LOCAL_AGENT, vram_descs(t.data_ptr(), rows, bb, dev_id), mem)
        remote_prep = agent.prep_xfer_dlist(remote, vram_descs(rbase, rows, bb, remote_dev), mem)
        try:
            agent.make_connection(remote)
        except Exception:  # older NIXL: the connection is made on first transfer
            pass
        rng = np.random.default_rng(3)
        deadline = time.monotonic() + deadline_s
        times, bad = [], 0
        for rep in range(w.warmup + w.reps):
            if rep == 0 or w.policy is BlockPolicy.NEW_EACH_REP:
                r_ids, l_ids = request_rows(w, rng)
                l_idx = torch.as_tensor(l_ids.astype(np.int64), device=device)
                r_idx = torch.as_tensor(r_ids.astype(np.int64), device=device)
            t.index_fill_(0, l_idx, 0)
            _sync(device)
            t0 = time.perf_counter()
            h = agent.make_prepped_xfer("READ", local_prep, l_ids, remote_prep, r_ids, notif_msg=f"rep-{rep}".encode())
            state = agent.transfer(h)
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise TimeoutError("NIXL transfer did not finish before the deadline")
                state = agent.check_xfer_state(h)
            _sync(device)  # as for ours: a no-op once DONE means the bytes are there
            dt = time.perf_counter() - t0
            if state != "DONE":
                raise RuntimeError(f"NIXL transfer ended in state {state}")
            agent.release_xfer_handle(h)
            if rep >= w.warmup:
                times.append(dt)
            bad += mismatched_blocks_torch(t.index_select(0, l_idx), r_idx, bb, SEED)
        conn.send(("ok", {**Timings.of(times, w.nbytes).to_json(), "bad_blocks": bad,
                          "verified_reps": w.warmup + w.reps, "descriptors_per_request": int(len(l_ids))}))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _recv(conn, timeout_s: float, what: str):
    if not conn.poll(timeout_s):
        raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"{what} failed: {msg[1]}")
    return msg


def nixl_vram(w: Workload, devices: Devices, timeout_s: float = 240.0) -> dict[str, Any]:
    """One NIXL configuration (defaults, UCX backend) as a bench entry; never raises."""
    from .nixl_import import find_nixl

    avail = find_nixl()
    if not avail.available:
        return {"available": False, "reason": avail.reason, "configs": []}
    entry: dict[str, Any] = {"name": "default", "gbps": None, "timing": TIMING, "devices": devices.to_json()}
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    r1, r2 = ctx.Pipe()
    procs = [ctx.Process(target=_owner, args=(w, devices.owner, timeout_s + 300, b), daemon=True)]
    try:
        procs[0].start()
        _, meta, base = _recv(a, 120, "NIXL owner")
        procs.append(ctx.Process(target=_reader, args=(w, devices.reader, meta, base, _mem(devices.owner)[1],
                                                       timeout_s, r2), daemon=True))
        procs[1].start()
        _, res = _recv(r1, timeout_s + 120, "NIXL reader")
        entry.update(res, verified=res["bad_blocks"] == 0, reason=None if res["bad_blocks"] == 0
                     else f"{res['bad_blocks']} blocks arrived with wrong bytes")
    except Exception as e:  # reported in the entry; the suite goes on
        log.warning("NIXL on %s failed: %s", w.name, e)
        entry["reason"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            a.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return {"available": True, "version": avail.version, "configs": [entry]}
