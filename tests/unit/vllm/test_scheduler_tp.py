"""Scheduler side (real vLLM Request / KVCacheBlocks objects): TP=2 params carry every rank's
agent and lease; per-group block ids of hybrid models (sliding-window groups expose only what
vLLM keeps at finish); decode names what it lacks (local prefix hit, null blocks); malformed
kv_transfer_params go to the load-failure policy (the worker fails them), never raise."""
from types import SimpleNamespace

import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.kv_cache_utils import KVCacheBlock
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request, RequestStatus

from nixl_connectors.vllm.config import UcxConnectorConfig
from nixl_connectors.vllm.metadata import UcxHandshakeMetadata, UcxWorkerMetadata
from nixl_connectors.vllm.params import RemotePrefill
from nixl_connectors.vllm.scheduler import NULL, GroupInfo, Phase, UcxScheduler, exposed_blocks


def vcfg(tp: int, bs: int = 32):
    return SimpleNamespace(cache_config=SimpleNamespace(block_size=bs),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp))


def kvcfg(*windows):
    """A KVCacheConfig-like object: one group per entry, sliding window or None."""
    return SimpleNamespace(kv_cache_groups=[
        SimpleNamespace(kv_cache_spec=SimpleNamespace(block_size=32, sliding_window=w), layer_names=["x"])
        for w in windows])


def request(rid: str, n: int, params: dict) -> Request:
    return Request(rid, list(range(3, 3 + n)), SamplingParams(
        max_tokens=1, extra_args={"kv_transfer_params": params}), None)


def blocks(*groups):
    """KVCacheBlocks from per-group lists of (id, hashed) / NULL."""
    out = []
    for g in groups:
        row = []
        for item in g:
            if item == NULL:
                row.append(KVCacheBlock(0, is_null=True))
                continue
            bid, hashed = item
            b = KVCacheBlock(bid)
            if hashed:
                b._block_hash = b"h%d" % bid
            row.append(b)
        out.append(row)
    return KVCacheBlocks(tuple(out))


def finish(s, req, table, leases):
    s.on_new_request(req)
    meta = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={req.request_id: req.num_prompt_tokens}),
                                  lambda rid: table)
    req.num_computed_tokens = req.num_prompt_tokens
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, out = s.request_finished(req, tuple(tuple(g for g in grp if g != NULL) for grp in table))
    s.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=UcxWorkerMetadata({req.request_id: leases})))
    return meta, delay, out


def test_tp2_params_carry_all_ranks_in_order():
    s = UcxScheduler(vcfg(2), "eng", UcxConnectorConfig())
    s.set_handshake({1: UcxHandshakeMetadata(1, "h:2"), 0: UcxHandshakeMetadata(0, "h:1")})
    req = request("r", 70, {"do_remote_decode": True})
    s.on_new_request(req)
    meta = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r": 70}), lambda rid: [[4, 5, 6, 7]])
    assert meta.to_expose == {"r": ((4, 5, 6),)}  # only blocks holding prompt tokens
    req.num_computed_tokens = 70
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, out = s.request_finished(req, ([4, 5, 6],))
    assert delay is True and "remote_lease_ids" not in out
    # rank 1 reports first, rank 0 in the aggregated metadata of the same step
    m = UcxWorkerMetadata({"r": {1: "L1"}}).aggregate(UcxWorkerMetadata({"r": {0: "L0"}}))
    s.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=m))
    assert out["remote_agents"] == ["h:1", "h:2"] and out["remote_lease_ids"] == ["L0", "L1"]
    assert out["remote_host"] == "h" and out["remote_port"] == 1 and out["tp_size"] == 2
    assert out["remote_block_ids"] == [4, 5, 6] and out["remote_block_size"] == 32
    remote = RemotePrefill.parse(out)
    assert remote.tp_size == 2 and remote.block_ids == (4, 5, 6)
    s.update_connector_output(KVConnectorOutput(finished_sending={"r"}))
    assert s.state == {p.value: 0 for p in Phase}, "the record is gone once every rank freed"


def test_exposed_blocks_per_group_sliding_window_keeps_what_vllm_keeps():
    groups = (GroupInfo(32, None), GroupInfo(32, 64))
    table = ([1, 2, 3, 4, 5], [NULL, 7, 8, 9, 10])
    # 150 tokens -> 5 blocks; window 64: vLLM frees at finish the blocks wholly below token 87
    assert exposed_blocks(groups, table, 150) == ((1, 2, 3, 4, 5), (8, 9, 10))
    # short prompt: nothing skipped, null blocks never exposed
    assert exposed_blocks(groups, ([1, 2], [NULL, 7]), 40) == ((1, 2), (7,))


def test_hybrid_params_carry_one_block_list_per_group():
    s = UcxScheduler(vcfg(1), "eng", UcxConnectorConfig(), kvcfg(None, 64))
    s.set_handshake({0: UcxHandshakeMetadata(0, "h:1")})
    table = [[1, 2, 3, 4, 5], [NULL, 7, 8, 9, 10]]
    meta, delay, out = finish(s, request("r", 150, {"do_remote_decode": True}), table, {0: "L"})
    assert meta.to_expose == {"r": ((1, 2, 3, 4, 5), (8, 9, 10))}
    assert delay and out["remote_block_ids"] == [[1, 2, 3, 4, 5], [8, 9, 10]]
    assert RemotePrefill.parse(out).group_block_ids == ((1, 2, 3, 4, 5), (8, 9, 10))


def test_exposed_block_freed_by_vllm_releases_instead_of_handing_out():
    s = UcxScheduler(vcfg(1), "eng", UcxConnectorConfig(), kvcfg(None, 64))
    s.set_handshake({0: UcxHandshakeMetadata(0, "h:1")})
    req = request("r", 150, {"do_remote_decode": True})
    s.on_new_request(req)
    s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r": 150}),
                           lambda rid: [[1, 2, 3, 4, 5], [NULL, 7, 8, 9, 10]])
    req.num_computed_tokens = 170
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, out = s.request_finished(req, ([1, 2, 3, 4, 5], [9, 10]))   # block 8 already freed
    assert delay is True and out is None
    assert s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}), lambda r: []).to_release == ["r"]


def _remote_params(**over):
    p = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_request_id": "x",
         "remote_block_ids": [1, 2, 3], "remote_agents": ["a:1"], "remote_lease_ids": ["L0"], "tp_size": 1}
    p.update(over)
    return p


def test_decode_plans_only_the_uncached_suffix_per_group():
    s = UcxScheduler(vcfg(1), "eng", UcxConnectorConfig(), kvcfg(None, 64))
    req = request("d", 150, _remote_params(remote_block_ids=[[1, 2, 3, 4, 5], [8, 9, 10]]))
    s.on_new_request(req)
    assert s.get_num_new_matched_tokens(req, 64) == (86, True)
    s.update_state_after_alloc(req, blocks([(11, True), (12, True), (13, False), (14, False), (15, False)],
                                           [NULL, NULL, (23, False), (24, False), (25, False)]), 86)
    meta = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}), lambda r: [])
    spec = meta.to_recv["d"]
    assert spec.error is None and spec.remote.group_block_ids[1] == (8, 9, 10)
    assert spec.target.tables == ((11, 12, 13, 14, 15), (NULL, NULL, 23, 24, 25))
    assert (spec.target.token_start, spec.target.token_end, spec.target.num_prompt_tokens) == (64, 150, 150)
    assert spec.load_block_ids == (13, 14, 15)
    assert req.kv_transfer_params["do_remote_prefill"] is False


@pytest.mark.parametrize("params", [
    _remote_params(remote_agents=["a:1", "a:2"]),      # 2 agents, 1 lease
    _remote_params(remote_block_ids="garbage"),
    {"do_remote_prefill": True},                        # nothing else
])
def test_malformed_params_go_to_the_load_failure_policy(params):
    s = UcxScheduler(vcfg(2), "eng", UcxConnectorConfig())
    req = request("d", 40, params)
    s.on_new_request(req)
    assert s.get_num_new_matched_tokens(req, 0) == (40, True), "loadable, so the policy applies"
    s.update_state_after_alloc(req, blocks([(5, False), (6, False)]), 40)
    spec = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={}), lambda r: []).to_recv["d"]
    assert spec.remote is None and spec.error and spec.load_block_ids == (5, 6)


def test_different_tp_is_left_to_the_worker_plan():
    s = UcxScheduler(vcfg(1), "eng", UcxConnectorConfig())
    params = _remote_params(remote_agents=["a:1", "a:2"], remote_lease_ids=["L0", "L1"], tp_size=2)
    assert s.get_num_new_matched_tokens(request("d", 20, params), 0) == (20, True)


def test_handshake_needs_every_rank():
    s = UcxScheduler(vcfg(2), "eng", UcxConnectorConfig())
    with pytest.raises(ValueError):
        s.set_handshake({1: UcxHandshakeMetadata(1, "h:2")})
