"""Scheduler side with TP=2: every rank's agent and lease travel in kv_transfer_params, and
the params are complete only once every rank reported its lease (real vLLM Request objects)."""
from types import SimpleNamespace

import pytest
from vllm.sampling_params import SamplingParams
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request, RequestStatus

from nixl_connectors.vllm.config import UcxConnectorConfig
from nixl_connectors.vllm.metadata import UcxHandshakeMetadata, UcxWorkerMetadata
from nixl_connectors.vllm.params import RemotePrefill
from nixl_connectors.vllm.scheduler import UcxScheduler


def vcfg(tp: int):
    return SimpleNamespace(cache_config=SimpleNamespace(block_size=32),
                           parallel_config=SimpleNamespace(tensor_parallel_size=tp))


def request(rid: str, n: int, params: dict) -> Request:
    return Request(rid, list(range(3, 3 + n)), SamplingParams(
        max_tokens=1, extra_args={"kv_transfer_params": params}), None)


def test_tp2_params_carry_all_ranks_in_order():
    s = UcxScheduler(vcfg(2), "eng", UcxConnectorConfig())
    s.set_handshake({1: UcxHandshakeMetadata(1, "h:2"), 0: UcxHandshakeMetadata(0, "h:1")})
    req = request("r", 70, {"do_remote_decode": True})
    s.on_new_request(req)
    req.num_computed_tokens = 70  # as after the scheduling of the whole prompt
    meta = s.build_connector_meta(SimpleNamespace(num_scheduled_tokens={"r": 70}),
                                  lambda rid: [4, 5, 6, 7])
    assert meta.to_expose == {"r": [4, 5, 6]}  # only blocks holding prompt tokens
    req.status = RequestStatus.FINISHED_LENGTH_CAPPED
    delay, out = s.request_finished(req, [4, 5, 6])
    assert delay is True and "remote_lease_ids" not in out
    # rank 1 reports first, rank 0 in the aggregated metadata of the same step
    m = UcxWorkerMetadata({"r": {1: "L1"}}).aggregate(UcxWorkerMetadata({"r": {0: "L0"}}))
    s.update_connector_output(KVConnectorOutput(kv_connector_worker_meta=m))
    assert out["remote_agents"] == ["h:1", "h:2"] and out["remote_lease_ids"] == ["L0", "L1"]
    assert out["remote_host"] == "h" and out["remote_port"] == 1 and out["tp_size"] == 2
    remote = RemotePrefill.parse(out)
    assert remote.tp_size == 2 and remote.block_ids == (4, 5, 6)


def test_decode_rejects_different_tp():
    s = UcxScheduler(vcfg(1), "eng", UcxConnectorConfig())
    params = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_request_id": "x",
              "remote_block_ids": [1], "remote_agents": ["a:1", "a:2"],
              "remote_lease_ids": ["L0", "L1"], "tp_size": 2}
    assert s.get_num_new_matched_tokens(request("d", 20, params), 0) == (0, False)


def test_handshake_needs_every_rank():
    s = UcxScheduler(vcfg(2), "eng", UcxConnectorConfig())
    with pytest.raises(ValueError):
        s.set_handshake({1: UcxHandshakeMetadata(1, "h:2")})
