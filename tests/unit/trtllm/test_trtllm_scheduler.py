"""UcxKvConnectorScheduler decisions (in-memory agents: the context side is a real worker's
directory on a fake network)."""
from __future__ import annotations

import pickle

import pytest

from nixl_connectors.trtllm.metadata import ConnectorMetadata
from nixl_connectors.trtllm.routing import salt_key
from trtllm_standin.llm_request import CppLlmRequest, PyLlmRequest, cache_salt_id
from trtllm_unit_helpers import (TPB, llm_args, make_scheduler, make_worker, request_data, scheduler_output,
                                 settings)


def key(salt):
    return salt_key(cache_salt_id(salt))


@pytest.fixture
def ctx(net):
    """A context instance's scheduler and worker (rank 0)."""
    args = llm_args()
    cfg = settings(role="context")
    w = make_worker(args, cfg)
    s = make_scheduler(args, cfg)
    yield s, w
    w.close()


@pytest.fixture
def gen(net, ctx):
    args = llm_args()
    cfg = settings(role="generation", context_agents=[ctx[1].agent.address], peer_retry_s=60)
    w = make_worker(args, cfg)
    s = make_scheduler(args, cfg)
    yield s, w
    w.close()


def test_context_leg_announces_whole_prompt_blocks_across_chunks(ctx):
    s, _ = ctx
    req = PyLlmRequest(1, list(range(18)), 1, cache_salt="k1")       # 17 -> 16 tokens, 4 blocks
    assert s.get_num_new_matched_tokens(CppLlmRequest(req), 0) == (0, False)
    s.update_state_after_alloc(req, [9, 8, 7, 6, 5])
    m1 = s.build_connector_meta(scheduler_output(new=[request_data(1, [9, 8])]))
    assert m1.saves == ()
    m2 = s.build_connector_meta(scheduler_output(cached=[request_data(1, [7, 6, 5])]))
    assert [(x.key, x.block_ids, x.num_tokens) for x in m2.saves] == [(key("k1"), (9, 8, 7, 6), 16)]
    assert m2.seq > m1.seq
    req.device_tokens.append(5)
    req.committed = 1
    assert s.request_finished(req, [9, 8, 7, 6, 5]) is True
    assert pickle.loads(pickle.dumps(m2)) == m2   # TensorRT-LLM broadcasts it pickled


def test_context_leg_ended_before_first_token_holds_nothing(ctx):
    s, _ = ctx
    req = PyLlmRequest(1, list(range(18)), 1, cache_salt="k1")
    s.get_num_new_matched_tokens(CppLlmRequest(req), 0)
    s.build_connector_meta(scheduler_output(new=[request_data(1, [1, 2, 3, 4, 5])]))
    assert s.request_finished(req, [1, 2, 3, 4, 5]) is False
    assert s.build_connector_meta(scheduler_output()).dropped == (1,)


def test_context_leg_announced_at_finish_when_never_seen(ctx):
    s, _ = ctx
    req = PyLlmRequest(1, list(range(9)), 1, cache_salt="k")
    s.get_num_new_matched_tokens(CppLlmRequest(req), 0)
    req.committed = 1
    req.device_tokens.append(1)
    assert s.request_finished(req, [4, 5, 6]) is True
    assert [x.block_ids for x in s.build_connector_meta(None).saves] == [(4, 5)]


def test_build_connector_meta_accepts_none_and_numbers_every_metadata(ctx):
    s, _ = ctx
    metas = [s.build_connector_meta(None) for _ in range(3)]
    assert all(isinstance(m, ConnectorMetadata) and not m for m in metas)
    assert [m.seq for m in metas] == sorted({m.seq for m in metas})


def test_a_second_request_with_the_same_salt_is_not_a_hand_off(ctx):
    s, _ = ctx
    a, b = (PyLlmRequest(i, list(range(20)), 1, cache_salt="same") for i in (1, 2))
    s.get_num_new_matched_tokens(CppLlmRequest(a), 0)
    assert s.get_num_new_matched_tokens(CppLlmRequest(b), 0) == (0, False)
    assert s.request_finished(b, [1, 2, 3, 4, 5]) is False


def expose(ctx_worker, salt, blocks=(0, 1, 2, 3), rid=77):
    """Make the context worker hold `blocks` for `salt` as after a finished request."""
    from nixl_connectors.trtllm.metadata import SaveSpec
    ctx_worker.bind_connector_meta(ConnectorMetadata(seq=10_000 + rid, saves=(
        SaveSpec(rid, key(salt), tuple(blocks), len(blocks) * TPB),)))
    ctx_worker.start_load_kv(None)
    ctx_worker.get_finished([rid], [])


def test_generation_claims_only_what_the_context_side_holds_ready(ctx, gen):
    s, _ = gen
    ready = PyLlmRequest(7, list(range(17)), 3, cache_salt="held")
    missing = PyLlmRequest(8, list(range(17)), 3, cache_salt="never-computed")
    expose(ctx[1], "held")
    assert s.get_num_new_matched_tokens(CppLlmRequest(missing), 0) == (0, False)   # unknown -> local
    assert s.get_num_new_matched_tokens(CppLlmRequest(ready), 0) == (16, True)
    s.update_state_after_alloc(ready, [3, 1, 4, 11, 5, 9])
    (load,) = s.build_connector_meta(scheduler_output()).loads
    assert (load.request_id, load.key, load.block_ids, load.num_tokens) == (7, key("held"), (3, 1, 4, 11), 16)
    assert load.lease_for(0) is not None and load.lease_for(0).nbytes == 4 * ctx[1]._layout.block_bytes
    # scheduled again once every worker reported it loaded: forgotten
    m = s.build_connector_meta(scheduler_output(new=[request_data(7, range(6), pos=16)]))
    assert m.forget == (7,) and s.request_finished(ready, list(range(6))) is False


def test_generation_request_ending_while_loading_keeps_its_blocks(ctx, gen):
    s, _ = gen
    req = PyLlmRequest(7, list(range(17)), 3, cache_salt="held")
    expose(ctx[1], "held")
    s.get_num_new_matched_tokens(CppLlmRequest(req), 0)
    s.update_state_after_alloc(req, list(range(6)))
    s.build_connector_meta(scheduler_output())
    assert s.request_finished(req, list(range(6))) is True


def test_a_parked_request_that_ends_without_request_finished_is_abandoned(ctx, gen):
    s, _ = gen
    req = PyLlmRequest(7, list(range(17)), 3, cache_salt="held")
    expose(ctx[1], "held")
    s.get_num_new_matched_tokens(CppLlmRequest(req), 0)
    s.update_state_after_alloc(req, list(range(6)))
    s.build_connector_meta(scheduler_output())
    req.finish_by_reason("cancelled")          # current TensorRT-LLM: no request_finished for it
    assert s.build_connector_meta(scheduler_output()).abandoned == (7,)
    assert s.build_connector_meta(scheduler_output()).abandoned == ()


def test_too_few_blocks_sends_an_empty_load_and_releases_the_leases(ctx, gen):
    s, _ = gen
    req = PyLlmRequest(7, list(range(17)), 3, cache_salt="held")
    expose(ctx[1], "held")
    s.get_num_new_matched_tokens(CppLlmRequest(req), 0)
    s.update_state_after_alloc(req, [1, 2])
    (load,) = s.build_connector_meta(scheduler_output()).loads
    assert load.leases == () and "blocks allocated" in load.error
    ctx[1].get_finished([], [])
    assert ctx[1].record(77) is None            # the context side got its blocks back


def test_an_unreachable_context_instance_is_not_asked_again_for_a_while(ctx, gen, net):
    s, gw = gen
    ctx[1].agent.closed = True                  # the context process is gone
    for rid in (1, 2, 3):
        req = CppLlmRequest(PyLlmRequest(rid, list(range(17)), 3, cache_salt=f"s{rid}"))
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    assert gw.agent.calls == 0                  # connect failed once; later requests not delayed


def test_prefix_already_on_device_or_short_prompt_computes_locally(ctx, gen):
    s, _ = gen
    expose(ctx[1], "held")
    assert s.get_num_new_matched_tokens(CppLlmRequest(PyLlmRequest(1, list(range(17)), 1, "held")), 8) == (0, False)
    assert s.get_num_new_matched_tokens(CppLlmRequest(PyLlmRequest(2, list(range(4)), 1, "held")), 0) == (0, False)
    assert s.get_num_new_matched_tokens(CppLlmRequest(PyLlmRequest(3, list(range(40)), 1)), 0) == (0, False)


def test_scheduler_errors_never_reach_the_engine(ctx, monkeypatch):
    s, _ = ctx
    req = PyLlmRequest(1, list(range(18)), 1, cache_salt="k1")
    monkeypatch.setattr(s, "_match", lambda *a: 1 / 0)
    assert s.get_num_new_matched_tokens(CppLlmRequest(req), 0) == (0, False)
    assert s.connector_errors == 1
