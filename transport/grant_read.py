"""Reader side of lease grants (grants.py): a whole-lease re-read on the calling thread, with no
message before the bytes land: process_vm_readv for host memory, the fused kernel over the
cached, checked CUDA IPC plan for CUDA memory; then the grant's word.

Called by Agent.read (any thread) and by the loop's initiator; returns False whenever the read
should go the normal way instead (no grant, a path turned off, the lease ended, any copy error),
having reported nothing: the normal path then answers with the owner's own checks and errors.
The owner learns of granted reads afterwards: at once when the read carries a notification,
else in batches (its transfer counters lag by up to the sweep interval).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from . import cma, gpu_upload, trace
from .core import Core
from .descs import Descs
from .grants import Grant, copy_granted
from .region import MemoryKind
from .session import Session
from .transfer import Transfer
from .wire import DataPath, Msg

log = logging.getLogger(__name__)

GPU_INLINE_BYTES = 2 << 30   # kernels this large end within ~2 ms: waited for on the calling thread


_CMA, _IPC = DataPath.CMA.value, DataPath.IPC.value   # (an enum member's .value is a Python-level property)


def _usable(core: Core, s: Session | None, local: Descs) -> MemoryKind | None:
    cfg = core.config
    if (s is None or s.lost is not None or not cfg.lease_grants or not s.peer.same_host or not s.pid_checked
            or (s.off and DataPath.CMA in s.off)):
        return None   # (the word check is a process_vm_readv: it needs the CMA path's permission)
    kind = local.regions[0].kind
    if kind is MemoryKind.HOST:
        return kind if cfg.same_host_copy and local.nbytes <= cfg.inline_copy_bytes else None
    if cfg.gpu_ipc and not (s.off and DataPath.IPC in s.off) and local.nbytes <= GPU_INLINE_BYTES:
        return kind
    return None


def try_read(core: Core, s: Session | None, local: Descs, lease_id: str, notify: bytes | None,
             xfer: Transfer | None = None, lanes: Any = None) -> Transfer | None:
    """Copy the lease under its grant; returns the Transfer, settled (successfully): `xfer`, or
    without one a new, already completed Transfer; None when the read must go the normal way (nothing
    was reported). On the loop thread `lanes` is None; from another thread a notification's report goes
    out on the thread's direct lane to that peer (with lanes on, a host read on a thread without one
    takes a lane read first, which makes it), else through the loop."""
    kind = _usable(core, s, local)
    if kind is None:
        return None
    g = s.grants.get(lease_id, local.nbytes)
    if g is None:
        return None
    trace.mark("ipc", "granted")
    if kind is not MemoryKind.HOST:
        return _read_ipc(core, s, g, local, lease_id, notify, xfer, lanes)
    lane = None
    if lanes is not None:
        lane = lanes.existing(s)
        if lane is None and lanes.enabled():
            return None  # a lane read makes this thread's lane; the next granted reads report on it
    t0 = time.monotonic()
    try:
        ok = g.remote is not None and copy_granted(s.peer.pid, g, local, s.words)
    except cma.CmaUnavailable as e:
        return _cma_refused(core, s, lease_id, e)
    except (OSError, ValueError, RuntimeError) as e:
        log.debug("granted read of %.12s from %s failed (%s); asking the owner", lease_id, s.name, e)
        ok = False
    if not ok:
        s.grants.drop(lease_id)
        return None
    trace.mark(xfer, "copied")
    nbytes = local.nbytes
    with core.lock:
        core.stats.count_granted_in(nbytes, _CMA)
        core.stats.transfer_seconds += time.monotonic() - t0
    if xfer is None:
        xfer = Transfer.completed(nbytes, core.runtime.call_soon)
    else:
        xfer._finish(None)
    _report(core, s, lease_id, nbytes, _CMA, notify, lanes, lane)
    return xfer


def _read_ipc(core: Core, s: Session, g: Grant, local: Descs, lease_id: str, notify: bytes | None,
              xfer: Transfer | None, lanes: Any) -> Transfer | None:
    """The fused kernel (or the driver's copy) over the plan's mappings, then the grant's word.
    What the read reports (its Transfer, its counters, the word's reader) is made while the copy
    runs: once the side stream is synchronized, one load decides (a thread that waited runs
    every line slower). The counters are taken back if the read then goes the normal way."""
    live = g.ipc.live(s) if g.ipc is not None else None
    if live is None:   # a mapping was dropped since (region gone, restart)
        s.grants.drop(lease_id)
        return None
    trace.mark("ipc", "live")
    nbytes = local.nbytes
    t0 = time.monotonic()
    counted, refused = False, None
    try:
        # no event: the side stream is synchronized below, on the calling thread (a driver call less)
        waitable, keep = core.data.ipc_launch(g.ipc, local, False, live, record=False)
        del live   # (held by `keep` until the wait returned)
        try:
            word = s.words.reader(s.peer.pid, g.word, g.board)
            done = Transfer.completed(nbytes, core.runtime.call_soon) if xfer is None else xfer
            with core.lock:
                core.stats.count_granted_in(nbytes, _IPC)
            counted = True
        finally:
            try:
                waitable.synchronize()
                trace.mark("ipc", "synced")
            finally:
                if isinstance(keep, gpu_upload.Held):
                    keep.synced()   # (frees its table slot)
                del keep
        trace.mark("ipc", "released")
        ok = word() == g.gen   # (a load from the mapped board; process_vm_readv where it is not mapped)
    except cma.CmaUnavailable as e:
        refused, ok = e, False
    except (OSError, ValueError, RuntimeError) as e:
        log.debug("granted read of %.12s from %s failed (%s); asking the owner", lease_id, s.name, e)
        ok = False
    if not ok:
        if counted:
            with core.lock:
                core.stats.uncount_granted_in(nbytes, _IPC)
        if refused is not None:
            return _cma_refused(core, s, lease_id, refused)
        s.grants.drop(lease_id)
        return None
    trace.mark(xfer, "copied")
    with core.lock:
        core.stats.transfer_seconds += time.monotonic() - t0
    if done is xfer:
        xfer._finish(None)
    _report(core, s, lease_id, nbytes, _IPC, notify, lanes, None)
    return done


def _cma_refused(core: Core, s: Session, lease_id: str, e: cma.CmaUnavailable) -> None:
    """The kernel refused process_vm_readv (Yama ptrace scope): no grants from this peer (their word
    checks need it); the read goes the normal way."""
    s.grants.drop(lease_id)
    s.off.setdefault(DataPath.CMA, f"the kernel refused process_vm_readv: {e}")
    core.fallback(DataPath.CMA, f"the kernel refused process_vm_readv: {e}", s.name)
    return None


def _report(core: Core, s: Session, lease_id: str, nbytes: int, path: str, notify: bytes | None, lanes: Any,
            lane: Any) -> None:
    """Tell the owner of a granted read: at once with its notification (on the loop, on this
    thread's lane, or through the loop), else only its counters, in a batch (flush_reports)."""
    if notify is None:
        s.grant_reports.append((lease_id, nbytes, path))
        return
    body = dict(lease=lease_id, reads=1, nbytes=nbytes, notify=bytes(notify), path=path)
    if lanes is None:
        s.conn.send_quiet(Msg.GRANT_READ, **body)
    elif lane is None or not lane.report(Msg.GRANT_READ, **body):
        core.runtime.call_soon(lambda: s.conn.send_quiet(Msg.GRANT_READ, **body))


def flush_reports(s: Session) -> None:
    """On the loop: tell the owner about granted reads that carried no notification (its
    counters), one GRANT_READ per lease. Run by the agent's sweep (every sweep_interval_s) and
    when it closes; the reads themselves never wait for this."""
    per: dict[tuple[str, str], list[int]] = {}
    q = s.grant_reports
    while q:
        try:
            lease, nbytes, path = q.popleft()
        except IndexError:
            break
        c = per.setdefault((lease, path), [0, 0])
        c[0] += 1
        c[1] += nbytes
    for (lease, path), (reads, nbytes) in per.items():
        s.conn.send_quiet(Msg.GRANT_READ, lease=lease, reads=reads, nbytes=nbytes, notify=None, path=path)
