"""A failure inside the UCX data path that is not one of our typed errors (a plan that cannot be
built, an endpoint UCX cannot open) still ends the transfer at once with a typed error on the
reader, and the owner still drops its hold on the lease. Before the fix both sides' data-path
tasks died with the raw exception: the reader's transfer never finished (past its own deadline,
`wait(30)` said "not finished after 30s") and the owner's lease was never handed back."""
from __future__ import annotations

import time

import numpy as np
import pytest
from xport_fixtures import agent, close_nodes, start_nodes
from xport_helpers import RemoteError, wait_until

pytestmark = pytest.mark.timeout(240)

MIB = 1 << 20


@pytest.fixture(scope="module")
def pair():
    nodes = start_nodes({"dp-owner": {"transports": "shm"}, "dp-reader": {"transports": "shm"}})
    yield nodes
    close_nodes(nodes)


def test_unplannable_ucx_transfer_fails_at_once_and_frees_the_lease(pair):
    """Runs of odd byte lengths at odd offsets: 1-byte units, more than the planner's bound
    (MAX_UNITS), so StreamPlan raises ValueError on both sides."""
    o, r = pair["dp-owner"], pair["dp-reader"]
    n = (33 * MIB) + 1   # > 2**25 one-byte units
    owner, oaddr = agent(o, "owner", 9, 4 * MIB, seed=1, timeout_s=10.0)
    rd, _ = agent(r, "reader", 9, 4 * MIB, same_host_copy=False, timeout_s=10.0)
    r.connect(rd, oaddr)
    lid = o.expose_runs(owner, [1], [n])
    t0 = time.monotonic()
    with pytest.raises(RemoteError) as ei:
        r.read_runs(rd, oaddr, [3], [n], [False], lid, timeout=5.0)
    took = time.monotonic() - t0
    assert "not finished after" not in ei.value.message, ei.value
    assert ei.value.type in ("BadMessage", "PeerLost", "TransferError", "TransferTimeout"), ei.value
    assert took < 12.0, f"the transfer failed only after {took:.1f}s (its deadline: 5s)"
    assert o.release(owner, lid)
    assert wait_until(lambda: o.freed(owner), 15, what="lease handed back") == [lid]
    # both still work
    lid2, _, _ = o.expose(owner, [2, 3])
    r.read(rd, oaddr, [0, 1], lid2, timeout=20)
    assert r.bad_blocks(rd, [0, 1], [2, 3], 1) == 0
