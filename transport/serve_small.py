"""Owner side of the small requests of a session: lease renewals, notifications,
application calls, and the UCX worker-address exchange."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from .core import Core
from .errors import BadMessage, CallFailed, PathUnavailable
from .session import Session
from .wire import Frame, Msg

log = logging.getLogger(__name__)


def serve_renew(core: Core, s: Session, f: Frame) -> None:
    b = f.body
    with core.lock:
        left = core.leases.renew(b["lease"], s.name, b["ttl"], core.config.max_ttl_s)
    s.conn.send(Msg.OK, f.rid, expires_in=left)


def serve_notify(core: Core, s: Session, f: Frame) -> None:
    core.inbox.put(s.name, f.body["payload"])  # Busy -> ERROR reply when the sender asked (rid)
    if f.rid:
        s.conn.send(Msg.OK, f.rid, expires_in=None)


def serve_call(core: Core, s: Session, f: Frame) -> None:
    h, ex = core.calls.handler, core.calls.executor
    if h is None:
        raise CallFailed(f"{core.name} has no call handler")

    def reply(out: Any) -> None:
        if not isinstance(out, (bytes, bytearray)):
            s.conn.send_error(f.rid, CallFailed("call handler returned no bytes"))
        else:
            s.conn.send_quiet(Msg.CALL_REPLY, f.rid, payload=bytes(out))

    if ex is None:
        try:
            out = h(s.name, f.body["payload"])
        except Exception as e:
            log.warning("%s: call handler failed for %s: %s", core.name, s.name, e)
            raise CallFailed(f"call handler failed: {type(e).__name__}: {e}") from None
        reply(out)
        return
    loop = asyncio.get_running_loop()

    def done(fut) -> None:
        e = fut.exception()
        if e is not None:
            log.warning("%s: call handler failed for %s: %s", core.name, s.name, e)
            s.conn.send_error(f.rid, CallFailed(f"call handler failed: {type(e).__name__}: {e}"))
        else:
            reply(fut.result())

    payload = f.body["payload"]   # bounded: a slow handler makes callers see Busy, not this process grow
    fut = core.calls.backlog.submit(ex, h, len(payload), s.name, payload)
    asyncio.wrap_future(fut, loop=loop).add_done_callback(done)


def serve_ucx_hello(core: Core, s: Session, f: Frame) -> None:
    from .ucx_link import UcxLink, check_worker_address

    async def run() -> None:
        try:
            ours = await core.runtime.ensure_ucx()
        except Exception as e:
            s.conn.send_error(f.rid, PathUnavailable(f"UCX cannot start here: {type(e).__name__}: {e}"))
            return
        try:
            check_worker_address(f.body["worker"], ours)
        except BadMessage as e:
            log.warning("%s: %s sent an unusable UCX worker address: %s", core.name, s.name, e)
            s.conn.send_error(f.rid, e)
            return
        s.ucx = UcxLink(f.body["worker"], error_handling=core.config.ucx_error_handling or not s.peer.same_host)
        s.conn.send_quiet(Msg.UCX_ACK, f.rid, worker=ours)

    if len(f.body["worker"]) > 1 << 16:
        raise BadMessage("UCX worker address too long")
    asyncio.get_running_loop().create_task(run())
