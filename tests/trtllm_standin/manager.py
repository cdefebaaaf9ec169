"""Stand-in of TensorRT-LLM's ``KvCacheConnectorManager`` (one per rank).

Follows ``_torch/pyexecutor/kv_cache_connector.py`` (1.2) and main's
``connectors/kv_cache_connector.py``: the scheduler exists on rank 0 only and its results are
broadcast (pickled) to every rank; async loads and saves are tracked per rank in three stages
(new -> passed to ``get_finished`` -> returned locally); a request counts as finished only once
*every* rank has returned it (all-gather + intersection); loaded requests go back to
``CONTEXT_INIT``; ``has_pending_transfers`` (main) keeps a cancelled request's blocks while a
transfer may touch them. An id a worker returns that is not outstanding raises ``KeyError`` as
the real ``extract_by_id`` does (an engine crash).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .llm_request import LlmRequestState, PyLlmRequest
from .mpi import RankGroup


class Flavour(enum.Enum):
    """Which TensorRT-LLM the stand-in follows where 1.2 and main differ."""

    V1_2 = "1.2"    # handle_metadata always builds; request_finished on every termination
    MAIN = "main"   # handle_metadata skips without output; request_finished only for finished
                    # requests of a batch; has_pending_transfers defers a cancelled request's free


@dataclass
class AsyncRequests:
    saving: Dict[int, PyLlmRequest] = field(default_factory=dict)
    loading: Dict[int, PyLlmRequest] = field(default_factory=dict)

    def add_from(self, other: "AsyncRequests") -> None:
        self.saving.update(other.saving)
        self.loading.update(other.loading)
        other.saving, other.loading = {}, {}

    def extract_by_id(self, saving_ids, loading_ids) -> "AsyncRequests":
        out = AsyncRequests()
        for rid in saving_ids:
            out.saving[rid] = self.saving.pop(rid)    # KeyError on a bogus id, as in TensorRT-LLM
        for rid in loading_ids:
            out.loading[rid] = self.loading.pop(rid)
        return out


class _OutputBuilder:
    """SchedulerOutput as TensorRT-LLM builds it: per request, only what is new."""

    def __init__(self, api: Any):
        self._api = api
        self._seen: Dict[int, Tuple[List[int], List[int]]] = {}
        self.external_loads: Dict[int, int] = {}

    def build(self, context, generation, loading_ids, kv) -> Any:
        out = self._api.SchedulerOutput()
        for req in context:
            if req.request_id in loading_ids:
                continue
            is_new = req.request_id not in self._seen
            rd = self._data(req, kv, True)
            if req.request_id in self.external_loads:
                rd.computed_position -= self.external_loads[req.request_id]
            (out.new_requests if is_new else out.cached_requests).append(rd)
        for req in generation:
            out.cached_requests.append(self._data(req, kv, False))
        self.external_loads = {}
        return out

    def _data(self, req: PyLlmRequest, kv, context: bool) -> Any:
        blocks_seen, tokens_seen = self._seen.setdefault(req.request_id, ([], []))
        blocks, tokens = kv.get_cache_indices(req), req.get_tokens(0)
        new_blocks, new_tokens = blocks[len(blocks_seen):], tokens[len(tokens_seen):]
        blocks_seen.extend(new_blocks)
        tokens_seen.extend(new_tokens)
        if context:
            pos, n = req.context_current_position, min(req.context_remaining_length, req.context_chunk_size)
        else:
            pos, n = len(tokens) - 1, 1
        return self._api.RequestData(req.request_id, list(new_tokens), list(new_blocks), pos, n)


class StandinConnectorManager:
    def __init__(self, api: Any, worker: Any, scheduler: Optional[Any], group: RankGroup, rank: int,
                 flavour: Flavour):
        if (scheduler is not None) != (rank == 0):
            raise AssertionError("The scheduler may only exist on rank 0!")
        self.api, self.worker, self.scheduler = api, worker, scheduler
        self.group, self.rank, self.flavour = group, rank, flavour
        self.new_async = AsyncRequests()
        self.pending_async = AsyncRequests()
        self.local_finished_async = AsyncRequests()
        self.finished_async_loading: Dict[int, PyLlmRequest] = {}
        self.output = _OutputBuilder(api)
        self._scheduler_output: Any = None
        self.calls: List[str] = []

    def _run_on_leader(self, f) -> Any:
        return self.group.broadcast(self.rank, f() if self.scheduler is not None else None)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        if request.is_generation_only_request:
            raise RuntimeError("Connector API is not supported for generation-only requests!")
        self.calls.append(f"get_num_new_matched_tokens:{request.request_id}")
        num, is_async = self._run_on_leader(
            lambda: self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens))
        if num == 0 and is_async:
            raise RuntimeError("load_kv_async must be False when num_tokens is 0!")
        if is_async:
            self.new_async.loading[request.request_id] = request
        self.output.external_loads[request.request_id] = num
        return int(num)

    def should_add_sequence(self, req: PyLlmRequest) -> bool:
        return req.request_id not in self.finished_async_loading

    def update_state_after_alloc(self, req: PyLlmRequest, block_ids: List[int]) -> None:
        if self.scheduler is not None:
            self.calls.append(f"update_state_after_alloc:{req.request_id}")
            self.scheduler.update_state_after_alloc(req, list(block_ids))

    def build_scheduler_output(self, context, generation, kv) -> None:
        self._scheduler_output = self.output.build(context, generation, set(self.new_async.loading), kv)

    def take_scheduled_requests_pending_load(self, context: List[PyLlmRequest]) -> List[PyLlmRequest]:
        kept = []
        for req in context:
            if req.request_id in self.new_async.loading:
                req.state = LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS
                self.new_async.loading[req.request_id] = req   # the canonical (Python) request
            else:
                kept.append(req)
        return kept

    def handle_metadata(self) -> None:
        if self.flavour is Flavour.MAIN and self._scheduler_output is None:
            return   # main returns without re-binding: the previous metadata stays bound
        self.calls.append("build_connector_meta")
        out = self._scheduler_output
        meta = self._run_on_leader(lambda: self.scheduler.build_connector_meta(out))
        self._scheduler_output = None
        self.worker.bind_connector_meta(meta)

    def request_finished(self, req: PyLlmRequest, block_ids: List[int]) -> bool:
        self.finished_async_loading.pop(req.request_id, None)
        self.calls.append(f"request_finished:{req.request_id}")
        saving = bool(self._run_on_leader(lambda: self.scheduler.request_finished(req, list(block_ids))))
        if saving:
            self.new_async.saving[req.request_id] = req
            req.state = LlmRequestState.DISAGG_CONTEXT_TRANS_IN_PROGRESS
        return saving

    def has_pending_transfers(self, rid: int) -> bool:
        return any(rid in a.saving or rid in a.loading
                   for a in (self.new_async, self.pending_async, self.local_finished_async))

    def get_finished(self) -> Tuple[List[PyLlmRequest], List[PyLlmRequest]]:
        """(requests every rank finished saving, requests every rank finished loading)."""
        self.calls.append("get_finished")
        started = list(self.new_async.loading)
        finished_gen = list(self.new_async.saving)
        self.pending_async.add_from(self.new_async)
        fs, fl = self.worker.get_finished(finished_gen, started)
        self.local_finished_async.add_from(self.pending_async.extract_by_id(fs, fl))
        gathered = self.group.allgather(self.rank, (sorted(self.local_finished_async.saving),
                                                    sorted(self.local_finished_async.loading)))
        all_saving = set.intersection(*[set(g[0]) for g in gathered])
        all_loading = set.intersection(*[set(g[1]) for g in gathered])
        done = self.local_finished_async.extract_by_id(all_saving, all_loading)
        for rid, req in done.loading.items():
            req.state = LlmRequestState.CONTEXT_INIT
            self.finished_async_loading[rid] = req
        return list(done.saving.values()), list(done.loading.values())

    def layer_pre_hook(self, layer_idx: int) -> None:
        self.worker.wait_for_layer_load(layer_idx, None)

    def layer_post_hook(self, layer_idx: int) -> None:
        self.worker.save_kv_layer(layer_idx, None)


def ids(requests: Sequence[PyLlmRequest]) -> List[int]:
    return [r.request_id for r in requests]
