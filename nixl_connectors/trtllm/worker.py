"""Worker side (every rank) of the TensorRT-LLM connector.

Each rank's worker owns one `transport.Agent` (built by the adapter kit) over its shard of the
KV pool, and one `RequestRecord` per request it takes part in. The context leg
(`ContextLeg`) exposes and holds finished requests' blocks; the generation leg
(`GenerationLeg`) pulls claimed hand-offs. ``get_finished`` computes its answer from the
records.

No method TensorRT-LLM calls per iteration lets an exception out: an exception there ends the
executor loop (and, with TP > 1, leaves the other ranks waiting in the connector manager's
all-gather until they are killed). Such an error is logged, counted (`connector_errors`) and
answered with the safe value (no ids this call); the engine and the ranks stay in step.
"""
from __future__ import annotations

import functools
import logging
import uuid
from typing import Any, Callable, TypeVar

import torch

from transport import Descs, cuda_sync

from ..handoff.lifecycle import ConsumerBook, ProducerBook
from ..kit import KvCompat, make_agent
from ..kit.compat import layout_signature
from . import rank_link
from .config import ConnectorSettings
from .context_directory import ContextDirectory
from .context_leg import ContextLeg
from .engine_api import KvCacheConnectorWorker, engine_rank
from .engine_args import configured_tokens_per_block, engine_shape
from .generation_leg import GenerationLeg
from .layout import PoolLayout, PoolLayoutError, pool_layout
from .metadata import ConnectorMetadata
from .records import Phase, RequestRecord, reportable
from .routing import Leg

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _engine_call(default: Callable[[], T]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Never let an exception escape into TensorRT-LLM's executor loop (see module doc)."""
    def deco(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(self: "UcxKvConnectorWorker", *args: Any, **kw: Any) -> T:
            try:
                return fn(self, *args, **kw)
            except Exception:  # noqa: BLE001 - see module doc
                self.connector_errors += 1
                logger.exception("rank %d: %s failed; the engine continues", self.rank, fn.__name__)
                return default()
        return wrapper
    return deco


class UcxKvConnectorWorker(KvCacheConnectorWorker):
    """`KvCacheConnectorWorker` that moves prompt blocks with `transport`."""

    def __init__(self, llm_args: Any, settings: ConnectorSettings | None = None):
        super().__init__(llm_args)
        self._settings = settings or ConnectorSettings.from_env()
        self._shape = engine_shape(llm_args)           # start-up checks (clear error)
        self._settings.trtllm.check_tp(self._shape.tp_size)
        self._rank = engine_rank()
        self._role = self._settings.trtllm.role
        self._leg = Leg.CONTEXT if self._settings.trtllm.holds else Leg.GENERATION
        self._layout_tpb: int | None = None
        self._agent: Any = None
        self._layout: PoolLayout | None = None
        self._region: Any = None
        self._pool: torch.Tensor | None = None
        self._save_event: Any = None
        self._directory: ContextDirectory | None = None
        self._ctx: ContextLeg | None = None
        self._gen: GenerationLeg | None = None
        self._records: dict[int, RequestRecord] = {}
        self._seen_seq = 0
        self.tokens_per_block: int | None = None
        self.connector_errors = 0
        self._closed = False

    # -- introspection (tests, diagnostics) -------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def address(self) -> str | None:
        return self._settings.agent.advertised(self._agent.address) if self._agent else None

    @property
    def agent(self) -> Any:
        return self._agent

    def record(self, request_id: int) -> RequestRecord | None:
        return self._records.get(request_id)

    @property
    def failed_pulls(self) -> int:
        return self._gen.failed_pulls if self._gen is not None else 0

    # -- set-up -----------------------------------------------------------------------------
    def register_kv_cache_layout(self, layout: Any) -> None:
        """Current TensorRT-LLM: the layout carries the pool's real ``tokens_per_block``."""
        self._layout_tpb = int(layout.tokens_per_block)
        tensor = layout.as_single_pool_tensor()
        if tensor is None:
            raise PoolLayoutError("this KV cache cannot be described as one pool tensor "
                                  f"({len(layout.groups)} layer groups); not supported")
        self.register_kv_caches(tensor)

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        if self._agent is not None:
            raise RuntimeError("KV cache already registered")
        t = kv_cache_tensor
        layout = pool_layout(t.shape, t.stride(), t.element_size(), t.storage_offset())
        tpb = self._layout_tpb or self._settings.trtllm.tokens_per_block \
            or configured_tokens_per_block(self._llm_args)
        if t.shape[3] % tpb:
            raise PoolLayoutError(f"pool block of {t.shape[3]} elements per layer and kv is not a multiple "
                                  f"of tokens_per_block={tpb}: set tokens_per_block in the connector config")
        compat = KvCompat("trtllm", self._settings.trtllm.model_key, str(t.dtype).replace("torch.", ""),
                          layout.num_layers, layout_signature({"pool": tuple(t.shape)}, block_dim=0))
        compat = compat.with_extra({"tokens_per_block": tpb, "tp_size": self._shape.tp_size,
                                    "block_bytes": layout.block_bytes})
        # Unique per process: a test process may hold several instances' agents.
        name = f"trtllm-{self._role.value}-r{self._rank}-{uuid.uuid4().hex[:8]}"
        agent = make_agent(name, self._settings.agent, self._rank, compat.to_dict())
        try:
            self._region = agent.register(t, whole_storage=layout.whole_storage)
            self._setup_legs(agent, name)
        except Exception:
            agent.close()
            raise
        self._agent, self._layout, self._pool, self.tokens_per_block = agent, layout, t, tpb
        rank_link.publish(self._llm_args, rank_link.WorkerLink(self._rank, agent, tpb, layout.block_bytes))
        logger.info("%s on %s: %d blocks of %d bytes, %d tokens per block", name, self.address,
                    layout.num_blocks, layout.block_bytes, tpb)

    def _setup_legs(self, agent: Any, name: str) -> None:
        ttl = self._settings.trtllm.lease_ttl_s
        if self._leg is Leg.CONTEXT:
            self._directory = ContextDirectory(self._rank, name)
            agent.on_notify(self._directory.on_notify)
            agent.on_call(self._directory.on_call, executor=self._directory.executor)
            self._ctx = ContextLeg(ProducerBook(agent, ttl_s=ttl), self._directory, self._descs,
                                   self._wait_for_engine_writes)
        else:
            # One pull thread: ConsumerBook connects outside its lock, and two connects to one
            # address at once open two connections, the second replacing the first at the peer
            # (its reads fail). Starting a read only posts it, so one thread is enough.
            self._gen = GenerationLeg(agent, ConsumerBook(agent, ttl_s=ttl, max_workers=1), self._rank,
                                      self._settings.trtllm.context_agent(self._rank), self._descs,
                                      self._settings.trtllm.probe_timeout_s)

    def _descs(self, block_ids: tuple[int, ...]) -> Descs:
        if self._layout is None:
            raise RuntimeError("register_kv_caches() has not been called")
        offsets, lengths = self._layout.block_range(block_ids)
        return Descs.from_ranges(self._region, offsets, lengths)

    def _wait_for_engine_writes(self) -> None:
        """The blocks must be complete in device memory before they are exposed."""
        pool = self._pool
        if pool is None or not pool.is_cuda:
            return
        if self._save_event is not None:
            self._save_event.synchronize()
        else:
            cuda_sync.wait_for_engine_writes(pool.device)

    # -- metadata -----------------------------------------------------------------------------
    def _record(self, rid: int) -> RequestRecord:
        rec = self._records.get(rid)
        if rec is None:
            rec = self._records[rid] = RequestRecord(rid, self._leg)
        return rec

    def _consume_metadata(self) -> None:
        meta = self.get_connector_meta()
        if not isinstance(meta, ConnectorMetadata) or meta.seq <= self._seen_seq:
            return   # nothing bound, or already consumed: each metadata is applied once
        self._seen_seq = meta.seq
        for spec in meta.saves:
            if self._ctx is not None:
                self._ctx.on_save_spec(self._record(spec.request_id), spec)
        for rid in meta.dropped:
            rec = self._records.pop(rid, None)
            if rec is not None and self._ctx is not None:
                self._ctx.on_dropped(rec)
        for spec in meta.loads:
            if self._gen is not None:
                self._gen.on_load_spec(self._record(spec.request_id), spec)
        for rid in meta.abandoned:
            rec = self._records.get(rid)
            if rec is not None and rec.leg is Leg.GENERATION:
                rec.abandoned = True
                if self._gen is not None:
                    self._gen.on_ended(rec)
        for rid in meta.forget:
            rec = self._records.get(rid)
            if rec is not None and rec.phase is Phase.LOADED and rec.loading_reported:
                del self._records[rid]

    @_engine_call(lambda: None)
    def bind_connector_meta(self, metadata: object) -> None:
        super().bind_connector_meta(metadata)

    # -- per-iteration hooks ------------------------------------------------------------------
    @_engine_call(lambda: None)
    def start_load_kv(self, stream: Any) -> None:
        self._consume_metadata()

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        # Loads are whole-request and asynchronous: a loading request is not in the batch.
        return None

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        # Blocks are exposed when the request finishes, not per layer.
        return None

    @_engine_call(lambda: None)
    def wait_for_save(self, stream: Any) -> None:
        pool = self._pool
        if pool is not None and pool.is_cuda and self._leg is Leg.CONTEXT:
            # Marks the end of this forward pass's KV writes; synchronised before exposing.
            self._save_event = cuda_sync.record_ready(stream, pool.device)

    @_engine_call(lambda: ([], []))
    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        self._consume_metadata()
        for rid in started_loading_req_ids:
            self._record(int(rid)).loading_started = True
        for rid in finished_gen_req_ids:
            rec = self._record(int(rid))
            if rec.leg is Leg.CONTEXT and self._ctx is not None:
                self._ctx.on_finished(rec)
            else:
                rec.engine_finished = True
                if self._gen is not None:
                    self._gen.on_ended(rec)
        if self._ctx is not None:
            self._ctx.advance()
        if self._gen is not None:
            self._gen.advance()
        saving, loading = [], []
        for rid, rec in list(self._records.items()):
            rep = reportable(rec)
            if rep.saving:
                saving.append(rid)
            if rep.loading:
                loading.append(rid)
                rec.loading_reported = True
            if rep.drop:
                del self._records[rid]
        return saving, loading

    # -- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        rank_link.withdraw(self._llm_args, self._rank)
        for part in (self._gen, self._ctx, self._directory):
            if part is not None:
                part.close()
        if self._agent is not None:
            self._agent.close()
