"""Initiator side of reads and writes: one request, one reply, then the data path.

Same host, host memory: the reply carries the owner's iovecs and the reader copies them itself
(process_vm_readv / writev), on the loop thread when small. Same host, CUDA memory: the reply
carries an IPC table and one fused kernel copies. Either way the transfer completes locally,
without a second round trip, when the copy finished within the time the owner promised to hold
the lease (same clock: one host); XFER_DONE then only releases the owner's hold. A copy that
finished later asks the owner to confirm it still held the lease. Other hosts and fallbacks use
UCX chunks right behind the reply.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
from typing import Any

from . import cma, gpu_upload, grant_read, trace
from .grant_read import GPU_INLINE_BYTES  # kernels this large are waited for on the loop (no thread hop)
from .core import Core
from .descs import Descs
from .errors import BadMessage, PathUnavailable, PeerLost, TransferError, error_from_wire
from .paths import PathInputs, choose_path
from .region import MemoryKind
from .session import Session
from .initiated import HOLD_MARGIN_S, Initiated, XState, _abort_owner, _on_deadline, _settle, abort
from .initiator_ucx import _start_ucx
from .transfer import Peer, Transfer
from .ucx_link import ensure_link
from .wire import DataPath, Frame, Msg

log = logging.getLogger(__name__)



def find_session(core: Core, peer: Peer | str) -> Session:
    cands: list[Session] = []
    if isinstance(peer, Peer):
        s = core.sessions.by_addr.get(peer.address)
        if s is not None and s.lost is None:
            return s
        cands = [s for s in core.sessions.live(peer.name) if not s.peer.lane]
    elif isinstance(peer, str):
        cands = [s for s in core.sessions.live(peer) if not s.peer.lane]
        if not cands:
            s = core.sessions.by_addr.get(peer)
            cands = [s] if s is not None and s.lost is None else []
    else:
        raise TypeError("peer must be a Peer or a peer name / address")
    if not cands:
        raise PeerLost(f"not connected to {peer}")
    outbound = [s for s in cands if not s.inbound]
    return (outbound or cands)[-1]


# ---------------------------------------------------------------------------------- start
def start(core: Core, peer: Peer | str, local: Descs, lease_id: str, ranges: bytes | None,
          notify: bytes | None, timeout: float, write: bool, xfer: Transfer) -> None:
    """Runs on the transport loop (scheduled by Agent.read / write)."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    x = Initiated(core, local, lease_id, ranges, notify, write, xfer, now + timeout, now)
    trace.mark(xfer, "loop_start")
    xfer._attach(lambda err: abort(x, err))
    try:
        x.session = find_session(core, peer)
    except (TransferError, TypeError) as e:
        _settle(x, e if isinstance(e, TransferError) else PeerLost(str(e)))
        return
    if not write and ranges is None and grant_read.try_read(core, x.session, local, lease_id, notify, xfer) is not None:
        return
    x.timer = loop.call_at(x.deadline, _on_deadline, x)
    _choose_and_go(x, force_ucx=False)


def _choose_and_go(x: Initiated, force_ucx: bool) -> None:
    s, core = x.session, x.core
    kind = x.local.regions[0].kind if x.local.regions else MemoryKind.HOST
    if force_ucx:
        path = DataPath.UCX
    else:
        if kind is MemoryKind.HOST and s.peer.same_host and not s.pid_checked:
            _check_peer_pid(s)
        ipc_on = core.config.gpu_ipc and core.data.ipc_unavailable() is None
        path, why = choose_path(PathInputs(kind, s.peer.same_host, s.peer.serves, core.config.same_host_copy,
                                           ipc_on, s.off))
        if why is not None:
            core.fallback(DataPath.CMA if kind is MemoryKind.HOST else DataPath.IPC, why, s.name,
                          configured=why == "same_host_copy is off here" or (
                              why.startswith("CUDA IPC is off") and not core.config.gpu_ipc))
    x.path = path
    if path is DataPath.UCX and s.ucx is None:
        x.state = XState.STARTING
        x.task = asyncio.get_running_loop().create_task(_link_then_request(x))
    else:
        _request(x)


def _check_peer_pid(s: Session) -> None:
    """Once per session, before the first same-host copy: the pid the peer claims must hold the
    other end of this connection (else a lying peer could aim our process_vm_readv / writev at
    any process we may ptrace)."""
    s.pid_checked = True
    t = s.conn.transport
    ours = t.get_extra_info("sockname") if t is not None else None
    theirs = t.get_extra_info("peername") if t is not None else None
    if not cma.pid_holds_connection(s.peer.pid, ours, theirs):
        s.off[DataPath.CMA] = "the peer's claimed pid does not hold its end of the connection"


async def _link_then_request(x: Initiated) -> None:
    loop = asyncio.get_running_loop()
    try:
        await ensure_link(x.core, x.session, max(0.0, x.deadline - loop.time()))
    except TransferError as e:
        _settle(x, e)
        return
    except Exception as e:
        _settle(x, PeerLost(f"UCX link to {x.session.name} failed: {type(e).__name__}: {e}"))
        return
    if x.state is XState.STARTING:
        _request(x)


def _request(x: Initiated) -> None:
    s, loop = x.session, asyncio.get_running_loop()
    x.xid = s.next_xid()
    s.initiated[x.xid] = x
    x.state = XState.REQUESTED
    x.rid = s.conn.on_reply(functools.partial(_on_ack, x))
    if x.state is not XState.REQUESTED:
        return  # the connection was already lost
    x.sent_at = loop.time()
    try:
        if x.write:
            s.conn.send(Msg.WRITE_REQ, x.rid, xid=x.xid, lease=x.lease_id, nbytes=x.local.nbytes,
                        path=x.path.value, notify=x.notify)
        else:
            x.tag = x.core.runtime.new_tag_base() if x.path is DataPath.UCX else 0
            s.conn.send(Msg.READ_REQ, x.rid, xid=x.xid, lease=x.lease_id, nbytes=x.local.nbytes,
                        ranges=x.ranges, path=x.path.value, tag=x.tag, notify=x.notify)
    except TransferError as e:
        s.conn.forget(x.rid)
        _settle(x, e)
        return
    trace.mark(x.xfer, "request_sent")


def _on_ack(x: Initiated, f: Frame | BaseException) -> None:
    trace.mark(x.xfer, "reply_handled")
    if x.state is not XState.REQUESTED:
        return
    if isinstance(f, BaseException):
        _settle(x, f if isinstance(f, TransferError) else PeerLost(str(f)))
        return
    if f.type is Msg.ERROR:
        err = error_from_wire(f.body["code"], f.body["message"], f.body["field"])
        if isinstance(err, PathUnavailable) and x.path is not DataPath.UCX and not x.retried:
            _fall_back(x, str(err), abort_owner=False)
            return
        _settle(x, err)
        return
    want = Msg.WRITE_ACK if x.write else Msg.READ_ACK
    if f.type is not want or f.body["xid"] != x.xid:
        _abort_owner(x, "unexpected reply")
        _settle(x, BadMessage(f"expected {want.value} for transfer {x.xid}, got {f.type.value}"))
        return
    x.hold_until = x.sent_at + f.body["hold_ms"] / 1000.0 * 0.999 - HOLD_MARGIN_S
    if x.path is DataPath.CMA:
        _start_cma(x, f)
    elif x.path is DataPath.IPC:
        _start_ipc(x, f)
    else:
        _start_ucx(x, f)


def _fall_back(x: Initiated, reason: str, abort_owner: bool) -> None:
    """The one-sided path failed before any byte moved: remember it for this peer, use UCX."""
    s = x.session
    if abort_owner:
        _abort_owner(x, f"falling back to UCX: {reason}")
    s.initiated.pop(x.xid, None)
    s.off[x.path] = reason
    x.core.fallback(x.path, reason, s.name)
    x.retried = True
    _choose_and_go(x, force_ucx=True)


# ---------------------------------------------------------------------------------- same host, host memory
def _start_cma(x: Initiated, f: Frame) -> None:
    nbytes = x.local.nbytes
    try:
        remote = cma.parse_remote(f.body["iov"] or b"", nbytes)
        batches = cma.plan_batches(x.local, remote)
    except ValueError as e:
        _abort_owner(x, "bad iovecs")
        _settle(x, BadMessage(f"owner sent unusable iovecs: {e}"))
        return
    x.state = XState.COPYING
    pid = x.session.peer.pid
    if f.body.get("grant") is not None and not x.write and x.ranges is None:
        x.session.grants.add(x.lease_id, nbytes, f.body["iov"], f.body["grant"], x.sent_at)
    if nbytes <= x.core.config.inline_copy_bytes:
        try:
            cma.copy_all(pid, batches, x.write)
        except cma.CmaUnavailable as e:
            _fall_back(x, f"the kernel refused process_vm_{'writev' if x.write else 'readv'}: {e}", True)
            return
        except OSError as e:
            _abort_owner(x, "copy failed")
            _settle(x, PeerLost(f"same-host copy failed: {e}"))
            return
        _copied(x)
        return
    x.stop = threading.Event()
    x.task = asyncio.get_running_loop().create_task(_cma_threads(x, pid, batches))


async def _cma_threads(x: Initiated, pid: int, batches) -> None:
    loop = asyncio.get_running_loop()
    stop = x.stop

    def run(lo, re) -> None:
        if not stop.is_set():
            cma.copy_batch(pid, lo, re, x.write)

    results = await asyncio.gather(*(loop.run_in_executor(x.core.executor, run, lo, re) for lo, re in batches),
                                   return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if x.pending_error is not None:  # aborted while copying: every started batch has ended now
        _abort_owner(x, str(x.pending_error))
        _settle(x, x.pending_error)
        return
    if errors:
        e = errors[0]
        if isinstance(e, cma.CmaUnavailable) and not x.retried:
            _fall_back(x, f"the kernel refused the same-host copy: {e}", True)
            return
        _abort_owner(x, "copy failed")
        _settle(x, PeerLost(f"same-host copy failed: {e}"))
        return
    _copied(x)


def _copied(x: Initiated) -> None:
    """One-sided copy finished: done now if the owner's hold covered it, else ask."""
    trace.mark(x.xfer, "copied")
    s, loop = x.session, asyncio.get_running_loop()
    if loop.time() <= x.hold_until and s.lost is None:
        xid = x.xid
        _settle(x, None)                                # wake the caller first ...
        s.conn.send_quiet(Msg.XFER_DONE, 0, xid=xid)    # ... then release the owner's hold
        return
    x.state = XState.CONFIRMING

    def confirmed(f: Frame | BaseException) -> None:
        if x.state is not XState.CONFIRMING:
            return
        if isinstance(f, BaseException):
            _settle(x, f if isinstance(f, TransferError) else PeerLost(str(f)))
        elif f.type is Msg.ERROR:
            _settle(x, error_from_wire(f.body["code"], f.body["message"], f.body["field"]))
        else:
            _settle(x, None)

    rid = s.conn.on_reply(confirmed)
    try:
        s.conn.send(Msg.XFER_DONE, rid, xid=x.xid)
    except TransferError as e:
        s.conn.forget(rid)
        _settle(x, e)


# ---------------------------------------------------------------------------------- same host, CUDA memory
def _start_ipc(x: Initiated, f: Frame) -> None:
    x.state = XState.COPYING
    try:
        ev, keep, plan = x.core.data.ipc_copy(x.session, x.local, f.body["ipc"], f.body["table"],
                                              x.local.nbytes, x.write)
    except BadMessage as e:
        _abort_owner(x, "bad IPC offer")
        _settle(x, e)
        return
    except Exception as e:  # the driver refused the mapping (MIG, no peer access, other namespace...)
        if x.retried:
            _abort_owner(x, "IPC failed")
            _settle(x, PeerLost(f"CUDA IPC failed: {type(e).__name__}: {e}"))
        else:
            _fall_back(x, f"CUDA IPC mapping failed: {type(e).__name__}: {str(e)[:200]}", True)
        return
    if f.body.get("grant") is not None and not x.write and x.ranges is None:
        if not x.session.pid_checked:
            _check_peer_pid(x.session)   # the grant's word is read with process_vm_readv
        x.session.grants.add_ipc(x.lease_id, x.local.nbytes, plan, f.body["grant"], x.sent_at)
    if x.local.nbytes <= GPU_INLINE_BYTES:
        ev.synchronize()
        trace.mark("ipc", "synced")
        if isinstance(keep, gpu_upload.Held):
            keep.synced()
        _copied(x)
        return
    x.task = asyncio.get_running_loop().create_task(_wait_event(x, ev, keep))


async def _wait_event(x: Initiated, ev: Any, keep: Any) -> None:
    await asyncio.get_running_loop().run_in_executor(x.core.executor, ev.synchronize)
    if isinstance(keep, gpu_upload.Held):
        keep.synced()
    del keep
    if x.pending_error is not None:  # the kernel cannot be stopped; it has ended now
        _abort_owner(x, str(x.pending_error))
        _settle(x, x.pending_error)
        return
    _copied(x)


# ---------------------------------------------------------------------------------- UCX


# ---------------------------------------------------------------------------------- ending


