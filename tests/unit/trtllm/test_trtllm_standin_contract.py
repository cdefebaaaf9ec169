"""The stand-in drives a connector in TensorRT-LLM 1.2's documented order and rules.

A recording connector (no transport) checks: the per-iteration call order, the scheduler on
rank 0 only, per-layer hooks on every rank, and that a request counts as finished only once
every rank has reported it.
"""
from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]

from trtllm_standin import install  # noqa: E402

API = install.ensure()

from trtllm_standin import mpi  # noqa: E402
from trtllm_standin.executor import (KvCacheConfig, KvCacheConnectorConfig, LlmArgs,  # noqa: E402
                                     ModelShape, StandinExecutor)
from trtllm_standin.llm_request import LlmRequest  # noqa: E402
from trtllm_standin.manager import ConnectorContractError  # noqa: E402

LOG: list = []
SETTINGS: dict = {}


class RecordingScheduler(API.KvCacheConnectorScheduler):
    def __init__(self, llm_args):
        super().__init__(llm_args)
        self.rank = mpi.mpi_rank()
        LOG.append(("scheduler_init", self.rank))

    def build_connector_meta(self, scheduler_output):
        LOG.append(("build_connector_meta", [r.request_id for r in scheduler_output.new_requests],
                    [r.request_id for r in scheduler_output.cached_requests]))
        return {"iteration": len(LOG)}

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        LOG.append(("get_num_new_matched_tokens", request.request_id))
        n = SETTINGS.get("load", {}).get(request.request_id, 0)
        return n, n > 0

    def request_finished(self, request, cache_block_ids):
        LOG.append(("request_finished", request.request_id))
        return request.request_id in SETTINGS.get("save", ())

    def update_state_after_alloc(self, request, block_ids):
        LOG.append(("update_state_after_alloc", request.request_id, len(block_ids)))


class RecordingWorker(API.KvCacheConnectorWorker):
    def __init__(self, llm_args):
        super().__init__(llm_args)
        self.rank = mpi.mpi_rank()
        self.saving: dict = {}
        self.loading: dict = {}
        self.calls = 0

    def _log(self, *what):
        LOG.append((what[0], self.rank) + what[1:])

    def register_kv_caches(self, kv_cache_tensor):
        self._log("register_kv_caches", tuple(kv_cache_tensor.shape))

    def start_load_kv(self, stream):
        self._log("start_load_kv", self.get_connector_meta() is not None)

    def wait_for_layer_load(self, layer_idx, stream):
        self._log("wait_for_layer_load", layer_idx)

    def save_kv_layer(self, layer_idx, stream):
        self._log("save_kv_layer", layer_idx)

    def wait_for_save(self, stream):
        self._log("wait_for_save")

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        self.calls += 1
        self._log("get_finished", tuple(finished_gen_req_ids), tuple(started_loading_req_ids))
        lag = SETTINGS.get("lag", {}).get(self.rank, 0)
        for rid in finished_gen_req_ids:
            self.saving[rid] = self.calls + lag
        for rid in started_loading_req_ids:
            self.loading[rid] = self.calls + lag
        done_s = [r for r, at in self.saving.items() if at <= self.calls]
        done_l = [r for r, at in self.loading.items() if at <= self.calls]
        for r in done_s:
            del self.saving[r]
        for r in done_l:
            del self.loading[r]
        return done_s + SETTINGS.get("bogus", []), done_l


def make(tp=1, layers=2):
    LOG.clear()
    cc = KvCacheConnectorConfig(__name__, "RecordingScheduler", "RecordingWorker")
    args = LlmArgs("m", cc, tensor_parallel_size=tp, kv_cache_config=KvCacheConfig(tokens_per_block=4))
    return StandinExecutor(args, ModelShape(num_layers=layers, num_kv_heads=2), API)


@pytest.fixture(autouse=True)
def _reset():
    SETTINGS.clear()
    yield
    SETTINGS.clear()


def names(log, rank=None):
    return [e[0] for e in log if rank is None or len(e) < 2 or e[1] == rank or e[0] in (
        "build_connector_meta", "get_num_new_matched_tokens", "request_finished",
        "update_state_after_alloc")]


def test_construction_scheduler_on_rank0_only_and_pool_given_once():
    ex = make(tp=2)
    assert [e for e in LOG if e[0] == "scheduler_init"] == [("scheduler_init", 0)]
    regs = [e for e in LOG if e[0] == "register_kv_caches"]
    assert [r[1] for r in regs] == [0, 1]
    assert regs[0][2] == (64, 2, 2, 1 * 8 * 4)   # [blocks, layers, kv_factor, heads/tp*head_dim*tpb]
    assert ex.workers[1].rank == 1


def test_iteration_order():
    ex = make(tp=1, layers=2)
    ex.add_request(LlmRequest(1, list(range(10)), 1))
    LOG.clear()
    ex.step()
    assert names(LOG) == [
        "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
        "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_layer_load",
        "save_kv_layer", "wait_for_save", "request_finished", "get_finished"]
    start = [e for e in LOG if e[0] == "start_load_kv"][0]
    assert start[2] is True   # metadata bound before start_load_kv
    bcm = [e for e in LOG if e[0] == "build_connector_meta"][0]
    assert bcm[1] == [1]


def test_saved_request_keeps_blocks_until_every_rank_reports():
    ex = make(tp=2)
    SETTINGS.update(save={1}, lag={1: 2})   # rank 1 reports two get_finished calls later
    ex.add_request(LlmRequest(1, list(range(10)), 1))
    ex.step()
    assert 1 in ex.saving and len(ex.free_blocks) < 64
    ex.step()
    assert 1 in ex.saving, "freed before rank 1 reported"
    ex.step()                                 # rank 1's third get_finished reports it
    assert 1 not in ex.saving and len(ex.free_blocks) == 64


def test_async_load_waits_outside_the_batch_until_every_rank_reports():
    ex = make(tp=2)
    SETTINGS.update(load={1: 8}, lag={0: 1})
    ex.add_request(LlmRequest(1, list(range(10)), 2))
    ex.step()
    assert 1 in ex.loading
    bcm = [e for e in LOG if e[0] == "build_connector_meta"]
    assert bcm[-1][1] == []          # a loading request is not in the scheduler output
    ex.step()
    assert 1 in ex.active and ex.active[1].context_current_position == 8
    ex.run()
    assert ex.finished[1] and len(ex.free_blocks) == 64


def test_unannounced_ids_break_the_contract():
    ex = make()
    SETTINGS.update(bogus=[99])
    ex.add_request(LlmRequest(1, list(range(5)), 1))
    with pytest.raises(ConnectorContractError):
        ex.step()


def test_generation_only_requests_are_rejected():
    ex = make()
    ex.add_request(LlmRequest(1, list(range(5)), 1, is_generation_only_request=True))
    with pytest.raises(RuntimeError):
        ex.step()


def test_pipeline_parallel_and_evicting_policy_are_rejected():
    cc = KvCacheConnectorConfig(__name__, "RecordingScheduler", "RecordingWorker")
    with pytest.raises(ValueError):
        StandinExecutor(LlmArgs("m", cc, pipeline_parallel_size=2), ModelShape(), API)
    args = LlmArgs("m", cc)
    args.scheduler_config.capacity_scheduler_policy = "MAX_UTILIZATION"
    with pytest.raises(ValueError):
        StandinExecutor(args, ModelShape(), API)


def test_empty_batch_still_calls_get_finished_only():
    ex = make(tp=1)
    SETTINGS.update(save={1}, lag={0: 5})
    ex.add_request(LlmRequest(1, list(range(10)), 1))
    ex.step()
    LOG.clear()
    ex.step()   # nothing scheduled: request 1 only waits for its save
    assert names(LOG) == ["get_finished"]
