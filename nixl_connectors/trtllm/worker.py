"""Worker side (every rank) of the TensorRT-LLM connector.

Each rank's worker owns one `transport.Agent` over its shard of the KV pool.

Context leg: when TensorRT-LLM reports a taking-part request finished
(``finished_gen_req_ids``), the worker exposes the request's prompt blocks under a lease
(lifecycle `ProducerBook`, keyed by routing id) and publishes the lease in its directory; the
request is reported in ``finished_saving`` once the lease ends and no transfer touches the
blocks any more (read by the generation worker, expired, or released).

Generation leg: for each load in the metadata the worker looks the lease up at the context
worker of the same TP rank, pulls it into the request's blocks (lifecycle `ConsumerBook`) and
reports the request in ``finished_loading``. A pull that fails makes ``get_finished`` raise
`KvLoadError` naming the requests: TensorRT-LLM 1.2's connector API has no way to report a
failed load, and finishing such a request would decode from garbage KV.
"""
from __future__ import annotations

import logging
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from transport import Agent, AgentConfig, Descs, TransportSet

from ..handoff.lifecycle import ConsumerBook, PendingPull, ProducerBook
from . import directory as d
from .config import TrtllmConnectorConfig
from .directory_service import AnswerMailbox, BookAgent, DirectoryTable, NotificationRouter
from .engine_api import KvCacheConnectorWorker, engine_rank
from .engine_args import engine_shape
from .layout import PoolLayout, pool_layout
from .lease_lookup import lookup_lease
from .metadata import ConnectorMetadata, HandoffSpec

logger = logging.getLogger(__name__)

COMPAT_SCHEMA = "trtllm-pool-v1"
LOOKUP_THREADS = 2


class KvLoadError(RuntimeError):
    """Pulling some requests' prompt blocks failed; ``request_ids`` names them."""

    def __init__(self, request_ids: list[int], reasons: dict[int, str]):
        self.request_ids = list(request_ids)
        self.reasons = dict(reasons)
        detail = "; ".join(f"{rid}: {why}" for rid, why in self.reasons.items())
        super().__init__(f"KV load failed for requests {self.request_ids}: {detail}")


@dataclass
class _Load:
    spec: HandoffSpec
    descs: Any
    lookup: Future | None = None
    started: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    done: bool = False


class UcxKvConnectorWorker(KvCacheConnectorWorker):
    """`KvCacheConnectorWorker` that moves prompt blocks with `transport`."""

    def __init__(self, llm_args: Any, config: TrtllmConnectorConfig | None = None):
        super().__init__(llm_args)
        self._cfg = config or TrtllmConnectorConfig.from_env()
        self._shape = engine_shape(llm_args, self._cfg.tokens_per_block)
        self._rank = engine_rank()
        self._agent: Agent | None = None
        self._layout: PoolLayout | None = None
        self._region: Any = None
        self._pool: torch.Tensor | None = None
        self._table = DirectoryTable()
        self._mailbox = AnswerMailbox()
        self._router: NotificationRouter | None = None
        self._producer: ProducerBook | None = None
        self._consumer: ConsumerBook | None = None
        self._lookups: ThreadPoolExecutor | None = None
        self._connect_lock = threading.Lock()   # one connection per context agent
        # context leg
        self._save_specs: dict[int, HandoffSpec] = {}
        self._awaiting_spec: set[int] = set()
        self._holding: dict[str, int] = {}
        self._saved: list[int] = []
        # generation leg
        self._loads: dict[int, _Load] = {}
        self._by_key: dict[str, int] = {}
        self._announced_loads: set[int] = set()
        self._loaded: set[int] = set()
        self._failed: dict[int, str] = {}
        self._quarantined: set[int] = set()
        self._closed = False

    # -- introspection (tests, diagnostics) -------------------------------------------------
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def address(self) -> str | None:
        return self._agent.address if self._agent is not None else None

    @property
    def agent(self) -> Agent | None:
        return self._agent

    def _need_agent(self) -> Agent:
        if self._agent is None:
            raise RuntimeError("register_kv_caches() has not been called")
        return self._agent

    # -- set-up ---------------------------------------------------------------------------
    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        if self._agent is not None:
            raise RuntimeError("KV cache already registered")
        t = kv_cache_tensor
        layout = pool_layout(t.shape, t.stride(), t.element_size(), t.storage_offset())
        compat = {
            "schema": COMPAT_SCHEMA,
            "model": self._cfg.model_key,
            "dtype": str(t.dtype).replace("torch.", ""),
            "block_bytes": layout.block_bytes,
            "num_layers": layout.num_layers,
            "kv_factor": layout.kv_factor,
            "tokens_per_block": self._shape.tokens_per_block,
            "tp_rank": self._rank,
            "tp_size": self._shape.tp_size,
        }
        cfg = AgentConfig(listen=self._cfg.listen_address(self._rank), auth_key=self._cfg.auth_key(),
                          timeout_s=self._cfg.transfer_timeout_s, compat=compat,
                          transports=TransportSet(self._cfg.transports))
        # Unique per process: a generation worker may talk to several context instances.
        name = f"trtllm-{self._cfg.role.value}-r{self._rank}-{uuid.uuid4().hex[:8]}"
        agent = Agent(name, cfg)
        try:
            self._region = agent.register(t, whole_storage=layout.whole_storage)
        except Exception:
            agent.close()
            raise
        self._agent, self._layout, self._pool = agent, layout, t
        self._router = NotificationRouter(agent, self._table, self._mailbox, name)
        self._router.start()
        self._producer = ProducerBook(BookAgent(agent, self._router.book_inbox), ttl_s=self._cfg.lease_ttl_s)
        self._consumer = ConsumerBook(agent, ttl_s=self._cfg.lease_ttl_s)
        self._lookups = ThreadPoolExecutor(LOOKUP_THREADS, thread_name_prefix=f"{name}-lookup")
        logger.info("%s listening on %s: %d blocks of %d bytes", name, agent.address,
                    layout.num_blocks, layout.block_bytes)

    def _descs(self, block_ids: tuple[int, ...]) -> Descs:
        lay = self._layout
        if lay is None:
            raise RuntimeError("register_kv_caches() has not been called")
        offsets, lengths = lay.block_range(block_ids)
        return Descs.from_ranges(self._region, offsets, lengths)

    # -- metadata ---------------------------------------------------------------------------
    def bind_connector_meta(self, metadata: object) -> None:
        super().bind_connector_meta(metadata)
        if not isinstance(metadata, ConnectorMetadata):
            return
        for spec in metadata.saves:
            self._save_specs[spec.request_id] = spec
            self._table.pending(spec.routing_key)
            if spec.request_id in self._awaiting_spec:
                self._awaiting_spec.discard(spec.request_id)
                self._expose(spec.request_id)
        for rid in metadata.dropped:
            spec = self._save_specs.pop(rid, None)
            if spec is not None:
                self._table.remove(spec.routing_key)

    # -- per-iteration hooks ------------------------------------------------------------------
    def start_load_kv(self, stream: Any) -> None:
        meta = self.get_connector_meta()
        if isinstance(meta, ConnectorMetadata):
            for spec in meta.loads:
                self._begin_load(spec)
        self._advance_loads()

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        # Loads are whole-request and asynchronous: a loading request is not in the batch.
        return None

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        # Blocks are exposed when the request finishes, not per layer.
        return None

    def wait_for_save(self, stream: Any) -> None:
        return None

    def get_finished(self, finished_gen_req_ids: list[int],
                     started_loading_req_ids: list[int]) -> tuple[list[int], list[int]]:
        self._announced_loads.update(int(r) for r in started_loading_req_ids)
        for rid in finished_gen_req_ids:
            rid = int(rid)
            if rid in self._loads or rid in self._loaded or rid in self._failed:
                self._quarantine(rid)
            elif rid in self._save_specs:
                self._expose(rid)
            else:
                self._awaiting_spec.add(rid)
        self._advance_loads()
        saving = self._collect_saved()
        loading = sorted(self._loaded & self._announced_loads)
        failed = {rid: why for rid, why in self._failed.items() if rid in self._announced_loads}
        for rid in loading:
            self._loaded.discard(rid)
            self._announced_loads.discard(rid)
        if failed:
            for rid in failed:
                del self._failed[rid]
                self._announced_loads.discard(rid)
            # Results for other requests were already taken off the books: hand them back
            # through the next call rather than losing them with the exception.
            self._saved.extend(saving)
            self._loaded.update(loading)
            self._announced_loads.update(loading)
            raise KvLoadError(sorted(failed), failed)
        return saving, loading

    # -- context leg --------------------------------------------------------------------------
    def _expose(self, rid: int) -> None:
        spec = self._save_specs.pop(rid)
        key = spec.routing_key
        producer = self._producer
        if producer is None:
            raise RuntimeError("register_kv_caches() has not been called")
        if key in self._holding:
            # A routing id must name one request; a second one with the same id holds nothing.
            logger.error("request %d reuses routing id %s of request %d; not exposing it",
                         rid, key, self._holding[key])
            self._saved.append(rid)
            return
        if self._pool is not None and self._pool.is_cuda:
            # The forward pass wrote these blocks on the engine's stream.
            torch.cuda.current_stream(self._pool.device).synchronize()
        try:
            held = producer.hold(key, self._descs(spec.block_ids))
        except Exception as e:  # noqa: BLE001 - nothing exposed: blocks go back at once
            logger.error("cannot expose blocks of request %d (%s): %s", rid, key, e)
            self._table.failed(key)
            self._saved.append(rid)
            return
        self._holding[key] = rid
        self._table.ready(key, held.lease_id, held.nbytes)
        logger.debug("request %d (%s): %d blocks under lease %s", rid, key, len(spec.block_ids),
                     held.lease_id)

    def _collect_saved(self) -> list[int]:
        producer = self._producer
        if producer is not None:
            router = self._router
            while router is not None and router.releases:
                key = router.releases.popleft()
                logger.info("generation side released %s", key)
                producer.abort(key)
            for freed in producer.poll():
                rid = self._holding.pop(freed.request_id, None)
                self._table.remove(freed.request_id)
                if rid is not None:
                    logger.debug("request %d (%s) freed: %s", rid, freed.request_id, freed.reason.value)
                    self._saved.append(rid)
        out, self._saved = self._saved, []
        return out

    # -- generation leg -----------------------------------------------------------------------
    def _begin_load(self, spec: HandoffSpec) -> None:
        agent, consumer, lookups = self._need_agent(), self._consumer, self._lookups
        if consumer is None or lookups is None:
            raise RuntimeError("register_kv_caches() has not been called")
        rid = spec.request_id
        if spec.routing_key in self._by_key:
            self._loads[rid] = _Load(spec, None, error=f"routing id {spec.routing_key} is already "
                                                       f"being loaded by request {self._by_key[spec.routing_key]}")
            return
        try:
            descs = self._descs(spec.block_ids)
            address = self._cfg.context_agent(self._rank)
        except Exception as e:  # noqa: BLE001 - reported as a load failure
            self._loads[rid] = _Load(spec, None, error=f"{type(e).__name__}: {e}")
            return
        load = _Load(spec, descs)
        reply_to = agent.address

        def _lookup() -> d.Answer:
            with self._connect_lock:
                # The agent keeps one connection per address; the book then finds it at once.
                agent.connect(address, timeout=self._cfg.connect_timeout_s)
                peer = consumer.peer(address)
            return lookup_lease(agent, peer, spec.routing_key, reply_to, self._mailbox,
                                timeout_s=self._cfg.lookup_timeout_s,
                                unknown_grace_s=self._cfg.unknown_grace_s, cancelled=load.cancelled)

        load.lookup = lookups.submit(_lookup)
        self._loads[rid] = load
        self._by_key[spec.routing_key] = rid

    def _advance_loads(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        for rid, load in list(self._loads.items()):
            if load.error is not None:
                self._settle(rid, load, load.error)
                continue
            if load.started or load.lookup is None or not load.lookup.done():
                continue
            err = load.lookup.exception()
            if err is not None:
                self._settle(rid, load, f"lease lookup: {type(err).__name__}: {err}")
                continue
            ans = load.lookup.result()
            if load.cancelled.is_set():
                self._release_remote(load.spec.routing_key)
                self._settle(rid, load, "cancelled")
                continue
            if ans.nbytes != load.descs.nbytes:
                self._release_remote(load.spec.routing_key)
                self._settle(rid, load, f"remote lease holds {ans.nbytes} bytes, local blocks "
                                        f"{load.descs.nbytes}: the two instances' layouts differ")
                continue
            try:
                consumer.start(PendingPull(load.spec.routing_key, self._cfg.context_agent(self._rank),
                                           ans.lease_id, load.descs, load.spec.block_ids),
                               notify=load.spec.routing_key.encode("utf-8"))
            except Exception as e:  # noqa: BLE001 - reported as this request's load failure
                self._release_remote(load.spec.routing_key)
                self._settle(rid, load, f"pull not started: {type(e).__name__}: {e}")
                continue
            load.started = True
        res = consumer.poll()
        for pull in res.done:
            rid = self._by_key.get(pull.request_id)
            if rid is not None:
                self._settle(rid, self._loads[rid], None)
        for pull in res.failed:
            rid = self._by_key.get(pull.request_id)
            if rid is not None:
                err = pull.error
                self._settle(rid, self._loads[rid], f"pull: {type(err).__name__}: {err}")

    def _settle(self, rid: int, load: _Load, error: str | None) -> None:
        self._loads.pop(rid, None)
        if self._by_key.get(load.spec.routing_key) == rid:
            del self._by_key[load.spec.routing_key]
        if rid in self._quarantined:
            load.done = True
            self._quarantined.discard(rid)
            self._saved.append(rid)   # finished while loading: its blocks may go now
            return
        if error is None:
            self._loaded.add(rid)
        else:
            logger.error("request %d (%s): KV load failed: %s", rid, load.spec.routing_key, error)
            self._failed[rid] = error

    def _quarantine(self, rid: int) -> None:
        """A generation-leg request finished (aborted) while its pull may run."""
        load = self._loads.get(rid)
        if load is None:
            # Already settled: nothing touches its blocks.
            self._loaded.discard(rid)
            self._failed.pop(rid, None)
            self._saved.append(rid)
            return
        self._quarantined.add(rid)
        load.cancelled.set()
        if load.started and self._consumer is not None:
            self._consumer.cancel(load.spec.routing_key)

    def _release_remote(self, key: str) -> None:
        agent, consumer = self._agent, self._consumer
        if agent is None or consumer is None:
            return
        try:
            with self._connect_lock:
                peer = consumer.peer(self._cfg.context_agent(self._rank))
            agent.notify(peer, d.encode(d.Release(key)))
        except Exception as e:  # noqa: BLE001 - the lease expires anyway
            logger.debug("release of %s not delivered: %s", key, e)

    # -- shutdown -----------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._router is not None:
            self._router.close()
        if self._consumer is not None:
            self._consumer.close()
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)
        if self._producer is not None:
            self._producer.close()
        if self._agent is not None:
            self._agent.close()
