"""lifecycle.ProducerBook / ConsumerBook over real transport Agents, one Agent per process."""
import multiprocessing as mp
import time

import numpy as np
import pytest

pytestmark = pytest.mark.timeout(180)

BLOCK = 4096
NB = 16


def _owner(q_out, q_in, ttl_s):
    from transport import Agent, AgentConfig, Descs
    from nixl_connectors.handoff.lifecycle import ProducerBook

    kv = (np.arange(NB * BLOCK, dtype=np.int64) % 251).astype(np.uint8)
    with Agent("owner", AgentConfig(timeout_s=10)) as a:
        book = ProducerBook(a, ttl_s=ttl_s)
        region = a.register(kv)
        held = book.hold("req-1", Descs.from_blocks(region, np.array([5, 2, 9]), BLOCK))
        assert book.hold("req-1", None) is held  # idempotent
        q_out.put((a.address, held.lease_id, held.nbytes))
        freed, t0 = [], time.monotonic()
        while not freed and time.monotonic() - t0 < 60:
            freed = book.poll()
            time.sleep(0.02)
        q_out.put([(f.request_id, f.reason.value) for f in freed])
        q_in.get(timeout=60)


def _reader(addr, lease_id, block_ids, q_out):
    from transport import Agent, AgentConfig, Descs
    from nixl_connectors.handoff.lifecycle import ConsumerBook, PendingPull

    dst = np.zeros(NB * BLOCK, dtype=np.uint8)
    with Agent("reader", AgentConfig(timeout_s=5)) as b:
        book = ConsumerBook(b, ttl_s=30.0)
        local = Descs.from_blocks(b.register(dst), np.array(block_ids), BLOCK)
        book.start(PendingPull("d-1", addr, lease_id, local, block_ids), notify=b"req-1")
        res, t0 = None, time.monotonic()
        while time.monotonic() - t0 < 30:
            r = book.poll()
            if r.done or r.failed:
                res = r
                break
            time.sleep(0.01)
        book.close()
        if res is None:
            q_out.put(("timeout", None, None))
        elif res.done:
            q_out.put(("done", dst.reshape(NB, BLOCK)[block_ids].copy(), res.done[0].nbytes))
        else:
            q_out.put(("failed", type(res.failed[0].error).__name__, list(res.failed[0].block_ids)))


def _run(ttl_s, read=True, dead_addr=False):
    ctx = mp.get_context("spawn")
    qo, qi, qr = ctx.Queue(), ctx.Queue(), ctx.Queue()
    po = ctx.Process(target=_owner, args=(qo, qi, ttl_s))
    po.start()
    try:
        addr, lease, nbytes = qo.get(timeout=60)
        rres = None
        if read:
            target = "127.0.0.1:1" if dead_addr else addr
            pr = ctx.Process(target=_reader, args=(target, lease, [0, 7, 3], qr))
            pr.start()
            rres = qr.get(timeout=90)
            pr.join(30)
        freed = qo.get(timeout=90) if not dead_addr or ttl_s < 5 else None
        return nbytes, rres, freed
    finally:
        qi.put(1)
        po.join(30)
        if po.is_alive():
            po.kill()


def test_read_then_owner_frees_as_read():
    nbytes, (state, data, n), freed = _run(ttl_s=30.0)
    assert nbytes == 3 * BLOCK and state == "done" and n == 3 * BLOCK
    src = (np.arange(NB * BLOCK, dtype=np.int64) % 251).astype(np.uint8).reshape(NB, BLOCK)
    np.testing.assert_array_equal(data, src[[5, 2, 9]])
    assert freed == [("req-1", "read")]


def test_unread_lease_expires():
    _, _, freed = _run(ttl_s=0.5, read=False)
    assert freed == [("req-1", "expired")]


def test_pull_from_dead_peer_fails_with_block_ids():
    _, (state, err, blocks), freed = _run(ttl_s=1.0, dead_addr=True)
    assert state == "failed" and blocks == [0, 7, 3]
    assert err in ("PeerLost", "TransferTimeout")
    assert freed == [("req-1", "expired")]
