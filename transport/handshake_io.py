"""Both sides of the handshake over a fresh `Conn`, and admission of the resulting session.

Order (see handshake.py for what the MACs cover):
  client HELLO -> server HELLO_ACK (+ server proof) -> client AUTH (client proof)
  -> server checks the proof, then compat, then admission -> WELCOME; MAC'd frames from here on.
Nothing the server says before the client's proof depends on memory the client may not see,
and compat values are only disclosed (in a CompatMismatch) to an authenticated peer.
"""
from __future__ import annotations

import asyncio
import logging
import re

from . import handshake as hs
from .conn import Conn, raise_if_error
from .core import Core
from .errors import BadMessage, TransferError, TransferTimeout, Unauthorized
from .session import PeerInfo, Session
from .wire import DataPath, Frame, Msg

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[\w.:@/+-]{1,200}$")


def _peer_info(body: dict) -> PeerInfo:
    name = body["name"]
    if not NAME_RE.match(name):
        raise BadMessage("peer name must be 1-200 characters of [A-Za-z0-9_.:@/+-]")
    if len(body["instance"]) != hs.INSTANCE_BYTES or len(body["nonce"]) != hs.NONCE_BYTES:
        raise BadMessage("bad instance id or nonce length")
    serves = frozenset(DataPath(p) for p in body["paths"] if p in DataPath._value2member_map_)
    return PeerInfo(name, body["instance"], body["host"][:200], body["pid"], body["chunk"], serves,
                    bool(body.get("lane", False)))


class Deadline:
    def __init__(self, seconds: float):
        self.loop = asyncio.get_running_loop()
        self.at = self.loop.time() + seconds

    def left(self) -> float:
        left = self.at - self.loop.time()
        if left <= 0:
            raise TransferTimeout("handshake deadline passed")
        return left


async def server_handshake(core: Core, conn: Conn, handler) -> Session:
    cfg = core.config
    dl = Deadline(cfg.handshake_timeout_s)
    hello = await conn.recv_frame(dl.left())
    if hello.type is not Msg.HELLO:
        raise BadMessage("expected hello")
    peer = _peer_info(hello.body)
    key = cfg.key_for(peer.name)
    if cfg.keyed and key is None:
        raise Unauthorized("handshake refused")  # a peer_keys deployment that does not know this name
    ack = dict(core.hello_fields(), nonce=hs.new_nonce())
    ack.pop("compat", None)
    th = hs.transcript(hello.body, ack)
    macs = hs.frame_macs(key, th, client=False)
    conn.arm(Msg.AUTH, macs, cfg.max_message_bytes, send_too=False)
    conn.send(Msg.HELLO_ACK, hello.rid, mac=hs.proof(key, b"server", th), **ack)
    auth = await conn.recv_frame(dl.left())
    if auth.type is not Msg.AUTH:
        raise BadMessage("expected auth")
    if not hs.proofs_equal(hs.proof(key, b"client", th), auth.body["mac"]):
        # the reply names nothing the peer sent (its claimed name goes to our log only)
        log.warning("%s: a peer claiming the name %r failed to authenticate", core.name, peer.name)
        raise Unauthorized("peer failed to authenticate (wrong or missing key)")
    hs.check_compat(dict(cfg.compat), hello.body["compat"])
    session = Session(conn, peer, inbound=True, address=None, secret=hs.session_secret(key, th))
    await admit(core, session, dl)
    conn.send(Msg.WELCOME, auth.rid)
    conn.sign_from_now(macs)
    session.start(handler)
    log.info("%s accepted %s (pid %d)", core.name, peer.name, peer.pid)
    return session


def check_server(core: Core, hello: dict, ack: Frame, address: str) -> tuple[PeerInfo, bytes | None, bytes]:
    """The client's check of HELLO_ACK: (the server's identity, the key, the transcript hash)."""
    raise_if_error(ack, Msg.HELLO_ACK)
    peer = _peer_info(ack.body)
    key = core.config.key_for(peer.name)
    if core.config.keyed and key is None:
        raise Unauthorized(f"{address} is {peer.name!r}, for which no key is configured")
    th = hs.transcript(hello, ack.body)
    if not hs.proofs_equal(hs.proof(key, b"server", th), ack.body["mac"]):
        raise Unauthorized(f"{address} ({peer.name}) failed to authenticate: wrong or missing auth_key")
    return peer, key, th


async def client_handshake(core: Core, conn: Conn, address: str, timeout: float, handler) -> Session:
    cfg = core.config
    dl = Deadline(timeout)
    hello = dict(core.hello_fields(), nonce=hs.new_nonce(), compat=dict(cfg.compat), lane=False)
    conn.send(Msg.HELLO, 1, **hello)
    ack = await conn.recv_frame(dl.left())
    peer, key, th = check_server(core, hello, ack, address)
    macs = hs.frame_macs(key, th, client=True)
    conn.arm(Msg.WELCOME, macs, cfg.max_message_bytes, send_too=True)
    conn.send(Msg.AUTH, 2, mac=hs.proof(key, b"client", th))
    welcome = await conn.recv_frame(dl.left())
    raise_if_error(welcome, Msg.WELCOME)
    session = Session(conn, peer, inbound=False, address=address, secret=hs.session_secret(key, th))
    core.sessions.add(session)
    session.start(handler)
    return session


async def admit(core: Core, s: Session, dl: Deadline) -> None:
    """A name belongs to one peer process at a time. A connection from another process under
    the name of a live session is refused; if that session no longer answers a ping before the
    deadline, it is dropped and the newcomer (e.g. the restarted peer) takes the name."""
    for old in core.sessions.live(s.name):
        if old.peer.instance == s.peer.instance:
            continue  # the same process again (the other direction, or a second connection)
        if await _answers(old, min(5.0, max(0.5, dl.left() / 2))):
            raise Unauthorized(f"the name {s.name!r} is in use by a live peer (pid {old.peer.pid})")
        log.warning("%s: %s reconnected from a new process; its old connection stopped answering "
                    "and is dropped", core.name, s.name)
        old.close("replaced: the peer's old process stopped answering")
    core.sessions.add(s)


async def _answers(s: Session, timeout: float) -> bool:
    try:
        f: Frame = await s.conn.request(Msg.PING, timeout)
        return f.type is Msg.PONG
    except TransferError:
        return False
