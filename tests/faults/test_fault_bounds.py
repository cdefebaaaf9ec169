"""Deadlines are the transfer's own, and queues are bounded (issue 8, item 8).

- `Transfer.wait(t)` raises the transfer's own error when the transfer failed first (its
  deadline, at its real time), and says "not finished after t" only when `t` passed first; the
  old transport re-wrapped a 5 s deadline as "not finished after 20s".
- Notifications queue up to `max_notify_count` / `max_notify_bytes`: `notify()` then gets Busy,
  and payloads riding on reads are dropped and counted; the owner's memory stays bounded (the
  old transport grew by 446 MiB for 24 x 8 MiB notifications).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from procinfo import rss_mib, status_kb
from rawpeer import RawServer
from xport_fixtures import agent, close_nodes, start_nodes
from xport_helpers import RemoteError, wait_until

pytestmark = pytest.mark.timeout(300)
MIB = 1 << 20


@pytest.fixture(scope="module")
def nodes():
    n = start_nodes({"b-owner": {"transports": "shm"}, "b-reader": {"transports": "shm"},
                     "b-fresh-owner": {"transports": "shm"}})
    yield n
    close_nodes(n)


def test_wait_reports_the_transfers_own_deadline(nodes):
    """An owner that accepts the request and never answers: a 2 s read fails at 2 s with its
    own deadline error, whatever the caller's wait() timeout."""
    silent = RawServer("silent-owner", None, paths=["cma"])      # answers nothing but PING
    try:
        r = nodes["b-reader"]
        rd, _ = agent(r, "waiter", 16, 4096, timeout_s=30.0)
        r.connect(rd, silent.address)
        tid = r.read(rd, silent.address, [0, 1], "a" * 32, timeout=2.0, wait=False)
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as ei:
            r.wait(tid, 20)
        took = time.monotonic() - t0
        assert ei.value.type == "TransferTimeout", ei.value
        assert "deadline" in ei.value.message and "2.0s" in ei.value.message, ei.value
        assert "not finished after" not in ei.value.message
        assert took < 4.5, f"a 2 s deadline was reported after {took:.1f}s"
        # a wait shorter than the deadline says so, and the transfer goes on to its own end
        tid = r.read(rd, silent.address, [0, 1], "b" * 32, timeout=3.0, wait=False)
        with pytest.raises(RemoteError) as ei:
            r.wait(tid, 0.5)
        assert "not finished after 0.5s" in ei.value.message
        assert not r.done(tid)
        with pytest.raises(RemoteError) as ei:
            r.wait(tid, 20)
        assert "deadline" in ei.value.message and "3.0s" in ei.value.message, ei.value
        # cancel: its own typed error at once
        tid = r.read(rd, silent.address, [0, 1], "c" * 32, timeout=30.0, wait=False)
        r.cancel(tid)
        with pytest.raises(RemoteError) as ei:
            r.wait(tid, 10)
        assert ei.value.type == "TransferCancelled", ei.value
        # the owner was told about each one it was asked for
        assert sum(1 for f in silent.frames if f.type.value == "xfer_abort") >= 2
    finally:
        silent.close()


def test_notification_bounds(nodes):
    o, r = nodes["b-owner"], nodes["b-reader"]
    owner, oaddr = agent(o, "inbox-owner", 64, 4096, seed=3, max_notify_count=4, max_notify_bytes=1 * MIB)
    rd, _ = agent(r, "notifier", 64, 4096)
    r.connect(rd, oaddr)
    for i in range(4):
        r.notify(rd, oaddr, b"n%d" % i)
    with pytest.raises(RemoteError) as ei:                   # the count bound
        r.notify(rd, oaddr, b"n4")
    assert ei.value.type == "Busy", ei.value
    # a payload riding on a read is dropped and counted; the read itself succeeds
    lid, _, _ = o.expose(owner, [1, 2])
    r.read(rd, oaddr, [0, 1], lid, notify=b"riding-on-a-read")
    assert r.bad_blocks(rd, [0, 1], [1, 2], 3) == 0
    # (the reader is woken before its XFER_DONE, which carries the payload, reaches the owner)
    wait_until(lambda: o.stats(owner)["notifications_dropped"] == 1, 10, what="payload dropped and counted")
    got = o.notifs(owner)
    assert [p for _, p in got] == [b"n0", b"n1", b"n2", b"n3"]
    # drained: room again; now the byte bound
    r.notify(rd, oaddr, b"x" * (600 << 10))
    with pytest.raises(RemoteError) as ei:
        r.notify(rd, oaddr, b"y" * (600 << 10))
    assert ei.value.type == "Busy"
    r.read(rd, oaddr, [0, 1], lid, notify=b"z" * (600 << 10))
    wait_until(lambda: o.stats(owner)["notifications_dropped"] == 2, 10, what="payload dropped and counted")
    assert [len(p) for _, p in o.notifs(owner)] == [600 << 10]
    r.read(rd, oaddr, [0, 1], lid, notify=b"after-drain")     # room again: delivered
    assert wait_until(lambda: o.notifs(owner), 10, what="delivered") == [(rd, b"after-drain")]


def test_notification_flood_keeps_memory_bounded(nodes):
    """64 x 4 MiB notifications (256 MiB) at an owner that keeps at most 8 MiB: all but two are
    refused with Busy, and the owner's resident memory (and its peak) grows by far less than
    what was sent."""
    o, r = nodes["b-fresh-owner"], nodes["b-reader"]
    owner, oaddr = agent(o, "flooded", 16, 4096, max_notify_bytes=8 * MIB)
    rd, _ = agent(r, "flooder", 16, 4096)
    r.connect(rd, oaddr)
    rss0, hwm0 = rss_mib(o.pid), status_kb(o.pid, "VmHWM") / 1024
    busy = 0
    for i in range(64):
        try:
            r.notify(rd, oaddr, bytes([i]) * (4 * MIB))
        except RemoteError as e:
            assert e.type == "Busy", e
            busy += 1
    assert busy == 62
    grew, peak = rss_mib(o.pid) - rss0, status_kb(o.pid, "VmHWM") / 1024 - hwm0
    print(f"\nnotification flood: 256 MiB sent, 62 refused; owner RSS +{grew:.1f} MiB, peak +{peak:.1f} MiB")
    assert grew < 96 and peak < 128, f"owner grew by {grew:.0f} MiB (peak +{peak:.0f} MiB) for 256 MiB sent"
    kept = o.notifs(owner)
    assert [len(p) for _, p in kept] == [4 * MIB, 4 * MIB]
    assert o.stats(owner)["notifications_dropped"] == 0   # refused (Busy), not dropped
    np.testing.assert_array_equal(np.frombuffer(kept[1][1][:16], np.uint8), np.full(16, 1, np.uint8))
