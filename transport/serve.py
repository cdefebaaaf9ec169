"""Owner-side handling of requests arriving on a control channel.

Every request is validated against the lease table before any memory is touched; a rejected
request gets a typed ERROR reply and is logged, and the agent keeps serving everyone else.
"""
from __future__ import annotations

import asyncio
import logging

import numpy as np
from typing import TYPE_CHECKING

from .channel import Channel
from .datapath import CancelToken, Receiver, Sender
from . import cma
from .errors import BadMessage, LeaseRejected, TransferError, TransferTimeout
from .runtime import TAG_CHUNK_BITS
from .wire import Frame, Msg

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

MIN_CHUNK, MAX_CHUNK = 4096, 1 << 30


def _check_chunk(c: int) -> None:
    if not (MIN_CHUNK <= c <= MAX_CHUNK and c & (c - 1) == 0):
        raise BadMessage(f"chunk size {c} is not a power of two in [{MIN_CHUNK}, {MAX_CHUNK}]")


async def serve_frame(agent: "Agent", ch: Channel, f: Frame) -> None:
    b = f.body
    if f.type is Msg.READ_REQ:
        await _serve_transfer(agent, ch, f, write=False)
    elif f.type is Msg.WRITE_REQ:
        await _serve_transfer(agent, ch, f, write=True)
    elif f.type is Msg.READ_DONE:
        key = (id(ch), b["xid"])
        waiting = agent._cma_waiters.get(key)
        if key in agent._cma_failed:
            agent._cma_failed.discard(key)
            raise TransferTimeout("the owner gave up on this read before it completed; data may be stale")
        if waiting is not None and not waiting.done():
            waiting.set_result(None)
        with agent._lock:
            e = agent._leases.get(b["lease"])
            if e is not None:
                e.reads += 1
        if b["notify"] is not None:
            agent._deliver(ch.peer_name, b["notify"])
        await ch.send(Msg.OK, f.rid, expires_in=None)
    elif f.type is Msg.WRITE_DONE:
        fut = agent._write_waiters.get(b["xid"])
        if fut is not None and not fut.done():
            fut.set_result(None)
    elif f.type is Msg.XFER_ABORT:
        tok = agent._tokens.get((id(ch), b["xid"]))
        err = TransferError(f"peer aborted the transfer: {b['reason']}")
        if tok is not None:
            tok.set(err)
        fut = agent._write_waiters.get(b["xid"])
        if fut is not None and not fut.done():
            fut.set_exception(err)
    elif f.type is Msg.RENEW:
        with agent._lock:
            left = agent._leases.renew(b["lease"], ch.peer_name, b["ttl"], agent.config.max_ttl_s)
        await ch.send(Msg.OK, f.rid, expires_in=left)
    elif f.type is Msg.NOTIFY:
        agent._deliver(ch.peer_name, b["payload"])
    elif f.type is Msg.CALL:
        out = await agent._serve_call(ch.peer_name, b["payload"])
        await ch.send(Msg.CALL_REPLY, f.rid, payload=out)
    elif f.type is Msg.PING:
        await ch.send(Msg.PONG, f.rid)
    else:
        raise BadMessage(f"unexpected {f.type.value} after the handshake")


def _host_only(descs) -> bool:
    return all(r.device.type == "cpu" for r in descs.regions)


async def _serve_cma_read(agent: "Agent", ch: Channel, f: Frame, descs, deadline: float,
                          tok: CancelToken) -> None:
    """Hand the reader the leased blocks' addresses and hold the lease until it reports done.

    If the reader neither finishes nor aborts before the deadline, the owner stops holding the
    blocks and answers a late READ_DONE with an error, so the reader never reports success for
    a copy that may have raced with the blocks' reuse."""
    loop = asyncio.get_running_loop()
    key = (id(ch), f.body["xid"])
    done = loop.create_future()
    agent._cma_waiters[key] = done
    waiter = loop.create_task(tok.wait())
    try:
        iov = cma.iovecs(descs).tobytes()
        await ch.send(Msg.READ_ACK, f.rid, xid=f.body["xid"], chunk=f.body["chunk"], iov=iov)
        fin, _ = await asyncio.wait({done, waiter}, timeout=max(0.0, deadline - loop.time()),
                                    return_when=asyncio.FIRST_COMPLETED)
        if done not in fin:
            agent._cma_failed.add(key)
            raise tok.error or TransferTimeout("reader did not finish its same-host copy in time")
    finally:
        waiter.cancel()
        agent._cma_waiters.pop(key, None)


async def _serve_transfer(agent: "Agent", ch: Channel, f: Frame, write: bool) -> None:
    b = f.body
    _check_chunk(b["chunk"])
    if not write and (b["tag"] <= 0 or b["tag"] & ((1 << TAG_CHUNK_BITS) - 1) or b["tag"] >= 1 << 63):
        raise BadMessage("invalid data tag")
    try:
        ranges = None
        if not write and b["ranges"] is not None:
            if len(b["ranges"]) % 16 or not b["ranges"]:
                raise BadMessage("ranges are not whole (offset, length) int64 pairs")
            ranges = np.frombuffer(b["ranges"], dtype="<i8").reshape(-1, 2)
        with agent._lock:
            entry, descs = agent._leases.acquire(b["lease"], ch.peer_name, b["nbytes"], want_write=write,
                                                 ranges=ranges)
    except LeaseRejected:
        agent.stats.requests_rejected += 1
        raise
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    xid = b["xid"]
    tok = CancelToken()
    key = (id(ch), xid)
    try:
        chunk = min(b["chunk"], agent.config.chunk_bytes)
        if key in agent._tokens:
            raise BadMessage(f"transfer id {xid} already in use")
        agent._tokens[key] = tok
        deadline = loop.time() + agent.config.timeout_s
        if write:
            tag = agent._rt.new_tag_base()
            await ch.send(Msg.WRITE_ACK, f.rid, xid=xid, chunk=chunk, tag=tag)
            await agent._run_stream(Receiver, ch, descs, chunk, tag, deadline, tok)
            if b["notify"] is not None:
                agent._deliver(ch.peer_name, b["notify"])
            await ch.send(Msg.WRITE_DONE, xid=xid)
            agent.stats.record_in(descs.nbytes, loop.time() - t0)
        elif b["cma"] and _host_only(descs) and len(descs) <= agent.config.max_message_bytes // 32:
            await _serve_cma_read(agent, ch, f, descs, deadline, tok)
            agent.stats.record_out(descs.nbytes, loop.time() - t0)
        else:
            await ch.send(Msg.READ_ACK, f.rid, xid=xid, chunk=chunk, iov=None)
            await agent._run_stream(Sender, ch, descs, chunk, b["tag"], deadline, tok)
            agent.stats.record_out(descs.nbytes, loop.time() - t0)
    except TransferError as e:
        agent.stats.transfers_failed += 1
        log.warning("%s: %s of lease %s for %s failed: %s", agent.name, "write" if write else "read",
                    b["lease"][:12], ch.peer_name, e)
        if write:
            await agent._send_quiet(ch, Msg.XFER_ABORT, xid=xid, reason=str(e)[:200])
    finally:
        if agent._tokens.get(key) is tok:
            del agent._tokens[key]
        if tok.lingering and ch.lost is None:
            # the peer is alive and UCX still holds requests on the blocks: keep the lease until
            # they end or the peer goes away (a dead peer can no longer pull the bytes)
            loop.create_task(_drop_when_settled(agent, ch, entry, tok.lingering))
        else:
            with agent._lock:
                agent._leases.drop(entry)


async def _drop_when_settled(agent: "Agent", ch: Channel, entry, tasks) -> None:
    loop = asyncio.get_running_loop()
    settled = loop.create_task(asyncio.wait(tasks))
    gone = loop.create_task(ch.lost_event.wait())
    await asyncio.wait({settled, gone}, return_when=asyncio.FIRST_COMPLETED)
    settled.cancel()
    gone.cancel()
    log.info("%s: lingering operations on lease %s ended (or its peer is gone); releasing it",
             agent.name, entry.id[:12])
    with agent._lock:
        agent._leases.drop(entry)
