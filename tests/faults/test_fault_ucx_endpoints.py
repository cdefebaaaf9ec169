"""Many concurrent UCX transfers between the same two processes, repeatedly; and one of them
cancelled. Each UCX transfer borrows its own data endpoint to the peer's worker.

Found by the load run: the owner's and reader's DataEndpoints kept at most 4 idle endpoints and
closed the surplus after a burst of concurrent transfers; closing one endpoint disturbed other
endpoints between the same two workers, and transfers of the next burst failed with
"UCXXCanceledError: Request canceled" (3 runs of 3, second burst).

Still open (xfail): a cancelled (or failed) UCX transfer aborts its endpoint, and that can
cancel requests of other transfers between the same two processes ("Request canceled"); with
surplus endpoints also closed (before the fix), later bursts degraded to transfers hanging until
their deadline.
"""
from __future__ import annotations

import numpy as np
import pytest
from xport_fixtures import agent, close_nodes, start_nodes

pytestmark = pytest.mark.timeout(600)
CONC, PER, BB, OWNER_BLOCKS = 32, 64, 16384, 4096


@pytest.fixture(scope="module")
def pair():
    n = start_nodes({"ep-owner": {"transports": "shm"}, "ep-reader": {"transports": "shm"}})
    yield n
    close_nodes(n)


def _jobs(o, owner, rd, rng):
    srcs = [rng.choice(OWNER_BLOCKS, PER, replace=False) for _ in range(CONC)]
    lids = o.expose_many(owner, [s.tolist() for s in srcs], peer=rd)
    local = rng.permutation(CONC * PER).reshape(CONC, PER)
    return [(local[j].tolist(), lids[j], srcs[j].tolist()) for j in range(CONC)]


def _setup(pair, tag, timeout_s):
    o, r = pair["ep-owner"], pair["ep-reader"]
    owner, oaddr = agent(o, f"ep-owner-{tag}", OWNER_BLOCKS, BB, seed=121, timeout_s=timeout_s)
    rd, _ = agent(r, f"ep-reader-{tag}", CONC * PER, BB, same_host_copy=False, timeout_s=timeout_s)
    r.connect(rd, oaddr)
    return o, r, owner, oaddr, rd


def test_bursts_of_concurrent_ucx_transfers(pair):
    o, r, owner, oaddr, rd = _setup(pair, "bursts", 60.0)
    rng = np.random.default_rng(1)
    for burst in range(4):
        dt, nbytes, bad = r.read_many(rd, oaddr, _jobs(o, owner, rd, rng), timeout=60.0, verify_seed=121)
        assert bad == 0, f"burst {burst}: {bad} wrong blocks"


@pytest.mark.xfail(strict=False, reason="aborting one UCX data endpoint (cancelled or failed transfer) can "
                   "cancel requests of other endpoints between the same two workers (intermittent: in a "
                   "6-burst probe, 1-3 of 24 concurrent transfers failed with 'Request canceled' in each "
                   "burst after the first; this 4-burst test passes now and then)")
def test_cancelled_ucx_transfers_leave_the_pairs_other_transfers_alone(pair):
    """Bursts of 32 concurrent reads with every 4th cancelled right away: the other 24 of each
    burst must complete with correct bytes."""
    o, r, owner, oaddr, rd = _setup(pair, "cancel", 8.0)
    rng = np.random.default_rng(2)
    failed = []
    for burst in range(4):
        cancelled, others, bad = r.read_many_cancel_some(rd, oaddr, _jobs(o, owner, rd, rng), 4, timeout=8.0,
                                                          verify_seed=121)
        assert bad == 0, "wrong bytes in a completed transfer"
        failed += [e for e in others if e]
    assert not failed, f"{len(failed)} transfers failed beside cancelled ones: {failed[:2]}"
