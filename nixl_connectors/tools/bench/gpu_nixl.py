"""NIXL 1.5 (UCX backend) on the CUDA workloads: two processes, VRAM registered on the owner's
device and the reader's device (both cuda:0 on one GPU), one descriptor per block (and layer) in
prepped descriptor lists, a notification on every transfer; the same reps, warm-up and block
policy as ours; every byte of every rep checked on the reader's device.

Two configurations, both moving the bytes from the owner's pool to the reader's (as ours does):

- ``nixl[read]``: the reader initiates, READ from the owner's pool (the owner only registers);
- ``nixl[write]``: the owner initiates, WRITE into the reader's pool, one rep at a time with the
  reader over a pipe (zero the destination rows, then verify them): ``gpu_nixl_write.py``.

Each runs in its own pair of processes and reports its own failure. A layered workload is one
tensor of ``num_layers x pool_blocks`` rows on each side (row ``layer * pool_blocks + block``):
one registration, the same descriptors NIXL would get from per-layer regions.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from enum import Enum
from typing import Any

import numpy as np

from .gpu_workloads import Devices
from .timing import Timings
from .workloads import BlockPolicy, Workload

log = logging.getLogger(__name__)

LOCAL_AGENT = "NIXL_INIT_AGENT"
SEED = 4242
ROWS_SEED = 3  # rng of request_rows: the same row sets for READ and WRITE


class Op(str, Enum):
    """The NIXL operation, and so which process initiates it."""

    READ = "READ"    # the reader pulls from the owner's pool
    WRITE = "WRITE"  # the owner pushes into the reader's pool

    @property
    def config(self) -> str:
        """The configuration's name in the report: ``nixl[read]``, ``nixl[write]``."""
        return self.value.lower()

    @property
    def initiator(self) -> str:
        return "reader" if self is Op.READ else "owner"


TIMING = {op: f"make_prepped_xfer(\"{op.value}\") + transfer() until check_xfer_state() is DONE (post to "
              f"completion), in the {op.initiator} process (torch.cuda.synchronize of its device after the timing)"
          for op in Op}


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


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def pool(w: Workload, device: str, filled: bool):
    """One side's pool, all layers, on ``device``: the owner's filled with the block pattern, the
    reader's zeroed."""
    import torch

    from ..blockfill import fill_pool_torch

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    shape = (w.pool_blocks * w.num_layers, w.block_bytes)
    if not filled:
        t = torch.zeros(shape, dtype=torch.uint8, device=device)
    else:
        t = torch.empty(shape, dtype=torch.uint8, device=device)
        fill_pool_torch(t, w.block_bytes, SEED)
    sync(device)
    return t


def registered_agent(name: str, t, device: str):
    """A NIXL agent (UCX backend, defaults) with ``t`` registered."""
    from .nixl_import import import_nixl

    nixl = import_nixl()
    agent = nixl.nixl_agent(name, nixl.nixl_agent_config(backends=["UCX"]))
    mem, dev_id = _mem(device)
    agent.register_memory([(t.data_ptr(), t.numel(), dev_id, "")], mem)
    return agent


def prepped_lists(agent, t, device: str, meta: bytes, rbase: int, remote_dev: int):
    """(local, remote) prepped descriptor lists of every row of both pools, connected."""
    mem, dev_id = _mem(device)
    rows, bb = t.shape
    remote = agent.add_remote_agent(meta)
    local_prep = agent.prep_xfer_dlist(LOCAL_AGENT, vram_descs(t.data_ptr(), rows, bb, dev_id), mem)
    remote_prep = agent.prep_xfer_dlist(remote, vram_descs(rbase, rows, bb, remote_dev), mem)
    try:
        agent.make_connection(remote)
    except Exception:  # older NIXL: the connection is made on first transfer
        pass
    return local_prep, remote_prep


def initiator_side(w: Workload, device: str, name: str, filled: bool, meta: bytes, rbase: int,
                   remote_dev: int):
    """An initiator's (pool, agent, local prepped list, remote prepped list): its pool registered,
    the passive side's added and connected."""
    t = pool(w, device, filled=filled)
    agent = registered_agent(name, t, device)
    return (t, agent, *prepped_lists(agent, t, device, meta, rbase, remote_dev))


def rep_rows(w: Workload):
    """(rep, (owner rows, reader rows)) for every rep, warm-up included: new rows each rep or the
    same ones throughout, as the workload's block policy says (the same seed for READ and WRITE)."""
    rng = np.random.default_rng(ROWS_SEED)
    rows = None
    for rep in range(w.warmup + w.reps):
        if rows is None or w.policy is BlockPolicy.NEW_EACH_REP:
            rows = request_rows(w, rng)
        yield rep, rows


def timed_xfer(agent, op: Op, local_prep, local_ids, remote_prep, remote_ids, tag: bytes, device: str,
               deadline: float) -> float:
    """Seconds from make_prepped_xfer() to DONE (the timed part); ``device`` is synchronized after."""
    t0 = time.perf_counter()
    h = agent.make_prepped_xfer(op.value, local_prep, local_ids, remote_prep, remote_ids, notif_msg=tag)
    state = agent.transfer(h)
    while state == "PROC":
        if time.monotonic() > deadline:
            raise TimeoutError(f"NIXL {op.value} did not finish before the deadline")
        state = agent.check_xfer_state(h)
    dt = time.perf_counter() - t0   # (as for ours: DONE means the bytes are there)
    sync(device)
    if state != "DONE":
        raise RuntimeError(f"NIXL {op.value} ended in state {state}")
    agent.release_xfer_handle(h)
    return dt


def result(w: Workload, times: list[float], bad: int, descriptors: int) -> dict[str, Any]:
    return {**Timings.of(times, w.nbytes).to_json(), "bad_blocks": bad, "verified_reps": w.warmup + w.reps,
            "descriptors_per_request": descriptors}


def send_error(*conns) -> None:
    """The current exception's traceback to every pipe still open."""
    tb = traceback.format_exc()
    for c in conns:
        try:
            c.send(("error", tb))
        except (BrokenPipeError, OSError):
            pass


def recv(conn, timeout_s: float, what: str, expect: str | None = None):
    """The next message; raises on a deadline, an error message, a closed pipe or (with
    ``expect``) a message of another kind."""
    if not conn.poll(max(0.0, timeout_s)):
        raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s")
    try:
        msg = conn.recv()
    except EOFError:
        raise RuntimeError(f"{what} went away") from None
    if msg[0] == "error":
        raise RuntimeError(f"{what} failed: {msg[1]}")
    if expect is not None and msg[0] != expect:
        raise RuntimeError(f"{what} sent {msg[0]!r}, expected {expect!r}")
    return msg


# ----------------------------------------------------------------------------------------- READ
def _owner(w: Workload, device: str, deadline_s: float, ctl) -> None:
    """READ's passive side: registers its filled pool and waits."""
    try:
        t = pool(w, device, filled=True)
        agent = registered_agent("nixl-owner", t, device)
        ctl.send(("ready", agent.get_agent_metadata(), t.data_ptr()))
        ctl.poll(deadline_s)  # until the parent says stop, goes away, or the run's deadline passes
    except Exception:
        send_error(ctl)


def _reader(w: Workload, device: str, meta: bytes, rbase: int, remote_dev: int, deadline_s: float, ctl) -> None:
    """READ's initiator: every rep zeroes its rows, READs them, checks every byte."""
    try:
        import torch

        from ..blockfill import mismatched_blocks_torch

        t, agent, local_prep, remote_prep = initiator_side(w, device, "nixl-reader", False, meta, rbase, remote_dev)
        deadline = time.monotonic() + deadline_s
        times, bad, rows = [], 0, None
        for rep, new in rep_rows(w):
            if new is not rows:
                rows = new
                r_ids, l_ids = rows
                l_idx = torch.as_tensor(l_ids.astype(np.int64), device=device)
                r_idx = torch.as_tensor(r_ids.astype(np.int64), device=device)
            t.index_fill_(0, l_idx, 0)
            sync(device)
            dt = timed_xfer(agent, Op.READ, local_prep, l_ids, remote_prep, r_ids, f"rep-{rep}".encode(),
                            device, deadline)
            if rep >= w.warmup:
                times.append(dt)
            bad += mismatched_blocks_torch(t.index_select(0, l_idx), r_idx, w.block_bytes, SEED)
        ctl.send(("ok", result(w, times, bad, len(l_ids))))
    except Exception:
        send_error(ctl)


# ---------------------------------------------------------------------------------- one config
def _start(p, started: list) -> None:
    p.start()
    started.append(p)


def run_config(w: Workload, devices: Devices, op: Op, timeout_s: float = 240.0) -> dict[str, Any]:
    """One configuration in its own pair of processes, as a ``nixl.configs`` entry; never raises
    (a failure is the entry's ``reason``). The passive side (READ: the owner; WRITE: the reader)
    starts first and sends its agent metadata and pool address; then the initiator runs every rep
    and sends the result. WRITE's two processes also share a pipe for the per-rep protocol."""
    entry: dict[str, Any] = {"name": op.config, "op": op.value, "initiator": op.initiator, "gbps": None,
                             "timing": TIMING[op], "devices": devices.to_json()}
    ctx = mp.get_context("spawn")
    p_ctl, p_end = ctx.Pipe()   # parent <-> passive side
    a_ctl, a_end = ctx.Pipe()   # parent <-> initiator
    if op is Op.READ:
        passive, active, pdev, adev = _owner, _reader, devices.owner, devices.reader
        p_extra, a_extra = (), ()
    else:
        from . import gpu_nixl_write as wr

        passive, active, pdev, adev = wr.target, wr.initiator, devices.reader, devices.owner
        to_owner, to_reader = ctx.Pipe()  # reader <-> owner directly: the per-rep protocol
        p_extra, a_extra = (to_owner,), (to_reader,)
    procs: list = []
    try:
        _start(ctx.Process(target=passive, args=(w, pdev, timeout_s + 300, p_end, *p_extra), daemon=True), procs)
        _, meta, base = recv(p_ctl, 120, f"NIXL {op.value} passive side")
        _start(ctx.Process(target=active, args=(w, adev, meta, base, _mem(pdev)[1], timeout_s, a_end, *a_extra),
                           daemon=True), procs)
        for c in (p_end, a_end, *p_extra, *a_extra):  # the children hold these: a child that dies closes them
            c.close()
        _, res = recv(a_ctl, timeout_s + 120, f"NIXL {op.value} initiator")
        entry.update(res, verified=res["bad_blocks"] == 0, reason=None if res["bad_blocks"] == 0
                     else f"{res['bad_blocks']} blocks arrived with wrong bytes")
    except Exception as e:  # reported in the entry; the other configuration and the suite go on
        log.warning("NIXL %s on %s failed: %s", op.value, w.name, e)
        entry["reason"] = f"{type(e).__name__}: {e}"
    finally:
        try:
            p_ctl.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return entry


def nixl_vram(w: Workload, devices: Devices, timeout_s: float = 240.0,
              ops: tuple[Op, ...] = (Op.READ, Op.WRITE)) -> dict[str, Any]:
    """NIXL's configurations (defaults, UCX backend; one per op) as a bench entry; never raises."""
    from .nixl_import import find_nixl

    avail = find_nixl()
    if not avail.available:
        return {"available": False, "reason": avail.reason, "configs": []}
    return {"available": True, "version": avail.version, "configs": [run_config(w, devices, op, timeout_s)
                                                                       for op in ops]}
