"""The async twins, from a user's own asyncio loop (pytest-asyncio): connect, read (awaiting the
Transfer and the `aread` twin), write, renew, notify, call, close; errors arrive typed."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from transport import Agent, AgentConfig, CallFailed, Descs, LeaseRejected

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


@pytest.fixture
def agents():
    a = Agent("async-owner", AgentConfig(auth_key=b"k", direct_lanes=False))
    b = Agent("async-reader", AgentConfig(auth_key=b"k"))
    yield a, b
    b.close()
    a.close()


async def test_async_twins_from_a_users_loop(agents):
    a, b = agents
    src = np.random.default_rng(1).integers(0, 255, (64, 4096), dtype=np.uint8)
    dst = np.zeros_like(src)
    ra, rb = a.register(src), b.register(dst)
    got = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    a.on_notify(lambda peer, payload: loop.call_soon_threadsafe(got.set_result, (peer, payload)))
    a.on_call(lambda peer, payload: payload[::-1])

    peer = await b.aconnect(a.address)
    lease = a.expose(Descs.from_blocks(ra, [5, 6, 7], 4096))
    t = b.read(peer, Descs.from_blocks(rb, [0, 1, 2], 4096), lease.id, notify=b"done")
    await asyncio.wait_for(t, 30)
    assert np.array_equal(dst[:3], src[5:8]) and t.done() and t.error is None
    assert await asyncio.wait_for(got, 10) == ("async-reader", b"done")
    await b.aread(peer, Descs.from_blocks(rb, [3], 4096), lease.id, ranges=[[4096, 4096]])
    assert np.array_equal(dst[3], src[6])

    wl = a.expose(Descs.from_blocks(ra, [40, 41], 4096), writable=True)
    await b.awrite(peer, Descs.from_blocks(rb, [0, 1], 4096), wl.id)
    assert np.array_equal(src[40:42], dst[0:2])

    left = await b.arenew(peer, lease.id, ttl_s=50.0)
    assert 0 < left <= 50.0
    assert await b.acall(peer, b"abc") == b"cba"
    a.on_call(None)
    with pytest.raises(CallFailed):
        await b.acall(peer, b"x")
    a.on_notify(None)
    await b.anotify(peer, b"queued")
    for _ in range(100):
        if a.notifications():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the notification never arrived")
    with pytest.raises(LeaseRejected):
        await b.aread(peer, Descs.from_blocks(rb, [0], 4096), "no-such-lease")
    await b.aclose()
