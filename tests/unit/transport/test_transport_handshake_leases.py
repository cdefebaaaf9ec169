"""Handshake MACs and compat comparison, typed errors from the wire, and the lease table with a
fake clock (expiry, renew, release, quarantine while a transfer holds a reference)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from transport import Descs, handshake as hs
from transport.errors import (BadMessage, CompatMismatch, ErrorCode, LeaseRejected, PeerLost, ProtocolMismatch,
                              TransferCancelled, TransferError, TransferTimeout, Unauthorized, error_from_wire)
from transport.leases import LeaseState, LeaseTable
from transport.region import make_region

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- handshake
HELLO = {"name": "c", "instance": b"i" * 16, "nonce": b"n" * 16, "compat": {"m": 1}, "host": "h", "pid": 1,
         "chunk": 4096, "paths": ["cma"]}
ACK = {"name": "s", "instance": b"j" * 16, "nonce": b"o" * 16, "host": "h", "pid": 2, "chunk": 4096,
       "paths": ["cma"], "mac": b"whatever"}


def test_proof_without_key_is_empty():
    assert hs.proof(None, b"server", hs.transcript(HELLO, ACK)) == b""
    assert hs.frame_macs(None, b"t", client=True) is None


def test_transcript_binds_every_field_of_both_sides():
    """Channel binding: changing anything either side said (worker/host/pid/instance/compat,
    not only names and nonces) changes the transcript, so a relay cannot substitute it."""
    base = hs.transcript(HELLO, ACK)
    assert base == hs.transcript(dict(reversed(list(HELLO.items()))), ACK)  # canonical: order-free
    assert base == hs.transcript(HELLO, dict(ACK, mac=b"other"))             # the ack's own MAC is not in it
    def changed(v):
        return {str: lambda: v + "x", bytes: lambda: v + b"x", int: lambda: v + 1, dict: lambda: {"m": 2},
                list: lambda: []}[type(v)]()

    for k in HELLO:
        assert hs.transcript(dict(HELLO, **{k: changed(HELLO[k])}), ACK) != base, k
    for k in ACK:
        if k != "mac":
            assert hs.transcript(HELLO, dict(ACK, **{k: changed(ACK[k])})) != base, k
    # the two sides' messages are not interchangeable
    assert hs.transcript(ACK, HELLO) != base


def test_proofs_bind_key_role_and_transcript():
    th = hs.transcript(HELLO, ACK)
    p = hs.proof(b"k", b"server", th)
    assert len(p) == 32 and p == hs.proof(b"k", b"server", th)
    assert p != hs.proof(b"K", b"server", th)
    assert p != hs.proof(b"k", b"client", th)       # no reflection of the server's proof
    assert p != hs.proof(b"k", b"server", th[:-1] + b"x")
    assert hs.proofs_equal(p, bytes(p)) and not hs.proofs_equal(p, p[:-1] + b"\0") and hs.proofs_equal(b"", b"")


def test_frame_macs_are_per_direction():
    from transport.framing import BadMac, FrameDecoder, encode_frame

    th = hs.transcript(HELLO, ACK)
    client, server = hs.frame_macs(b"k", th, client=True), hs.frame_macs(b"k", th, client=False)
    dec_server = FrameDecoder(1 << 16)
    dec_server.mac = server
    frames = [encode_frame(b"one", client), encode_frame(b"two", client)]
    assert dec_server.feed(b"".join(frames)) == [b"one", b"two"]
    # a frame the client signed cannot be reflected back to the client
    dec_client = FrameDecoder(1 << 16)
    dec_client.mac = hs.frame_macs(b"k", th, client=True)
    with pytest.raises(BadMac):
        dec_client.feed(encode_frame(b"three", hs.frame_macs(b"k", th, client=True)))


def test_keystream_hides_and_restores():
    blob = bytes(range(200))
    enc = hs.keystream_xor(b"s" * 32, b"label", blob)
    assert enc != blob and hs.keystream_xor(b"s" * 32, b"label", enc) == blob
    assert hs.keystream_xor(b"t" * 32, b"label", enc) != blob
    assert hs.keystream_xor(None, b"label", blob) == blob


def test_nonces_are_fresh():
    a, b = hs.new_nonce(), hs.new_nonce()
    assert len(a) == hs.NONCE_BYTES and a != b


def test_compat_hash_is_order_independent():
    assert hs.compat_hash({"a": 1, "b": "x"}) == hs.compat_hash({"b": "x", "a": 1})
    assert hs.compat_hash({"a": 1}) != hs.compat_hash({"a": 2})


def test_check_compat_equal_passes():
    hs.check_compat({}, {})
    hs.check_compat({"model": "m", "tp": 2}, {"tp": 2, "model": "m"})


@pytest.mark.parametrize("mine,theirs,field", [
    ({"model": "a", "dtype": "bf16"}, {"model": "b", "dtype": "fp16"}, "dtype"),   # first in sorted order
    ({"model": "a"}, {"model": "a", "block_size": 16}, "block_size"),             # missing locally
    ({"model": "a", "tp": 2}, {"model": "a"}, "tp"),                              # missing on the peer
    ({"tp": 2}, {"tp": "2"}, "tp"),
])
def test_check_compat_names_the_first_differing_field(mine, theirs, field):
    with pytest.raises(CompatMismatch) as ei:
        hs.check_compat(mine, theirs)
    assert ei.value.field == field and field in str(ei.value)


# ----------------------------------------------------------------------------- errors
def test_every_error_is_a_transfer_error():
    for cls in (TransferTimeout, PeerLost, LeaseRejected, ProtocolMismatch, CompatMismatch, Unauthorized,
                TransferCancelled, BadMessage):
        assert issubclass(cls, TransferError)
    assert issubclass(TransferTimeout, TimeoutError)


@pytest.mark.parametrize("code,cls", [
    ("timeout", TransferTimeout), ("peer_lost", PeerLost), ("protocol", ProtocolMismatch),
    ("compat", CompatMismatch), ("unauthorized", Unauthorized), ("cancelled", TransferCancelled),
    ("bad_message", BadMessage), ("no_such_lease", LeaseRejected), ("lease_expired", LeaseRejected),
    ("not_allowed", LeaseRejected), ("size_mismatch", LeaseRejected), ("internal", TransferError),
])
def test_error_from_wire(code, cls):
    e = error_from_wire(code, "msg", "dtype")
    assert type(e) is cls and "msg" in str(e)
    assert e.code is ErrorCode(code)
    if cls is CompatMismatch:
        assert e.field == "dtype"


def test_error_from_wire_unknown_code():
    e = error_from_wire("martian", "boom")
    assert type(e) is TransferError and "martian" in str(e)


# ----------------------------------------------------------------------------- leases
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def descs(n: int = 4, bb: int = 1024) -> Descs:
    return Descs.from_blocks(make_region(np.zeros(n * bb, np.uint8)), np.arange(n), bb)


@pytest.fixture
def table():
    c = Clock()
    return LeaseTable(clock=c), c


def test_add_validation(table):
    t, _ = table
    with pytest.raises(ValueError):
        t.add(descs(), None, 0, False)
    with pytest.raises(ValueError):
        t.add(Descs.from_blocks(make_region(np.zeros(16, np.uint8)), [], 8), None, 1, False)


def test_public_lease(table):
    t, _ = table
    e = t.add(descs(4, 1024), None, 30.0, False)
    pub = t.public(e)
    assert pub.id == e.id and pub.nbytes == 4096
    assert abs(pub.expires_at - (time.time() + 30.0)) < 2.0
    assert len(e.id) >= 32 and t.add(descs(), None, 1, False).id != e.id  # unguessable, unique


def test_acquire_checks(table):
    t, c = table
    ro = t.add(descs(), "alice", 10, False)
    rw = t.add(descs(), None, 10, True)
    n = ro.descs.nbytes

    def code(lid, peer="alice", nbytes=n, write=False):
        with pytest.raises(LeaseRejected) as ei:
            t.acquire(lid, peer, nbytes, write)[0]
        return ei.value.code

    assert code("f" * 32) is ErrorCode.NO_SUCH_LEASE
    assert code(ro.id, peer="mallory") is ErrorCode.NOT_ALLOWED
    assert code(ro.id, write=True) is ErrorCode.NOT_ALLOWED
    assert code(ro.id, nbytes=n - 1) is ErrorCode.SIZE_MISMATCH
    assert code(ro.id, nbytes=n + 1024) is ErrorCode.SIZE_MISMATCH
    assert t.acquire(ro.id, "alice", n, False)[0] is ro and ro.refs == 1
    assert t.acquire(rw.id, "anyone", n, True)[0] is rw     # peer=None: any authenticated peer
    assert t.acquire(rw.id, "other", n, False)[0].refs == 2  # a writable lease can be read
    c.t += 10.0
    assert code(ro.id) is ErrorCode.LEASE_EXPIRED       # expired even before a sweep


def test_expiry_sweep_and_freed(table):
    t, c = table
    a = t.add(descs(), None, 5, False)
    b = t.add(descs(), None, 50, False)
    c.t += 4.9
    assert t.sweep() == 0 and t.drain_freed() == []
    c.t += 0.1
    assert t.sweep() == 1 and t.expired_count == 1
    assert t.drain_freed() == [a.id]
    assert t.drain_freed() == []          # drains
    assert len(t) == 1 and t.get(a.id) is None and t.get(b.id) is b
    with pytest.raises(LeaseRejected) as ei:
        t.acquire(a.id, "p", a.descs.nbytes, False)[0]
    assert ei.value.code is ErrorCode.NO_SUCH_LEASE


def test_release(table):
    t, _ = table
    a = t.add(descs(), None, 5, False)
    assert t.release(a.id) is True
    assert t.release(a.id) is False
    assert t.release("nope") is False
    assert t.drain_freed() == [a.id]
    assert t.sweep() == 0 and t.expired_count == 0


def test_quarantine_until_last_reference_drops(table):
    t, c = table
    a = t.add(descs(), None, 5, False)
    n = a.descs.nbytes
    e1 = t.acquire(a.id, "p", n, False)[0]
    e2 = t.acquire(a.id, "q", n, False)[0]
    assert t.release(a.id)
    assert a.state is LeaseState.ENDED and t.drain_freed() == []
    with pytest.raises(LeaseRejected) as ei:   # no new transfer on an ended lease
        t.acquire(a.id, "p", n, False)[0]
    assert ei.value.code is ErrorCode.LEASE_EXPIRED
    t.drop(e1)
    assert t.drain_freed() == []
    t.drop(e2)
    assert t.drain_freed() == [a.id] and a.state is LeaseState.FREED


def test_expiry_while_in_use_is_quarantined(table):
    t, c = table
    a = t.add(descs(), None, 5, False)
    e = t.acquire(a.id, "p", a.descs.nbytes, False)[0]
    c.t += 6
    assert t.sweep() == 1 and t.drain_freed() == []
    assert t.sweep() == 0                     # counted once
    t.drop(e)
    assert t.drain_freed() == [a.id]


def test_drop_of_active_lease_keeps_it(table):
    t, _ = table
    a = t.add(descs(), None, 5, False)
    t.drop(t.acquire(a.id, "p", a.descs.nbytes, False)[0])
    assert a.state is LeaseState.ACTIVE and a.refs == 0 and t.drain_freed() == []


def test_renew(table):
    t, c = table
    a = t.add(descs(), "alice", 5, False)
    c.t += 4
    assert t.renew(a.id, "alice", 10, max_ttl_s=60) == pytest.approx(10)
    c.t += 9
    assert t.sweep() == 0                                   # renewed past the original ttl
    assert t.renew(a.id, "alice", 0.5, max_ttl_s=60) == pytest.approx(1)  # never shortens
    for ttl in (0, -1, 61):
        with pytest.raises(LeaseRejected) as ei:
            t.renew(a.id, "alice", ttl, max_ttl_s=60)
        assert ei.value.code is ErrorCode.NOT_ALLOWED
    with pytest.raises(LeaseRejected) as ei:
        t.renew(a.id, "mallory", 10, max_ttl_s=60)
    assert ei.value.code is ErrorCode.NOT_ALLOWED
    with pytest.raises(LeaseRejected) as ei:
        t.renew("unknown", "alice", 10, max_ttl_s=60)
    assert ei.value.code is ErrorCode.NO_SUCH_LEASE
    c.t += 1.0
    with pytest.raises(LeaseRejected) as ei:                 # expired, not yet swept
        t.renew(a.id, "alice", 10, max_ttl_s=60)
    assert ei.value.code is ErrorCode.LEASE_EXPIRED


def test_renew_of_released_lease_in_quarantine(table):
    t, _ = table
    a = t.add(descs(), None, 5, False)
    t.acquire(a.id, "p", a.descs.nbytes, False)[0]
    t.release(a.id)
    with pytest.raises(LeaseRejected) as ei:
        t.renew(a.id, "p", 10, max_ttl_s=60)
    assert ei.value.code is ErrorCode.LEASE_EXPIRED


class LeaseMachine(RuleBasedStateMachine):
    """Random sequences of lease operations: a lease is handed back exactly once, and never while
    a transfer holds a reference."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.t = LeaseTable(clock=self.clock)
        self.leases: list[str] = []
        self.held: list = []          # entries with a reference taken
        self.freed: set[str] = set()

    @rule(ttl=st.floats(0.1, 10))
    def add(self, ttl):
        self.leases.append(self.t.add(descs(2, 256), None, ttl, False).id)

    @precondition(lambda self: self.leases)
    @rule(i=st.integers(0, 1000))
    def acquire(self, i):
        lid = self.leases[i % len(self.leases)]
        e = self.t.get(lid)
        try:
            got = self.t.acquire(lid, "p", 512, False)[0]
        except LeaseRejected:
            assert e is None or e.state is not LeaseState.ACTIVE or self.clock.t >= e.expires_mono
            return
        self.held.append(got)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 1000))
    def drop(self, i):
        self.t.drop(self.held.pop(i % len(self.held)))

    @precondition(lambda self: self.leases)
    @rule(i=st.integers(0, 1000))
    def release(self, i):
        self.t.release(self.leases[i % len(self.leases)])

    @precondition(lambda self: self.leases)
    @rule(i=st.integers(0, 1000), ttl=st.floats(0.1, 10))
    def renew(self, i, ttl):
        try:
            self.t.renew(self.leases[i % len(self.leases)], "p", ttl, 60)
        except LeaseRejected:
            pass

    @rule(dt=st.floats(0, 5))
    def tick(self, dt):
        self.clock.t += dt

    @rule()
    def sweep(self):
        self.t.sweep()

    @rule()
    def drain(self):
        out = self.t.drain_freed()
        assert len(out) == len(set(out)) and not (set(out) & self.freed)
        held_ids = {e.id for e in self.held}
        assert not (set(out) & held_ids), "lease freed while a transfer holds it"
        self.freed |= set(out)

    @invariant()
    def refs_match(self):
        for lid in self.leases:
            e = self.t.get(lid)
            if e is not None:
                assert e.refs == sum(1 for h in self.held if h.id == lid)
            else:
                assert not any(h.id == lid for h in self.held)


LeaseMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
TestLeaseMachine = LeaseMachine.TestCase
