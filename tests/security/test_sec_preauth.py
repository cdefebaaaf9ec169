"""Before authentication: nothing but a typed ERROR (or a plain close) ever comes back, never
stale memory and never the sender's own bytes; unauthenticated connections are bounded in
number and time and spin no core, while connected peers keep being served.

The old transport received frames over 16 KiB into `np.empty(n)`: a header announcing 30,000
bytes with a shorter body left stale heap in the buffer, and the schema error echoed a bytes map
key back, so a client read ~300 KB of the owner's heap (another peer's notifications included)
without any key (issue 8, item 1). The old UCX listener never timed out half-open connections
and spun a core on garbage (item 3).
"""
from __future__ import annotations

import selectors
import socket
import struct
import time

import msgpack
import numpy as np
import pytest
from procinfo import busy_cores, fd_count, tcp_connections
from rawpeer import RawPeer, dial, read_until_closed, split_frames
from xport_fixtures import agent
from xport_helpers import wait_until

from transport import handshake as hs
from transport import wire
from transport.wire import Msg

pytestmark = pytest.mark.timeout(300)

KEY = b"preauth-suite-key"
SECRET = b"SECRET-NOTIFICATION-PAYLOAD-"   # planted in the owner's heap by an honest peer
MARK = b"ATTACKER-BYTES-"                  # what the attacker sends; must never come back
HS_TIMEOUT = 2.0
MAX_PENDING = 16


@pytest.fixture(scope="module")
def target(sec):
    """A keyed owner with short handshake deadline and a small pending bound, an honest reader
    connected to it, and secrets in the owner's heap (notifications, not drained)."""
    o, r = sec["owner"], sec["reader"]
    owner, oaddr = agent(o, "preauth-owner", 256, 4096, seed=11, auth_key=KEY, handshake_timeout_s=HS_TIMEOUT,
                         max_pending_handshakes=MAX_PENDING, compat={"model": "SecretModelName-42"})
    rd, _ = agent(r, "honest", 256, 4096, auth_key=KEY, compat={"model": "SecretModelName-42"})
    r.connect(rd, oaddr)
    for i in range(8):
        r.notify(rd, oaddr, SECRET * 2000 + bytes([i]) * 100)   # ~56 KB each, kept in the inbox
    lid, _, _ = o.expose(owner, np.arange(64))
    r.read(rd, oaddr, np.arange(64), lid)
    return {"o": o, "r": r, "owner": owner, "oaddr": oaddr, "rd": rd, "port": int(oaddr.rsplit(":", 1)[1])}


def honest_read(t, n=32, seed_off=0):
    """The honest reader is still served: a fresh lease, every byte checked."""
    src = np.random.default_rng(n + seed_off).permutation(256)[:n]
    lid, _, _ = t["o"].expose(t["owner"], src)
    t["r"].fill(t["rd"])
    t["r"].read(t["rd"], t["oaddr"], np.arange(n), lid, timeout=30)
    assert t["r"].bad_blocks(t["rd"], np.arange(n), src, 11) == 0


def check_reply(data: bytes, sent: bytes = b"") -> list:
    """What came back is at most one complete, well-formed ERROR frame, with no stale memory
    and none of the sender's bytes."""
    frames, tail = split_frames(data)
    assert tail == b"", f"{len(tail)} bytes of a partial frame came back"
    assert len(frames) <= 1, f"{len(frames)} frames came back"
    assert len(data) < 1024, f"{len(data)} bytes came back"
    assert SECRET[:12] not in data and b"SecretModelName" not in data, "secret bytes came back"
    assert MARK[:8] not in data, "the sender's own bytes were echoed"
    out = []
    for body in frames:
        f = wire.decode(body, 1 << 16)
        assert f.type is Msg.ERROR, f
        text = (f.body["message"] + str(f.body["field"])).encode()
        for i in range(0, max(0, len(sent) - 12), 7):   # no run of the sender's bytes in the texts
            piece = sent[i:i + 12]
            if len(set(piece)) > 4:
                assert piece not in text, f"sender bytes {piece!r} echoed"
        out.append(f)
    return out


def _recipe(version: int, announce: int) -> bytes:
    # [version, "ping", 1, {bin16 key of announce-13 bytes: ...}] cut short
    return bytes([0x94, version, 0xA4]) + b"ping" + bytes([0x01, 0x81, 0xC5]) + struct.pack(">H", announce - 13)


# ------------------------------------------------------------------------------- item 1: disclosure
@pytest.mark.parametrize("case", ["recipe-eof", "recipe-deadline", "short-body-eof", "full-frame-old",
                                  "full-frame-current", "too-large", "empty-frame", "garbage-frames",
                                  "hello-then-recipe"])
def test_no_memory_disclosure_before_auth(target, case):
    s = dial(target["oaddr"])
    hdr = struct.pack("<I", 30000)
    shut = True
    if case == "recipe-eof":
        sent = hdr + _recipe(wire.PROTOCOL_VERSION - 1, 30000)
    elif case == "recipe-deadline":
        sent, shut = hdr + _recipe(wire.PROTOCOL_VERSION - 1, 30000), False
    elif case == "short-body-eof":
        sent = hdr + _recipe(wire.PROTOCOL_VERSION, 30000) + MARK * 1500
    elif case == "full-frame-old":   # complete frames: no EOF, so the agent answers before it closes
        body = _recipe(wire.PROTOCOL_VERSION - 1, 30000)
        sent, shut = hdr + body + (MARK * 3000)[:30000 - len(body)], False
    elif case == "full-frame-current":
        body = _recipe(wire.PROTOCOL_VERSION, 30000)
        sent, shut = hdr + body + (MARK * 3000)[:30000 - len(body)], False
    elif case == "too-large":
        sent = struct.pack("<I", 70000) + MARK * 100
    elif case == "empty-frame":
        sent = struct.pack("<I", 0) + MARK
    elif case == "garbage-frames":
        rng = np.random.default_rng(7)
        sent = b"".join(struct.pack("<I", 40) + MARK[:8] + rng.bytes(32) for _ in range(50))
    else:  # a valid HELLO, its HELLO_ACK, then the recipe where AUTH should be
        s.close()
        p = RawPeer(target["oaddr"], "hello-then-recipe", None, compat={"model": MARK.decode()})
        p.send_hello()
        ack = p.recv()
        assert ack.type is Msg.HELLO_ACK and "compat" not in ack.body
        assert b"SecretModelName" not in msgpack.packb(ack.body)
        s, sent = p.sock, hdr + _recipe(wire.PROTOCOL_VERSION, 30000)
    t0 = time.monotonic()
    s.sendall(sent)
    if shut:
        s.shutdown(socket.SHUT_WR)
    data, closed = read_until_closed(s, HS_TIMEOUT + 10)
    took = time.monotonic() - t0
    s.close()
    assert closed, "the agent kept an unauthenticated connection open past its handshake deadline"
    errors = check_reply(data, sent)
    if case == "recipe-deadline":
        assert HS_TIMEOUT * 0.7 <= took <= HS_TIMEOUT + 5, took
        assert [f.body["code"] for f in errors] == ["timeout"], errors
    if case == "full-frame-old":
        assert [f.body["code"] for f in errors] == ["protocol"], errors
    if case == "full-frame-current":
        assert [f.body["code"] for f in errors] == ["bad_message"], errors


def _frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def test_failed_auth_error_does_not_echo_the_claimed_name(target):
    """A wrong key: a typed Unauthorized ERROR, which names neither the peer's claimed name nor
    anything else it sent; the owner's compat is never disclosed to an unauthenticated peer."""
    name = "ATTACKER-BYTES-name"
    p = RawPeer(target["oaddr"], name, b"wrong key", compat={"model": "other"})
    p.send_hello()
    ack = p.recv()
    assert ack.type is Msg.HELLO_ACK and "compat" not in ack.body
    p.send(Msg.AUTH, 2, mac=b"\x00" * 32)
    data, closed = read_until_closed(p.sock, 10)
    p.close()
    assert closed
    errors = check_reply(data, name.encode())
    assert [f.body["code"] for f in errors] == ["unauthorized"], errors


# ------------------------------------------------------------------------------- item 3: flood
def _slowloris(address: str, n: int, secs: float) -> list[float]:
    """`n` connections each sending a valid HELLO one byte per second; returns when each was
    closed by the agent (seconds after connecting), inf for those still open after `secs`."""
    hello = _frame(wire.encode(Msg.HELLO, 1, name="slow", instance=hs.new_instance(), host="h", pid=1,
                               chunk=1 << 20, paths=[], nonce=hs.new_nonce(), compat={}, lane=False))
    sel = selectors.DefaultSelector()
    socks = []
    t0 = time.monotonic()
    for i in range(n):
        s = dial(address)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
        socks.append(s)
    closed = [float("inf")] * n
    sent = 0
    next_byte = t0
    while time.monotonic() - t0 < secs and any(c == float("inf") for c in closed):
        now = time.monotonic()
        if now >= next_byte and sent < len(hello):
            for i, s in enumerate(socks):
                if closed[i] == float("inf"):
                    try:
                        s.send(hello[sent:sent + 1])
                    except OSError:
                        closed[i] = now - t0
            sent += 1
            next_byte += 1.0
        for key, _ in sel.select(timeout=max(0.0, min(next_byte - time.monotonic(), 0.2))):
            i = key.data
            try:
                chunk = key.fileobj.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if not chunk:
                closed[i] = time.monotonic() - t0
                sel.unregister(key.fileobj)
    for s in socks:
        s.close()
    return closed


def test_unauthenticated_flood_is_bounded_timed_out_and_quiet(target):
    o, t = target["o"], target
    pid, port = o.pid, t["port"]
    honest_read(t)
    fds0 = fd_count(pid)
    conns0 = tcp_connections(pid, port)
    refused0 = o.stats(t["owner"])["connections_refused"]

    # (a) garbage >= 4 KiB and close, 20 times (random headers, and valid small headers)
    rng = np.random.default_rng(3)
    for i in range(20):
        s = dial(t["oaddr"])
        data = rng.bytes(8192) if i % 2 else b"".join(struct.pack("<I", 60) + rng.bytes(60) for _ in range(80))
        try:
            s.sendall(data)
        except OSError:
            pass
        s.close()

    # (b) 300 half-open connections: at most MAX_PENDING wait in their handshake, the rest are
    # closed at once; all are closed by the handshake deadline; the honest peer is served.
    # The listener resets a connection over the bound inside the accept that took it, so no
    # sample, however the loop is scheduled, sees more than MAX_PENDING held (a connection the
    # kernel holds in the backlog, not yet accepted, is not the process's socket).
    flood = []
    samples = []
    for i in range(300):
        flood.append(dial(t["oaddr"]))
        if i % 25 == 24:
            samples.append(tcp_connections(pid, port) - conns0)
    honest_read(t, 48, 1)
    for _ in range(3):
        samples.append(tcp_connections(pid, port) - conns0)
        honest_read(t, 16, 2)
    assert max(samples) <= MAX_PENDING, f"{samples} unauthenticated connections held"
    t0 = time.monotonic()
    sel = selectors.DefaultSelector()
    for i, s in enumerate(flood):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    open_ = set(range(len(flood)))
    while open_ and time.monotonic() - t0 < HS_TIMEOUT + 10:
        for key, _ in sel.select(timeout=0.5):
            try:
                chunk = key.fileobj.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            if not chunk:
                open_.discard(key.data)
                sel.unregister(key.fileobj)
            else:
                check_reply(chunk)
    for s in flood:
        s.close()
    assert not open_, f"{len(open_)} half-open connections still open {HS_TIMEOUT + 10}s later"
    refused = o.stats(t["owner"])["connections_refused"] - refused0
    assert refused >= 300 - MAX_PENDING - 2, f"only {refused} connections refused over the bound"

    # (c) slowloris: a valid HELLO at one byte per second is cut at the handshake deadline
    closed = _slowloris(t["oaddr"], 10, HS_TIMEOUT + 8)
    assert all(HS_TIMEOUT * 0.7 <= c <= HS_TIMEOUT + 4 for c in closed), closed

    # (d) a handshake that never finishes (HELLO, then silence): a typed timeout at the deadline
    p = RawPeer(t["oaddr"], "never-auth", KEY)
    p.send_hello()
    assert p.recv().type is Msg.HELLO_ACK
    t0 = time.monotonic()
    data, was_closed = read_until_closed(p.sock, HS_TIMEOUT + 10)
    p.close()
    assert was_closed and HS_TIMEOUT * 0.5 <= time.monotonic() - t0 <= HS_TIMEOUT + 4
    assert [f.body["code"] for f in check_reply(data)] == ["timeout"]

    # afterwards: nothing left open, no core busy, honest peers (old and new) served
    wait_until(lambda: tcp_connections(pid, port) <= conns0, 15, what="unauthenticated connections gone")
    wait_until(lambda: fd_count(pid) <= fds0 + 2, 15, what=f"fds back to {fds0}")
    busy = busy_cores([pid], 5.0)[pid]
    assert busy < 0.2, f"the owner's process kept {busy:.2f} cores busy after the flood"
    honest_read(t, 64, 3)
    r2 = target["r"]
    late, _ = agent(r2, "late", 64, 4096, auth_key=KEY, compat={"model": "SecretModelName-42"})
    r2.connect(late, t["oaddr"], timeout=10)


def test_frames_before_auth_are_small(target):
    """64 KiB is the most an unauthenticated peer may announce (the limit rises only with a
    verified key): a 65 KiB HELLO is dropped without an answer."""
    s = dial(target["oaddr"])
    body = msgpack.packb([wire.PROTOCOL_VERSION, "hello", 1, {"name": "x" * (65 << 10)}])
    s.sendall(_frame(body))
    data, closed = read_until_closed(s, HS_TIMEOUT + 10)
    s.close()
    assert closed
    check_reply(data, body[:4096])
