"""Length-prefixed control frames over a UCX endpoint's own tag pair.

A frame starts with an 8-byte little-endian length. A small frame (the common case: every
request and reply) travels as one tag message, header and body together, received into a fixed
buffer of `inline_limit(max_bytes)` bytes; a larger frame sends the header alone, then the body
as a second message. One message instead of two halves the completions a round trip waits for.
Per-connection tags (random, agreed by ucxx when the connection is made) mean a message still in
flight for a closed connection can never be taken for one of a new connection, which ucxx's
active messages, keyed by endpoint handle, do not guarantee when a handle is reused. The length
is checked against the limit before anything for the body is allocated.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import BadMessage

HEADER = np.dtype("<u8")
HEADER_BYTES = HEADER.itemsize
INLINE_BYTES = 16 << 10  # largest first message: header plus a body of up to INLINE_BYTES - 8


class FrameTooLarge(BadMessage):
    """The peer announced a frame over the limit (its body was discarded unread)."""


def inline_limit(max_bytes: int) -> int:
    """Size of the first message's receive buffer: never more than a whole allowed frame."""
    return min(INLINE_BYTES, HEADER_BYTES + max_bytes)


async def send_bytes(ep: Any, data: bytes) -> None:
    """Send one frame (callers serialise concurrent senders)."""
    n = len(data)
    if HEADER_BYTES + n <= INLINE_BYTES:
        msg = np.empty(HEADER_BYTES + n, dtype=np.uint8)
        msg[:HEADER_BYTES].view(HEADER)[0] = n
        msg[HEADER_BYTES:] = np.frombuffer(data, dtype=np.uint8)
        await ep.send(msg)
        return
    await ep.send(np.array([n], dtype=HEADER))
    await ep.send(np.frombuffer(data, dtype=np.uint8))


async def recv_bytes(ep: Any, max_bytes: int) -> bytes:
    """Receive one frame; raise FrameTooLarge when the announced length exceeds max_bytes."""
    first = np.zeros(inline_limit(max_bytes), dtype=np.uint8)  # a short message leaves zeros, not old memory
    try:
        await ep.recv(first)
    except Exception as e:
        if not _is_truncation(e):
            raise
        # a one-message frame larger than any frame we accept: UCX dropped it, the stream is in step
        raise FrameTooLarge(f"peer sent a control message over the limit ({max_bytes} bytes)") from None
    n = int(first[:HEADER_BYTES].view(HEADER)[0])
    if n > max_bytes:
        if HEADER_BYTES + n > INLINE_BYTES:
            await _discard(ep)
        raise FrameTooLarge(f"peer announced a {n}-byte control message (limit {max_bytes})")
    if HEADER_BYTES + n <= INLINE_BYTES:
        return first[HEADER_BYTES:HEADER_BYTES + n].tobytes()
    buf = np.empty(n, dtype=np.uint8)
    await ep.recv(buf)
    return buf.tobytes()


async def _discard(ep: Any) -> None:
    """Consume the oversized body without allocating it: UCX drops a message that does not fit
    the posted buffer and reports truncation, which keeps the frame stream in step."""
    try:
        await ep.recv(np.empty(1, dtype=np.uint8))
    except Exception as e:  # ucxx's truncation error is the expected outcome
        if not _is_truncation(e):
            raise


def _is_truncation(e: BaseException) -> bool:
    """ucxx's message-truncated errors (their class names differ between versions)."""
    return "runcat" in type(e).__name__ or "runcat" in str(e)
