"""UcxKvConnectorScheduler decisions, without a transport (pure bookkeeping)."""
from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace

TESTS = Path(__file__).resolve().parents[2]

from trtllm_standin import install  # noqa: E402

API = install.ensure()

from nixl_connectors.trtllm.config import ConnectorRole, TrtllmConnectorConfig  # noqa: E402
from nixl_connectors.trtllm.metadata import ConnectorMetadata  # noqa: E402
from nixl_connectors.trtllm.scheduler import UcxKvConnectorScheduler  # noqa: E402
from trtllm_standin.llm_request import LlmRequest  # noqa: E402

TPB = 4


def sched(role: ConnectorRole) -> UcxKvConnectorScheduler:
    args = SimpleNamespace(tensor_parallel_size=1, kv_cache_config=SimpleNamespace(tokens_per_block=TPB))
    return UcxKvConnectorScheduler(args, TrtllmConnectorConfig(role=role))


def rd(rid, blocks, pos=0):
    return API.RequestData(rid, [], list(blocks), pos, 4)


def out(new=(), cached=()):
    return API.SchedulerOutput(list(new), list(cached))


def test_context_leg_announces_whole_prompt_blocks_across_chunks():
    s = sched(ConnectorRole.CONTEXT)
    req = LlmRequest(1, list(range(18)), 1, cache_salt="nixl-rt:ctx:k1")   # 17 -> 16 tokens, 4 blocks
    assert s.get_num_new_matched_tokens(req, 0) == (0, False)
    s.update_state_after_alloc(req, [9, 8, 7, 6, 5])
    m1 = s.build_connector_meta(out(new=[rd(1, [9, 8])]))
    assert m1.saves == ()
    m2 = s.build_connector_meta(out(cached=[rd(1, [7, 6, 5])]))
    assert [(x.routing_key, x.block_ids, x.num_tokens) for x in m2.saves] == [("k1", (9, 8, 7, 6), 16)]
    assert s.build_connector_meta(out()).saves == ()
    req.generated.append(5)
    assert s.request_finished(req, [9, 8, 7, 6, 5]) is True
    assert pickle.loads(pickle.dumps(m2)) == m2   # TensorRT-LLM broadcasts it pickled


def test_context_leg_ended_before_first_token_holds_nothing():
    s = sched(ConnectorRole.CONTEXT)
    req = LlmRequest(1, list(range(18)), 1, cache_salt="nixl-rt:ctx:k1")
    s.get_num_new_matched_tokens(req, 0)
    s.build_connector_meta(out(new=[rd(1, [1, 2, 3, 4, 5])]))
    assert s.request_finished(req, [1, 2, 3, 4, 5]) is False
    assert s.build_connector_meta(out()).dropped == (1,)


def test_context_leg_announced_at_finish_when_never_seen():
    s = sched(ConnectorRole.CONTEXT)
    req = LlmRequest(1, list(range(9)), 1, cache_salt="nixl-rt:ctx:k")
    s.get_num_new_matched_tokens(req, 0)
    req.generated.append(1)
    assert s.request_finished(req, [4, 5, 6]) is True
    assert [x.block_ids for x in s.build_connector_meta(out()).saves] == [(4, 5)]


def test_generation_leg_claims_whole_blocks_and_loads_after_alloc():
    s = sched(ConnectorRole.GENERATION)
    req = LlmRequest(7, list(range(17)), 3, cache_salt="nixl-rt:gen:k7")
    assert s.get_num_new_matched_tokens(req, 0) == (16, True)
    assert s.build_connector_meta(out()).loads == ()
    s.update_state_after_alloc(req, [3, 1, 4, 1 + 10, 5, 9])
    m = s.build_connector_meta(out())
    assert [(x.request_id, x.routing_key, x.block_ids, x.num_tokens) for x in m.loads] == \
        [(7, "k7", (3, 1, 4, 11), 16)]
    # aborted while loading: blocks held until the pull settles
    assert s.request_finished(req, [3, 1, 4, 11, 5, 9]) is True


def test_generation_leg_after_load_finishes_normally():
    s = sched(ConnectorRole.GENERATION)
    req = LlmRequest(7, list(range(17)), 3, cache_salt="nixl-rt:gen:k7")
    s.get_num_new_matched_tokens(req, 0)
    s.update_state_after_alloc(req, list(range(6)))
    s.build_connector_meta(out())
    s.build_connector_meta(out(new=[rd(7, range(6), pos=16)]))   # scheduled: loaded everywhere
    assert s.request_finished(req, list(range(6))) is False


def test_not_taking_part():
    s = sched(ConnectorRole.BOTH)
    assert s.get_num_new_matched_tokens(LlmRequest(1, list(range(40)), 1), 0) == (0, False)
    short = LlmRequest(2, list(range(4)), 1, cache_salt="nixl-rt:gen:k")   # < one whole block + 1
    assert s.get_num_new_matched_tokens(short, 0) == (0, False)
    hit = LlmRequest(3, list(range(40)), 1, cache_salt="nixl-rt:gen:k3")
    assert s.get_num_new_matched_tokens(hit, 8) == (0, False)           # prefix already on device
    assert isinstance(s.build_connector_meta(out()), ConnectorMetadata)


def test_warns_once_when_requests_lack_the_salt_string(caplog):
    s = sched(ConnectorRole.GENERATION)
    r = SimpleNamespace(request_id=1, cache_salt_id=77, py_prompt_len=40, get_tokens=lambda b: list(range(40)))
    with caplog.at_level("WARNING"):
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)
        assert s.get_num_new_matched_tokens(r, 0) == (0, False)
    assert sum("cache_salt_id" in m for m in caplog.messages) == 1
