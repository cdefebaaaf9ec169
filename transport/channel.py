"""Control channel to one peer: framed msgpack messages over a UCX endpoint (see framing.py).

The control endpoint has UCX peer error handling on, so a dead peer is reported promptly; it
carries only small messages, so its slower transports cost nothing measurable. Bulk data goes
over separate endpoints without error handling (see datapath.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Awaitable, Callable

import numpy as np

from . import framing, wire
from .errors import BadMessage, PeerLost, ProtocolMismatch, TransferError, TransferTimeout, error_from_wire
from .wire import Frame, Msg

log = logging.getLogger(__name__)

REPLY_TYPES = {Msg.HELLO_ACK, Msg.WELCOME, Msg.ERROR, Msg.READ_ACK, Msg.WRITE_ACK, Msg.OK, Msg.CALL_REPLY}
Handler = Callable[["Channel", Frame], Awaitable[None]]


class Channel:
    def __init__(self, ep: Any, max_bytes: int, label: str):
        self.ep = ep
        self.max_bytes = max_bytes
        self.label = label
        self.peer_name = ""
        self.peer_worker = b""
        self.peer_host = ""
        self.peer_pid = 0
        self.cma_ok = True
        self.inbound = False
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self._handler: Handler | None = None
        self.lost: BaseException | None = None
        self.graceful = False
        self.lost_event = asyncio.Event()
        self._lost_callbacks: list[Callable[["Channel", BaseException], None]] = []
        self._send_lock = asyncio.Lock()

    # -- raw I/O --------------------------------------------------------------------------
    async def send(self, msg: Msg, rid: int = 0, **body: Any) -> None:
        if self.lost is not None:
            raise PeerLost(f"{self.label}: connection lost ({self.lost})")
        data = wire.encode(msg, rid, **body)
        try:
            async with self._send_lock:
                await framing.send_bytes(self.ep, data)
        except Exception as e:  # ucxx raises its own exception types
            err = PeerLost(f"{self.label}: send failed: {type(e).__name__}: {e}")
            self._mark_lost(err)
            raise err from None

    async def recv_frame(self, timeout: float) -> Frame:
        """Receive one frame directly (handshake only, before the reader task runs)."""
        try:
            buf = await asyncio.wait_for(framing.recv_bytes(self.ep, self.max_bytes), timeout)
        except framing.FrameTooLarge:
            raise
        except asyncio.TimeoutError:
            raise TransferTimeout(f"{self.label}: no answer within {timeout:.1f}s") from None
        except Exception as e:
            raise PeerLost(f"{self.label}: receive failed: {type(e).__name__}: {e}") from None
        return wire.decode(buf, self.max_bytes)

    # -- request / reply --------------------------------------------------------------------
    async def request(self, msg: Msg, timeout: float, **body: Any) -> Frame:
        rid = next(self._rids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(msg, rid, **body)
            try:
                frame = await asyncio.wait_for(asyncio.shield(fut), timeout)
            except asyncio.TimeoutError:
                raise TransferTimeout(f"{self.label}: no reply to {msg.value} within {timeout:.1f}s") from None
        finally:
            self._pending.pop(rid, None)
        if frame.type is Msg.ERROR:
            raise error_from_wire(frame.body["code"], frame.body["message"], frame.body["field"])
        return frame

    async def reply_error(self, rid: int, err: TransferError) -> None:
        try:
            await self.send(Msg.ERROR, rid, code=err.code.value, message=str(err),
                            field=getattr(err, "field", None))
        except TransferError:
            pass

    # -- reader loop --------------------------------------------------------------------------
    def start(self, handler: Handler) -> None:
        self._handler = handler
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    def on_lost(self, cb: Callable[["Channel", BaseException], None]) -> None:
        self._lost_callbacks.append(cb)

    async def _read_loop(self) -> None:
        while self.lost is None:
            try:
                buf = await framing.recv_bytes(self.ep, self.max_bytes)
            except framing.FrameTooLarge as e:
                log.warning("%s: rejected control message: %s", self.label, e)
                await self.reply_error(0, e)
                continue
            except asyncio.CancelledError:
                self._mark_lost(PeerLost(f"{self.label}: channel closed"))
                raise
            except Exception as e:
                self._mark_lost(PeerLost(f"{self.label}: connection lost: {type(e).__name__}: {e}"))
                return
            try:
                frame = wire.decode(buf, self.max_bytes)
            except (BadMessage, ProtocolMismatch) as e:
                log.warning("%s: rejected control message: %s", self.label, e)
                await self.reply_error(0, e)
                continue
            if frame.type in REPLY_TYPES and frame.rid in self._pending:
                fut = self._pending.pop(frame.rid)
                if not fut.done():
                    fut.set_result(frame)
                continue
            if frame.type in REPLY_TYPES:
                if frame.type is Msg.ERROR:
                    log.warning("%s: peer reported: %s: %s", self.label, frame.body["code"], frame.body["message"])
                else:
                    log.debug("%s: late reply %s (rid %d) dropped", self.label, frame.type.value, frame.rid)
                continue
            asyncio.get_running_loop().create_task(self._dispatch(frame))

    async def _dispatch(self, frame: Frame) -> None:
        try:
            await self._handler(self, frame)  # type: ignore[misc]
        except TransferError as e:
            log.warning("%s: %s request failed: %s", self.label, frame.type.value, e)
            await self.reply_error(frame.rid, e)
        except Exception as e:  # never let one bad request kill the channel
            log.exception("%s: internal error handling %s", self.label, frame.type.value)
            await self.reply_error(frame.rid, TransferError(f"internal error: {type(e).__name__}"))

    def _mark_lost(self, err: BaseException) -> None:
        if self.lost is not None:
            return
        self.lost = err
        self.lost_event.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        self._pending.clear()
        for cb in self._lost_callbacks:
            try:
                cb(self, err)
            except Exception:
                log.exception("%s: lost-callback failed", self.label)

    async def close(self) -> None:
        # No goodbye message: ucxx can hand a message that arrives while an endpoint closes to
        # the next endpoint reusing its handle, so a closing connection sends nothing more.
        self.graceful = True
        self._mark_lost(PeerLost(f"{self.label}: closed locally"))
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
        self._abort_ep()

    def _abort_ep(self) -> None:
        try:
            self.ep.abort(period=200_000_000)
        except Exception:
            pass
