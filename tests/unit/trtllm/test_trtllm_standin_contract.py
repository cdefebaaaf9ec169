"""The stand-in behaves like the TensorRT-LLM engine a connector runs in (recording connector).

Checks what docs/trtllm-notes.md's table lists: construction (scheduler on rank 0 only, built
concurrently with the worker), the C++-shaped request, the connector skipped without block
reuse, the overlap loop, get_finished every iteration with the all-ranks rule, exceptions as
engine crashes (and a hang of the other ranks, caught by a deadline), the start-up rejections.
"""
from __future__ import annotations

import threading

import pytest

from trtllm_standin import install, mpi
from trtllm_standin.instance import (EngineCrashed, EngineHung, KvCacheConfig, KvCacheConnectorConfig, LlmArgs,
                                     ModelShape, StandinExecutor)
from trtllm_standin.manager import Flavour

API = install.ensure()
LOG: list = []
SETTINGS: dict = {}


class RecordingScheduler(API.KvCacheConnectorScheduler):
    def __init__(self, llm_args):
        super().__init__(llm_args)
        self.rank = mpi.mpi_rank()
        LOG.append(("scheduler_init", self.rank, threading.current_thread().name))
        if "meet" in SETTINGS:
            SETTINGS["meet"].wait()    # returns only if the worker is being built at the same time

    def build_connector_meta(self, scheduler_output):
        LOG.append(("build_connector_meta", [r.request_id for r in scheduler_output.new_requests],
                    [r.request_id for r in scheduler_output.cached_requests]))
        return {"n": len(LOG)}

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        LOG.append(("get_num_new_matched_tokens", request.request_id, type(request).__name__,
                    hasattr(request, "py_request_id"), hasattr(request, "cache_salt"), request.cache_salt_id))
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
        if "meet" in SETTINGS and self.rank == 0:
            SETTINGS["meet"].wait()

    def _log(self, *what):
        LOG.append((what[0], self.rank) + what[1:])

    def register_kv_caches(self, kv_cache_tensor):
        self._log("register_kv_caches", tuple(kv_cache_tensor.shape))

    def start_load_kv(self, stream):
        self._log("start_load_kv")

    def wait_for_layer_load(self, layer_idx, stream):
        self._log("wait_for_layer_load", layer_idx)

    def save_kv_layer(self, layer_idx, stream):
        self._log("save_kv_layer", layer_idx)

    def wait_for_save(self, stream):
        self._log("wait_for_save")

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        self.calls += 1
        self._log("get_finished", tuple(finished_gen_req_ids), tuple(started_loading_req_ids))
        if self.rank in SETTINGS.get("raise_on_rank", ()):
            raise RuntimeError(f"connector bug on rank {self.rank}")
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


def make(tp=1, flavour=Flavour.MAIN, reuse=True, step_timeout_s=60.0, **kw):
    LOG.clear()
    cc = KvCacheConnectorConfig(__name__, "RecordingScheduler", "RecordingWorker")
    args = LlmArgs("m", cc, tensor_parallel_size=tp,
                   kv_cache_config=KvCacheConfig(tokens_per_block=4, enable_block_reuse=reuse), **kw)
    return StandinExecutor(args, ModelShape(num_layers=2, num_kv_heads=2), API, flavour=flavour,
                           step_timeout_s=step_timeout_s)


@pytest.fixture(autouse=True)
def _reset():
    SETTINGS.clear()
    made: list = []
    yield made
    SETTINGS.clear()


def names(rank=0):
    return [e[0] for e in LOG if e[0] in ("build_connector_meta", "get_num_new_matched_tokens",
                                          "request_finished", "update_state_after_alloc")
            or (e[0] not in ("scheduler_init", "register_kv_caches") and len(e) > 1 and e[1] == rank)]


def test_scheduler_on_rank0_only_built_concurrently_with_the_worker_and_pool_given_once():
    SETTINGS["meet"] = threading.Barrier(2, timeout=60)   # breaks unless both are built at once
    ex = make(tp=2)
    try:
        assert [e[:2] for e in LOG if e[0] == "scheduler_init"] == [("scheduler_init", 0)]
        assert [e[1] for e in LOG if e[0] == "register_kv_caches"] == [0, 1]
    finally:
        ex.close()


def test_connector_sees_the_cpp_request_and_only_with_block_reuse_on():
    ex = make()
    try:
        ex.add_request(1, list(range(10)), 1, salt="s")
        ex.run()
        (match,) = [e for e in LOG if e[0] == "get_num_new_matched_tokens"]
        assert match[2] == "CppLlmRequest" and match[3:5] == (False, False) and isinstance(match[5], int)
    finally:
        ex.close()
    ex = make(reuse=False)
    try:
        ex.add_request(1, list(range(10)), 1, salt="s")
        ex.run()
        assert not [e for e in LOG if e[0] == "get_num_new_matched_tokens"]
        assert [e[:2] for e in LOG if e[0] == "update_state_after_alloc"] == [("update_state_after_alloc", 1)]
        assert ex.finished[1]          # the engine ran the request; the connector was never asked
    finally:
        ex.close()


def test_overlap_loop_order_and_results_one_iteration_later():
    ex = make()
    try:
        ex.add_request(1, list(range(10)), 2)
        ex.step()   # context forward, first token sampled on the device
        assert names() == ["get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta",
                           "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_layer_load",
                           "save_kv_layer", "wait_for_save", "get_finished"]
        assert ex.rank0.active[1].committed == 0           # not visible before the next iteration
        ex.step()
        assert ex.rank0.active[1].committed == 1
        ex.step()   # 2nd token processed: the request finishes, after a forward that included it
        assert ex.finished[1] and "request_finished" in names()
    finally:
        ex.close()


def test_get_finished_every_iteration_and_a_request_finishes_only_when_every_rank_says_so():
    ex = make(tp=2)
    try:
        SETTINGS.update(save={1}, lag={1: 3})
        ex.add_request(1, list(range(10)), 1)
        ex.run(until=lambda: 1 in ex.rank0.held)
        free_before = ex.free_blocks()
        for _ in range(2):
            LOG.clear()
            ex.step()     # empty batch: only get_finished; rank 1 has not finished saving yet
            assert [e[0] for e in LOG] == ["get_finished", "get_finished"] and 1 in ex.rank0.held
        ex.run(until=lambda: 1 not in ex.rank0.held)
        assert ex.free_blocks() > free_before
    finally:
        ex.close()


def test_async_load_leaves_the_batch_until_every_rank_reports_it():
    ex = make(tp=2)
    try:
        SETTINGS.update(load={1: 8}, lag={0: 2})
        ex.add_request(1, list(range(10)), 1)
        ex.step()
        assert 1 in ex.rank0.active and ex.rank0.active[1].state.name == "DISAGG_GENERATION_TRANS_IN_PROGRESS"
        assert "wait_for_layer_load" not in names()
        ex.run()
        assert ex.loaded_tokens[1] == 8 and ex.finished[1]
    finally:
        ex.close()


@pytest.mark.parametrize("flavour", [Flavour.MAIN, Flavour.V1_2])
def test_cancelling_a_loading_request_keeps_its_blocks_until_the_load_settles(flavour):
    ex = make(flavour=flavour)
    try:
        # 1.2 frees a terminated request's blocks unless request_finished says a transfer runs
        SETTINGS.update(load={2: 8}, lag={0: 4}, save={2} if flavour is Flavour.V1_2 else set())
        ex.add_request(1, list(range(8)), 30)        # keeps a batch running (cancels need one)
        ex.step()
        ex.add_request(2, list(range(10)), 1)
        ex.abort(2)
        ex.step()
        assert ex.finished[2] == []
        holding = ex.rank0.deferred if flavour is Flavour.MAIN else ex.rank0.held
        assert 2 in holding and ex.rank0.manager.has_pending_transfers(2)
        ex.run(until=lambda: 2 not in holding)
        assert not ex.rank0.manager.has_pending_transfers(2) and 2 not in ex.rank0.kv.blocks
        calls = [e for e in LOG if e[:2] == ("request_finished", 2)]
        assert len(calls) == (1 if flavour is Flavour.V1_2 else 0)   # main does not tell the connector
    finally:
        ex.close()


def test_a_connector_exception_ends_the_executor_loop():
    ex = make()
    try:
        SETTINGS.update(raise_on_rank={0})
        ex.add_request(1, list(range(10)), 1)
        with pytest.raises(EngineCrashed, match="connector bug"):
            ex.step()
        with pytest.raises(EngineCrashed):
            ex.step()     # dead for good
    finally:
        ex.close()


def test_one_rank_raising_leaves_the_others_hanging_in_the_gather():
    ex = make(tp=2, step_timeout_s=3.0)
    try:
        SETTINGS.update(raise_on_rank={1})
        with pytest.raises(EngineHung, match=r"ranks \[0\]"):
            ex.step()
    finally:
        ex.close()


def test_returning_an_id_that_is_not_outstanding_crashes_the_engine():
    ex = make()
    try:
        SETTINGS.update(bogus=[99])
        with pytest.raises(EngineCrashed, match="99"):
            ex.step()
    finally:
        ex.close()


@pytest.mark.parametrize("kw", [dict(pipeline_parallel_size=2), dict(context_parallel_size=2),
                                dict(max_beam_width=2), dict(enable_attention_dp=True)])
def test_start_up_rejections(kw):
    with pytest.raises(NotImplementedError):
        make(**kw)


def test_start_up_rejections_of_the_kv_cache_config():
    cc = KvCacheConnectorConfig(__name__, "RecordingScheduler", "RecordingWorker")
    for kv in (KvCacheConfig(host_cache_size=1 << 20), KvCacheConfig(max_attention_window=[8, 16])):
        with pytest.raises(NotImplementedError):
            StandinExecutor(LlmArgs("m", cc, kv_cache_config=kv), ModelShape(), API)
    args = LlmArgs("m", cc)
    args.scheduler_config.capacity_scheduler_policy = "MAX_UTILIZATION"
    with pytest.raises(NotImplementedError, match="no evict"):
        StandinExecutor(args, ModelShape(), API)
