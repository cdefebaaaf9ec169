"""framing.py over a fake in-order tag endpoint: length-prefixed frames, the limit checked before
anything is allocated, and an oversized frame discarded so the stream stays in step."""
from __future__ import annotations

import asyncio
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

framing = pytest.importorskip("transport.framing")
from transport.errors import BadMessage  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class UCXXTruncatedError(Exception):
    pass


class FakeEp:
    """In-order messages, like one UCX tag pair: a receive into a smaller buffer fails with a
    truncation error and drops the message (what UCX does)."""

    def __init__(self) -> None:
        self.q: deque[bytes] = deque()
        self.largest_recv = 0

    sent = 0

    async def send(self, arr) -> None:
        self.sent += 1
        self.q.append(np.ascontiguousarray(arr).view(np.uint8).tobytes())

    async def recv(self, arr) -> None:
        msg = self.q.popleft()
        view = arr.view(np.uint8)
        self.largest_recv = max(self.largest_recv, view.nbytes)
        if len(msg) > view.nbytes:
            raise UCXXTruncatedError("message truncated")
        view[:len(msg)] = np.frombuffer(msg, dtype=np.uint8)


def run(coro):
    return asyncio.run(coro)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_roundtrip_in_order(frames):
    ep = FakeEp()

    async def go():
        for f in frames:
            await framing.send_bytes(ep, f)
        return [await framing.recv_bytes(ep, 1 << 20) for _ in frames]

    assert run(go()) == frames
    assert not ep.q


def test_empty_frame_is_one_message():
    ep = FakeEp()
    run(framing.send_bytes(ep, b""))
    assert len(ep.q) == 1
    assert run(framing.recv_bytes(ep, 10)) == b""


def test_oversized_frame_is_refused_unallocated_and_stream_stays_in_step():
    ep = FakeEp()

    async def go():
        await framing.send_bytes(ep, b"x" * 5000)
        await framing.send_bytes(ep, b"next")
        with pytest.raises(BadMessage):              # FrameTooLarge is a BadMessage
            await framing.recv_bytes(ep, 4096)
        return await framing.recv_bytes(ep, 4096)

    assert run(go()) == b"next"
    assert ep.largest_recv <= 4096 + 8               # the 5000-byte body was never given a buffer


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 3 * framing.INLINE_BYTES), min_size=1, max_size=5))
def test_frames_around_the_inline_limit(sizes):
    """Small frames travel as one message, large ones as header + body; both arrive intact."""
    ep = FakeEp()
    frames = [bytes([i % 251]) * n for i, n in enumerate(sizes)]

    async def go():
        for f in frames:
            await framing.send_bytes(ep, f)
        return [await framing.recv_bytes(ep, 1 << 20) for _ in frames]

    assert run(go()) == frames
    small = sum(1 for n in sizes if n + framing.HEADER_BYTES <= framing.INLINE_BYTES)
    assert ep.sent == small + 2 * (len(sizes) - small)


def test_absurd_announced_length():
    ep = FakeEp()

    async def go():
        await ep.send(np.array([(1 << 64) - 1], dtype=framing.HEADER))
        await ep.send(np.zeros(4, np.uint8))
        with pytest.raises(framing.FrameTooLarge):
            await framing.recv_bytes(ep, 1 << 20)

    run(go())
