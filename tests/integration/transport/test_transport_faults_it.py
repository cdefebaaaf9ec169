"""Faults between real processes: authentication, protocol version, compatibility, rejected
lease requests, peers killed (SIGKILL) in the
middle of a transfer, and reconnecting after an orderly close."""
from __future__ import annotations

import time

import numpy as np
import pytest
from procinfo import busy_cores
from xport_helpers import Node, RemoteError, wait_until

from transport import wire

pytestmark = pytest.mark.timeout(120)

DEADLINE_S = 15.0   # transfer deadline (AgentConfig.timeout_s) of the agents that face a dead peer


@pytest.fixture(scope="module")
def spares(cluster):
    """Extra node processes, started together: a protocol-v2 node and victims to kill."""
    nodes = {
        "proto": Node("shm", protocol_version=wire.PROTOCOL_VERSION + 1, label="proto-v2"),
        "victim-owner-shm": Node("shm", label="victim-owner-shm"),
        "victim-reader-shm": Node("shm", label="victim-reader-shm"),
        "victim-owner-tcp": Node("tcp", label="victim-owner-tcp"),
        "victim-reader-tcp": Node("tcp", label="victim-reader-tcp"),
        "quiet-owner-shm": Node("shm", label="quiet-owner-shm"),
        "victim-reader2-shm": Node("shm", label="victim-reader2-shm"),
    }
    try:
        for n in nodes.values():
            n.wait_ready()
        yield nodes
    finally:
        for n in nodes.values():
            n.close()


def good_read(owner_node, owner, reader_node, reader, oaddr, n=32, seed=7):
    """The owner still serves: a fresh lease is read correctly."""
    src = np.random.default_rng(n).permutation(64)[:n]
    lid, _, _ = owner_node.expose(owner, src)
    reader_node.fill(reader)
    reader_node.read(reader, oaddr, np.arange(n), lid, timeout=30)
    assert reader_node.bad_blocks(reader, np.arange(n), src, seed) == 0


# ----------------------------------------------------------------------------- auth
def test_auth_success_and_failure(cluster, agents):
    owner_node, reader_node = cluster["shm"]
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=7, auth_key=b"right key")
    good, _ = agents(reader_node, "good", 64, 4096, auth_key=b"right key")
    wrong, _ = agents(reader_node, "wrong", 64, 4096, auth_key=b"wrong key")
    nokey, _ = agents(reader_node, "nokey", 64, 4096)
    assert reader_node.connect(good, oaddr)[0] == owner
    good_read(owner_node, owner, reader_node, good, oaddr)
    for name in (wrong, nokey):
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            reader_node.connect(name, oaddr, timeout=10.0)
        assert ei.value.type == "Unauthorized", ei.value
        assert time.monotonic() - t0 < 10
    wait_until(lambda: owner_node.stats(owner)["handshake_failures"] >= 2, 15, what="server counted both failures")
    assert owner_node.peer_names(owner) == [good]
    assert reader_node.stats(wrong)["handshake_failures"] == 1
    # the owner keeps serving the authenticated peer
    good_read(owner_node, owner, reader_node, good, oaddr, n=40)
    # the reader is woken before its XFER_DONE (which the owner counts) has arrived
    wait_until(lambda: owner_node.stats(owner)["transfers_out"] == 2, 10, what="owner counted both reads")


def test_new_client_after_failed_auth(cluster, agents):
    """Regression: a client that rejects the server's MAC closes at once (BYE); that BYE used to
    reach the server after its endpoint had failed, and ucxx handed it to the next accepted
    connection, whose handshake then failed with "expected auth, got bye"."""
    o, r = cluster["tcp"]
    oaddr = o.call("agent", "auth-owner", 64, 4096, 7, auth_key=b"k", timeout_s=5.0)
    for i in range(2):
        r.call("agent", f"auth-bad{i}", 64, 4096, None, auth_key=b"bad", timeout_s=5.0)
        with pytest.raises(RemoteError) as ei:
            r.connect(f"auth-bad{i}", oaddr, timeout=5.0)
        assert ei.value.type == "Unauthorized"
        r.call("agent", f"auth-good{i}", 64, 4096, None, auth_key=b"k", timeout_s=5.0)
        r.connect(f"auth-good{i}", oaddr, timeout=5.0)     # fails: stale BYE / timeout


def test_keyed_client_rejects_keyless_server(cluster, agents):
    owner_node, reader_node = cluster["tcp"]
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=7)
    client, _ = agents(reader_node, "client", 64, 4096, auth_key=b"k")
    with pytest.raises(RemoteError) as ei:
        reader_node.connect(client, oaddr, timeout=10.0)
    assert ei.value.type == "Unauthorized"
    plain, _ = agents(reader_node, "plain", 64, 4096)
    reader_node.connect(plain, oaddr)
    good_read(owner_node, owner, reader_node, plain, oaddr)


# ----------------------------------------------------------------------------- version / compat
def test_wrong_protocol_version(cluster, spares, agents):
    owner_node, reader_node = cluster["shm"]
    v2 = spares["proto"]
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=7)
    new, naddr = agents(v2, "v2", 64, 4096, seed=7)
    with pytest.raises(RemoteError) as ei:          # a v2 client meets a v1 server
        v2.connect(new, oaddr, timeout=10.0)
    assert ei.value.type == "ProtocolMismatch", ei.value
    wait_until(lambda: owner_node.stats(owner)["handshake_failures"] >= 1, 15, what="server counted it")
    old, _ = agents(reader_node, "v1", 64, 4096)
    with pytest.raises(RemoteError) as ei:          # a v1 client meets a v2 server
        reader_node.connect(old, naddr, timeout=10.0)
    assert ei.value.type == "ProtocolMismatch", ei.value
    reader_node.connect(old, oaddr)                 # the v1 server keeps serving
    good_read(owner_node, owner, reader_node, old, oaddr)


@pytest.mark.parametrize("client_compat,field", [
    ({"model": "m", "dtype": "fp16", "block_size": 16}, "dtype"),
    ({"model": "m", "dtype": "bf16"}, "block_size"),
    ({"model": "m", "dtype": "bf16", "block_size": 16, "tp_size": 2}, "tp_size"),
    ({"model": "other", "dtype": "fp8", "block_size": 16}, "dtype"),   # first differing key, sorted
])
def test_wrong_compat(cluster, agents, client_compat, field):
    owner_node, reader_node = cluster["shm"]
    compat = {"model": "m", "dtype": "bf16", "block_size": 16}
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=7, compat=compat)
    bad, _ = agents(reader_node, "bad", 64, 4096, compat=client_compat)
    with pytest.raises(RemoteError) as ei:
        reader_node.connect(bad, oaddr, timeout=10.0)
    assert ei.value.type == "CompatMismatch" and ei.value.field == field, ei.value
    assert field in ei.value.message
    wait_until(lambda: owner_node.stats(owner)["handshake_failures"] >= 1, 15, what="server counted it")
    ok, _ = agents(reader_node, "ok", 64, 4096, compat=dict(compat))
    reader_node.connect(ok, oaddr)
    good_read(owner_node, owner, reader_node, ok, oaddr)


# ----------------------------------------------------------------------------- lease requests
def test_rejected_lease_requests(cluster, agents):
    owner_node, reader_node = cluster["tcp"]
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=7, sweep_interval_s=0.1)
    reader, _ = agents(reader_node, "reader", 64, 4096, same_host_copy=False)
    reader_node.connect(reader, oaddr)

    def rejected(lid, nblocks=8):
        with pytest.raises(RemoteError) as ei:
            reader_node.read(reader, oaddr, np.arange(nblocks), lid, timeout=10)
        assert ei.value.type == "LeaseRejected", ei.value
        return ei.value.code

    assert rejected("0123456789abcdef" * 2) == "no_such_lease"
    assert rejected("") == "no_such_lease"
    lid, _, _ = owner_node.expose(owner, np.arange(8))
    assert rejected(lid, 7) == "size_mismatch"
    assert rejected(lid, 9) == "size_mismatch"
    other, _, _ = owner_node.expose(owner, np.arange(8), peer="somebody-else")
    assert rejected(other) == "not_allowed"
    short, _, _ = owner_node.expose(owner, np.arange(8), ttl_s=0.3)
    time.sleep(0.8)
    assert rejected(short) in ("lease_expired", "no_such_lease")
    assert owner_node.stats(owner)["requests_rejected"] == 6
    reader_node.read(reader, oaddr, np.arange(8), lid)      # the right request still works
    assert reader_node.bad_blocks(reader, np.arange(8), np.arange(8), 7) == 0
    mine, _, _ = owner_node.expose(owner, np.arange(8), peer=reader)
    reader_node.read(reader, oaddr, np.arange(8, 16), mine)


# ----------------------------------------------------------------------------- hostile messages
# ----------------------------------------------------------------------------- peers killed
def _slow_owner(node):
    """4096 x 4 KiB blocks sent in 4 KiB chunks: a read of all of them takes a while."""
    return dict(pool_blocks=4096, block_bytes=4096, seed=9, chunk_bytes=4096, staging_bytes=8192,
                timeout_s=DEADLINE_S)


@pytest.mark.parametrize("pair", ["shm", "tcp"])
def test_owner_killed_mid_read(cluster, spares, agents, pair):
    victim = spares[f"victim-owner-{pair}"]
    owner_node, reader_node = cluster[pair]
    vowner, vaddr = agents(victim, "victim-owner", **_slow_owner(victim))
    reader, _ = agents(reader_node, "survivor", 4096, 4096, same_host_copy=False, timeout_s=DEADLINE_S)
    reader_node.connect(reader, vaddr)
    lid, _, _ = victim.expose(vowner, np.random.default_rng(1).permutation(4096))
    tid = reader_node.read(reader, vaddr, np.arange(4096), lid, wait=False)
    wait_until(lambda: reader_node.zero_blocks(reader, [0]) == 0, 30, 0.01, "first block landed")
    victim.stop_signal()
    time.sleep(0.2)
    assert not reader_node.done(tid), "transfer finished before the owner could be killed"
    victim.kill()
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        reader_node.wait(tid, DEADLINE_S + 30)
    took = time.monotonic() - t0
    assert ei.value.type in ("PeerLost", "TransferTimeout"), ei.value
    assert took < DEADLINE_S + 10, f"survivor noticed the dead owner only after {took:.1f}s"
    assert reader_node.stats(reader)["transfers_failed"] == 1
    # the survivor still works with a new peer
    owner, oaddr = agents(owner_node, "new-owner", 64, 4096, seed=7)
    reader_node.connect(reader, oaddr)
    good_read(owner_node, owner, reader_node, reader, oaddr)
    # ... and the dead peer is reported as such
    with pytest.raises(RemoteError) as ei:
        reader_node.read(reader, vaddr, np.arange(8), lid, timeout=5)
    assert ei.value.type in ("PeerLost", "TransferTimeout")


@pytest.mark.parametrize("pair", ["shm", "tcp"])
def test_reader_killed_mid_read(cluster, spares, agents, pair):
    victim = spares[f"victim-reader-{pair}"]
    owner_node, reader_node = cluster[pair]
    owner, oaddr = agents(owner_node, "survivor-owner", **_slow_owner(owner_node))
    vreader, _ = agents(victim, "victim-reader", 4096, 4096, same_host_copy=False, timeout_s=DEADLINE_S)
    victim.connect(vreader, oaddr)
    lid, _, _ = owner_node.expose(owner, np.random.default_rng(2).permutation(4096))
    victim.read(vreader, oaddr, np.arange(4096), lid, wait=False)
    wait_until(lambda: victim.zero_blocks(vreader, [0]) == 0, 30, 0.01, "first block landed")
    victim.stop_signal()
    before = owner_node.stats(owner)
    # the owner ends the lease while the transfer still reads it: quarantined, not freed
    assert owner_node.release(owner, lid)
    time.sleep(0.3)
    assert lid not in owner_node.freed(owner), "lease handed back while a transfer still used it"
    victim.kill()
    wait_until(lambda: vreader not in owner_node.peer_names(owner), 15, what="dead peer dropped")
    t0 = time.monotonic()
    # once the data path lets go, the blocks come back: promptly, since the peer is known dead
    freed = wait_until(lambda: owner_node.freed(owner), DEADLINE_S + 15, what="lease freed after the kill")
    assert freed == [lid]
    took = time.monotonic() - t0
    assert took < 8.0, f"lease came back {took:.1f}s after the dead peer was dropped"
    after = owner_node.stats(owner)
    assert after["transfers_failed"] + after["transfers_out"] == before["transfers_failed"] + before["transfers_out"] + 1
    # the owner still serves a new peer
    reader, _ = agents(reader_node, "new-reader", 64, 4096, same_host_copy=False)
    reader_node.connect(reader, oaddr)
    src = np.arange(100, 132)
    lid2, _, _ = owner_node.expose(owner, src)
    reader_node.read(reader, oaddr, np.arange(32), lid2, timeout=30)
    assert reader_node.bad_blocks(reader, np.arange(32), src, 9) == 0


def _busy_cores(pid: int, secs: float) -> float:
    """CPU cores the process kept busy over the next `secs` seconds (all its threads)."""
    return busy_cores([pid], secs)[pid]

def test_reader_killed_mid_read_of_4096_chunks(spares, agents):
    """4096 one-block chunks (contiguous each; staged, as every send on an endpoint with UCX
    peer error handling is): the owner keeps only a window of them posted, so a reader that
    dies mid-read leaves few UCX requests behind; the lease comes back and the owner's process
    goes quiet (when every chunk was posted at once, zero-copy, UCX spun a core forever)."""
    owner_node, victim = spares["quiet-owner-shm"], spares["victim-reader2-shm"]
    owner, oaddr = agents(owner_node, "owner", **_slow_owner(owner_node))
    vreader, _ = agents(victim, "victim", 4096, 4096, same_host_copy=False, timeout_s=DEADLINE_S)
    victim.connect(vreader, oaddr)
    lid, _, _ = owner_node.expose(owner, np.random.default_rng(5).permutation(4096))
    victim.read(vreader, oaddr, np.arange(4096), lid, wait=False)
    wait_until(lambda: victim.zero_blocks(vreader, [0]) == 0, 30, 0.01, "first block landed")
    victim.kill()
    assert owner_node.release(owner, lid)
    assert wait_until(lambda: owner_node.freed(owner), DEADLINE_S + 15, what="lease freed") == [lid]
    time.sleep(1.0)
    busy = _busy_cores(owner_node.pid, 3.0)
    assert busy < 0.3, f"the owner's process kept {busy:.2f} cores busy after its reader died"


# ----------------------------------------------------------------------------- reconnect
def test_reconnect_after_close(cluster):
    o, r = cluster["shm"]
    for i in range(2):
        oaddr = o.call("agent", f"re-own{i}", 16, 4096, 1)
        r.call("agent", f"re-rd{i}", 16, 4096, None, timeout_s=15.0)
        r.connect(f"re-rd{i}", oaddr, timeout=15.0)
        lid, _, _ = o.expose(f"re-own{i}", np.arange(4))
        r.read(f"re-rd{i}", oaddr, np.arange(4), lid, timeout=15.0)
        r.call("close", f"re-rd{i}")
        o.call("close", f"re-own{i}")
