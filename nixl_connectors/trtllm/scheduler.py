"""Scheduler side (rank 0 only) of the TensorRT-LLM connector.

Context leg: a salted request's prompt blocks are announced to the workers (`SaveSpec` in
``saves``) when the scheduler output first shows them; when it finishes with its prompt
computed, ``request_finished`` returns True so that TensorRT-LLM keeps the blocks until every
worker reports the lease ended (read, released or expired).

Generation leg: ``get_num_new_matched_tokens`` claims the prompt's whole blocks (all but at
least one prompt token) only when every context rank holds them ready (`HandoffProbe`);
otherwise the request computes locally. Once TensorRT-LLM has allocated the blocks
(``update_state_after_alloc``) the pull goes to the workers in ``loads``, with each rank's lease.

One `_Track` per request, with an enum phase. No method lets an exception into TensorRT-LLM
(see `worker`); each falls back to the answer that keeps blocks safe.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from . import rank_link
from .config import ConnectorSettings
from .engine_api import KvCacheConnectorScheduler
from .engine_args import configured_tokens_per_block, engine_shape
from .layout import transferable_tokens
from .metadata import ConnectorMetadata, LoadSpec, RankLease, SaveSpec
from .probe import HandoffProbe
from .routing import Leg, Routing, num_tokens, prompt_length, request_id, routing_of

logger = logging.getLogger(__name__)


class Stage(str, Enum):
    COMPUTING = "computing"   # context leg: prompt blocks not yet announced
    ANNOUNCED = "announced"   # context leg: SaveSpec sent to the workers
    CLAIMED = "claimed"       # generation leg: tokens claimed, waiting for block allocation
    LOADING = "loading"       # generation leg: LoadSpec sent, request parked by TensorRT-LLM


@dataclass
class _Track:
    routing: Routing
    num_tokens: int
    stage: Stage
    block_ids: list[int] = field(default_factory=list)
    leases: tuple[RankLease, ...] = ()
    request: Any = None   # the Python request of update_state_after_alloc (to see it end)


class UcxKvConnectorScheduler(KvCacheConnectorScheduler):
    """`KvCacheConnectorScheduler` that hands prompt blocks over through `transport`."""

    def __init__(self, llm_args: Any, settings: ConnectorSettings | None = None):
        super().__init__(llm_args)
        self._settings = settings or ConnectorSettings.from_env()
        self._role = self._settings.trtllm.role
        self._shape = engine_shape(llm_args)           # start-up checks (clear error)
        self._settings.trtllm.check_tp(self._shape.tp_size)
        self._probe = HandoffProbe(self._settings.trtllm, self._shape.tp_size) \
            if self._settings.trtllm.pulls else None
        self._tracks: dict[int, _Track] = {}
        self._keys: dict[str, int] = {}                # routing key -> request id using it
        self._seq = itertools.count(1)
        self._saves: list[SaveSpec] = []
        self._loads: list[LoadSpec] = []
        self._dropped: list[int] = []
        self._forget: list[int] = []
        self._warned_no_link = False
        self.connector_errors = 0
        logger.info("UCX KV connector scheduler: role=%s tp=%d", self._role.value, self._shape.tp_size)

    # -- helpers -----------------------------------------------------------------------
    def _link(self) -> rank_link.WorkerLink | None:
        link = rank_link.find(self._llm_args, 0)
        if link is None and not self._warned_no_link:
            self._warned_no_link = True
            logger.error("no registered worker of rank 0 in this process: hand-offs are skipped")
        return link

    def _tpb(self, link: rank_link.WorkerLink | None) -> int:
        if link is not None:
            return link.tokens_per_block
        return self._settings.trtllm.tokens_per_block or configured_tokens_per_block(self._llm_args)

    def _spec(self, rid: int, t: _Track, tpb: int) -> SaveSpec:
        return SaveSpec(rid, t.routing.key, tuple(t.block_ids[:t.num_tokens // tpb]), t.num_tokens)

    def _end(self, rid: int) -> _Track | None:
        t = self._tracks.pop(rid, None)
        if t is not None and self._keys.get(t.routing.key) == rid:
            del self._keys[t.routing.key]
        return t

    # -- KvCacheConnectorScheduler -----------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        try:
            return self._match(request, int(num_computed_tokens))
        except Exception:  # noqa: BLE001 - computing locally is always safe here
            self.connector_errors += 1
            logger.exception("get_num_new_matched_tokens failed; the request computes locally")
            return 0, False

    def _match(self, request: Any, num_computed: int) -> tuple[int, bool]:
        routing = routing_of(request, self._role)
        if routing is None:
            return 0, False
        rid = request_id(request)
        link = self._link()
        n = transferable_tokens(prompt_length(request), self._tpb(link))
        if n == 0 or link is None:
            return 0, False
        if routing.key in self._keys:
            logger.warning("request %d: routing key %s is in use by request %d; computing locally",
                           rid, routing.key, self._keys[routing.key])
            return 0, False
        if routing.leg is Leg.CONTEXT:
            self._tracks[rid] = _Track(routing, n, Stage.COMPUTING)
            self._keys[routing.key] = rid
            return 0, False
        if num_computed:
            logger.info("request %d (%s): %d tokens already on device; computing the prompt locally",
                        rid, routing.key, num_computed)
            return 0, False
        expected = (n // link.tokens_per_block) * link.block_bytes
        result = self._probe.probe(link.agent, routing.key, expected)
        if not result.ready:
            return 0, False
        self._tracks[rid] = _Track(routing, n, Stage.CLAIMED, leases=result.leases)
        self._keys[routing.key] = rid
        return n, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        rid = request_id(request)
        t = self._tracks.get(rid)
        if t is not None:
            t.request = request   # to notice an end TensorRT-LLM does not report (build)
        if t is None or t.stage is not Stage.CLAIMED:
            return
        try:
            need = t.num_tokens // self._tpb(self._link())
            t.stage = Stage.LOADING
            if len(block_ids) < need:
                raise ValueError(f"{len(block_ids)} blocks allocated for {need} claimed blocks")
            t.block_ids = [int(b) for b in block_ids[:need]]
            self._loads.append(LoadSpec(rid, t.routing.key, tuple(t.block_ids), t.num_tokens, t.leases))
        except Exception as e:  # noqa: BLE001 - the workers park the request (blocks stay safe)
            self.connector_errors += 1
            logger.exception("request %d: cannot build its load", rid)
            self._loads.append(LoadSpec(rid, t.routing.key, (), t.num_tokens, (), f"{type(e).__name__}: {e}"))
            if self._probe is not None and (link := self._link()) is not None:
                self._probe.release(link.agent, t.routing.key, [lease.rank for lease in t.leases])

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata:
        try:
            self._absorb(scheduler_output)
        except Exception:  # noqa: BLE001 - what was queued still goes out
            self.connector_errors += 1
            logger.exception("build_connector_meta could not read the scheduler output")
        abandoned = []
        for rid, t in list(self._tracks.items()):
            if t.request is None or not bool(getattr(t.request, "is_finished", False)):
                continue
            # Ended without request_finished (current TensorRT-LLM does not call it for a
            # cancelled request): a parked load is reported once its pull settles, an announced
            # context request is dropped.
            if t.stage is Stage.LOADING:
                abandoned.append(rid)
            elif t.stage is Stage.ANNOUNCED:
                self._dropped.append(rid)
            self._end(rid)
        meta = ConnectorMetadata(next(self._seq), tuple(self._saves), tuple(self._loads),
                                 tuple(self._dropped), tuple(abandoned), tuple(self._forget))
        self._saves, self._loads, self._dropped, self._forget = [], [], [], []
        return meta

    def _absorb(self, scheduler_output: Any) -> None:
        if scheduler_output is None:
            return
        tpb = self._tpb(self._link())
        for rd in list(scheduler_output.new_requests) + list(scheduler_output.cached_requests):
            rid = int(rd.request_id)
            t = self._tracks.get(rid)
            if t is None:
                continue
            if t.stage is Stage.LOADING:
                # Scheduled again: every worker reported the load; nothing more to do.
                self._end(rid)
                self._forget.append(rid)
            elif t.stage is Stage.COMPUTING:
                t.block_ids.extend(int(b) for b in rd.new_block_ids)
                if len(t.block_ids) >= t.num_tokens // tpb:
                    t.stage = Stage.ANNOUNCED
                    self._saves.append(self._spec(rid, t, tpb))

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        rid = request_id(request)
        t = self._tracks.get(rid)
        if t is None:
            return False
        try:
            return self._finished(rid, t, request, cache_block_ids)
        except Exception:  # noqa: BLE001 - keep the blocks when a transfer may touch them
            self.connector_errors += 1
            logger.exception("request_finished failed for request %d", rid)
            self._end(rid)
            return t.stage in (Stage.ANNOUNCED, Stage.LOADING)

    def _finished(self, rid: int, t: _Track, request: Any, cache_block_ids: list[int]) -> bool:
        self._end(rid)
        if t.stage in (Stage.CLAIMED, Stage.LOADING):
            # Ended while its pull may still write into its blocks: keep them until the workers
            # report the pull settled.
            logger.info("request %d (%s) ended while loading; blocks held until the pull settles",
                        rid, t.routing.key)
            if t.stage is Stage.CLAIMED:
                # No load went out yet: send an empty one so the workers settle the request.
                self._loads.append(LoadSpec(rid, t.routing.key, (), t.num_tokens, (),
                                            "ended before its blocks were allocated"))
                if self._probe is not None and (link := self._link()) is not None:
                    self._probe.release(link.agent, t.routing.key, [x.rank for x in t.leases])
            return True
        if num_tokens(request) <= prompt_length(request):
            logger.info("request %d (%s) ended before its prompt was computed; nothing to hand off",
                        rid, t.routing.key)
            if t.stage is Stage.ANNOUNCED:
                self._dropped.append(rid)
            return False
        if t.stage is Stage.COMPUTING:
            # Blocks never seen in a scheduler output: announce them from the final list.
            tpb = self._tpb(self._link())
            t.block_ids = [int(b) for b in cache_block_ids]
            if len(t.block_ids) < t.num_tokens // tpb:
                logger.error("request %d: only %d blocks at finish; nothing to hand off", rid, len(t.block_ids))
                return False
            self._saves.append(self._spec(rid, t, tpb))
        return True
