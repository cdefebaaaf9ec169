"""framing.py: length-prefixed frames, limits before buffering, per-frame MACs (replay,
reorder, injection, truncation), and no stale bytes ever reaching a decoder."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.errors import BadMessage
from transport.framing import MAC_BYTES, BadMac, FrameDecoder, FrameMac, FrameTooLarge, encode_frame

pytestmark = pytest.mark.timeout(60)


def pair():
    return FrameMac(b"a" * 32, b"b" * 32), FrameMac(b"b" * 32, b"a" * 32)


def test_roundtrip_in_any_split():
    data = b"".join(encode_frame(b"x" * n, None) for n in (1, 10, 1000))
    for cut in range(1, len(data)):
        d = FrameDecoder(4096)
        assert d.feed(data[:cut]) + d.feed(data[cut:]) == [b"x", b"x" * 10, b"x" * 1000]


def test_length_checked_before_the_body_arrives():
    d = FrameDecoder(100)
    with pytest.raises(FrameTooLarge):
        d.feed(struct.pack("<I", 101))       # only the header: refused at once
    assert FrameDecoder(100).feed(encode_frame(b"y" * 100, None)) == [b"y" * 100]


def test_empty_frame_is_bad():
    with pytest.raises(BadMessage):
        FrameDecoder(100).feed(struct.pack("<I", 0))


def test_short_body_never_yields_a_frame():
    """A header announcing more than arrives gives nothing (no stale memory: bodies are built
    from received bytes only)."""
    d = FrameDecoder(30000)
    assert d.feed(struct.pack("<I", 30000) + b"\x94\x02\xa4ping\x01\x81\xc5\x75\x23") == []
    assert d.buffered() < 100


def test_macs_detect_tampering_replay_and_reorder():
    a, b = pair()
    f1, f2 = encode_frame(b"first", a), encode_frame(b"second", a)
    d = FrameDecoder(1024)
    d.mac = b
    assert d.feed(f1) == [b"first"]
    with pytest.raises(BadMac):
        d.feed(f1)                          # replay
    a2, b2 = pair()
    g1, g2 = encode_frame(b"first", a2), encode_frame(b"second", a2)
    d2 = FrameDecoder(1024)
    d2.mac = b2
    with pytest.raises(BadMac):
        d2.feed(g2)                         # reorder / drop
    a3, b3 = pair()
    h = bytearray(encode_frame(b"payload", a3))
    h[6] ^= 1
    d3 = FrameDecoder(1024)
    d3.mac = b3
    with pytest.raises(BadMac):
        d3.feed(bytes(h))                   # altered
    d4 = FrameDecoder(1024)
    d4.mac = pair()[1]
    with pytest.raises(BadMac):
        d4.feed(encode_frame(b"injected", None) + b"\0" * MAC_BYTES)   # injected without the key


def test_mac_switch_between_frames():
    """The handshake's last frame is unsigned, everything after it is signed, in one chunk."""
    a, b = pair()
    data = encode_frame(b"welcome", None) + encode_frame(b"signed", a)
    d = FrameDecoder(1024)
    out = []
    for body in d.frames(data):
        out.append(body)
        d.mac = b
    assert out == [b"welcome", b"signed"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(1, 64))
def test_fuzz_only_typed_errors(blob, limit):
    d = FrameDecoder(limit)
    try:
        for body in d.frames(blob):
            assert 0 < len(body) <= limit
    except BadMessage:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_with_macs_never_accepts_garbage(blob):
    d = FrameDecoder(1024)
    d.mac = pair()[1]
    try:
        assert d.feed(blob) == []
    except BadMessage:
        pass
