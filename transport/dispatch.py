"""Routes a session's incoming (non-reply) frames to the owner or initiator side."""
from __future__ import annotations

from . import grant_push, initiator_ucx, owner, serve_small
from .core import Core
from .errors import BadMessage
from .session import Session
from .wire import Frame, Msg


def handle(core: Core, s: Session, f: Frame) -> None:
    t = f.type
    if t is Msg.READ_REQ:
        owner.serve_transfer(core, s, f, write=False)
    elif t is Msg.WRITE_REQ:
        owner.serve_transfer(core, s, f, write=True)
    elif t is Msg.GRANT:
        grant_push.on_grant(core, s, f)
    elif t is Msg.GRANT_READ:
        owner.serve_granted(core, s, f)
    elif t is Msg.XFER_DONE:
        owner.serve_done(core, s, f)
    elif t is Msg.XFER_ABORT:
        if f.body["by_owner"]:
            initiator_ucx.on_owner_abort(s, f)
        else:
            owner.serve_abort(core, s, f)
    elif t is Msg.WRITE_DONE:
        initiator_ucx.on_write_done(s, f)
    elif t is Msg.RENEW:
        serve_small.serve_renew(core, s, f)
    elif t is Msg.NOTIFY:
        serve_small.serve_notify(core, s, f)
    elif t is Msg.CALL:
        serve_small.serve_call(core, s, f)
    elif t is Msg.UCX_HELLO:
        serve_small.serve_ucx_hello(core, s, f)
    elif t is Msg.REGION_GONE:
        core.data.drop_mappings(s, f.body["slot"])
    elif t is Msg.PING:
        s.conn.send(Msg.PONG, f.rid)
    else:
        raise BadMessage(f"unexpected {t.value} after the handshake")
