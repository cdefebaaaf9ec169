"""Stand-in of a TensorRT-LLM instance: the creator, the ranks' threads, and a driver.

Follows ``_torch/pyexecutor/py_executor_creator.py`` and ``PyExecutor.__init__``:

* the creator rejects a capacity scheduler policy other than GUARANTEED_NO_EVICT, imports
  ``connector_module`` and builds, on every rank, the worker and (rank 0 only) the scheduler
  **concurrently** on a two-thread pool, each as ``cls(llm_args)``;
* on current TensorRT-LLM (`Flavour.MAIN`) the creator writes a tokens-per-block override of
  the attention backend back into ``llm_args.kv_cache_config`` before that; 1.2 does not;
* ``PyExecutor`` then rejects what the connector path does not support (pipeline or context
  parallelism, beam search, attention DP, host KV offload, variable sliding window) and hands
  every rank's worker its pool ``[num_blocks, num_layers, kv_factor, per_block]`` once.

Each rank's executor loop runs on its own thread (`mpi`); `StandinExecutor.step` runs one
iteration on every rank and waits for all of them with a deadline: a rank whose connector
raised is dead (`EngineCrashed`), and ranks left waiting for it in a collective are reported
as `EngineHung` when the deadline passes.
"""
from __future__ import annotations

import importlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set

import torch

from .executor import RankExecutor
from .kv_manager import StandinKvCacheManager
from .llm_request import PyLlmRequest
from .manager import Flavour, StandinConnectorManager
from .mpi import RankGroup, as_rank, run_as_rank

NO_EVICT = "GUARANTEED_NO_EVICT"


class EngineCrashed(RuntimeError):
    """A rank's executor loop ended with an exception (TensorRT-LLM: the engine dies)."""


class EngineHung(RuntimeError):
    """Some ranks never finished the iteration: they wait in a collective for a dead rank."""


@dataclass
class KvCacheConfig:
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    max_attention_window: Optional[List[int]] = None
    host_cache_size: Optional[int] = None


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
    """Shaped like ``TorchLlmArgs`` where the connector or the creator reads it."""

    model: str
    kv_connector_config: KvCacheConnectorConfig
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    context_parallel_size: int = 1
    max_beam_width: int = 1
    enable_attention_dp: bool = False
    speculative_config: Any = None
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
    context_chunk: int = 1 << 30      # prompt tokens computed per iteration
    device: str = "cpu"               # "{rank}" is replaced by the TP rank ("cuda:{rank}")
    backend_tokens_per_block: Optional[int] = None   # an attention backend's override (FlashMLA)


def _check_executor(args: LlmArgs) -> None:
    """What ``PyExecutor._maybe_init_kv_connector_manager`` (main) rejects."""
    kv = args.kv_cache_config
    if args.pipeline_parallel_size > 1 or args.context_parallel_size > 1:
        raise NotImplementedError("KV Cache Connector is not supported with pipeline or context parallelism")
    if args.max_beam_width > 1:
        raise NotImplementedError("KV Cache Connector is not supported with beam search")
    if args.enable_attention_dp:
        raise NotImplementedError("KV Cache Connector is not supported with attention data parallelism")
    if kv.host_cache_size:
        raise NotImplementedError("KV Cache Connector is not supported with KV cache host offloading")
    if kv.max_attention_window is not None and len(set(kv.max_attention_window)) > 1:
        raise NotImplementedError("KV Cache Connector is not supported with variable sliding-window attention")


class StandinExecutor:
    def __init__(self, llm_args: LlmArgs, shape: ModelShape, api: Any, flavour: Flavour = Flavour.MAIN,
                 step_timeout_s: float = 120.0, hooks: Optional[Dict[str, Callable]] = None):
        if llm_args.scheduler_config.capacity_scheduler_policy != NO_EVICT:
            raise NotImplementedError("KV connector is only supported with guaranteed no evict scheduler policy.")
        tp = llm_args.tensor_parallel_size
        if shape.num_kv_heads % tp:
            raise ValueError("num_kv_heads must divide by tensor_parallel_size")
        self.args, self.shape, self.api, self.flavour = llm_args, shape, api, flavour
        self.tpb = shape.backend_tokens_per_block or llm_args.kv_cache_config.tokens_per_block
        if flavour is Flavour.MAIN:
            llm_args.kv_cache_config.tokens_per_block = self.tpb
        self.heads = shape.num_kv_heads // tp
        self.step_timeout_s = step_timeout_s
        self.hooks: Dict[str, Callable] = dict(hooks or {})
        cc = llm_args.kv_connector_config
        module = importlib.import_module(cc.connector_module)
        worker_cls = getattr(module, cc.connector_worker_class)
        scheduler_cls = getattr(module, cc.connector_scheduler_class)
        self.workers: List[Any] = []
        self.scheduler: Any = None
        self._closed = False
        try:
            for rank in range(tp):   # one process per rank in TensorRT-LLM
                with ThreadPoolExecutor(max_workers=2) as pool:
                    wf = pool.submit(run_as_rank, rank, tp, worker_cls, llm_args)
                    if rank == 0:
                        self.scheduler = pool.submit(run_as_rank, rank, tp, scheduler_cls, llm_args).result()
                    self.workers.append(wf.result())
            _check_executor(llm_args)
            self.group = RankGroup(tp)
            self.pools = [torch.full((shape.num_blocks, shape.num_layers, shape.kv_factor,
                                      self.heads * shape.head_dim * self.tpb), float("nan"), dtype=shape.dtype,
                                     device=shape.device.replace("{rank}", str(r))) for r in range(tp)]
            self.ranks: List[RankExecutor] = []
            for rank, (worker, pool) in enumerate(zip(self.workers, self.pools)):
                kv = StandinKvCacheManager(shape.num_blocks, self.tpb, llm_args.kv_cache_config.enable_block_reuse)
                mgr = StandinConnectorManager(api, worker, self.scheduler if rank == 0 else None,
                                              self.group, rank, flavour)
                kv.connector_manager = mgr
                with as_rank(rank, tp):
                    worker.register_kv_caches(pool)
                self.ranks.append(RankExecutor(rank, self.group, kv, mgr, pool, heads=self.heads,
                                               head_dim=shape.head_dim, context_chunk=shape.context_chunk,
                                               flavour=flavour, hooks=self.hooks))
        except BaseException:
            self._close_workers()
            raise
        self._new: List[tuple] = []
        self._cancels: Set[int] = set()
        self._done: "queue.Queue[tuple]" = queue.Queue()
        self._inboxes = [queue.Queue() for _ in range(tp)]
        self.dead: Optional[RuntimeError] = None
        self._threads = [threading.Thread(target=self._rank_loop, args=(r,), daemon=True,
                                          name=f"standin-rank{r}") for r in range(tp)]
        for t in self._threads:
            t.start()

    # -- the ranks' threads ---------------------------------------------------------------------
    def _rank_loop(self, rank: int) -> None:
        with as_rank(rank, len(self.ranks)):
            while True:
                job = self._inboxes[rank].get()
                if job is None:
                    return
                new, cancels = job
                try:
                    self.ranks[rank].iteration([PyLlmRequest(*spec) for spec in new], cancels)
                except BaseException as e:  # noqa: BLE001 - the rank's loop ends: an engine crash
                    self._done.put((rank, e))
                    return
                self._done.put((rank, None))

    # -- driver ---------------------------------------------------------------------------------
    def add_request(self, request_id: int, prompt: List[int], max_new_tokens: int,
                    salt: Optional[str] = None) -> None:
        self._new.append((request_id, list(prompt), max_new_tokens, salt))

    def abort(self, request_id: int) -> None:
        self._cancels.add(request_id)

    def step(self) -> None:
        if self.dead is not None:
            raise self.dead
        new, cancels = self._new, set(self._cancels)
        self._new, self._cancels = [], set()
        for inbox in self._inboxes:
            inbox.put((new, cancels))
        errors: Dict[int, BaseException] = {}
        pending = set(range(len(self.ranks)))
        deadline = time.monotonic() + self.step_timeout_s
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, err = self._done.get(timeout=left)
            except queue.Empty:
                break
            pending.discard(rank)
            if err is not None:
                errors[rank] = err
        if pending:
            self.dead = EngineHung(f"ranks {sorted(pending)} did not finish the iteration within "
                                   f"{self.step_timeout_s}s; crashed: {errors}")
            self.group.abort()
        elif errors:
            self.dead = EngineCrashed(f"executor loop ended: {errors}")
        if self.dead is not None:
            self.dead.errors = errors  # type: ignore[attr-defined]
            raise self.dead

    def run(self, max_iterations: int = 100_000, until: Optional[Callable[[], bool]] = None) -> None:
        for _ in range(max_iterations):
            if (until() if until is not None else not self.busy()):
                return
            self.step()
        raise TimeoutError(f"still busy after {max_iterations} iterations")

    # -- rank 0's view (ranks run in lockstep) ----------------------------------------------------
    def busy(self) -> bool:
        return bool(self._new) or self.ranks[0].busy()

    @property
    def rank0(self) -> RankExecutor:
        return self.ranks[0]

    @property
    def finished(self) -> Dict[int, List[int]]:
        return self.rank0.finished

    @property
    def loaded_tokens(self) -> Dict[int, int]:
        return self.rank0.loaded_tokens

    def free_blocks(self, rank: int = 0) -> int:
        return len(self.ranks[rank].kv.free_blocks)

    @property
    def iterations(self) -> int:
        return self.rank0.iterations

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for inbox in self._inboxes:
            inbox.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._close_workers()

    def _close_workers(self) -> None:
        for w in self.workers:
            close = getattr(w, "close", None)
            if close is not None:
                close()
