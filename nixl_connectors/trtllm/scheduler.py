"""Scheduler side (rank 0 only) of the TensorRT-LLM connector.

Context leg: when a taking-part request is first scheduled its prompt's whole blocks are
announced to the workers (`HandoffSpec` in ``saves``); when it finishes with its prompt fully
computed, ``request_finished`` returns True so that TensorRT-LLM keeps the blocks until every
worker reports the lease freed (read, expired or aborted).

Generation leg: ``get_num_new_matched_tokens`` claims the prompt's whole blocks (all but at
least one prompt token) for asynchronous loading; once TensorRT-LLM has allocated the blocks
(``update_state_after_alloc``) the pull is handed to the workers in ``loads``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from .config import RoutingSource, TrtllmConnectorConfig
from .engine_api import KvCacheConnectorScheduler
from .engine_args import engine_shape
from .layout import transferable_tokens
from .metadata import ConnectorMetadata, HandoffSpec
from .routing import Leg, Routing, num_tokens, prompt_length, request_id, routing_of

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    routing: Routing
    num_tokens: int
    block_ids: list[int] = field(default_factory=list)
    announced: bool = False


class UcxKvConnectorScheduler(KvCacheConnectorScheduler):
    """`KvCacheConnectorScheduler` that hands prompt blocks over through `transport`."""

    def __init__(self, llm_args: Any, config: TrtllmConnectorConfig | None = None):
        super().__init__(llm_args)
        self._cfg = config or TrtllmConnectorConfig.from_env()
        self._shape = engine_shape(llm_args, self._cfg.tokens_per_block)
        self._ctx: dict[int, _Tracked] = {}        # context leg, until request_finished
        self._loads: dict[int, _Tracked] = {}      # generation leg, until scheduled after load
        self._ready_loads: list[HandoffSpec] = []
        self._saves: list[HandoffSpec] = []
        self._dropped: list[int] = []
        self._warned_salt = False
        logger.info("UCX KV connector scheduler: role=%s tokens_per_block=%d tp=%d",
                    self._cfg.role.value, self._shape.tokens_per_block, self._shape.tp_size)

    # -- helpers -----------------------------------------------------------------------
    @property
    def _tpb(self) -> int:
        return self._shape.tokens_per_block

    def _routing(self, request: Any) -> Routing | None:
        routing = routing_of(request, self._cfg.role, self._cfg.routing_source, self._cfg.routing_prefix)
        if (routing is None and not self._warned_salt and self._cfg.routing_source is RoutingSource.CACHE_SALT
                and not hasattr(request, "cache_salt") and getattr(request, "cache_salt_id", None)):
            # This TensorRT-LLM hands the scheduler requests without the salt string: no request
            # can take part this way. Say so once instead of silently computing everything.
            self._warned_salt = True
            logger.warning("requests carry cache_salt_id but no cache_salt string: set routing_source "
                           "to cache_salt_id (role context/generation) and run the proxy with "
                           "--salt-mode shared")
        return routing

    def _spec(self, rid: int, t: _Tracked) -> HandoffSpec:
        nblocks = t.num_tokens // self._tpb
        return HandoffSpec(rid, t.routing.key, tuple(int(b) for b in t.block_ids[:nblocks]),
                           t.num_tokens)

    # -- KvCacheConnectorScheduler -----------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        routing = self._routing(request)
        if routing is None:
            return 0, False
        rid = request_id(request)
        n = transferable_tokens(prompt_length(request), self._tpb)
        if n == 0:
            logger.debug("request %d (%s): prompt shorter than one block; nothing moves", rid, routing.key)
            return 0, False
        if routing.leg is Leg.CONTEXT:
            self._ctx[rid] = _Tracked(routing, n)
            return 0, False
        if num_computed_tokens:
            # A prefix hit on this instance: the hand-off moves whole prompts from block 0, so
            # compute locally instead (a unique cache_salt per request makes this rare).
            logger.info("request %d (%s): %d tokens already on device; computing the prompt locally",
                        rid, routing.key, num_computed_tokens)
            return 0, False
        self._loads[rid] = _Tracked(routing, n)
        return n, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        rid = request_id(request)
        t = self._loads.get(rid)
        if t is None or t.announced:
            return
        need = t.num_tokens // self._tpb
        if len(block_ids) < need:
            logger.error("request %d: %d blocks allocated for %d loaded tokens; not loading",
                         rid, len(block_ids), t.num_tokens)
            return
        t.block_ids = [int(b) for b in block_ids]
        t.announced = True
        self._ready_loads.append(self._spec(rid, t))

    def build_connector_meta(self, scheduler_output: Any) -> ConnectorMetadata:
        for rd in list(scheduler_output.new_requests) + list(scheduler_output.cached_requests):
            rid = int(rd.request_id)
            load = self._loads.get(rid)
            if load is not None and load.announced:
                # Scheduled again: TensorRT-LLM saw every worker finish the load.
                del self._loads[rid]
            t = self._ctx.get(rid)
            if t is None or t.announced:
                continue
            t.block_ids.extend(int(b) for b in rd.new_block_ids)
            if len(t.block_ids) >= t.num_tokens // self._tpb:
                t.announced = True
                self._saves.append(self._spec(rid, t))
        meta = ConnectorMetadata(saves=tuple(self._saves), loads=tuple(self._ready_loads),
                                 dropped=tuple(self._dropped))
        self._saves, self._ready_loads, self._dropped = [], [], []
        return meta

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        rid = request_id(request)
        if rid in self._loads:
            # Finished (aborted) while its pull may still be writing into its blocks: keep them
            # until the workers report the pull settled.
            t = self._loads.pop(rid)
            if not t.announced:
                return False
            logger.info("request %d (%s) finished while loading; blocks held until the pull settles",
                        rid, t.routing.key)
            return True
        t = self._ctx.pop(rid, None)
        if t is None:
            return False
        if num_tokens(request) <= prompt_length(request):
            # Ended before its first generated token: the prompt's KV is not complete.
            logger.info("request %d (%s) ended before its prompt was computed; nothing to hand off",
                        rid, t.routing.key)
            if t.announced:
                self._dropped.append(rid)
            return False
        if not t.announced:
            # Blocks never seen in a scheduler output: announce them from the final list.
            t.block_ids = [int(b) for b in cache_block_ids]
            if len(t.block_ids) < t.num_tokens // self._tpb:
                logger.error("request %d: only %d blocks at finish; nothing to hand off",
                             rid, len(t.block_ids))
                return False
            t.announced = True
            self._saves.append(self._spec(rid, t))
        return True
