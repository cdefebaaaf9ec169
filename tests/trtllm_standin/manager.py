"""Stand-in of TensorRT-LLM 1.2's ``KvCacheConnectorManager`` (the connector's driver).

Ranks are simulated in one process: ``workers[r]`` is rank r's worker, the scheduler exists
on rank 0 only, its results are "broadcast" as pickled copies, and ``get_finished`` results are
"all-gathered" and intersected, so that a request counts as finished only when every rank has
reported it.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .llm_request import LlmRequest, LlmRequestState


class ConnectorContractError(AssertionError):
    """The connector broke a rule of TensorRT-LLM's connector API."""


@dataclass
class AsyncRequests:
    saving: Dict[int, LlmRequest] = field(default_factory=dict)
    loading: Dict[int, LlmRequest] = field(default_factory=dict)

    def take_all_from(self, other: "AsyncRequests") -> None:
        self.saving.update(other.saving)
        self.loading.update(other.loading)
        other.saving, other.loading = {}, {}

    def extract(self, saving_ids, loading_ids) -> "AsyncRequests":
        out = AsyncRequests()
        for rid in saving_ids:
            out.saving[rid] = self.saving.pop(rid)
        for rid in loading_ids:
            out.loading[rid] = self.loading.pop(rid)
        return out


@dataclass
class _RankBooks:
    new: AsyncRequests = field(default_factory=AsyncRequests)             # not yet passed to get_finished
    pending: AsyncRequests = field(default_factory=AsyncRequests)         # passed, not yet returned
    local_finished: AsyncRequests = field(default_factory=AsyncRequests)  # returned here, not by all ranks


class _OutputBuilder:
    """Builds SchedulerOutput the way TensorRT-LLM 1.2 does: per request, only what is new."""

    def __init__(self, api: Any):
        self._api = api
        self._seen: Dict[int, Tuple[List[int], List[int]]] = {}
        self.external_loads: Dict[int, int] = {}

    def build(self, context_reqs: Sequence[LlmRequest], generation_reqs: Sequence[LlmRequest],
              loading_ids: set, block_table: Dict[int, List[int]], chunk: int) -> Any:
        out = self._api.SchedulerOutput()
        for req in context_reqs:
            if req.request_id in loading_ids:
                continue
            is_new = req.request_id not in self._seen
            rd = self._data(req, block_table, chunk, context=True)
            if req.request_id in self.external_loads:
                rd.computed_position -= self.external_loads[req.request_id]
            (out.new_requests if is_new else out.cached_requests).append(rd)
        for req in generation_reqs:
            out.cached_requests.append(self._data(req, block_table, chunk, context=False))
        self.external_loads = {}
        return out

    def _data(self, req: LlmRequest, block_table, chunk: int, context: bool) -> Any:
        blocks_seen, tokens_seen = self._seen.setdefault(req.request_id, ([], []))
        blocks = block_table[req.request_id]
        tokens = req.get_tokens(0)
        new_blocks, new_tokens = blocks[len(blocks_seen):], tokens[len(tokens_seen):]
        blocks_seen.extend(new_blocks)
        tokens_seen.extend(new_tokens)
        if context:
            pos, n = req.context_current_position, min(req.context_remaining_length, chunk)
        else:
            pos, n = len(tokens) - 1, 1
        return self._api.RequestData(req.request_id, list(new_tokens), list(new_blocks), pos, n)

    def forget(self, rid: int) -> None:
        self._seen.pop(rid, None)


class StandinConnectorManager:
    def __init__(self, api: Any, workers: List[Any], scheduler: Optional[Any]):
        if scheduler is None:
            raise ConnectorContractError("the scheduler must exist on rank 0")
        self.api = api
        self.workers = workers
        self.scheduler = scheduler
        self.books = [_RankBooks() for _ in workers]
        self.output = _OutputBuilder(api)
        self._scheduler_output: Any = None
        self.calls: List[str] = []   # call log, for call-order tests

    # leader calls, result broadcast to every rank
    def _broadcast(self, value: Any) -> Any:
        return pickle.loads(pickle.dumps(value))

    def get_num_new_matched_tokens(self, req: LlmRequest, num_computed_tokens: int) -> int:
        if req.is_generation_only_request:
            raise RuntimeError("Connector API is not supported for generation-only requests!")
        self.calls.append(f"get_num_new_matched_tokens:{req.request_id}")
        num, is_async = self._broadcast(self.scheduler.get_num_new_matched_tokens(req, num_computed_tokens))
        if num == 0 and is_async:
            raise ConnectorContractError("load_kv_async must be False when num_tokens is 0")
        if is_async:
            for b in self.books:
                b.new.loading[req.request_id] = req
        self.output.external_loads[req.request_id] = num
        return int(num), bool(is_async)

    def update_state_after_alloc(self, req: LlmRequest, block_ids: List[int]) -> None:
        self.calls.append(f"update_state_after_alloc:{req.request_id}")
        self.scheduler.update_state_after_alloc(req, list(block_ids))

    def build_scheduler_output(self, context_reqs, generation_reqs, block_table, chunk: int) -> None:
        self._scheduler_output = self.output.build(context_reqs, generation_reqs,
                                                   set(self.books[0].new.loading), block_table, chunk)

    def handle_metadata(self) -> None:
        self.calls.append("build_connector_meta")
        meta = self._broadcast(self.scheduler.build_connector_meta(self._scheduler_output))
        self._scheduler_output = None
        for w in self.workers:
            w.bind_connector_meta(self._broadcast(meta))

    def request_finished(self, req: LlmRequest, block_ids: List[int]) -> bool:
        self.calls.append(f"request_finished:{req.request_id}")
        saving = bool(self._broadcast(self.scheduler.request_finished(req, list(block_ids))))
        if saving:
            for b in self.books:
                b.new.saving[req.request_id] = req
            req.state = LlmRequestState.DISAGG_CONTEXT_TRANS_IN_PROGRESS
        return saving

    def get_finished(self) -> Tuple[List[LlmRequest], List[LlmRequest]]:
        """Returns (requests finished saving, requests finished loading), agreed by all ranks."""
        self.calls.append("get_finished")
        gathered = []
        for rank, (w, b) in enumerate(zip(self.workers, self.books)):
            started = list(b.new.loading)
            finished_gen = list(b.new.saving)
            b.pending.take_all_from(b.new)
            fs, fl = w.get_finished(finished_gen, started)
            fs, fl = [int(x) for x in fs], [int(x) for x in fl]
            bad = [x for x in fs if x not in b.pending.saving] + [x for x in fl if x not in b.pending.loading]
            if bad:
                raise ConnectorContractError(
                    f"rank {rank} returned ids {bad} that were not (or no longer) outstanding")
            b.local_finished.take_all_from(b.pending.extract(fs, fl))
            gathered.append((set(b.local_finished.saving), set(b.local_finished.loading)))
        all_saving = set.intersection(*[g[0] for g in gathered])
        all_loading = set.intersection(*[g[1] for g in gathered])
        done = [b.local_finished.extract(all_saving, all_loading) for b in self.books]
        saved = list(done[0].saving.values())
        loaded = list(done[0].loading.values())
        for req in loaded:
            req.state = LlmRequestState.CONTEXT_INIT
        return saved, loaded

    def layer_pre_hook(self, layer_idx: int) -> None:
        for w in self.workers:
            w.wait_for_layer_load(layer_idx, None)

    def layer_post_hook(self, layer_idx: int) -> None:
        for w in self.workers:
            w.save_kv_layer(layer_idx, None)
