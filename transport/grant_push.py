"""Lease grants sent ahead (grants.py): when a lease is exposed, the owner sends its grant to the
same-host readers that may read it, so even a lease's first read needs no round trip.

A grant goes only where the lease allows (its named peer's sessions, or, for a lease open to any
authenticated peer, to at most `AgentConfig.grant_push_sessions` same-host sessions that have
read one-sidedly from this agent before), only for host memory or for CUDA regions whose IPC
handles that session already holds (a pushed grant never shares a new handle), and it carries
exactly what the READ_ACK of a whole-lease read would. A reader that cannot use it ignores it;
its reads then ask, as before. Writable leases are not pushed.
"""
from __future__ import annotations

import asyncio
import logging

from . import cma
from .core import Core
from .errors import BadMessage
from .leases import LeaseEntry, LeaseState
from .region import MemoryKind
from .session import Session
from .wire import Frame, Msg

log = logging.getLogger(__name__)


def _readers(core: Core, e: LeaseEntry) -> list[Session]:
    out = [s for s in core.sessions.all()
           if s.lost is None and not s.peer.lane and s.peer.same_host and s.one_sided_reader
           and (e.peer is None or e.peer == s.name)]
    if e.peer is None and len(out) > core.config.grant_push_sessions:
        return []   # too many possible readers: each asks when it reads
    return out


def push(core: Core, e: LeaseEntry) -> None:
    """On the loop, right after `expose`: send the lease's grant to its likely readers."""
    from .owner import grant_for   # (owner imports nothing of this module)

    if e.writable or e.state is not LeaseState.ACTIVE:
        return
    readers = _readers(core, e)
    if not readers:
        return
    cfg, descs = core.config, e.descs
    host = descs.regions[0].kind is MemoryKind.HOST
    if host and (not cfg.same_host_copy or len(descs) * 16 > cfg.max_message_bytes // 2):
        return
    if not host and (not cfg.gpu_ipc or core.data.export_unavailable() or len(descs) * 24 > cfg.max_message_bytes // 2):
        return
    grant = grant_for(core, e)
    if grant is None:
        return
    iov = table = None
    if host:
        if e.iov is None:
            e.iov = cma.iovecs(descs).tobytes()
        iov = e.iov
    else:
        if e.ipc is None:
            e.ipc = core.data.ipc_table(descs)
        regions, table = e.ipc
    for s in readers:
        ipc = None
        if not host:
            if not all(r.uid in s.ipc_sent for r in regions):
                continue   # its first read shares the handles
            ipc = core.data.ipc_offer(s, regions, table)
        s.conn.send_quiet(Msg.GRANT, lease=e.id, nbytes=descs.nbytes, iov=iov, ipc=ipc, table=table, grant=grant)


def on_grant(core: Core, s: Session, f: Frame) -> None:
    """Reader: keep a grant the owner sent ahead (if this agent could use it)."""
    b = f.body
    if not core.config.lease_grants or not s.peer.same_host or s.peer.lane:
        return
    now = asyncio.get_running_loop().time()
    if b["iov"] is not None:
        if core.config.same_host_copy:
            s.grants.add(b["lease"], b["nbytes"], b["iov"], b["grant"], now)
        return
    if b["ipc"] is None or b["table"] is None or not core.config.gpu_ipc or core.data.ipc_unavailable():
        return
    try:
        plan = core.data.ipc_prepare(s, None, b["ipc"], b["table"], b["nbytes"], may_open=False)
    except BadMessage as e:
        log.warning("%s: unusable lease grant from %s ignored: %s", core.name, s.name, e)
        return
    if s.grants.add_ipc(b["lease"], b["nbytes"], plan, b["grant"], now):
        core.data.ipc_preload(plan)
