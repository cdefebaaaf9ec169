"""Direct lanes (transport/lane.py): small same-host reads from an ordinary thread run on that
thread over their own connection; bytes, notifications and lease checks are those of the normal
path, and a read that is not answered quickly is finished by the loop instead of blocking."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from transport import Agent, AgentConfig, Descs, LeaseRejected

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pair():
    a = Agent("lane-owner", AgentConfig(auth_key=b"k"))
    b = Agent("lane-reader", AgentConfig(auth_key=b"k"))
    yield a, b
    b.close()
    a.close()


def test_small_reads_take_the_lane_with_the_same_checks(pair):
    a, b = pair
    rng = np.random.default_rng(3)
    src = rng.integers(0, 255, (256, 4096), dtype=np.uint8)
    dst = np.zeros_like(src)
    ra, rb = a.register(src), b.register(dst)
    got = []
    ev = threading.Event()
    a.on_notify(lambda peer, payload: (got.append(payload), ev.set() if len(got) == 20 else None))
    peer = b.connect(a.address)
    for i in range(20):
        ids = rng.permutation(256)[:8]
        lease = a.expose(Descs.from_blocks(ra, ids, 4096))
        b.read(peer, Descs.from_blocks(rb, np.arange(8), 4096), lease.id, notify=b"n%d" % i).wait(10)
        assert np.array_equal(dst[:8], src[ids])
    assert len(b._lanes._all) == 1, "reads after the first should have used one lane"
    assert ev.wait(10) and sorted(got) == sorted(b"n%d" % i for i in range(20))
    other = a.expose(Descs.from_blocks(ra, [1], 4096), peer="somebody-else")
    with pytest.raises(LeaseRejected):
        b.read(peer, Descs.from_blocks(rb, [0], 4096), other.id).wait(10)
    assert b.snapshot()["paths"].get("cma") == 20


def test_each_thread_has_its_own_lane(pair):
    a, b = pair
    src = np.arange(64 * 4096, dtype=np.uint8).reshape(64, 4096)
    ra = a.register(src)
    lease = a.expose(Descs.from_blocks(ra, np.arange(64), 4096), ttl_s=60)
    peer = b.connect(a.address)
    errors = []

    def worker(k: int) -> None:
        dst = np.zeros((64, 4096), np.uint8)
        rb = b.register(dst)
        try:
            for _ in range(10):
                b.read(peer, Descs.from_blocks(rb, np.arange(64), 4096), lease.id).wait(10)
                assert np.array_equal(dst, src)
        except BaseException as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors
    assert 1 <= len(b._lanes._all) <= 3
