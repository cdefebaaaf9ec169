"""Stand-in of TensorRT-LLM 1.2's PyExecutor loop, as far as the KV connector sees it.

One `step()` is one executor iteration, in TensorRT-LLM 1.2's order:

1. abort requests asked to be cancelled, including ones loading asynchronously (they finish:
   ``request_finished``);
2. schedule waiting requests, first come first served, under GUARANTEED_NO_EVICT (all blocks
   a request will ever need are allocated up front): ``get_num_new_matched_tokens`` (rank-0
   scheduler, broadcast), block allocation, ``update_state_after_alloc``; requests the
   connector loads asynchronously wait outside the batch until every rank reports them loaded;
3. build the scheduler output; if the batch is not empty: the connector metadata
   (``build_connector_meta`` on rank 0), bound on every rank;
4. (batch not empty) ``start_load_kv`` on every rank;
5. (batch not empty) the forward pass: for each layer, ``wait_for_layer_load`` (pre-hook),
   compute that layer's KV for the scheduled tokens, ``save_kv_layer`` (post-hook), on every rank;
6. (batch not empty) ``wait_for_save`` on every rank;
7. sampling; requests that reached ``max_new_tokens`` finish: ``request_finished``; if it
   returns True their blocks stay allocated;
8. ``get_finished`` on every rank, every iteration; requests every rank reported saved free their blocks;
   requests every rank reported loaded become schedulable context requests.
"""
from __future__ import annotations

import collections
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional

import torch

from . import fake_model, mpi
from .llm_request import LlmRequest, LlmRequestState
from .manager import StandinConnectorManager

logger = logging.getLogger(__name__)

NO_EVICT = "GUARANTEED_NO_EVICT"


# -- llm_args, shaped like TensorRT-LLM's TorchLlmArgs where the connector reads it ----------
@dataclass
class KvCacheConfig:
    tokens_per_block: int = 32
    max_attention_window: Optional[List[int]] = None


@dataclass
class SchedulerConfig:
    capacity_scheduler_policy: str = NO_EVICT


@dataclass
class KvCacheConnectorConfig:
    connector_module: str
    connector_scheduler_class: str
    connector_worker_class: str


@dataclass
class LlmArgs:
    model: str
    kv_connector_config: KvCacheConnectorConfig
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_beam_width: int = 1
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int = 2
    kv_factor: int = 2
    num_kv_heads: int = 2
    head_dim: int = 8
    num_blocks: int = 64
    dtype: torch.dtype = torch.float16
    context_chunk: int = 1 << 30   # tokens of a prompt computed per iteration
    device: str = "cpu"            # pool device; "{rank}" is replaced by the TP rank ("cuda:{rank}")


class StandinExecutor:
    def __init__(self, llm_args: LlmArgs, shape: ModelShape, api: Any):
        if llm_args.pipeline_parallel_size != 1:
            raise ValueError("KV connector does not support pipeline parallelism")
        if llm_args.scheduler_config.capacity_scheduler_policy != NO_EVICT:
            raise ValueError("KV connector requires the GUARANTEED_NO_EVICT scheduler policy")
        tp = llm_args.tensor_parallel_size
        if shape.num_kv_heads % tp:
            raise ValueError("num_kv_heads must divide by tensor_parallel_size")
        self.args, self.shape, self.api = llm_args, shape, api
        self.tpb = llm_args.kv_cache_config.tokens_per_block
        self.heads = shape.num_kv_heads // tp
        cc = llm_args.kv_connector_config
        module = importlib.import_module(cc.connector_module)
        worker_cls = getattr(module, cc.connector_worker_class)
        scheduler_cls = getattr(module, cc.connector_scheduler_class)
        self.workers: List[Any] = []
        scheduler = None
        for rank in range(tp):
            with mpi.as_rank(rank):
                self.workers.append(worker_cls(llm_args))
                if rank == 0:
                    scheduler = scheduler_cls(llm_args)
        self.scheduler = scheduler
        per_block = self.heads * shape.head_dim * self.tpb
        self.pools = [torch.full((shape.num_blocks, shape.num_layers, shape.kv_factor, per_block),
                                 float("nan"), dtype=shape.dtype,
                                 device=shape.device.replace("{rank}", str(r))) for r in range(tp)]
        for w, pool in zip(self.workers, self.pools):
            w.register_kv_caches(pool)
        self.manager = StandinConnectorManager(api, self.workers, scheduler)
        self.free_blocks: Deque[int] = collections.deque(range(shape.num_blocks))
        self.block_table: Dict[int, List[int]] = {}
        self.waiting: Deque[LlmRequest] = collections.deque()
        self.loading: Dict[int, LlmRequest] = {}
        self.active: Dict[int, LlmRequest] = {}
        self.saving: Dict[int, LlmRequest] = {}
        self.finished: Dict[int, List[int]] = {}     # request id -> generated tokens
        self.loaded_tokens: Dict[int, int] = {}     # request id -> tokens the connector loaded
        self._aborts: set = set()
        self.iterations = 0

    # -- client side ----------------------------------------------------------------------
    def add_request(self, req: LlmRequest) -> None:
        self.waiting.append(req)

    def abort(self, request_id: int) -> None:
        self._aborts.add(request_id)

    def busy(self) -> bool:
        return bool(self.waiting or self.loading or self.active or self.saving)

    # -- one iteration -----------------------------------------------------------------------
    def step(self) -> None:
        self.iterations += 1
        self._apply_aborts()
        newly_loading = self._schedule()
        ctx = [r for r in self.active.values() if r.state is LlmRequestState.CONTEXT_INIT]
        gen = [r for r in self.active.values() if r.state is LlmRequestState.GENERATION_IN_PROGRESS]
        self.manager.build_scheduler_output(ctx, gen, self.block_table, self.shape.context_chunk)
        # As in PyExecutor, metadata, start_load_kv, the forward pass and wait_for_save happen
        # only when the scheduled batch is not empty (requests that start loading asynchronously
        # this iteration count: TensorRT-LLM takes them out of the batch after this check).
        if ctx or gen or newly_loading:
            self.manager.handle_metadata()
            for w in self.workers:
                w.start_load_kv(None)
            spans = {r.request_id: self._span(r) for r in ctx + gen}
            for layer in range(self.shape.num_layers):
                self.manager.layer_pre_hook(layer)
                for req in ctx + gen:
                    start, end = spans[req.request_id]
                    for rank, pool in enumerate(self.pools):
                        fake_model.write_kv(pool, self.block_table[req.request_id], req.get_tokens(0),
                                            start, end, layer, self.heads, rank * self.heads,
                                            self.shape.head_dim, self.tpb)
                self.manager.layer_post_hook(layer)
            for w in self.workers:
                w.wait_for_save(None)
            for req in ctx + gen:
                self._advance(req, spans[req.request_id][1])
        # get_finished runs every iteration.
        saved, loaded = self.manager.get_finished()
        for req in saved:
            self.saving.pop(req.request_id, None)
            self._free(req.request_id)
        for req in loaded:
            if self.loading.pop(req.request_id, None) is not None:   # not cancelled meanwhile
                self.active[req.request_id] = req

    def run(self, max_iterations: int = 10000, until=None) -> None:
        """Step while busy (or until ``until()`` is true)."""
        for _ in range(max_iterations):
            if until is not None and until():
                return
            if until is None and not self.busy():
                return
            self.step()
        raise TimeoutError(f"still busy after {max_iterations} iterations")

    # -- internals --------------------------------------------------------------------------
    def _span(self, req: LlmRequest) -> tuple:
        if req.state is LlmRequestState.CONTEXT_INIT:
            start = req.context_current_position
            return start, min(len(req.prompt), start + self.shape.context_chunk)
        n = len(req.get_tokens(0))
        return n - 1, n

    def _advance(self, req: LlmRequest, end: int) -> None:
        if req.state is LlmRequestState.CONTEXT_INIT:
            req.context_current_position = end
            if end < len(req.prompt):
                return
            req.state = LlmRequestState.GENERATION_IN_PROGRESS
        token = fake_model.sample(self.pools, self.block_table[req.request_id], req.get_tokens(0),
                                  self.heads, self.shape.head_dim, self.tpb)
        req.generated.append(token)
        if len(req.generated) >= req.max_new_tokens:
            self._finish(req)

    def _finish(self, req: LlmRequest) -> None:
        self.active.pop(req.request_id, None)
        req.state = LlmRequestState.GENERATION_COMPLETE
        self.finished[req.request_id] = list(req.generated)
        if self.manager.request_finished(req, self.block_table[req.request_id]):
            self.saving[req.request_id] = req
        else:
            self._free(req.request_id)

    def _free(self, rid: int) -> None:
        self.free_blocks.extend(self.block_table.pop(rid, []))
        self.manager.output.forget(rid)

    def _apply_aborts(self) -> None:
        for rid in list(self._aborts):
            for req in list(self.waiting):
                if req.request_id == rid:
                    self.waiting.remove(req)
                    self.finished[rid] = []
                    self._aborts.discard(rid)
            req = self.active.get(rid) or self.loading.pop(rid, None)
            if req is not None:
                # Like PyExecutor without a cache transceiver, a request is cancelled whatever
                # its state, including while the connector loads it asynchronously: it finishes
                # and ``request_finished`` decides whether its blocks must stay allocated.
                req.cancelled = True
                self._aborts.discard(rid)
                self._finish(req)

    def _schedule(self) -> List[LlmRequest]:
        """Admit waiting requests; returns those that start loading asynchronously."""
        loading: List[LlmRequest] = []
        while self.waiting:
            req = self.waiting[0]
            need = -(-(len(req.prompt) + req.max_new_tokens) // self.tpb)
            if need > len(self.free_blocks):
                break    # no-evict: wait until enough blocks are free
            self.waiting.popleft()
            num, is_async = self.manager.get_num_new_matched_tokens(req, 0)
            blocks = [self.free_blocks.popleft() for _ in range(need)]
            self.block_table[req.request_id] = blocks
            self.manager.update_state_after_alloc(req, blocks)
            req.context_current_position = num
            self.loaded_tokens[req.request_id] = num
            if is_async:
                req.state = LlmRequestState.DISAGG_GENERATION_TRANS_IN_PROGRESS
                self.loading[req.request_id] = req
                loading.append(req)
            else:
                req.state = LlmRequestState.CONTEXT_INIT
                self.active[req.request_id] = req
        return loading

    def close(self) -> None:
        for w in self.workers:
            close = getattr(w, "close", None)
            if close is not None:
                close()
