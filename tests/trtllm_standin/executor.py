"""Stand-in of one rank's ``PyExecutor`` overlap loop, as far as a KV connector sees it.

Follows ``_torch/pyexecutor/py_executor.py`` (``_executor_loop_overlap``). One `iteration`:

1. fetch new requests and cancellations (every rank gets the same);
2. schedule under GUARANTEED_NO_EVICT (a context request is admitted only if everything it can
   need is free; context chunks of ``context_chunk`` tokens; generation requests always);
3. batch not empty: ``prepare_resources`` (``add_sequence`` -> ``get_num_new_matched_tokens``
   only with block reuse on, ``update_state_after_alloc``, ``build_scheduler_output``), then
   ``_kv_connector_start_batch``: requests the connector loads asynchronously leave the batch
   (``take_scheduled_requests_pending_load``), ``handle_metadata`` (rank-0
   ``build_connector_meta``, broadcast, bind), ``start_load_kv`` on every rank;
4. what is left of the batch: the forward pass, per layer ``wait_for_layer_load`` /
   KV writes / ``save_kv_layer``, then ``wait_for_save``; sampling (an all-reduce across
   ranks); context positions advance (``_update_request_states``). An exception in the forward
   step (connector hooks included) fails every active request, as ``_handle_errors`` does;
5. the *previous* iteration's batch is processed now (overlap): its sampled tokens become
   visible, finished requests go through ``request_finished`` (main: ``_send_kv_async``;
   1.2: at termination), cancellations are applied (``_handle_canceled_requests``) and
   finished requests terminate (``_handle_responses``): blocks are freed unless a save is
   pending, or (main) the manager still has a transfer for the request;
6. every iteration, batch or not: the manager's ``get_finished`` (worker + all-gather): saved
   requests free their blocks, loaded requests become schedulable context requests.

Any other exception from a connector method propagates: the rank's loop ends (an engine crash).
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

import torch

from . import fake_model
from .kv_manager import StandinKvCacheManager
from .llm_request import LlmRequestState, PyLlmRequest
from .manager import Flavour, StandinConnectorManager
from .mpi import RankGroup

logger = logging.getLogger(__name__)


@dataclass
class BatchState:
    requests: List[PyLlmRequest] = field(default_factory=list)
    sampled: List[Tuple[PyLlmRequest, int]] = field(default_factory=list)  # (request, device len)


class RankExecutor:
    def __init__(self, rank: int, group: RankGroup, kv: StandinKvCacheManager,
                 manager: StandinConnectorManager, pool: torch.Tensor, *, heads: int, head_dim: int,
                 context_chunk: int, flavour: Flavour, hooks: Dict[str, Any]):
        self.rank, self.group, self.kv, self.manager, self.pool = rank, group, kv, manager, pool
        self.worker = manager.worker
        self.heads, self.head_dim, self.chunk = heads, head_dim, context_chunk
        self.flavour, self.hooks = flavour, hooks
        self.waiting: Deque[PyLlmRequest] = collections.deque()
        self.active: Dict[int, PyLlmRequest] = {}
        self.held: Dict[int, PyLlmRequest] = {}      # terminated, blocks kept for a pending save
        self.deferred: Dict[int, PyLlmRequest] = {}  # (main) terminated, transfer still pending
        self.finished: Dict[int, List[int]] = {}
        self.errors: Dict[int, str] = {}
        self.loaded_tokens: Dict[int, int] = {}
        self.cancel_ids: Set[int] = set()
        self.previous: Optional[BatchState] = None
        self.iterations = 0

    # -- one iteration -------------------------------------------------------------------------
    def iteration(self, new: List[PyLlmRequest], cancels: Set[int]) -> None:
        self.iterations += 1
        self.waiting.extend(new)
        self.cancel_ids |= cancels
        context, generation = self._schedule()
        batch = None
        if context or generation:
            self.kv.prepare_resources(context, generation)
            for req in context:
                self.loaded_tokens.setdefault(req.request_id, req.prepopulated_prompt_len)
            self._hook("after_prepare_resources")
            context = self.manager.take_scheduled_requests_pending_load(context)
            self.manager.handle_metadata()
            self.worker.start_load_kv(None)
            if context or generation:
                batch = self._forward_step(context, generation)
        if self.previous is not None:
            self._process_previous_batch(self.previous)
        self.previous = batch
        saved, loaded = self.manager.get_finished()
        for req in saved:
            self._free(self.held.pop(req.request_id, req))
        for rid in [r for r in self.deferred if not self.manager.has_pending_transfers(r)]:
            self._free(self.deferred.pop(rid))

    def _hook(self, name: str) -> None:
        fn = self.hooks.get(name)
        if fn is not None:
            fn(self)

    def _schedule(self) -> Tuple[List[PyLlmRequest], List[PyLlmRequest]]:
        context, generation = [], []
        for req in self.active.values():
            if req.is_finished:
                continue
            if req.state is LlmRequestState.GENERATION_IN_PROGRESS:
                generation.append(req)
            elif req.state is LlmRequestState.CONTEXT_INIT:
                context.append(req)
        while self.waiting and self.kv.reserve(self.waiting[0]):
            req = self.waiting.popleft()
            self.active[req.request_id] = req
            context.append(req)
        for req in context:
            req.context_chunk_size = min(req.context_remaining_length, self.chunk)
        return context, generation

    # -- forward ------------------------------------------------------------------------------
    def _forward_step(self, context: List[PyLlmRequest], generation: List[PyLlmRequest]) -> BatchState:
        state = BatchState(requests=context + generation)
        try:
            spans = {}
            for req in context:
                spans[req.request_id] = (req.context_current_position,
                                         req.context_current_position + req.context_chunk_size)
            for req in generation:
                self.kv.grow_for_next_token(req)
                spans[req.request_id] = (len(req.device_tokens) - 1, len(req.device_tokens))
            for layer in range(self.pool.shape[1]):
                self.manager.layer_pre_hook(layer)
                for req in state.requests:
                    start, end = spans[req.request_id]
                    fake_model.write_kv(self.pool, self.kv.blocks[req.request_id], req.device_tokens,
                                        start, end, layer, self.heads, self.rank * self.heads,
                                        self.head_dim, self.kv.tokens_per_block)
                self.manager.layer_post_hook(layer)
            self.worker.wait_for_save(None)
        except Exception as e:  # noqa: BLE001 - PyExecutor._forward_step -> _handle_errors
            logger.error("rank %d: error in the forward step: %s", self.rank, e)
            self._handle_errors(f"{type(e).__name__}: {e}")
            return BatchState()
        for req in state.requests:
            end = spans[req.request_id][1]
            if end < req.prompt_len:
                continue
            score = fake_model.partial_score(self.pool, self.kv.blocks[req.request_id], end, self.heads,
                                             self.head_dim, self.kv.tokens_per_block)
            tok = fake_model.token_from(req.device_tokens[:end], self.group.allreduce_sum(self.rank, score))
            req.device_tokens.append(tok)
            state.sampled.append((req, len(req.device_tokens)))
        for req in context:   # _update_request_states
            req.context_current_position = spans[req.request_id][1]
            if req.context_current_position >= req.prompt_len:
                req.state = LlmRequestState.GENERATION_IN_PROGRESS
        return state

    def _handle_errors(self, msg: str) -> None:
        for req in list(self.active.values()):
            req.finish_by_reason("error")
            self.errors[req.request_id] = msg
        self._handle_responses()

    # -- the previous batch (overlap) -----------------------------------------------------------
    def _process_previous_batch(self, prev: BatchState) -> None:
        for req, device_len in prev.sampled:   # _update_requests
            if req.is_finished or req.request_id not in self.active:
                continue
            req.committed = min(device_len - req.prompt_len, req.max_new_tokens)
            if req.committed >= req.max_new_tokens:
                req.finish_by_reason("length")
        if self.flavour is Flavour.MAIN:       # _send_kv_async -> request_finished
            for req in prev.requests:
                if req.is_finished and req.request_id in self.active:
                    self.manager.request_finished(req, self.kv.get_cache_indices(req))
        for rid in sorted(self.cancel_ids):    # _handle_canceled_requests
            req = self.active.get(rid)
            if req is not None and not req.is_finished:
                req.finish_by_reason("cancelled")
            for w in [w for w in self.waiting if w.request_id == rid]:
                self.waiting.remove(w)
                self.finished[rid] = []
        self.cancel_ids.clear()
        self._handle_responses()

    def _handle_responses(self) -> None:
        for rid, req in list(self.active.items()):
            if not req.is_finished:
                continue
            del self.active[rid]
            self.finished[rid] = list(req.generated)
            if req.state is LlmRequestState.DISAGG_CONTEXT_TRANS_IN_PROGRESS:
                self.held[rid] = req                      # main: save pending, not terminated
            elif self.flavour is Flavour.V1_2:
                self._terminate_v12(req)
            elif self.manager.has_pending_transfers(rid):
                self.deferred[rid] = req                  # main: keep while a transfer may run
            else:
                self._free(req)

    def _terminate_v12(self, req: PyLlmRequest) -> None:
        try:
            block_ids = self.kv.get_cache_indices(req)
        except IndexError:
            self._free(req)
            return
        if self.manager.request_finished(req, block_ids):
            self.held[req.request_id] = req               # 1.2: pinned until the save is reported
        else:
            self._free(req)

    def _free(self, req: PyLlmRequest) -> None:
        self.kv.free_resources(req)

    def busy(self) -> bool:
        # A cancellation alone is no work: TensorRT-LLM applies it with the next batch.
        return bool(self.waiting or self.active or self.held or self.deferred)
