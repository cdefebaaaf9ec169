"""Length-prefixed control frames over a UCX endpoint's own tag pair.

Each frame is two tag messages on the endpoint's per-connection tags: an 8-byte little-endian
length, then the bytes. Per-connection tags (random, agreed by ucxx when the connection is
made) mean a message still in flight for a closed connection can never be taken for one of a
new connection, which ucxx's active messages, keyed by endpoint handle, do not guarantee when a
handle is reused. The length is checked against the limit before anything is allocated.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import BadMessage

HEADER = np.dtype("<u8")


class FrameTooLarge(BadMessage):
    """The peer announced a frame over the limit (its body was discarded unread)."""


async def send_bytes(ep: Any, data: bytes) -> None:
    """Send one frame (callers serialise concurrent senders)."""
    await ep.send(np.array([len(data)], dtype=HEADER))
    if data:
        await ep.send(np.frombuffer(data, dtype=np.uint8))


async def recv_bytes(ep: Any, max_bytes: int) -> bytes:
    """Receive one frame; raise FrameTooLarge when the announced length exceeds max_bytes."""
    hdr = np.empty(1, dtype=HEADER)
    await ep.recv(hdr)
    n = int(hdr[0])
    if n > max_bytes:
        await _discard(ep)
        raise FrameTooLarge(f"peer announced a {n}-byte control message (limit {max_bytes})")
    if n == 0:
        return b""
    buf = np.empty(n, dtype=np.uint8)
    await ep.recv(buf)
    return buf.tobytes()


async def _discard(ep: Any) -> None:
    """Consume the oversized body without allocating it: UCX drops a message that does not fit
    the posted buffer and reports truncation, which keeps the frame stream in step."""
    try:
        await ep.recv(np.empty(1, dtype=np.uint8))
    except Exception as e:  # ucxx's truncation error is the expected outcome
        if "runcat" not in type(e).__name__ and "runcat" not in str(e):
            raise
