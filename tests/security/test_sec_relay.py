"""Handshake relay (issue 8, item 4): a process without the key sits between a real reader and
the owner. It may forward the handshake (both sides then authenticate each other, through it),
but it cannot change anything either side is later trusted for (name, instance id, nonce, host
key, pid, capabilities, compat: all in the MAC'd transcript), and after authentication it cannot
inject, alter, replay or drop a frame without the connection ending. It never gets to read a
lease. The old handshake MAC'd only the nonces and names: a relay substituted its own UCX worker
address, was authenticated as the real peer and read its lease.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from rawpeer import RawPeer, Relay, frame_type, rewrite_body
from xport_fixtures import agent
from xport_helpers import RemoteError, wait_until

from transport import wire
from transport.wire import Msg

pytestmark = pytest.mark.timeout(240)
KEY = b"relay-suite-key"


@pytest.fixture(scope="module")
def owner(sec):
    o = sec["owner"]
    name, addr = agent(o, "relay-owner", 128, 4096, seed=21, auth_key=KEY, timeout_s=15.0,
                       compat={"model": "m"})
    return o, name, addr


def _reader(sec, timeout_s=15.0, **cfg):
    r = sec["reader"]
    name, _ = agent(r, "relayed", 128, 4096, auth_key=KEY, timeout_s=timeout_s, compat={"model": "m"}, **cfg)
    return r, name


def _no_session_for(o, owner, name):
    assert name not in o.peer_names(owner)


def test_transparent_relay_learns_nothing_usable(sec, owner):
    """Forwarding everything unchanged: the two real agents authenticate each other and read
    correct bytes; what the relay saw (names, nonces, MACs, the lease id) does not let it in on a
    connection of its own, not even by replaying the recorded handshake."""
    o, oname, oaddr = owner
    relay = Relay(oaddr)
    try:
        r, rd = _reader(sec)
        r.connect(rd, relay.address)
        lid, _, _ = o.expose(oname, np.arange(32), peer=rd)
        r.read(rd, relay.address, np.arange(32), lid, timeout=20)
        assert r.bad_blocks(rd, np.arange(32), np.arange(32), 21) == 0
        # the relay has seen HELLO (the reader's name, instance, pid) and the lease id ...
        c2s = relay.frames("c2s")
        hello = wire.decode(c2s[0][4:], 1 << 20)
        assert hello.type is Msg.HELLO and hello.body["name"] == rd
        assert any(lid.encode() in f for f in c2s[2:])
        # ... and with all of it, without the key, gets nothing: a new handshake under the
        # reader's identity (same instance id) fails, and so does replaying the recorded one
        b = hello.body
        p = RawPeer(oaddr, rd, None, instance=b["instance"], pid=b["pid"], host=b["host"], compat=b["compat"])
        with pytest.raises(Exception):
            p.handshake()
        p.close()
        p = RawPeer(oaddr, rd, KEY)
        p.send_bytes(c2s[0])              # the reader's own HELLO, byte for byte
        ack = p.recv()
        assert ack.type is Msg.HELLO_ACK
        p.send_bytes(c2s[1])              # its recorded AUTH: MAC'd over the old nonce
        f = p.recv()
        assert f.type is Msg.ERROR and f.body["code"] == "unauthorized", f
        p.close()
    finally:
        relay.close()


HELLO_FIELDS = {
    "name": lambda v: v + "x",
    "instance": lambda v: os.urandom(16),
    "nonce": lambda v: os.urandom(16),
    "host": lambda v: "relay-host/" + v,
    "pid": lambda v: os.getpid(),
    "chunk": lambda v: v // 2,
    "paths": lambda v: [],
    "compat": lambda v: dict(v, model="relay"),
}
ACK_FIELDS = {k: f for k, f in HELLO_FIELDS.items() if k != "compat"}


@pytest.mark.parametrize("field", sorted(HELLO_FIELDS))
def test_relay_cannot_substitute_the_readers_identity(sec, owner, field):
    o, oname, oaddr = owner

    def c2s(i, frame, signed):
        if i == 0:
            b = wire.decode(frame[4:], 1 << 20).body
            return [rewrite_body(frame, **{field: HELLO_FIELDS[field](b[field])})]
        return [frame]

    relay = Relay(oaddr, c2s=c2s)
    try:
        r, rd = _reader(sec)
        before = o.stats(oname)["handshake_failures"]
        with pytest.raises(RemoteError) as ei:
            r.connect(rd, relay.address, timeout=10)
        # the reader sees the owner's proof fail over the transcript it sent
        assert ei.value.type in ("Unauthorized", "PeerLost"), ei.value
        wait_until(lambda: o.stats(oname)["handshake_failures"] > before, 15, what="owner refused it")
        _no_session_for(o, oname, rd)
        _no_session_for(o, oname, rd + "x")
    finally:
        relay.close()


@pytest.mark.parametrize("field", sorted(ACK_FIELDS))
def test_relay_cannot_substitute_the_owners_identity(sec, owner, field):
    o, oname, oaddr = owner

    def s2c(i, frame, signed):
        if i == 0:
            b = wire.decode(frame[4:], 1 << 20).body
            return [rewrite_body(frame, **{field: ACK_FIELDS[field](b[field])})]
        return [frame]

    relay = Relay(oaddr, s2c=s2c)
    try:
        r, rd = _reader(sec)
        with pytest.raises(RemoteError) as ei:
            r.connect(rd, relay.address, timeout=10)
        assert ei.value.type in ("Unauthorized", "BadMessage"), ei.value
        _no_session_for(o, oname, rd)
    finally:
        relay.close()


# ---------------------------------------------------------------------------------- after auth
def _forged_read(lid: str, nbytes: int, mac: bytes | None) -> bytes:
    body = wire.encode(Msg.READ_REQ, 77, xid=77, lease=lid, nbytes=nbytes, ranges=None, path="cma", tag=0,
                       notify=None)
    tail = mac if mac is not None else b""
    return struct.pack("<I", len(body) + len(tail)) + body + tail


@pytest.mark.parametrize("how", ["inject-unsigned", "inject-random-mac", "alter-lease-id", "replay-notify",
                                 "drop-one", "swap-ucx-worker"])
def test_relay_cannot_touch_frames_after_auth(sec, owner, how):
    """The reader authenticates through the relay; then the relay injects, alters, replays, drops
    a frame or swaps the UCX worker address. The owner ends the connection at the first frame
    that fails its MAC; no forged request is served, the reader's read fails with a typed error
    (never wrong bytes), a notification is delivered at most once."""
    o, oname, oaddr = owner
    lid, nbytes, _ = o.expose(oname, np.arange(8, 24))
    st = {"armed": False}

    def c2s(i, frame, signed):
        if not (signed and st["armed"]):
            return [frame]
        t = frame_type(frame, True)
        if how == "inject-unsigned":
            st["armed"] = False
            return [_forged_read(lid, nbytes, None), frame]
        if how == "inject-random-mac":
            st["armed"] = False
            return [_forged_read(lid, nbytes, os.urandom(16)), frame]
        if how == "alter-lease-id" and t is Msg.READ_REQ:
            st["armed"] = False
            return [frame.replace(lid.encode(), lid[::-1].encode())]
        if how == "replay-notify" and t is Msg.NOTIFY:
            st["armed"] = False
            return [frame, frame]
        if how == "drop-one" and t is Msg.NOTIFY:
            st["armed"] = False
            return []
        if how == "swap-ucx-worker" and t is Msg.UCX_HELLO:
            st["armed"] = False
            f = wire.decode(frame[4:-16], 1 << 20)
            body = wire.encode(Msg.UCX_HELLO, f.rid, worker=bytes(reversed(f.body["worker"])))
            return [struct.pack("<I", len(body) + 16) + body + frame[-16:]]
        return [frame]

    relay = Relay(oaddr, c2s=c2s)
    try:
        # (a dropped NOTIFY is never answered: its caller gives up at the reader's timeout_s)
        r, rd = _reader(sec, timeout_s=3.0 if how == "drop-one" else 15.0, same_host_copy=(how != "swap-ucx-worker"))
        r.connect(rd, relay.address)
        out0 = o.stats(oname)["transfers_out"]
        o.notifs(oname)
        st["armed"] = True
        if how in ("replay-notify", "drop-one"):
            try:
                r.notify(rd, relay.address, b"exactly-once")
            except RemoteError as e:   # the replayed copy ended the connection before the OK
                assert e.type in ("PeerLost", "TransferTimeout"), e
        with pytest.raises(RemoteError) as ei:
            r.read(rd, relay.address, np.arange(16), lid, timeout=10, wait_timeout=30)
        assert ei.value.type in ("PeerLost", "TransferTimeout"), ei.value
        wait_until(lambda: rd not in o.peer_names(oname), 15, what="owner dropped the tampered connection")
        assert o.stats(oname)["transfers_out"] == out0, "a forged or altered request was served"
        # nothing the owner sent back to the relay answers the forged request
        for f in relay.frames("s2c"):
            for body in (f[4:], f[4:-16]):
                try:
                    fr = wire.decode(body, 1 << 24)
                except Exception:
                    continue
                assert not (fr.type is Msg.READ_ACK and fr.body["xid"] == 77), "the forged read was answered"
        got = [p for _, p in o.notifs(oname) if p == b"exactly-once"]
        assert len(got) <= 1
        # the read was never served: the reader's blocks are untouched (zeros)
        assert r.zero_blocks(rd, np.arange(16)) == 16
    finally:
        relay.close()
    # and the owner still serves the reader directly
    r.connect(rd, oaddr)
    lid2, _, _ = o.expose(oname, np.arange(16))
    r.read(rd, oaddr, np.arange(16), lid2, timeout=20)
    assert r.bad_blocks(rd, np.arange(16), np.arange(16), 21) == 0


def test_handshake_replay_to_another_agent_fails(sec, owner):
    """A recorded HELLO/AUTH of one session is useless against a second agent with the same key
    (the transcript holds both nonces and both identities)."""
    o, oname, oaddr = owner
    other, other_addr = agent(o, "relay-owner-b", 16, 4096, seed=1, auth_key=KEY, compat={"model": "m"})
    relay = Relay(oaddr)
    try:
        r, rd = _reader(sec)
        r.connect(rd, relay.address)
        c2s = relay.frames("c2s")
    finally:
        relay.close()
    p = RawPeer(other_addr, rd, KEY)
    p.send_bytes(c2s[0])
    assert p.recv().type is Msg.HELLO_ACK
    p.send_bytes(c2s[1])
    f = p.recv()
    assert f.type is Msg.ERROR and f.body["code"] == "unauthorized"
    p.close()
