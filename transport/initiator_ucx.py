"""The initiator's UCX path: chunks behind the owner's reply (other hosts, and fallbacks)."""
from __future__ import annotations

import asyncio
import logging

from .datapath import CancelToken, Sender, StagedReceiver
from .errors import BadMessage, TransferError
from .initiated import Initiated, XState, _abort_owner, _settle, abort
from .runtime import TAG_CHUNK_BITS
from .session import Session
from .wire import DataPath, Frame, Msg

log = logging.getLogger(__name__)


def _start_ucx(x: Initiated, f: Frame) -> None:
    tag = f.body["tag"] if x.write else x.tag
    if tag <= 0 or tag & ((1 << TAG_CHUNK_BITS) - 1):
        _abort_owner(x, "bad tag")
        _settle(x, BadMessage("owner answered with an invalid tag"))
        return
    x.state = XState.STREAMING
    x.token = CancelToken()
    x.task = asyncio.get_running_loop().create_task(_ucx(x, tag))


async def _ucx(x: Initiated, tag: int) -> None:
    s = x.session
    try:
        # A read receives into staging only: a receive stranded by a stopped owner cannot write
        # the caller's memory after the read failed (datapath.py).
        await x.core.data.run_stream(Sender if x.write else StagedReceiver, s, x.local, tag, x.deadline, x.token)
    except TransferError as e:
        if x.token.lingering:
            # operations that may still touch the caller's memory: a write's zero-copy sends (on
            # an endpoint whose sends cannot block), a copy thread that outlived the grace
            log.warning("%s: %s of lease %.12s with %s failed; %d operation(s) on the caller's memory "
                        "still pending after the abort: %s", x.core.name, "write" if x.write else "read",
                        x.lease_id, s.name, len(x.token.lingering), e)
        _abort_owner(x, str(e))
        _settle(x, e)
        return
    if not x.write:
        s.conn.send_quiet(Msg.XFER_DONE, 0, xid=x.xid)
        _settle(x, None)
    elif x.owner_done:
        _settle(x, None)
    else:
        x.state = XState.WAIT_OWNER


def on_write_done(s: Session, f: Frame) -> None:
    x = s.initiated.get(f.body["xid"])
    if x is None or not x.write or x.path is not DataPath.UCX:
        raise BadMessage(f"write_done for transfer {f.body['xid']}, which is not a write of this connection")
    if x.state is XState.WAIT_OWNER:
        _settle(x, None)
    else:
        x.owner_done = True


def on_owner_abort(s: Session, f: Frame) -> None:
    x = s.initiated.get(f.body["xid"])
    if x is None:  # finished here already, or not one of this connection's: no effect
        log.info("%s: owner abort for transfer %d, not in flight on this connection: ignored", s.name,
                 f.body["xid"])
        return
    abort(x, TransferError(f"owner aborted the transfer: {f.body['reason'][:200]}"))
