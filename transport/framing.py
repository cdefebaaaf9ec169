"""Length-prefixed control frames on a byte stream, with per-frame MACs after the handshake (pure).

A frame is a 4-byte little-endian length, the body (msgpack, see wire.py), and, once an
authenticated session is set up, a 16-byte truncated HMAC-SHA256 of (sequence number, body)
under a per-direction session key (handshake.py). The sequence numbers are implicit, so a
frame that is replayed, reordered, dropped, injected or altered by anything between the two
agents (a relay included) fails the check and ends the connection.

The length is checked against the current limit (small before authentication) as soon as the
header is in; bodies are Python bytes built from what arrived, so nothing stale can leak.
"""
from __future__ import annotations

import hmac
import struct

from .errors import BadMessage

HEADER = struct.Struct("<I")
MAC_BYTES = 16


class FrameTooLarge(BadMessage):
    """The peer announced a frame over the limit."""


class BadMac(BadMessage):
    """A frame's MAC did not verify (altered, replayed, injected or out of order)."""


class FrameMac:
    """Per-direction keys and sequence numbers of one authenticated connection."""

    def __init__(self, send_key: bytes, recv_key: bytes):
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_seq = 0
        self._recv_seq = 0

    def sign(self, body: bytes) -> bytes:
        tag = _mac(self._send_key, self._send_seq, body)
        self._send_seq += 1
        return tag

    def verify(self, body: bytes, tag: bytes) -> None:
        want = _mac(self._recv_key, self._recv_seq, body)
        if not hmac.compare_digest(want, tag):
            raise BadMac("control frame failed its integrity check")
        self._recv_seq += 1


def _mac(key: bytes, seq: int, body: bytes) -> bytes:
    if len(body) <= 4096:
        return hmac.digest(key, seq.to_bytes(8, "little") + body, "sha256")[:MAC_BYTES]
    h = hmac.new(key, seq.to_bytes(8, "little"), "sha256")
    h.update(body)
    return h.digest()[:MAC_BYTES]


def encode_frame(body: bytes, mac: FrameMac | None) -> bytes:
    if mac is None:
        return HEADER.pack(len(body)) + body
    return b"".join((HEADER.pack(len(body) + MAC_BYTES), body, mac.sign(body)))


class FrameDecoder:
    """Incremental decoder: `feed(data)` returns the complete frame bodies that arrived.

    `limit` bounds one frame's body; `mac` (set after the handshake) checks every frame.
    Raises FrameTooLarge / BadMac / BadMessage; the caller then drops the connection."""

    def __init__(self, limit: int):
        self.limit = limit
        self.mac: FrameMac | None = None
        self._buf = bytearray()
        self._need = -1  # body+mac length of the frame being received; -1: header not complete

    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        return list(self.frames(data))

    def frames(self, data: bytes):
        """Yield the complete frame bodies; `mac` may be switched on between two frames."""
        self._buf += data
        while True:
            if self._need < 0:
                if len(self._buf) < HEADER.size:
                    return
                n = HEADER.unpack_from(self._buf)[0]
                body_limit = self.limit + (MAC_BYTES if self.mac is not None else 0)
                if n > body_limit:
                    raise FrameTooLarge(f"peer announced a {n}-byte control frame (limit {self.limit})")
                if self.mac is not None and n < MAC_BYTES:
                    raise BadMac("control frame shorter than its MAC")
                if n == 0:
                    raise BadMessage("empty control frame")
                self._need = n
            if len(self._buf) < HEADER.size + self._need:
                return
            end = HEADER.size + self._need
            frame = bytes(self._buf[HEADER.size:end])
            del self._buf[:end]
            self._need = -1
            if self.mac is not None:
                body, tag = frame[:-MAC_BYTES], frame[-MAC_BYTES:]
                self.mac.verify(body, tag)
                frame = body
            yield frame
