"""Owner side: requests of one session for the leases this agent holds.

Every request is checked against the lease table (exists, not ended, exposed to this peer,
writable for writes, the bytes named lie in the lease) before any memory is touched, and
against its own session (transfer ids are per connection). One-sided paths hand the initiator
what it needs in the one reply (iovecs or an IPC table) and hold the lease until the
initiator's XFER_DONE or the hold time passes; the UCX path packs and sends right behind the
reply. A rejected request gets a typed ERROR and is logged; the agent keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from . import cma, trace
from .core import Core
from .datapath import CancelToken, Receiver, Sender
from .descs import Descs
from .errors import BadMessage, Busy, LeaseRejected, PathUnavailable, PeerLost, TransferError, TransferTimeout
from .leases import LeaseEntry
from .region import MemoryKind
from .runtime import TAG_CHUNK_BITS
from .session import Session
from .wire import DataPath, Frame, Msg, parse_path

log = logging.getLogger(__name__)


class ServedState(str, Enum):
    ACTIVE = "active"          # the initiator may be touching the lease's memory
    DATA_DONE = "data_done"    # UCX read: every chunk sent; waiting for XFER_DONE (notification)
    GAVE_UP = "gave_up"        # hold time passed without XFER_DONE: the lease is not held any more


@dataclass(eq=False)
class Served:
    xid: int
    entry: LeaseEntry
    descs: Descs
    path: DataPath
    write: bool
    notify: bytes | None
    started: float
    state: ServedState = ServedState.ACTIVE
    holds_ref: bool = True
    initiator_done: bool = False   # UCX read: the reader had every byte before our sends completed
    timer: asyncio.TimerHandle | None = None
    token: CancelToken | None = None
    task: asyncio.Task | None = field(default=None, repr=False)


def hold_seconds(core: Core) -> float:
    return core.config.timeout_s


def _drop_ref(core: Core, sv: Served) -> None:
    if sv.holds_ref:
        sv.holds_ref = False
        with core.lock:
            core.leases.drop(sv.entry)


def _finish(core: Core, s: Session, sv: Served) -> None:
    if sv.timer is not None:
        sv.timer.cancel()
        sv.timer = None
    _drop_ref(core, sv)
    if s.served.get(sv.xid) is sv:
        del s.served[sv.xid]


def _deliver(core: Core, s: Session, sv: Served) -> None:
    if sv.notify is not None:
        if not core.inbox.put_or_drop(s.name, sv.notify):
            core.stats.notifications_dropped += 1
        sv.notify = None


# ---------------------------------------------------------------------------------- requests
def _ranges(raw: bytes | None) -> np.ndarray | None:
    if raw is None:
        return None
    if len(raw) % 16 or not raw:
        raise BadMessage("ranges are not whole (offset, length) int64 pairs")
    return np.frombuffer(raw, dtype="<i8").reshape(-1, 2)


def _acquire(core: Core, s: Session, b: dict, write: bool) -> tuple[LeaseEntry, Descs]:
    if len(s.served) >= core.config.max_transfers_per_peer:
        raise Busy(f"{len(s.served)} transfers of this connection are in flight")
    if b["xid"] in s.served:
        raise BadMessage(f"transfer id {b['xid']} is already in use on this connection")
    ranges = None if write else _ranges(b["ranges"])
    try:
        with core.lock:
            return core.leases.acquire(b["lease"], s.name, b["nbytes"], want_write=write, ranges=ranges)
    except LeaseRejected as e:
        core.stats.requests_rejected += 1
        log.warning("%s: %s of lease %.12s by %s rejected: %s", core.name, "write" if write else "read",
                    b["lease"], s.name, e)
        raise


def _check_one_sided(core: Core, s: Session, descs: Descs, path: DataPath) -> None:
    if not s.peer.same_host:
        raise PathUnavailable(f"{path.value} needs both processes on one host (and PID namespace)")
    kind = descs.regions[0].kind  # one Descs lives on one device
    if path is DataPath.CMA:
        if not core.config.same_host_copy:
            raise PathUnavailable("same_host_copy is off at the owner")
        if kind is not MemoryKind.HOST:
            raise PathUnavailable("the lease is not in host memory")
        if len(descs) * 16 > core.config.max_message_bytes // 2:
            raise PathUnavailable("the lease has too many ranges for one message")
    else:
        if not core.config.gpu_ipc:
            raise PathUnavailable("gpu_ipc is off at the owner")
        if kind is not MemoryKind.CUDA:
            raise PathUnavailable("the lease is not in CUDA memory")
        reason = core.data.export_unavailable()
        if reason:
            raise PathUnavailable(reason)
        if len(descs) * 24 > core.config.max_message_bytes // 2:
            raise PathUnavailable("the lease has too many ranges for one message")


def serve_transfer(core: Core, s: Session, f: Frame, write: bool) -> None:
    b = f.body
    trace.mark(("owner", b["xid"]), "request_handled")
    path = parse_path(b["path"])
    entry, descs = _acquire(core, s, b, write)
    loop = asyncio.get_running_loop()
    sv = Served(b["xid"], entry, descs, path, write, b["notify"], loop.time())
    try:
        if path is DataPath.UCX:
            _serve_ucx(core, s, f, sv)
        else:
            _check_one_sided(core, s, descs, path)
            _serve_one_sided(core, s, f, sv)
            s.one_sided_reader = s.one_sided_reader or not write
    except BaseException:
        _drop_ref(core, sv)
        raise
    core.stats.paths[path.value] += 1


def _serve_one_sided(core: Core, s: Session, f: Frame, sv: Served) -> None:
    hold = hold_seconds(core)
    iov = ipc = table = grant = None
    if sv.path is DataPath.CMA:
        whole = f.body.get("ranges") is None
        if whole and sv.entry.iov is not None:
            iov = sv.entry.iov
        else:
            iov = cma.iovecs(sv.descs).tobytes()
            if whole:
                sv.entry.iov = iov
        if whole and not sv.write and core.config.lease_grants:
            grant = grant_for(core, sv.entry)
    else:
        whole = f.body.get("ranges") is None
        if whole and sv.entry.ipc is not None:
            regions, table = sv.entry.ipc
        else:
            regions, table = core.data.ipc_table(sv.descs)
            if whole:
                sv.entry.ipc = (regions, table)
        ipc = core.data.ipc_offer(s, regions, table)
        if whole and not sv.write and core.config.lease_grants:
            grant = grant_for(core, sv.entry)
    s.served[sv.xid] = sv
    sv.timer = asyncio.get_running_loop().call_later(hold, _hold_passed, core, s, sv)
    reply = Msg.WRITE_ACK if sv.write else Msg.READ_ACK
    extra = {"tag": 0} if sv.write else {"grant": grant}
    s.conn.send(reply, f.rid, xid=sv.xid, hold_ms=hold * 1000.0, iov=iov, ipc=ipc, table=table, **extra)
    trace.mark(("owner", sv.xid), "reply_sent")


def grant_for(core: Core, entry: LeaseEntry) -> list | None:
    """[word address, generation, ms left (, board fd, board address, board id)] of the lease's
    grant (grants.py, grant_words.py), or None."""
    with core.lock:
        left = entry.expires_mono - core.leases.now()
        g = core.grants.issue(entry) if left > 0 else None
    if g is None:
        return None
    ref = core.grants.ref
    return [g[0], g[1], left * 1000.0] + ([] if ref is None else [ref.fd, ref.base, ref.ident])


def serve_granted(core: Core, s: Session, f: Frame) -> None:
    """A peer re-read a lease under its grant (`reads` times, `nbytes` in all): count it and
    deliver its notification. The reads needed nothing from us, and the report comes after the
    fact: a lease that has ended since (the usual case for a lease read once and released) is
    counted all the same (the reader's word check passed after each copy, so the bytes were the
    lease's); a live lease's report must match it."""
    b = f.body
    path = parse_path(b["path"])
    reads, nbytes = b["reads"], b["nbytes"]
    if path is DataPath.UCX or not 0 < reads <= 1 << 32 or nbytes > reads << 47:
        raise BadMessage("implausible granted-read report")
    with core.lock:
        e = core.leases.get(b["lease"])
        if e is not None and ((e.peer is not None and e.peer != s.name) or nbytes != reads * e.descs.nbytes):
            log.warning("%s: granted-read report from %s does not match lease %.12s; ignored", core.name,
                        s.name, b["lease"])
            return
        core.stats.bytes_out += nbytes
        core.stats.transfers_out += reads
        core.stats.paths[path.value] += reads
        core.stats.granted_reads += reads
    if b["notify"] is not None:
        if not core.inbox.put_or_drop(s.name, b["notify"]):
            core.stats.notifications_dropped += 1


def _hold_passed(core: Core, s: Session, sv: Served) -> None:
    sv.timer = None
    if sv.state is not ServedState.ACTIVE:
        return
    sv.state = ServedState.GAVE_UP
    _drop_ref(core, sv)
    core.stats.transfers_failed += 1
    log.warning("%s: %s of lease %.12s by %s not confirmed within %.1fs; lease no longer held for it",
                core.name, "write" if sv.write else "read", sv.entry.id, s.name, hold_seconds(core))
    if s.lost is not None:
        s.served.pop(sv.xid, None)
    else:  # keep the id a while to answer a late XFER_DONE with an error
        sv.timer = asyncio.get_running_loop().call_later(hold_seconds(core), _forget, s, sv)


def _forget(s: Session, sv: Served) -> None:
    if s.served.get(sv.xid) is sv:
        del s.served[sv.xid]


def _serve_ucx(core: Core, s: Session, f: Frame, sv: Served) -> None:
    if s.ucx is None:
        raise BadMessage("UCX transfer requested before the UCX worker addresses were exchanged")
    b = f.body
    if sv.write:
        tag = core.runtime.new_tag_base()
    else:
        tag = b["tag"]
        if tag <= 0 or tag & ((1 << TAG_CHUNK_BITS) - 1):
            raise BadMessage("invalid data tag")
    sv.token = CancelToken()
    s.served[sv.xid] = sv
    if sv.write:
        s.conn.send(Msg.WRITE_ACK, f.rid, xid=sv.xid, hold_ms=0.0, iov=None, ipc=None, table=None, tag=tag)
    else:
        s.conn.send(Msg.READ_ACK, f.rid, xid=sv.xid, hold_ms=0.0, iov=None, ipc=None, table=None, grant=None)
    sv.task = asyncio.get_running_loop().create_task(_run_ucx(core, s, sv, tag))


async def _run_ucx(core: Core, s: Session, sv: Served, tag: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + core.config.timeout_s
    tok = sv.token
    try:
        await core.data.run_stream(Receiver if sv.write else Sender, s, sv.descs, tag, deadline, tok)
    except TransferError as e:
        core.stats.transfers_failed += 1
        log.warning("%s: %s of lease %.12s for %s over UCX failed: %s", core.name,
                    "write" if sv.write else "read", sv.entry.id, s.name, e)
        s.conn.send_quiet(Msg.XFER_ABORT, xid=sv.xid, reason=str(e)[:200], by_owner=True)
        if tok.lingering and s.lost is None:
            # the peer is alive and UCX still holds requests on the blocks: keep the lease until
            # they end or the peer goes away (a dead peer can no longer touch the bytes)
            loop.create_task(_drop_when_settled(core, s, sv, tok.lingering))
            s.served.pop(sv.xid, None)
            return
        _finish(core, s, sv)
        return
    nbytes = sv.descs.nbytes
    if sv.write:
        core.stats.record_in(nbytes, loop.time() - sv.started)
        _deliver(core, s, sv)
        s.conn.send_quiet(Msg.WRITE_DONE, xid=sv.xid)
        _finish(core, s, sv)
    else:
        core.stats.record_out(nbytes, loop.time() - sv.started)
        if sv.initiator_done:
            _finish(core, s, sv)
            return
        _drop_ref(core, sv)
        sv.state = ServedState.DATA_DONE
        sv.timer = loop.call_later(hold_seconds(core), _forget, s, sv)


async def _drop_when_settled(core: Core, s: Session, sv: Served, tasks) -> None:
    loop = asyncio.get_running_loop()
    settled = loop.create_task(asyncio.wait(tasks))
    gone = loop.create_task(s.conn.lost_event.wait())
    await asyncio.wait({settled, gone}, return_when=asyncio.FIRST_COMPLETED)
    settled.cancel()
    gone.cancel()
    log.info("%s: stranded operations on lease %.12s ended (or its peer is gone); releasing it",
             core.name, sv.entry.id)
    _drop_ref(core, sv)


# ---------------------------------------------------------------------------------- completion
def serve_done(core: Core, s: Session, f: Frame) -> None:
    sv = s.served_entry(f.body["xid"])
    if sv.state is ServedState.GAVE_UP:
        _forget(s, sv)
        raise TransferTimeout("the owner stopped holding the lease before this transfer confirmed; "
                              "its bytes may be stale")
    if sv.state is ServedState.ACTIVE and sv.path is DataPath.UCX:
        if sv.write:
            raise BadMessage(f"transfer {sv.xid} is a UCX write: the owner confirms it")
        # every chunk arrived before our send completions did: the sender task finishes it
        sv.initiator_done = True
        _deliver(core, s, sv)
        if f.rid:
            s.conn.send(Msg.OK, f.rid, expires_in=None)
        return
    if sv.state is ServedState.ACTIVE:
        dt = asyncio.get_running_loop().time() - sv.started
        if sv.write:
            core.stats.record_in(sv.descs.nbytes, dt)
        else:
            core.stats.record_out(sv.descs.nbytes, dt)
    _deliver(core, s, sv)
    _finish(core, s, sv)
    if f.rid:
        s.conn.send(Msg.OK, f.rid, expires_in=None)


def serve_abort(core: Core, s: Session, f: Frame) -> None:
    """The initiator stopped: for one-sided paths it no longer touches our memory."""
    sv = s.served.get(f.body["xid"])
    if sv is None:  # finished on our side already, or not one of this connection's: no effect
        log.info("%s: abort from %s for transfer %d, not in flight on this connection: ignored",
                 core.name, s.name, f.body["xid"])
        return
    err = TransferError(f"peer aborted the transfer: {f.body['reason'][:200]}")
    if sv.path is DataPath.UCX and sv.state is ServedState.ACTIVE:
        sv.token.set(err)  # the UCX task winds down and drops the reference
        return
    _finish(core, s, sv)


def session_lost(core: Core, s: Session) -> None:
    """The connection ended: UCX transfers stop; one-sided holds end now if the peer's process
    is gone, else when their hold time passes (the peer might still be copying)."""
    err = PeerLost(f"lost {s.name}")
    alive = s.peer.alive()
    for sv in list(s.served.values()):
        if sv.path is DataPath.UCX and sv.state is ServedState.ACTIVE:
            sv.token.set(err)
        elif sv.state is ServedState.ACTIVE and alive:
            continue  # its hold timer ends it
        else:
            _finish(core, s, sv)
