"""Raw-socket fuzzing of a live agent's control port, before and after the handshake (hypothesis).

Before authentication every input gets at most a HELLO_ACK and/or one typed ERROR (never an
internal error, never the sender's bytes, never stale memory) and the connection ends. After
authentication (frames correctly signed, so they reach the decoder and the handlers) every
input is answered in order: the PING sent behind it comes back, or the agent ends the connection
for a protocol reason; no ERROR is ever "internal" (an unhandled exception); the agent stays up
and keeps serving an honest reader correct bytes.

Default: a fast run for CI (derandomized). NIXL_FUZZ_LONG=1: many more examples, random seeds.

Not fuzzed: UCX_HELLO worker addresses that pass our format check. UCX parses a worker
address with no bounds checks, so a key holder who crafts one can crash the process; our check
(size, address format version) stops malformed input, not a crafted one (docs/threat-model.md).
"""
from __future__ import annotations

import os
import socket
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawpeer import Closed, RawPeer, dial, read_until_closed, split_frames
from xport_fixtures import agent

from transport import wire
from transport.wire import Msg

pytestmark = pytest.mark.timeout(1800)

LONG = os.environ.get("NIXL_FUZZ_LONG") == "1"
N_PRE = 4000 if LONG else 150
N_POST = 4000 if LONG else 200
KEY = b"fuzz-suite-key"
COUNT = {"pre": 0, "post": 0, "post_frames": 0, "reconnects": 0}

FUZZ_SETTINGS = dict(deadline=None, derandomize=not LONG, database=None, print_blob=True,
                     suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def target(sec):
    o, r = sec["owner"], sec["reader"]
    owner, oaddr = agent(o, "fuzz-owner", 64, 4096, seed=91, auth_key=KEY, handshake_timeout_s=2.0,
                         max_notify_count=64, max_notify_bytes=1 << 20, timeout_s=5.0)
    leases = [o.expose(owner, np.arange(8))[0], o.expose(owner, np.arange(4), writable=True)[0],
              o.expose(owner, np.arange(2), ttl_s=1.0)[0]]
    rd, _ = agent(r, "fuzz-honest", 64, 4096, auth_key=KEY)
    r.connect(rd, oaddr)
    t = {"o": o, "r": r, "owner": owner, "oaddr": oaddr, "rd": rd, "leases": leases, "peer": None}
    yield t
    if t["peer"] is not None:
        t["peer"].close()
    print(f"\nfuzz inputs: {COUNT['pre']} pre-auth connections, {COUNT['post']} post-auth examples "
          f"({COUNT['post_frames']} signed frames, {COUNT['reconnects']} reconnects)")


def _honest_read(t, salt):
    src = np.random.default_rng(salt).permutation(64)[:16]
    lid, _, _ = t["o"].expose(t["owner"], src)
    t["r"].fill(t["rd"])
    t["r"].read(t["rd"], t["oaddr"], np.arange(16), lid, timeout=20)
    assert t["r"].bad_blocks(t["rd"], np.arange(16), src, 91) == 0


# ---------------------------------------------------------------------------------- strategies
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 64), max_value=(1 << 64) - 1),
                    st.floats(allow_nan=True), st.text(max_size=40), st.binary(max_size=64))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=5),
                                                   st.dictionaries(st.one_of(st.text(max_size=10), st.integers()),
                                                                   c, max_size=5)), max_leaves=12)


def _pack(obj) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


@st.composite
def field_value(draw, name: str, leases: list[str]):
    """Mostly plausible values for our schema's fields, sometimes anything at all."""
    if draw(st.integers(0, 5)) == 0:
        return draw(values)
    if name == "lease":
        return draw(st.sampled_from(leases + ["", "0" * 32, "x" * 70000]))
    if name in ("xid", "tag", "slot", "pid", "chunk", "nbytes"):
        return draw(st.one_of(st.integers(0, 10), st.sampled_from([4096, 8192, 32768, 1 << 30, (1 << 63) - 1,
                                                                  1 << 24, -1, 1 << 63])))
    if name == "ranges":
        return draw(st.one_of(st.none(), st.binary(max_size=64),
                              st.lists(st.tuples(st.integers(-5, 1 << 40), st.integers(-5, 1 << 16)), min_size=1,
                                       max_size=6).map(lambda rs: np.array(rs, "<i8").tobytes())))
    if name == "path":
        return draw(st.sampled_from(["cma", "ucx", "ipc", "", "CMA", "x" * 100]))
    if name in ("notify", "payload", "mac", "iov", "table", "instance", "nonce"):
        return draw(st.one_of(st.none(), st.binary(max_size=128), st.just(b"\0" * 70000)))
    if name in ("ttl", "hold_ms", "expires_in"):
        return draw(st.sampled_from([0.0, -1.0, 1e-9, 5.0, 600.0, 1e300, float("inf"), float("nan"), 3]))
    if name in ("reason", "code", "message", "name", "host", "field"):
        return draw(st.text(max_size=50))
    if name in ("paths", "ipc"):
        return draw(st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=4))
    if name == "compat":
        return draw(st.dictionaries(st.text(max_size=8), scalars, max_size=4))
    if name == "by_owner":
        return draw(st.booleans())
    return draw(values)


@st.composite
def frame_body(draw, leases: list[str], exclude=()):
    """A msgpack frame body: usually [version, type, rid, {schema fields}], bent in every way."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(min_size=1, max_size=256))
    if kind == 1:
        body = _pack(draw(values))
        return body if body else b"\xc1"
    mtype = draw(st.sampled_from([m for m in Msg if m not in exclude]))
    fields = {k: draw(field_value(k, leases)) for k in wire.SCHEMAS[mtype]}
    if draw(st.integers(0, 7)) == 0 and fields:
        fields.pop(draw(st.sampled_from(sorted(fields))))
    if draw(st.integers(0, 7)) == 0:
        fields[draw(st.text(max_size=8))] = draw(scalars)
    version = wire.PROTOCOL_VERSION if draw(st.integers(0, 9)) else draw(st.integers(-2, 300))
    mvalue = mtype.value if draw(st.integers(0, 9)) else draw(st.text(max_size=12))
    rid = draw(st.one_of(st.integers(0, 1000), st.sampled_from([-1, 1 << 63, 1 << 64, True])))
    body = _pack([version, mvalue, rid, fields])
    return body if body else b"\xc1"


# ---------------------------------------------------------------------------------- pre-auth
def _check_preauth_reply(data: bytes, sent: bytes) -> None:
    frames, tail = split_frames(data)
    assert tail == b"", f"a partial frame of {len(tail)} bytes came back"
    assert len(frames) <= 2 and len(data) < 4096, (len(frames), len(data))
    for body in frames:
        f = wire.decode(body, 1 << 16)
        assert f.type in (Msg.HELLO_ACK, Msg.ERROR), f
        if f.type is Msg.ERROR:
            assert f.body["code"] != "internal", f
            raw = (f.body["message"] + str(f.body["field"])).encode()   # the texts, not our framing
            for i in range(0, max(0, len(sent) - 12), 3):
                piece = sent[i:i + 12]
                if len(set(piece)) > 6:
                    assert piece not in raw, f"sender bytes {piece!r} echoed in {f}"


@settings(max_examples=N_PRE, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_control_port_before_auth(target, data):
    leases = target["leases"]
    frames = data.draw(st.lists(frame_body(leases), min_size=1, max_size=3))
    mode = data.draw(st.integers(0, 3))
    if mode == 0:
        sent = b"".join(struct.pack("<I", len(b)) + b for b in frames)
    elif mode == 1:   # a header that lies about its length
        b = frames[0]
        sent = struct.pack("<I", data.draw(st.integers(0, (1 << 32) - 1))) + b
    elif mode == 2:   # raw bytes
        sent = data.draw(st.binary(min_size=1, max_size=8192))
    else:             # cut anywhere
        whole = b"".join(struct.pack("<I", len(b)) + b for b in frames)
        sent = whole[:data.draw(st.integers(1, len(whole)))]
    s = dial(target["oaddr"])
    try:
        s.sendall(sent)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    reply, closed = read_until_closed(s, 10)
    s.close()
    COUNT["pre"] += 1
    assert closed, "an unauthenticated connection stayed open after its peer's EOF"
    _check_preauth_reply(reply, sent)


def test_after_preauth_fuzz_the_agent_serves(target):
    assert target["o"].alive()
    _honest_read(target, 1)


# ---------------------------------------------------------------------------------- post-auth
def _peer(t) -> RawPeer:
    if t["peer"] is None:
        t["peer"] = RawPeer(t["oaddr"], f"fuzzer-{COUNT['reconnects']}", KEY).handshake()
        COUNT["reconnects"] += 1
    return t["peer"]


@settings(max_examples=N_POST, **FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_control_port_after_auth(target, data):
    leases = target["leases"]
    bodies = data.draw(st.lists(frame_body(leases, exclude=(Msg.UCX_HELLO,)), min_size=1, max_size=3))
    p = _peer(target)
    COUNT["post"] += 1
    try:
        for b in bodies:
            p.send_body(b)
            COUNT["post_frames"] += 1
        rid = p.next_rid()
        p.send(Msg.PING, rid)
        while True:
            f = p.recv(15)
            if f.type is Msg.ERROR:
                assert f.body["code"] != "internal", f"an input raised inside the agent: {f.body}"
            if f.type is Msg.PONG and f.rid == rid:
                break
    except Closed:
        target["peer"] = None     # the agent ended the connection (over-limit frame, ...): fine
    except TimeoutError:
        raise AssertionError("the agent neither answered the PING behind the input nor closed") from None
    finally:
        if target["peer"] is not None and len(p.pending) > 64:
            p.pending.clear()


def test_after_postauth_fuzz_the_agent_serves(target):
    assert target["o"].alive()
    _honest_read(target, 2)
    snap = target["o"].stats(target["owner"])
    assert snap["handshake_failures"] >= 1
