"""``nixl[write]`` of the CUDA suite: the owner process initiates NIXL WRITEs from its pool into
the reader's pool (the same direction as ours and as ``nixl[read]``). Started by
``gpu_nixl.run_config``: the reader (``target``) first, then the owner (``initiator``) with the
reader's agent metadata and pool address, and a pipe between the two.

Every rep, over that pipe: the owner picks the rows as ``request_rows`` does (the same seed and
block policy as READ) and sends them; the reader zeroes its destination rows, synchronizes and
answers; the owner times make_prepped_xfer("WRITE") + transfer() until DONE, then synchronizes
its device; then the reader checks every byte of the destination rows against the source rows'
pattern and answers the count of wrong blocks. Every wait has a deadline.
"""
from __future__ import annotations

import time
from enum import Enum

import numpy as np

from .gpu_nixl import (
    SEED,
    Op,
    initiator_side,
    pool,
    recv,
    registered_agent,
    rep_rows,
    result,
    send_error,
    sync,
    timed_xfer,
)
from .workloads import Workload


class Cmd(str, Enum):
    """Messages between the owner (initiator) and the reader (target) of one rep."""

    ZERO = "zero"          # owner -> reader: (ZERO, source rows, destination rows)
    ZEROED = "zeroed"      # reader -> owner: the destination rows are zero on the device
    VERIFY = "verify"      # owner -> reader: the WRITE is DONE, check the destination rows
    CHECKED = "checked"    # reader -> owner: (CHECKED, wrong blocks)
    DONE = "done"          # owner -> reader: no more reps


def target(w: Workload, device: str, deadline_s: float, ctl, peer) -> None:
    """The reader: registers its zeroed pool, sends its metadata to the parent, then serves the
    owner's ZERO and VERIFY until DONE."""
    try:
        import torch

        from ..blockfill import mismatched_blocks_torch

        t = pool(w, device, filled=False)
        agent = registered_agent("nixl-write-target", t, device)
        ctl.send(("ready", agent.get_agent_metadata(), t.data_ptr()))
        deadline = time.monotonic() + deadline_s
        src = dst = None
        while True:
            msg = recv(peer, deadline - time.monotonic(), "NIXL WRITE initiator (owner)")
            if msg[0] == Cmd.DONE:
                return
            if msg[0] == Cmd.ZERO:
                src = torch.as_tensor(msg[1].astype(np.int64), device=device)
                dst = torch.as_tensor(msg[2].astype(np.int64), device=device)
                t.index_fill_(0, dst, 0)
                sync(device)
                peer.send((Cmd.ZEROED,))
            elif msg[0] == Cmd.VERIFY and dst is not None:
                agent.get_new_notifs()  # drained; the check is of the bytes, not of the notifications
                peer.send((Cmd.CHECKED, mismatched_blocks_torch(t.index_select(0, dst), src, w.block_bytes, SEED)))
            else:
                raise RuntimeError(f"unexpected message {msg[0]!r}")
    except Exception:
        send_error(peer, ctl)


def initiator(w: Workload, device: str, meta: bytes, rbase: int, remote_dev: int, deadline_s: float,
              ctl, peer) -> None:
    """The owner: WRITEs every rep's rows from its filled pool into the reader's, timed; the
    reader zeroes before and verifies after each."""
    try:
        _, agent, local_prep, remote_prep = initiator_side(w, device, "nixl-write-initiator", True, meta, rbase,
                                                           remote_dev)
        deadline = time.monotonic() + deadline_s
        times, bad = [], 0
        for rep, (src, dst) in rep_rows(w):
            peer.send((Cmd.ZERO, src, dst))
            recv(peer, deadline - time.monotonic(), "NIXL WRITE target (reader)", Cmd.ZEROED)
            dt = timed_xfer(agent, Op.WRITE, local_prep, src, remote_prep, dst, f"rep-{rep}".encode(),
                            device, deadline)
            if rep >= w.warmup:
                times.append(dt)
            peer.send((Cmd.VERIFY,))
            bad += int(recv(peer, deadline - time.monotonic(), "NIXL WRITE target (reader)", Cmd.CHECKED)[1])
        peer.send((Cmd.DONE,))
        ctl.send(("ok", result(w, times, bad, len(src))))
    except Exception:
        send_error(ctl, peer)
