"""One transfer an agent initiated (read or write), its states, and how it ends.

Shared by the initiator's paths (initiator.py: request, reply, one-sided copies;
initiator_ucx.py: UCX chunks). Ending is memory-safe: a copy or kernel that is running is
waited for before the transfer reports its error.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from enum import Enum

from . import trace
from .core import Core
from .datapath import CancelToken
from .descs import Descs
from .errors import PeerLost, TransferCancelled, TransferError, TransferTimeout
from .session import Session
from .transfer import Transfer
from .wire import DataPath, Msg

HOLD_MARGIN_S = 0.002


class XState(str, Enum):
    STARTING = "starting"       # waiting for the UCX link
    REQUESTED = "requested"     # request sent, no reply yet
    COPYING = "copying"         # one-sided copy running (threads or GPU kernel)
    STREAMING = "streaming"     # UCX chunks moving
    CONFIRMING = "confirming"   # copied after the owner's hold time: waiting for its OK
    WAIT_OWNER = "wait_owner"   # UCX write sent: waiting for the owner's WRITE_DONE
    DONE = "done"


@dataclass(eq=False)
class Initiated:
    core: Core
    local: Descs
    lease_id: str
    ranges: bytes | None
    notify: bytes | None
    write: bool
    xfer: Transfer
    deadline: float
    t0: float
    session: Session | None = None
    path: DataPath = DataPath.UCX
    xid: int = 0
    rid: int = 0
    tag: int = 0
    state: XState = XState.STARTING
    sent_at: float = 0.0
    hold_until: float = 0.0
    timer: asyncio.TimerHandle | None = None
    token: CancelToken | None = None
    stop: threading.Event | None = None
    task: asyncio.Task | None = field(default=None, repr=False)
    pending_error: TransferError | None = None
    owner_done: bool = False
    retried: bool = False


def _abort_owner(x: Initiated, reason: str) -> None:
    x.session.conn.send_quiet(Msg.XFER_ABORT, xid=x.xid, reason=reason[:200], by_owner=False)


def _on_deadline(x: Initiated) -> None:
    x.timer = None
    abort(x, TransferTimeout(f"transfer did not finish within its deadline "
                             f"({x.deadline - x.t0:.1f}s, state {x.state.value})"))


def abort(x: Initiated, err: TransferError) -> None:
    """Stop the transfer (cancel, deadline, peer lost, owner abort). Memory safety first: a copy
    or kernel that is running is waited for before the transfer reports its error."""
    st = x.state
    if st is XState.DONE:
        return
    if st is XState.COPYING:
        x.pending_error = err
        if x.stop is not None:
            x.stop.set()
        return
    if st is XState.STREAMING:
        x.token.set(err)
        return
    if st in (XState.REQUESTED, XState.WAIT_OWNER) and x.session is not None:
        _abort_owner(x, str(err))
    _settle(x, err)


def _settle(x: Initiated, err: BaseException | None) -> None:
    if x.state is XState.DONE:
        return
    x.state = XState.DONE
    if x.timer is not None:
        x.timer.cancel()
        x.timer = None
    s, core = x.session, x.core
    if s is not None and s.initiated.get(x.xid) is x:
        del s.initiated[x.xid]
    dt = asyncio.get_running_loop().time() - x.t0
    if err is None:
        (core.stats.record_out if x.write else core.stats.record_in)(x.local.nbytes, dt)
        core.stats.paths[x.path.value] += 1
    else:
        core.stats.transfers_failed += 1
    trace.mark(x.xfer, "settled")
    x.xfer._finish(err)


def session_lost(s: Session) -> None:
    err = s.lost if isinstance(s.lost, TransferError) else PeerLost(f"lost {s.name}")
    for x in list(s.initiated.values()):
        abort(x, err)


def cancelled() -> TransferCancelled:
    return TransferCancelled("transfer cancelled by caller")
