"""Real UCX transfers between separate OS processes on loopback: random block sets
(property-based), contiguous and scattered, tcp and shared memory (and the same-host copy path),
notifications, leases (expiry, renew, release), writes, cancel and the async API."""
from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from xport_helpers import RemoteError, wait_until

pytestmark = pytest.mark.timeout(120)

OWNER_BLOCKS, BB = 1024, 8192
LINKS = {  # link -> (node pair, reader's same_host_copy)
    "tcp": ("tcp", False),
    "shm": ("shm", False),
    "cma": ("shm", True),
}


def setup_link(cluster, agents, link, **owner_cfg):
    pair, shc = LINKS[link]
    owner_node, reader_node = cluster[pair]
    owner, oaddr = agents(owner_node, "owner", OWNER_BLOCKS, BB, seed=11, **owner_cfg)
    return owner_node, reader_node, owner, oaddr, shc


# ----------------------------------------------------------------------------- random block sets
@pytest.mark.parametrize("link", list(LINKS))
def test_random_block_sets(cluster, agents, link):
    owner_node, reader_node, owner, oaddr, shc = setup_link(cluster, agents, link)
    # readers with different chunk sizes and block sizes (8 KiB source blocks land in 4 KiB blocks)
    readers = []
    for chunk, rbb in ((16 << 10, 8192), (256 << 10, 4096), (8 << 20, 8192)):
        name, _ = agents(reader_node, "reader", 2048, rbb, chunk_bytes=chunk, same_host_copy=shc)
        reader_node.connect(name, oaddr)
        readers.append((name, rbb))
    counter = iter(range(1 << 30))

    @settings(max_examples=4, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.data())
    def run(data):
        which = data.draw(st.integers(0, len(readers) - 1), label="reader")
        rname, rbb = readers[which]
        n = data.draw(st.integers(1, 256), label="blocks")
        shape = data.draw(st.sampled_from(["scattered", "contiguous", "duplicates"]), label="shape")
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
        if shape == "contiguous":
            s = int(rng.integers(0, OWNER_BLOCKS - n + 1))
            src = np.arange(s, s + n)
        elif shape == "duplicates":
            src = rng.integers(0, OWNER_BLOCKS, n)
        else:
            src = rng.permutation(OWNER_BLOCKS)[:n]
        per = BB // rbb
        dst = rng.permutation(2048)[:n * per] if shape != "contiguous" else np.arange(n * per)
        reader_node.fill(rname)
        lid, nbytes, _ = owner_node.expose(owner, src, ttl_s=60)
        assert nbytes == n * BB
        i = next(counter)
        reader_node.read(rname, oaddr, dst, lid, notify=f"req-{i}".encode(), timeout=60)
        assert reader_node.bad_blocks(rname, dst, src, 11, src_block_bytes=BB) == 0
        rest = np.setdiff1d(np.arange(2048), dst)
        assert reader_node.zero_blocks(rname, rest) == len(rest), "bytes landed outside the destination"
        got = wait_until(lambda: owner_node.notifs(owner), 10, what="read notification")
        assert got == [(rname, f"req-{i}".encode())]
        assert owner_node.release(owner, lid)
        assert lid in wait_until(lambda: owner_node.freed(owner), 10, what="freed lease")

    run()
    st_ = owner_node.stats(owner)
    assert st_["transfers_failed"] == 0 and st_["requests_rejected"] == 0


@pytest.mark.parametrize("link", list(LINKS))
def test_large_contiguous_and_scattered(cluster, agents, link):
    """8 MiB leases: one contiguous run (zero-copy chunks) and a fully scattered permutation."""
    pair, shc = LINKS[link]
    owner_node, reader_node = cluster[pair]
    owner, oaddr = agents(owner_node, "owner", 512, 16384, seed=5)
    reader, _ = agents(reader_node, "reader", 512, 16384, chunk_bytes=1 << 20, same_host_copy=shc)
    reader_node.connect(reader, oaddr)
    for src, dst in [(np.arange(512), np.arange(512)),
                     (np.random.default_rng(1).permutation(512), np.random.default_rng(2).permutation(512))]:
        reader_node.fill(reader)
        lid, nbytes, _ = owner_node.expose(owner, src)
        assert nbytes == 8 << 20
        reader_node.read(reader, oaddr, dst, lid, timeout=60)
        assert reader_node.bad_blocks(reader, dst, src, 5) == 0
    assert reader_node.stats(reader)["bytes_in"] == 16 << 20


# ----------------------------------------------------------------------------- notifications
def test_notifications_both_ways(cluster, agents):
    owner_node, reader_node = cluster["shm"]
    owner, oaddr = agents(owner_node, "owner", 16, 4096, seed=1)
    reader, _ = agents(reader_node, "reader", 16, 4096)
    peer_name, _ = reader_node.connect(reader, oaddr)
    assert peer_name == owner
    reader_node.notify(reader, oaddr, b"hello owner")
    reader_node.notify(reader, oaddr, b"")
    got = wait_until(lambda: owner_node.notifs(owner), 10, what="notification")
    if len(got) < 2:
        got += wait_until(lambda: owner_node.notifs(owner), 10, what="second notification")
    assert got == [(reader, b"hello owner"), (reader, b"")]
    assert owner_node.notifs(owner) == []   # drained
    # the owner answers over the connection the reader opened
    owner_node.notify(owner, reader, b"hello reader")
    assert wait_until(lambda: reader_node.notifs(reader), 10) == [(owner, b"hello reader")]
    assert reader in owner_node.peer_names(owner)


# ----------------------------------------------------------------------------- leases
def test_lease_expiry(cluster, agents):
    owner_node, reader_node = cluster["shm"]
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=3, sweep_interval_s=0.1)
    reader, _ = agents(reader_node, "reader", 64, 4096, same_host_copy=False)
    reader_node.connect(reader, oaddr)
    lid, _, expires_at = owner_node.expose(owner, np.arange(8), ttl_s=1.0)
    assert expires_at == pytest.approx(time.time() + 1.0, abs=2.0)
    assert lid in wait_until(lambda: owner_node.freed(owner), 10, what="expired lease freed")
    with pytest.raises(RemoteError) as ei:
        reader_node.read(reader, oaddr, np.arange(8), lid)
    assert ei.value.type == "LeaseRejected" and ei.value.code in ("lease_expired", "no_such_lease")
    with pytest.raises(RemoteError) as ei:
        reader_node.renew(reader, oaddr, lid, 10.0)
    assert ei.value.type == "LeaseRejected"
    assert owner_node.stats(owner)["leases_expired"] >= 1


def test_lease_renew_keeps_it_alive(cluster, agents):
    owner_node, reader_node = cluster["shm"]
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=3, sweep_interval_s=0.1, max_ttl_s=8.0)
    reader, _ = agents(reader_node, "reader", 64, 4096, same_host_copy=False)
    reader_node.connect(reader, oaddr)
    lid, _, _ = owner_node.expose(owner, np.arange(10, 20), ttl_s=3.0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5.0:      # well past the first ttl
        left = reader_node.renew(reader, oaddr, lid, 4.0)
        assert 2.0 < left <= 4.1
        time.sleep(0.8)
        assert lid not in owner_node.freed(owner)
    reader_node.read(reader, oaddr, np.arange(10), lid)
    assert reader_node.bad_blocks(reader, np.arange(10), np.arange(10, 20), 3) == 0
    with pytest.raises(RemoteError) as ei:       # beyond the owner's max_ttl_s
        reader_node.renew(reader, oaddr, lid, 60.0)
    assert ei.value.type == "LeaseRejected" and ei.value.code == "not_allowed"
    with pytest.raises(RemoteError) as ei:
        reader_node.renew(reader, oaddr, "0" * 32, 1.0)
    assert ei.value.type == "LeaseRejected" and ei.value.code == "no_such_lease"
    # without renewals it expires
    assert lid in wait_until(lambda: owner_node.freed(owner), 10, what="lease expiry after renewals stop")


def test_lease_release(cluster, agents):
    owner_node, reader_node = cluster["tcp"]
    owner, oaddr = agents(owner_node, "owner", 64, 4096, seed=3)
    reader, _ = agents(reader_node, "reader", 64, 4096, same_host_copy=False)
    reader_node.connect(reader, oaddr)
    lid, _, _ = owner_node.expose(owner, np.arange(4))
    reader_node.read(reader, oaddr, np.arange(4), lid)       # a lease may be read more than once
    reader_node.read(reader, oaddr, np.arange(4, 8), lid)
    assert lid not in owner_node.freed(owner)
    assert owner_node.release(owner, lid) is True
    assert owner_node.release(owner, lid) is False
    assert owner_node.freed(owner) == [lid]
    with pytest.raises(RemoteError) as ei:
        reader_node.read(reader, oaddr, np.arange(4), lid)
    assert ei.value.type == "LeaseRejected"


def slow_pair(cluster, agents, pair="shm", blocks=4096):
    """An owner whose sends go in 4 KiB chunks, so reading `blocks` 4 KiB blocks takes a while."""
    owner_node, reader_node = cluster[pair]
    owner, oaddr = agents(owner_node, "slow-owner", blocks, 4096, seed=9, chunk_bytes=4096,
                          staging_bytes=8192, timeout_s=60.0)
    reader, _ = agents(reader_node, "reader", blocks, 4096, same_host_copy=False, timeout_s=60.0)
    reader_node.connect(reader, oaddr)
    return owner_node, reader_node, owner, oaddr, reader


def test_release_during_read_is_quarantined(cluster, agents):
    """A lease released while a transfer reads it is handed back only after the transfer ends."""
    owner_node, reader_node, owner, oaddr, reader = slow_pair(cluster, agents)
    ids = np.random.default_rng(3).permutation(4096)
    lid, _, _ = owner_node.expose(owner, ids)
    tid = reader_node.read(reader, oaddr, np.arange(4096), lid, wait=False)
    wait_until(lambda: reader_node.zero_blocks(reader, [0]) == 0, 30, 0.01, "first block landed")
    reader_node.stop_signal()          # freeze the reader mid-transfer (SIGSTOP)
    try:
        out_before = owner_node.stats(owner)["transfers_out"]
        assert owner_node.release(owner, lid)
        time.sleep(0.5)
        assert lid not in owner_node.freed(owner), "lease handed back while a transfer still reads it"
        assert owner_node.stats(owner)["transfers_out"] == out_before, "transfer finished before SIGSTOP"
    finally:
        reader_node.cont_signal()
    try:
        reader_node.wait(tid, 90)
    except RemoteError as e:       # the owner may refuse to confirm a read of a released lease
        assert e.type == "LeaseRejected", e
    else:
        assert reader_node.bad_blocks(reader, np.arange(4096), ids, 9) == 0
    assert lid in wait_until(lambda: owner_node.freed(owner), 20, what="freed after the transfer")


# ----------------------------------------------------------------------------- write
@pytest.mark.parametrize("pair", ["shm", "tcp"])
def test_write_into_writable_lease(cluster, agents, pair):
    owner_node, writer_node = cluster[pair]
    owner, oaddr = agents(owner_node, "owner", 512, 8192)
    writer, _ = agents(writer_node, "writer", 512, 8192, seed=21, chunk_bytes=64 << 10)
    writer_node.connect(writer, oaddr)
    dst = np.random.default_rng(5).permutation(512)[:300]
    src = np.random.default_rng(6).permutation(512)[:300]
    lid, _, _ = owner_node.expose(owner, dst, writable=True)
    writer_node.write(writer, oaddr, src, lid, notify=b"written")
    assert owner_node.bad_blocks(owner, dst, src, 21) == 0
    rest = np.setdiff1d(np.arange(512), dst)
    assert owner_node.zero_blocks(owner, rest) == len(rest)
    assert wait_until(lambda: owner_node.notifs(owner), 10) == [(writer, b"written")]
    # (the owner books the write just after confirming it)
    wait_until(lambda: owner_node.stats(owner)["bytes_in"] == 300 * 8192, 10, what="owner's stats")


def test_write_into_read_only_lease_is_rejected(cluster, agents):
    owner_node, writer_node = cluster["shm"]
    owner, oaddr = agents(owner_node, "owner", 64, 8192, seed=4)
    writer, _ = agents(writer_node, "writer", 64, 8192, seed=22)
    writer_node.connect(writer, oaddr)
    lid, _, _ = owner_node.expose(owner, np.arange(16), writable=False)
    with pytest.raises(RemoteError) as ei:
        writer_node.write(writer, oaddr, np.arange(16), lid)
    assert ei.value.type == "LeaseRejected" and ei.value.code == "not_allowed"
    assert owner_node.bad_blocks(owner, np.arange(64), np.arange(64), 4) == 0   # untouched
    wl, _, _ = owner_node.expose(owner, np.arange(16), writable=True)
    with pytest.raises(RemoteError) as ei:                                    # wrong size
        writer_node.write(writer, oaddr, np.arange(15), wl)
    assert ei.value.type == "LeaseRejected" and ei.value.code == "size_mismatch"
    assert owner_node.stats(owner)["requests_rejected"] == 2


# ----------------------------------------------------------------------------- cancel / async
def test_cancel_transfer(cluster, agents):
    owner_node, reader_node, owner, oaddr, reader = slow_pair(cluster, agents)
    ids = np.arange(4096)[::-1].copy()
    lid, _, _ = owner_node.expose(owner, ids)
    tid = reader_node.read(reader, oaddr, np.arange(4096), lid, wait=False)
    wait_until(lambda: reader_node.zero_blocks(reader, [0]) == 0, 30, 0.01, "first block landed")
    owner_node.stop_signal()           # the owner stalls (SIGSTOP): the transfer cannot finish by itself
    try:
        assert not reader_node.done(tid)
        t0 = time.monotonic()
        reader_node.cancel(tid)
        with pytest.raises(RemoteError) as ei:
            reader_node.wait(tid, 30)
        assert ei.value.type == "TransferCancelled"
        assert time.monotonic() - t0 < 15
    finally:
        owner_node.cont_signal()
    # the owner's side ends (its eager sends may all have completed before the abort arrived, so
    # it may count a success) and the lease stays usable
    wait_until(lambda: sum(owner_node.stats(owner)[k] for k in ("transfers_out", "transfers_failed")) >= 1,
               30, what="owner's side of the cancelled transfer ended")
    reader_node.fill(reader)
    reader_node.read(reader, oaddr, np.arange(4096), lid, timeout=90, wait_timeout=90)
    assert reader_node.bad_blocks(reader, np.arange(4096), ids, 9) == 0
    assert owner_node.release(owner, lid)
    assert lid in wait_until(lambda: owner_node.freed(owner), 10)


def test_async_api(cluster, agents):
    owner_node, reader_node = cluster["shm"]
    owner, oaddr = agents(owner_node, "owner", 256, 8192, seed=31)
    reader, _ = agents(reader_node, "reader", 256, 8192)
    src = np.random.default_rng(8).permutation(256)[:100]
    lid, _, _ = owner_node.expose(owner, src, ttl_s=20.0)
    peer, done, err, left = reader_node.async_read(reader, oaddr, np.arange(100), lid, notify=b"async",
                                                   renew_ttl=60.0)
    assert peer == owner and done and err == "None"
    assert 50.0 < left <= 60.1
    assert reader_node.bad_blocks(reader, np.arange(100), src, 31) == 0
    assert wait_until(lambda: owner_node.notifs(owner), 10) == [(reader, b"async")]


def test_stalled_owner_times_out(cluster, agents):
    """An owner that stops answering (SIGSTOP) mid-transfer: the read fails with TransferTimeout
    at its deadline, not later; once the owner runs again, the same lease reads correctly."""
    owner_node, reader_node, owner, oaddr, reader = slow_pair(cluster, agents)
    ids = np.random.default_rng(4).permutation(4096)
    lid, _, _ = owner_node.expose(owner, ids)
    tid = reader_node.read(reader, oaddr, np.arange(4096), lid, timeout=3.0, wait=False)
    wait_until(lambda: reader_node.zero_blocks(reader, [0]) == 0, 30, 0.01, "first block landed")
    owner_node.stop_signal()
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            reader_node.wait(tid, 30)
        took = time.monotonic() - t0
        assert ei.value.type == "TransferTimeout", ei.value
        assert took < 3.0 + 10.0, f"deadline of 3 s enforced only after {took:.1f}s"
    finally:
        owner_node.cont_signal()
    wait_until(lambda: sum(owner_node.stats(owner)[k] for k in ("transfers_out", "transfers_failed")) >= 1,
               30, what="owner's side of the timed-out transfer ended")
    reader_node.fill(reader)
    reader_node.read(reader, oaddr, np.arange(4096), lid, timeout=90, wait_timeout=90)
    assert reader_node.bad_blocks(reader, np.arange(4096), ids, 9) == 0
