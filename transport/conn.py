"""One control connection: framed, MAC'd msgpack messages over a TCP stream (asyncio Protocol).

Requests carry a request id (rid); replies carry the rid they answer and complete the
requester's future right in `data_received`, and other frames go to the session's handler in
the same call: a small request is answered without a task, a thread hop or a second read.
Outbound bytes are bounded: a peer that stops reading while we owe it more than
`MAX_WRITE_BUFFER` is dropped, as is one that sends a frame over the limit or a bad MAC.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from typing import Any, Callable

from . import framing, trace, wire
from .errors import BadMessage, PeerLost, ProtocolMismatch, TransferError, TransferTimeout, error_from_wire
from .wire import Frame, Msg

log = logging.getLogger(__name__)

MAX_WRITE_BUFFER = 64 << 20
HANDSHAKE_FRAME_LIMIT = 64 << 10


def tune_socket(sock: socket.socket | None, keepalive_s: float) -> None:
    """No Nagle delay (small frames go at once); TCP keepalive finds a peer whose host vanished."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle = max(1, int(keepalive_s))
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, idle // 2))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError as e:  # not fatal: deadlines still bound every wait
        log.debug("socket tuning failed: %s", e)


Handler = Callable[[Frame], None]


class Conn(asyncio.Protocol):
    """Frames in both directions over one TCP connection.

    Until `start(handler)` frames are queued for `recv_frame` (the handshake); after it, every
    non-reply frame is passed to `handler` synchronously."""

    def __init__(self, label: str, keepalive_s: float):
        self.label = label
        self.keepalive_s = keepalive_s
        self.transport: asyncio.Transport | None = None
        self.decoder = framing.FrameDecoder(HANDSHAKE_FRAME_LIMIT)
        self.mac: framing.FrameMac | None = None
        self.max_body = HANDSHAKE_FRAME_LIMIT
        self.peer_addr: tuple | None = None
        self.lost: BaseException | None = None
        self.lost_event = asyncio.Event()
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._handler: Handler | None = None
        self._early: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self._on_lost: list[Callable[[BaseException], None]] = []
        self._armed: tuple[Msg, framing.FrameMac | None, int, bool] | None = None
        self._connected = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        tune_socket(sock, self.keepalive_s)
        self.peer_addr = transport.get_extra_info("peername")
        if not self._connected.done():
            self._connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.lost is not None:
            return
        if trace.on():
            trace.mark(self.label, "data_received")
        frames = self.decoder.frames(data)
        while self.lost is None:
            try:
                body = next(frames, None)
            except TransferError as e:
                self.abort(e)
                return
            if body is None:
                return
            try:
                frame = wire.decode(body, self.max_body)
            except (BadMessage, ProtocolMismatch) as e:
                if self._handler is None:  # handshake: the caller decides what to answer
                    self._early.put_nowait(e)
                    continue
                log.warning("%s: rejected control message: %s", self.label, e)
                self.send_error(0, e)
                continue
            if self._armed is not None and frame.type is self._armed[0]:
                # the last handshake frame: everything after it is MAC'd (framing.py)
                _, mac, limit, send_too = self._armed
                self._armed = None
                self.decoder.mac = mac
                self.decoder.limit = self.max_body = limit
                if send_too:
                    self.mac = mac
            self._dispatch(frame)

    def eof_received(self) -> bool | None:
        """The peer will send nothing more. During the handshake keep our direction open so
        the error reply still reaches it; afterwards the connection is over."""
        if self._handler is None and self.lost is None:
            self._early.put_nowait(PeerLost(f"{self.label}: peer closed its side during the handshake"))
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._mark_lost(PeerLost(f"{self.label}: connection closed" + (f" ({exc})" if exc else "")))

    # -- dispatch -------------------------------------------------------------------------------
    def _dispatch(self, frame: Frame) -> None:
        if frame.type in wire.REPLY_TYPES:
            fut = self._pending.pop(frame.rid, None)
            if fut is not None:
                if callable(fut):  # a reply callback (no future, no extra loop iteration)
                    fut(frame)
                elif not fut.done():
                    fut.set_result(frame)
                return
            if self._handler is None:
                self._early.put_nowait(frame)
            elif frame.type is Msg.ERROR:
                log.warning("%s: peer reported: %s: %.300s", self.label, frame.body["code"], frame.body["message"])
            else:
                log.debug("%s: late reply %s (rid %d) dropped", self.label, frame.type.value, frame.rid)
            return
        if self._handler is None:
            self._early.put_nowait(frame)
            return
        try:
            self._handler(frame)
        except TransferError as e:
            log.warning("%s: %s failed: %s", self.label, frame.type.value, e)
            self.send_error(frame.rid, e)
        except Exception as e:  # one bad request never kills the connection
            log.exception("%s: internal error handling %s", self.label, frame.type.value)
            self.send_error(frame.rid, TransferError(f"internal error: {type(e).__name__}"))

    def arm(self, last_handshake_frame: Msg, mac: framing.FrameMac | None, max_body: int,
            send_too: bool) -> None:
        """After a frame of type `last_handshake_frame` arrives, received frames carry MACs and
        may be up to `max_body` bytes (and sent ones carry MACs too if `send_too`)."""
        self._armed = (last_handshake_frame, mac, max_body, send_too)

    def sign_from_now(self, mac: framing.FrameMac | None) -> None:
        """The server signs every frame after its WELCOME."""
        self.mac = mac

    def start(self, handler: Handler) -> None:
        """Handshake done: frames go to `handler` (those already queued first, in order)."""
        self._handler = handler
        while not self._early.empty() and self.lost is None:
            item = self._early.get_nowait()
            if isinstance(item, BaseException):
                continue
            self._dispatch(item)

    def on_lost(self, cb: Callable[[BaseException], None]) -> None:
        if self.lost is not None:
            cb(self.lost)
        else:
            self._on_lost.append(cb)

    # -- sending ----------------------------------------------------------------------------------
    def send(self, msg: Msg, rid: int = 0, **body: Any) -> None:
        if self.lost is not None:
            raise PeerLost(f"{self.label}: connection lost ({self.lost})")
        t = self.transport
        if t is None or t.is_closing():
            raise PeerLost(f"{self.label}: not connected")
        t.write(framing.encode_frame(wire.encode(msg, rid, **body), self.mac))
        if t.get_write_buffer_size() > MAX_WRITE_BUFFER:
            err = PeerLost(f"{self.label}: peer does not read its control messages (over "
                           f"{MAX_WRITE_BUFFER >> 20} MiB queued); dropping it")
            self.abort(err)
            raise err

    def send_quiet(self, msg: Msg, rid: int = 0, **body: Any) -> None:
        try:
            self.send(msg, rid, **body)
        except TransferError:
            pass

    def send_error(self, rid: int, err: TransferError) -> None:
        self.send_quiet(Msg.ERROR, rid, code=err.code.value, message=str(err)[:1000],
                        field=getattr(err, "field", None))

    def new_request(self) -> tuple[int, asyncio.Future]:
        rid = next(self._rids)
        fut = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            fut.set_exception(self.lost)
            fut.exception()
        else:
            self._pending[rid] = fut
        return rid, fut

    def on_reply(self, callback: Callable[[Frame | BaseException], None]) -> int:
        """A request id whose reply (or the connection's loss) is passed to `callback`, called
        from `data_received` directly."""
        rid = next(self._rids)
        if self.lost is not None:
            callback(self.lost)
        else:
            self._pending[rid] = callback
        return rid

    def forget(self, rid: int) -> None:
        self._pending.pop(rid, None)

    async def request(self, msg: Msg, timeout: float, **body: Any) -> Frame:
        rid, fut = self.new_request()
        try:
            self.send(msg, rid, **body)
            try:
                frame = await asyncio.wait_for(fut, max(0.0, timeout))
            except asyncio.TimeoutError:
                raise TransferTimeout(f"{self.label}: no reply to {msg.value} within {timeout:.1f}s") from None
        finally:
            self._pending.pop(rid, None)
        raise_if_error(frame)
        return frame

    async def recv_frame(self, timeout: float) -> Frame:
        """Next frame before `start()` (handshake only)."""
        try:
            item = await asyncio.wait_for(self._early.get(), timeout)
        except asyncio.TimeoutError:
            raise TransferTimeout(f"{self.label}: handshake step not answered within {timeout:.1f}s") from None
        if isinstance(item, BaseException):
            raise item
        return item

    # -- ending -------------------------------------------------------------------------------------
    def _mark_lost(self, err: BaseException) -> None:
        if self.lost is not None:
            return
        self.lost = err
        self.lost_event.set()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if callable(fut):
                try:
                    fut(err)
                except Exception:
                    log.exception("%s: reply callback failed", self.label)
            elif not fut.done():
                fut.set_exception(err)
                fut.exception()
        self._early.put_nowait(err)
        for cb in self._on_lost:
            try:
                cb(err)
            except Exception:
                log.exception("%s: lost-callback failed", self.label)
        self._on_lost.clear()

    def abort(self, err: BaseException) -> None:
        """Drop the connection now (no goodbye); everything waiting on it fails with `err`."""
        self._mark_lost(err)
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str = "closed locally") -> None:
        self.abort(PeerLost(f"{self.label}: {reason}"))

    def close_after_flush(self) -> None:
        """End the connection once what we queued (e.g. an ERROR) has been written."""
        self._mark_lost(PeerLost(f"{self.label}: closed"))
        if self.transport is not None:
            self.transport.close()

    async def connected(self) -> None:
        await self._connected


def raise_if_error(f: Frame, expected: Msg | None = None) -> None:
    if f.type is Msg.ERROR:
        raise error_from_wire(f.body["code"], f.body["message"], f.body["field"])
    if expected is not None and f.type is not expected:
        raise BadMessage(f"expected {expected.value}, got {f.type.value}")
