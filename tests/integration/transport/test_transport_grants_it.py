"""Lease grants (transport/grants.py): a same-host re-read of a lease copies under its grant with
no round trip, and never reports the lease's bytes when the lease ended before the copy was
checked. Real agents, real process_vm_readv; the owner is a separate process where its death
or stop matters."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from transport import Agent, AgentConfig, Descs, LeaseRejected, PeerLost, TransferError
from transport import grants
from xport_helpers import Node, wait_until

pytestmark = pytest.mark.timeout(180)

BB = 4096


@pytest.fixture
def pair():
    a = Agent("grant-owner", AgentConfig(auth_key=b"k", sweep_interval_s=0.1))
    b = Agent("grant-reader", AgentConfig(auth_key=b"k", sweep_interval_s=0.1))
    yield a, b
    b.close()
    a.close()


def _setup(a, b, nblocks=16, seed=3):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 255, (256, BB), dtype=np.uint8)
    dst = np.zeros((nblocks, BB), np.uint8)
    ra, rb = a.register(src), b.register(dst)
    ids = rng.permutation(256)[:nblocks]
    return src, dst, ra, Descs.from_blocks(rb, np.arange(nblocks), BB), ids


def test_rereads_use_the_grant_and_the_owner_counts_them(pair):
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    lease = a.expose(Descs.from_blocks(ra, ids, BB))
    peer = b.connect(a.address)
    for i in range(6):
        dst[:] = 0
        b.read(peer, local, lease.id).wait(10)
        assert np.array_equal(dst, src[ids]), f"read {i}"
    st = b.snapshot()
    assert st["granted_reads"] >= 4, st   # the first read asks; later ones copy under the grant
    assert st["paths"]["cma"] == 6
    # the owner learns of them afterwards (batched: its counters lag by a sweep interval)
    wait_until(lambda: a.snapshot()["transfers_out"] == 6, 10, what="owner counted every read")
    assert a.snapshot()["granted_reads"] == st["granted_reads"]


def test_granted_read_delivers_its_notification(pair):
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    got, ev = [], threading.Event()
    a.on_notify(lambda peer, payload: (got.append(payload), ev.set() if len(got) == 5 else None))
    lease = a.expose(Descs.from_blocks(ra, ids, BB))
    peer = b.connect(a.address)
    for i in range(5):
        b.read(peer, local, lease.id, notify=b"n%d" % i).wait(10)
    assert b.snapshot()["granted_reads"] >= 3
    assert ev.wait(10) and sorted(got) == [b"n%d" % i for i in range(5)]


def test_release_ends_the_grant(pair):
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    lease = a.expose(Descs.from_blocks(ra, ids, BB))
    peer = b.connect(a.address)
    for _ in range(3):
        b.read(peer, local, lease.id).wait(10)
    granted = b.snapshot()["granted_reads"]
    assert granted >= 1
    assert a.release(lease.id)
    with pytest.raises(LeaseRejected):
        b.read(peer, local, lease.id).wait(10)
    assert b.snapshot()["granted_reads"] == granted


def test_lease_ended_during_the_copy_is_never_reported_done(pair, monkeypatch):
    """The owner ends the lease and its engine rewrites the blocks while the reader copies under
    the grant: the word check after the copy sees it, and the read goes to the owner, which
    refuses it. (The copy is the real one; the owner's actions are run inside it, so the
    interleaving is fixed, not raced.)"""
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    lease = a.expose(Descs.from_blocks(ra, ids, BB))
    peer = b.connect(a.address)
    for _ in range(2):
        b.read(peer, local, lease.id).wait(10)
    real_copy = grants.cma.copy_all
    calls = []

    def copy_then_end_lease(pid, batches, write):
        real_copy(pid, batches, write)
        calls.append(1)
        a.release(lease.id)
        src[ids] = 0xEE          # the engine reuses the blocks
    monkeypatch.setattr(grants.cma, "copy_all", copy_then_end_lease)
    before = b.snapshot()["granted_reads"]
    with pytest.raises(LeaseRejected):
        b.read(peer, local, lease.id).wait(10)
    assert calls == [1], "the read did not copy under the grant"
    assert b.snapshot()["granted_reads"] == before


def test_grant_ends_with_the_lease_ttl(pair):
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    lease = a.expose(Descs.from_blocks(ra, ids, BB), ttl_s=0.5)
    peer = b.connect(a.address)
    for _ in range(2):
        b.read(peer, local, lease.id).wait(10)
    wait_until(lambda: lease.id in a.freed_leases(), 10, what="lease expired")
    with pytest.raises(LeaseRejected):
        b.read(peer, local, lease.id).wait(10)


def test_renewed_lease_is_granted_again(pair):
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    lease = a.expose(Descs.from_blocks(ra, ids, BB), ttl_s=1.0)
    peer = b.connect(a.address)
    b.read(peer, local, lease.id).wait(10)
    b.renew(peer, lease.id, ttl_s=60.0)
    s = b._core.sessions.by_addr[peer.address]
    wait_until(lambda: s.grants.get(lease.id, local.nbytes) is None, 10, what="old grant's expiry passed")
    dst[:] = 0
    b.read(peer, local, lease.id).wait(10)      # asks the owner again: a fresh grant
    assert np.array_equal(dst, src[ids])
    n = b.snapshot()["granted_reads"]
    b.read(peer, local, lease.id).wait(10)
    assert b.snapshot()["granted_reads"] == n + 1


@pytest.mark.parametrize("side", ["owner", "reader"])
def test_grants_off_on_either_side(side):
    off = AgentConfig(auth_key=b"k", lease_grants=False)
    on = AgentConfig(auth_key=b"k")
    a = Agent("g-off-owner", off if side == "owner" else on)
    b = Agent("g-off-reader", off if side == "reader" else on)
    try:
        src, dst, ra, local, ids = _setup(a, b)
        lease = a.expose(Descs.from_blocks(ra, ids, BB))
        peer = b.connect(a.address)
        for _ in range(4):
            dst[:] = 0
            b.read(peer, local, lease.id).wait(10)
            assert np.array_equal(dst, src[ids])
        assert b.snapshot()["granted_reads"] == 0
    finally:
        b.close()
        a.close()


def test_grant_belongs_to_the_peer_it_was_given_to(pair):
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    c = Agent("grant-other", AgentConfig(auth_key=b"k"))
    try:
        lease = a.expose(Descs.from_blocks(ra, ids, BB), peer=b.name)
        peer = b.connect(a.address)
        for _ in range(3):
            b.read(peer, local, lease.id).wait(10)
        assert b.snapshot()["granted_reads"] >= 1
        cdst = np.zeros((16, BB), np.uint8)
        cpeer = c.connect(a.address)
        with pytest.raises(LeaseRejected):
            c.read(cpeer, Descs.from_blocks(c.register(cdst), np.arange(16), BB), lease.id).wait(10)
        assert not cdst.any()
    finally:
        c.close()


@pytest.mark.parametrize("grant", [[1], [0, 1, 10.0], [8, 0, 10.0], [8, 1, -1.0], [8, True, 10.0],
                                   ["8", 1, 10.0], [8, 1, 10.0, 1], [1 << 64, 1, 10.0]])
def test_malformed_grants_are_ignored(grant):
    cache = grants.GrantCache()
    iov = np.array([[4096, 64]], dtype="<u8").tobytes()
    cache.add("L", 64, iov, grant, 0.0)
    assert len(cache) == 0


def test_grant_with_iovecs_of_another_size_is_ignored():
    cache = grants.GrantCache()
    iov = np.array([[4096, 64]], dtype="<u8").tobytes()
    cache.add("L", 128, iov, [8, 1, 1e6], 0.0)
    assert len(cache) == 0


def test_board_words_change_when_leases_end_and_are_never_reused():
    class E:
        grant = None
    board = grants.GrantBoard(slots=2)
    e1, e2, e3 = E(), E(), E()
    w1, g1 = board.issue(e1)
    assert board.issue(e1) == (w1, g1)            # one grant per lease
    w2, g2 = board.issue(e2)
    assert board.issue(e3) is None                # board full: reads keep their round trip
    board.revoke(e1)
    assert board.words[(w1 - board.words.ctypes.data) // 8] == 0
    w3, g3 = board.issue(e3)                      # slot reused, new generation
    assert w3 == w1 and g3 not in (g1, g2)
    board.close()
    assert not board.words.any() and board.issue(E()) is None


# ----------------------------------------------------------------------------- owner process faults
@pytest.fixture
def owner_node():
    n = Node("shm", label="grant-owner")
    n.wait_ready()
    yield n
    n.close()


def _reader_with_grant(owner_node, nblocks=16):
    oname = "grant-proc-owner"
    oaddr = owner_node.call("agent", oname, 64, BB, 7, auth_key=b"k")
    ids = np.random.default_rng(1).permutation(64)[:nblocks]
    lid, _, _ = owner_node.expose(oname, ids, ttl_s=120.0)
    b = Agent("grant-proc-reader", AgentConfig(auth_key=b"k", timeout_s=5.0))
    dst = np.zeros((nblocks, BB), np.uint8)
    local = Descs.from_blocks(b.register(dst), np.arange(nblocks), BB)
    peer = b.connect(oaddr)
    for _ in range(3):
        b.read(peer, local, lid).wait(10)
    assert b.snapshot()["granted_reads"] >= 1
    # the owner's grant words are mapped (grant_words.py): word checks are loads, not syscalls
    assert b._core.sessions.by_addr[peer.address].words.mapped() == 1
    return b, peer, local, lid, dst, ids, oname


def test_owner_killed_granted_read_fails(owner_node):
    b, peer, local, lid, dst, ids, _ = _reader_with_grant(owner_node)
    try:
        granted = b.snapshot()["granted_reads"]
        owner_node.kill()
        with pytest.raises((PeerLost, TransferError)):
            b.read(peer, local, lid).wait(15)
        assert b.snapshot()["granted_reads"] == granted
    finally:
        b.close()


def test_stopped_owner_still_serves_granted_rereads(owner_node):
    """A SIGSTOPped owner cannot answer, but a live grant needs no answer: the bytes are right,
    and the report reaches the owner once it runs again."""
    b, peer, local, lid, dst, ids, oname = _reader_with_grant(owner_node)
    try:
        expect = dst.copy()
        owner_node.stop_signal()
        try:
            dst[:] = 0
            b.read(peer, local, lid, notify=b"while-stopped").wait(10)
            assert np.array_equal(dst, expect)
        finally:
            owner_node.cont_signal()
        seen: list[bytes] = []
        wait_until(lambda: seen.extend(p for _, p in owner_node.notifs(oname)) or b"while-stopped" in seen,
                   15, what="notification after SIGCONT")
    finally:
        b.close()


# ----------------------------------------------------------------------------- grants sent ahead
def _session(agent, peer):
    return agent._core.sessions.by_addr[peer.address]


def _wait_grant(b, peer, lease_id, nbytes):
    s = _session(b, peer)
    wait_until(lambda: s.grants.get(lease_id, nbytes) is not None, 10, what="the grant sent ahead arrived")


def test_first_read_of_a_new_lease_uses_the_grant_sent_ahead(pair):
    a, b = pair
    src, dst, ra, local, ids = _setup(a, b)
    peer = b.connect(a.address)
    first = a.expose(Descs.from_blocks(ra, ids, BB))
    for _ in range(2):    # a one-sided reader now (and this thread has its lane)
        b.read(peer, local, first.id).wait(10)
    ids2 = np.random.default_rng(9).permutation(256)[:16]
    lease = a.expose(Descs.from_blocks(ra, ids2, BB))
    _wait_grant(b, peer, lease.id, local.nbytes)
    n = b.snapshot()["granted_reads"]
    b.read(peer, local, lease.id).wait(10)
    assert np.array_equal(dst, src[ids2])
    assert b.snapshot()["granted_reads"] == n + 1


@pytest.mark.parametrize("case", ["other-peer", "open-lease-over-limit", "writable"])
def test_grants_are_sent_ahead_only_where_the_lease_allows(case):
    cfg = AgentConfig(auth_key=b"k", grant_push_sessions=0 if case == "open-lease-over-limit" else 4)
    a, b = Agent("push-owner", cfg), Agent("push-reader", AgentConfig(auth_key=b"k"))
    try:
        src, dst, ra, local, ids = _setup(a, b)
        peer = b.connect(a.address)
        warm = a.expose(Descs.from_blocks(ra, ids, BB))
        b.read(peer, local, warm.id).wait(10)
        d = Descs.from_blocks(ra, ids, BB)
        held = {"other-peer": lambda: a.expose(d, peer="someone-else"),
                "open-lease-over-limit": lambda: a.expose(d),
                "writable": lambda: a.expose(d, peer=b.name, writable=True)}[case]()
        marker = a.expose(d, peer=b.name)   # sent ahead after `held` on the same connection
        _wait_grant(b, peer, marker.id, local.nbytes)
        assert _session(b, peer).grants.get(held.id, local.nbytes) is None
    finally:
        b.close()
        a.close()
