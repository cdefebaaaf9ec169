"""UcxKvConnectorWorker: records, metadata consumed once, what get_finished reports and when,
and that nothing raises into the engine (in-memory agents)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nixl_connectors.trtllm.metadata import ConnectorMetadata, LoadSpec, RankLease, SaveSpec
from nixl_connectors.trtllm.records import Phase
from trtllm_unit_helpers import TPB, llm_args, make_worker, settings

KEY = "salt-id:00000000000000aa"


@pytest.fixture
def pair(net):
    """A context worker holding KEY's blocks (2, 3) and a generation worker pointed at it."""
    ctx = make_worker(llm_args(), settings(role="context"), fill=1.5)
    gen = make_worker(llm_args(), settings(role="generation", context_agents=[ctx.agent.address]))
    ctx.bind_connector_meta(ConnectorMetadata(1, saves=(SaveSpec(5, KEY, (2, 3), 2 * TPB),)))
    ctx.start_load_kv(None)
    assert ctx.get_finished([5], []) == ([], [])
    lease_id, nbytes = next(iter(ctx.agent.leases)), 2 * ctx._layout.block_bytes
    yield ctx, gen, RankLease(0, lease_id, nbytes)
    gen.close()
    ctx.close()


def load_meta(seq, lease, rid=9, blocks=(6, 7), **kw):
    return ConnectorMetadata(seq, loads=(LoadSpec(rid, KEY, tuple(blocks), 2 * TPB, (lease,)),), **kw)


def test_pull_reports_loaded_once_and_context_gets_its_blocks_back(pair):
    ctx, gen, lease = pair
    gen.bind_connector_meta(load_meta(1, lease))
    gen.start_load_kv(None)
    assert gen.get_finished([], [9]) == ([], [9])
    assert torch.equal(gen.pool[6:8], ctx.pool[2:4])
    assert gen.get_finished([], []) == ([], [])              # reported once
    assert ctx.get_finished([], []) == ([5], [])             # read notification -> lease freed
    gen.bind_connector_meta(ConnectorMetadata(2, forget=(9,)))
    gen.start_load_kv(None)
    assert gen.record(9) is None


def test_each_metadata_is_consumed_exactly_once(pair):
    ctx, gen, lease = pair
    gen.agent.hold_reads = True
    meta = load_meta(1, lease)
    gen.bind_connector_meta(meta)
    gen.start_load_kv(None)
    gen.start_load_kv(None)                  # main leaves the old metadata bound ...
    gen.bind_connector_meta(meta)            # ... or binds the same object again
    gen.start_load_kv(None)
    gen.get_finished([], [9])
    assert len(gen.agent.transfers) == 1
    assert gen.record(9).phase is Phase.PULLING


def test_a_request_aborted_mid_load_is_reported_only_after_its_pull_settled(pair):
    ctx, gen, lease = pair
    gen.agent.hold_reads = True
    gen.bind_connector_meta(load_meta(1, lease))
    gen.start_load_kv(None)
    assert gen.get_finished([9], [9]) == ([], [])            # cancelled, but the pull is in flight
    (t,) = gen.agent.transfers
    assert t.cancelled
    assert gen.get_finished([], []) == ([], [])              # not settled yet: blocks stay
    t.fail(RuntimeError("cancelled"))                        # the data path let go
    # both the saving entry (request_finished returned True) and the loading entry settle
    assert gen.get_finished([], []) == ([9], [9])
    assert gen.record(9) is None
    assert ctx.get_finished([], []) == ([5], [])             # the reader released the lease


def test_a_failed_pull_parks_the_request_until_it_ends(pair):
    ctx, gen, lease = pair
    ctx.agent.leases.clear()                                  # the lease is gone
    gen.bind_connector_meta(load_meta(1, lease))
    gen.start_load_kv(None)
    for _ in range(3):
        assert gen.get_finished([], [9] if _ == 0 else []) == ([], [])   # never "loaded"
    assert gen.record(9).phase is Phase.PARKED and gen.failed_pulls == 1
    gen.bind_connector_meta(ConnectorMetadata(2, abandoned=(9,)))     # ended without request_finished
    gen.start_load_kv(None)
    assert gen.get_finished([], []) == ([], [9])                       # the loading entry clears
    assert gen.record(9) is None


def test_a_failed_claim_parks_and_settles_on_request_finished(pair):
    _, gen, _ = pair
    gen.bind_connector_meta(ConnectorMetadata(1, loads=(LoadSpec(9, KEY, (), 8, (), "too few blocks"),)))
    gen.start_load_kv(None)
    assert gen.get_finished([], [9]) == ([], [])
    assert gen.get_finished([9], []) == ([9], [9])


def test_context_request_dropped_before_it_finished_holds_nothing(net):
    ctx = make_worker(llm_args(), settings(role="context"))
    ctx.bind_connector_meta(ConnectorMetadata(1, saves=(SaveSpec(5, KEY, (2, 3), 8),)))
    ctx.start_load_kv(None)
    ctx.bind_connector_meta(ConnectorMetadata(2, dropped=(5,)))
    ctx.start_load_kv(None)
    assert ctx.get_finished([], []) == ([], []) and ctx.record(5) is None
    assert not ctx.agent.leases
    ctx.close()


def test_context_finish_before_its_spec_waits_for_the_spec(net):
    ctx = make_worker(llm_args(), settings(role="context"))
    assert ctx.get_finished([5], []) == ([], [])
    ctx.bind_connector_meta(ConnectorMetadata(1, saves=(SaveSpec(5, KEY, (2, 3), 8),)))
    ctx.start_load_kv(None)
    assert len(ctx.agent.leases) == 1
    ctx.close()


def test_get_finished_never_raises_into_the_engine(pair, monkeypatch):
    _, gen, lease = pair
    monkeypatch.setattr(gen._gen, "advance", lambda: 1 / 0)
    assert gen.get_finished([], [1]) == ([], [])
    assert gen.connector_errors == 1
    monkeypatch.setattr(gen, "_consume_metadata", lambda: 1 / 0)
    gen.start_load_kv(None)
    assert gen.connector_errors == 2


def test_tokens_per_block_comes_from_the_registered_layout(net):
    args = llm_args()                                   # llm_args says 4 ...
    w = __import__("nixl_connectors.trtllm.worker", fromlist=["x"]).UcxKvConnectorWorker(
        args, settings(role="context"))
    pool = torch.zeros(8, 2, 2, 2 * 8 * 16, dtype=torch.float16)
    w.register_kv_cache_layout(SimpleNamespace(tokens_per_block=16, groups=(1,),
                                               as_single_pool_tensor=lambda: pool))
    assert w.tokens_per_block == 16 and w.agent.compat["tokens_per_block"] == 16   # ... the pool 16
    w.close()


def test_tokens_per_block_that_does_not_fit_the_pool_is_a_start_up_error(net):
    from nixl_connectors.trtllm.layout import PoolLayoutError
    w = __import__("nixl_connectors.trtllm.worker", fromlist=["x"]).UcxKvConnectorWorker(
        llm_args(tokens_per_block=5), settings(role="context"))
    with pytest.raises(PoolLayoutError, match="tokens_per_block"):
        w.register_kv_caches(torch.zeros(8, 2, 2, 64, dtype=torch.float16))
