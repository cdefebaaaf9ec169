"""Transfers and names belong to sessions (issue 8, items 5 and 6).

Cross-peer transfer control: a third, authenticated peer that sends XFER_DONE / XFER_ABORT /
WRITE_DONE naming another peer's transfer ids (ids count from 1 on every connection, so they are
trivial to guess) cannot finish or abort them: the message is looked up among its own session's
transfers only, rejected (an ERROR back when it asked for a reply) and logged, and the victim's
transfer completes with correct bytes. The old transport keyed waiters by transfer id alone: a
third peer's XFER_ABORT failed another peer's write, a forged WRITE_DONE made a write "succeed".

Names: without a key anyone may claim any name; with a shared key any key holder may; with
`peer_keys` only the holder of that name's key. One name belongs to one live peer process: a
newcomer from another process under a live name is refused and the first session's in-flight
reads go on; a restarted peer (old process dead, or no longer answering) gets its name back.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from rawpeer import RawPeer
from xport_fixtures import agent, close_nodes, start_nodes
from xport_helpers import RemoteError, pattern, wait_until

from transport.errors import TransferError
from transport.wire import Msg

pytestmark = pytest.mark.timeout(240)
KEY = b"sessions-suite-key"


@pytest.fixture(scope="module")
def victims():
    """Processes that are killed or stopped here."""
    nodes = start_nodes({"name-victim": {"transports": "shm"}, "name-hung": {"transports": "shm"}})
    yield nodes
    close_nodes(nodes)


def _attack_owner(p: RawPeer, xids) -> list:
    """XFER_DONE (asking for a reply), XFER_ABORT and WRITE_DONE for every id; returns the
    replies to the XFER_DONEs and WRITE_DONEs (a PING at the end proves everything was handled)."""
    replies = []
    for xid in xids:
        f, _ = p.request(Msg.XFER_DONE, xid=xid)
        replies.append(f)
        p.send(Msg.XFER_ABORT, xid=xid, reason="forged", by_owner=False)
        p.send(Msg.XFER_ABORT, xid=xid, reason="forged", by_owner=True)
        f, _ = p.request(Msg.WRITE_DONE, xid=xid)
        replies.append(f)
    assert p.ping() == [], "unexpected frames"
    return replies


def test_third_peer_cannot_finish_or_abort_another_peers_read(sec):
    o, v = sec["owner"], sec["reader"]
    o.capture_logs()
    owner, oaddr = agent(o, "x-owner", 2048, 16384, seed=31, auth_key=KEY)
    vic, _ = agent(v, "x-victim", 2048, 16384, auth_key=KEY)
    v.connect(vic, oaddr)
    src = np.random.default_rng(31).permutation(2048)
    lid, _, _ = o.expose(owner, src, peer=vic)
    v.install_stall("cma", after=1)   # the victim's copy is in flight: one batch landed, one waiting
    try:
        tid = v.read(vic, oaddr, np.arange(2048), lid, wait=False, timeout=60)
        wait_until(lambda: v.stalled(), 60, what="victim mid-copy")
        o.logs()
        with RawPeer(oaddr, "x-attacker", KEY).handshake() as p:
            replies = _attack_owner(p, range(1, 6))
            assert all(f.type is Msg.ERROR and f.body["code"] == "bad_message" for f in replies), replies
            # and the lease itself: exposed to the victim's name only
            f, _ = p.request(Msg.READ_REQ, xid=1, lease=lid, nbytes=2048 * 16384, ranges=None, path="cma",
                             tag=0, notify=None)
            assert f.type is Msg.ERROR and f.body["code"] == "not_allowed", f
            f, _ = p.request(Msg.RENEW, lease=lid, ttl=60.0)
            assert f.type is Msg.ERROR and f.body["code"] == "not_allowed", f
        logs = " | ".join(m for _, _, m in o.logs())
        assert "not one of this connection's" in logs, logs
        assert "ignored" in logs, logs
        # the owner still holds the lease for the victim: released now, it is not handed back
        assert o.release(owner, lid)
        assert lid not in o.freed(owner), "a forged XFER_DONE / XFER_ABORT dropped the victim's hold"
        assert not v.done(tid)
    finally:
        v.release_stall()
    v.wait(tid, 60)
    assert v.bad_blocks(vic, np.arange(2048), src, 31) == 0
    assert wait_until(lambda: o.freed(owner), 15, what="lease back after the real XFER_DONE") == [lid]


def test_third_peer_cannot_finish_or_abort_another_peers_ucx_write(sec):
    """A UCX write waits for the owner's WRITE_DONE: a forged one from a third peer (on its own
    connection to the writer) is rejected, as are forged aborts; the write completes for real."""
    o, v = sec["owner"], sec["reader"]
    owner, oaddr = agent(o, "w-owner", 256, 16384, auth_key=KEY, chunk_bytes=64 << 10, staging_bytes=256 << 10)
    vic, vaddr = agent(v, "w-victim", 257, 16384, seed=32, auth_key=KEY, same_host_copy=False)
    v.connect(vic, oaddr)
    dst = np.random.default_rng(32).permutation(256)
    wid, _, _ = o.expose(owner, dst, writable=True, peer=vic)
    v.call("read", vic, oaddr, [256], o.expose(owner, [0])[0])        # UCX link up before the stall
    o.install_stall("unpack", after=2)    # the owner is receiving: two chunks in, then it waits
    try:
        tid = v.write(vic, oaddr, np.arange(256), wid, wait=False, timeout=60)
        wait_until(lambda: o.stalled(), 60, what="owner mid-receive")
        v.capture_logs()
        v.logs()
        with RawPeer(vaddr, "w-attacker", KEY).handshake() as p:   # the attacker talks to the writer
            replies = _attack_owner(p, range(1, 8))
            assert all(f.type is Msg.ERROR and f.body["code"] == "bad_message" for f in replies), replies
        assert not v.done(tid), "a forged WRITE_DONE / XFER_ABORT ended the victim's write"
        logs = " | ".join(m for _, _, m in v.logs())
        assert "not a write of this connection" in logs, logs
    finally:
        o.release_stall()
    v.wait(tid, 60)
    ids = np.arange(256)
    got = np.frombuffer(o.pool(owner), dtype=np.uint8).reshape(256, 16384)[dst]
    assert np.array_equal(got, pattern(ids, 16384, 32)), "the write landed wrong bytes"


# ---------------------------------------------------------------------------------- names
def test_without_a_key_anyone_claims_any_name(sec):
    o = sec["owner"]
    owner, oaddr = agent(o, "nokey-owner", 16, 4096, seed=1)
    with RawPeer(oaddr, "prefill-0", None).handshake() as p:
        assert p.ping() == []
        assert "prefill-0" in o.peer_names(owner)


def test_with_a_shared_key_any_holder_claims_any_name(sec):
    o = sec["owner"]
    owner, oaddr = agent(o, "shared-owner", 16, 4096, seed=1, auth_key=KEY)
    lid, _, _ = o.expose(owner, [1, 2], peer="decode-7")
    with RawPeer(oaddr, "decode-7", KEY).handshake() as p:   # not decode-7, but holds the key
        f, _ = p.request(Msg.READ_REQ, xid=1, lease=lid, nbytes=8192, ranges=None, path="cma", tag=0, notify=None)
        assert f.type is Msg.READ_ACK, f
    with pytest.raises(TransferError):
        RawPeer(oaddr, "decode-7", b"not the key").handshake()


def test_peer_keys_bind_names_to_keys(sec):
    o, r = sec["owner"], sec["reader"]
    ka, kb = b"key-of-reader-a", b"key-of-reader-b"
    a, _ = agent(r, "reader-a", 16, 4096, auth_key=ka)
    b, _ = agent(r, "reader-b", 16, 4096, auth_key=kb)
    owner, oaddr = agent(o, "pk-owner", 16, 4096, seed=3, peer_keys={a: ka, b: kb})
    lid_a, _, _ = o.expose(owner, [1, 2], peer=a)
    r.connect(a, oaddr)
    r.connect(b, oaddr)
    r.read(a, oaddr, [0, 1], lid_a)
    with pytest.raises(RemoteError) as ei:                      # b cannot read a's lease
        r.read(b, oaddr, [0, 1], lid_a)
    assert ei.value.code == "not_allowed"
    for name, key in ((b, ka), (a, kb), ("mallory", ka), ("mallory", None)):
        p = RawPeer(oaddr, name, key)
        with pytest.raises(TransferError):   # another name's key, an unlisted name: refused
            p.handshake()
        p.close()
    with RawPeer(oaddr, a + "-impostor", ka) as p:
        with pytest.raises(TransferError):
            p.handshake()


def test_live_name_is_not_taken_over_and_inflight_reads_go_on(sec):
    o, r, r2 = sec["owner"], sec["reader"], sec["reader2"]
    owner, oaddr = agent(o, "dup-owner", 2048, 16384, seed=41, auth_key=KEY)
    name = f"dup-reader-{time.monotonic_ns()}"
    r.call("agent", name, 2048, 16384, None, auth_key=KEY)
    r.connect(name, oaddr)
    src = np.random.default_rng(41).permutation(2048)
    lid, _, _ = o.expose(owner, src, peer=name)
    r.install_stall("cma", after=1)
    try:
        tid = r.read(name, oaddr, np.arange(2048), lid, wait=False, timeout=60)
        wait_until(lambda: r.stalled(), 60, what="reader mid-copy")
        # another live process under the same name, same key: refused
        r2.call("agent", name, 16, 4096, None, auth_key=KEY)
        with pytest.raises(RemoteError) as ei:
            r2.connect(name, oaddr, timeout=20)
        assert ei.value.type == "Unauthorized" and "in use" in ei.value.message, ei.value
        # the raw attacker too, with a fresh instance id
        with pytest.raises(TransferError, match="in use"):
            RawPeer(oaddr, name, KEY).handshake()
        assert o.peer_names(owner).count(name) == 1
        assert not r.done(tid)
    finally:
        r.release_stall()
    r.wait(tid, 60)
    assert r.bad_blocks(name, np.arange(2048), src, 41) == 0


def test_restarted_peer_gets_its_name_back(sec, victims):
    """The old process killed (its connection resets): the new one is admitted at once. The old
    process hung (SIGSTOP, its connection still open): admitted once the old session fails to
    answer a ping."""
    o, r2 = sec["owner"], sec["reader2"]
    owner, oaddr = agent(o, "restart-owner", 64, 4096, seed=51, auth_key=KEY)
    for label, how in (("name-victim", "kill"), ("name-hung", "stop")):
        old = victims[label]
        name = f"restarted-{how}-{time.monotonic_ns()}"
        old.call("agent", name, 64, 4096, None, auth_key=KEY)
        old.connect(name, oaddr)
        assert name in o.peer_names(owner)
        if how == "kill":
            old.kill()
        else:
            old.stop_signal()
        r2.call("agent", name, 64, 4096, None, auth_key=KEY)
        t0 = time.monotonic()
        r2.connect(name, oaddr, timeout=30)
        took = time.monotonic() - t0
        assert took < 12, f"restarted peer admitted only after {took:.1f}s"
        lid, _, _ = o.expose(owner, np.arange(8), peer=name)
        r2.read(name, oaddr, np.arange(8), lid)
        assert r2.bad_blocks(name, np.arange(8), np.arange(8), 51) == 0
        assert o.peer_names(owner).count(name) == 1
        if how == "stop":
            old.cont_signal()
            old.kill()
