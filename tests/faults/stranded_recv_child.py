"""Child process of test_fault_stranded_recv.py: one chunk of a UCX transfer whose sender stops
part-way through the message, made deterministic without signals.

The sender is a second UCX worker in this process (ucxx's low-level API, no progress thread):
it makes progress only when this script calls `progress()`, so "stopped" means "not progressed".
It sends one chunk far larger than the tcp socket buffers, is progressed until the message has
reached the receiving worker (the receiver's tag probe matches it), and then stops. The
receiving side is our data path (`datapath.Receiver` or `StagedReceiver`) on an ucxx endpoint,
as in an agent. Its receive matches the queued message and waits for the stopped sender; no
endpoint abort or worker cancel can stop a receive that has matched (ucp_request_cancel only
removes unmatched receives), so it stays posted after the transfer's deadline.

Prints one JSON line: how late the transfer failed, what it raised, how many operations it left
lingering, and whether the destination ("the caller's memory") was written after the failure,
i.e. once the sender is progressed again until its send completes.

usage: python stranded_recv_child.py CLASS DEADLINE_S GRACE_S
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

CHUNK = 64 << 20        # >> the socket buffers: the sender cannot push it out without progress
FILL = 7
TLS = {"TLS": "tcp", "RNDV_SCHEME": "get_zcopy", "MAX_RNDV_RAILS": "1", "WARN_UNUSED_ENV_VARS": "n"}


async def main(cls_name: str, deadline_s: float, grace_s: float) -> dict:
    import ucxx
    import ucxx._lib.libucxx as ucx_api
    from ucxx._lib.arr import Array
    from ucxx.types import Tag

    from transport import datapath
    from transport.datapath import CancelToken, StagingPool
    from transport.descs import Descs
    from transport.errors import TransferError
    from transport.plan import StreamPlan
    from transport.region import make_region
    from transport.runtime import Runtime

    datapath.QUARANTINE_GRACE_S = grace_s
    cls = getattr(datapath, cls_name)
    ucxx.init(options=dict(TLS), enable_python_future=True)
    reader_worker = ucxx.core._get_ctx().worker
    sender = ucx_api.UCXWorker(ucx_api.UCXContext(dict(TLS)))
    sender_ep = ucx_api.UCXEndpoint.create_from_worker_address(sender, ucxx.get_worker_address(), False)
    ep = await ucxx.create_endpoint_from_worker_address(sender.address, endpoint_error_handling=False)

    dst = np.zeros(CHUNK, np.uint8)          # the caller's memory
    descs = Descs.from_ranges(make_region(dst), [0], [CHUNK])
    plan = StreamPlan(descs, CHUNK)
    assert plan.num_chunks == 1 and plan.chunk(0).contiguous is not None
    pool = StagingPool(torch.device("cpu"), CHUNK, 2)
    tag = Runtime.new_tag_base()

    src = np.full(CHUNK, FILL, np.uint8)
    send = sender_ep.tag_send(Array(src), Tag(tag))
    t0 = time.monotonic()
    while not reader_worker.tag_probe(Tag(tag)).matched:
        sender.progress()
        await asyncio.sleep(0.001)
        if time.monotonic() - t0 > 30:
            raise RuntimeError("the message never reached the receiving worker")
    if send.completed:
        raise RuntimeError("the sender pushed the whole message out unprogressed: the scenario did not arise")
    # the sender stops here

    loop = asyncio.get_running_loop()
    token = CancelToken()
    rcv = cls(ep, plan, pool, ThreadPoolExecutor(2), tag)
    t_start = loop.time()
    try:
        await rcv.run(descs, t_start + deadline_s, token)
        error = None
    except TransferError as e:
        error = type(e).__name__
    failed_after = loop.time() - t_start
    written_at_failure = int(np.count_nonzero(dst))

    # the sender runs again: its send completes, and so does the stranded receive
    t0 = time.monotonic()
    while not send.completed:
        sender.progress()
        await asyncio.sleep(0.001)
        if time.monotonic() - t0 > 60:
            raise RuntimeError("the sender's send never completed")
    lingering = list(token.lingering)
    if lingering:
        _, still = await asyncio.wait(lingering, timeout=30)
        lingering_ended = not still
    else:
        lingering_ended = True
    t0 = time.monotonic()
    while pool.stranded() and time.monotonic() - t0 < 30:   # the stranded receive lets its slot go
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)                 # an unpack started by a late receive would land by now
    return {"error": error, "failed_after": round(failed_after, 3), "lingering": len(lingering),
            "lingering_ended": lingering_ended, "retired": pool.retired_total,
            "stranded_after": pool.stranded(),
            "written_at_failure": written_at_failure, "written_after": int(np.count_nonzero(dst))}


if __name__ == "__main__":
    out = asyncio.run(main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)   # no orderly UCX teardown with a second worker in the process
