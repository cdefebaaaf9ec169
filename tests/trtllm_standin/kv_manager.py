"""Stand-in of the KV cache manager's side of the connector (one per rank).

Follows ``_torch/pyexecutor/resource_manager.py`` (``KVCacheManager.prepare_resources`` /
``free_resources``) and the C++ ``KVCacheManager::addSequence``:

* a context request's first chunk adds its sequence (``add_sequence``): the context blocks of
  its prompt are allocated; the KV cache connector is asked (``get_num_new_matched_tokens``)
  **only when block reuse is on** (C++: the ``!isCyclic() && mEnableBlockReuse`` path; with
  reuse off the connector is silently ignored); then ``update_state_after_alloc`` with the
  request's block ids;
* a request that finished loading asynchronously is not added again (``should_add_sequence``);
* blocks for generated tokens are allocated as tokens are added; GUARANTEED_NO_EVICT reserves
  everything a request can need (prompt + max_new_tokens + one overlap token) when it is
  scheduled, so allocation never fails;
* ``prepare_resources`` ends with the connector's ``build_scheduler_output``.

Not modelled: prefix reuse itself (the radix tree; ``num_computed_tokens`` is always 0), block
pinning for reuse (a request whose save is pending simply keeps its blocks until it is freed).
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Deque, Dict, List

from .llm_request import CppLlmRequest, PyLlmRequest

logger = logging.getLogger(__name__)


class StandinKvCacheManager:
    def __init__(self, num_blocks: int, tokens_per_block: int, enable_block_reuse: bool):
        self.tokens_per_block = tokens_per_block
        self.enable_block_reuse = enable_block_reuse
        self.free_blocks: Deque[int] = collections.deque(range(num_blocks))
        self.blocks: Dict[int, List[int]] = {}      # request id -> allocated blocks, in order
        self.reserved: Dict[int, int] = {}          # request id -> blocks reserved to completion
        self.connector_manager: Any = None

    # -- capacity (GUARANTEED_NO_EVICT) -----------------------------------------------------
    def blocks_to_completion(self, req: PyLlmRequest) -> int:
        return -(-(req.prompt_len + req.max_new_tokens + 1) // self.tokens_per_block)

    def available(self) -> int:
        unallocated = sum(self.reserved[r] - len(self.blocks.get(r, ())) for r in self.reserved)
        return len(self.free_blocks) - unallocated

    def reserve(self, req: PyLlmRequest) -> bool:
        if req.request_id in self.reserved:
            return True
        need = self.blocks_to_completion(req)
        if need > self.available():
            return False
        self.reserved[req.request_id] = need
        return True

    # -- allocation ---------------------------------------------------------------------------
    def _grow(self, rid: int, num_tokens: int) -> None:
        have = self.blocks.setdefault(rid, [])
        while len(have) * self.tokens_per_block < num_tokens:
            have.append(self.free_blocks.popleft())

    def get_cache_indices(self, req: PyLlmRequest) -> List[int]:
        if req.request_id not in self.blocks:
            raise IndexError(f"request {req.request_id} has no sequence")
        return list(self.blocks[req.request_id])

    def add_sequence(self, req: PyLlmRequest) -> None:
        self._grow(req.request_id, req.prompt_len)
        matched = 0
        if self.connector_manager is not None:
            if self.enable_block_reuse:
                matched = self.connector_manager.get_num_new_matched_tokens(CppLlmRequest(req), 0)
                if matched >= req.prompt_len:
                    raise RuntimeError("There must be at least one uncomputed token in the prompt!")
            elif not getattr(self, "_warned", False):
                self._warned = True
                logger.warning("KV Cache Connector specified when block reuse is disabled. "
                               "The KV Cache Connector will be ignored.")
        req.prepopulated_prompt_len = matched
        req.context_current_position = matched

    def prepare_resources(self, context: List[PyLlmRequest], generation: List[PyLlmRequest]) -> None:
        cm = self.connector_manager
        for req in context:
            should_add = cm is None or cm.should_add_sequence(req)
            if req.is_first_context_chunk and should_add and req.request_id not in self.blocks:
                self.add_sequence(req)
                if cm is not None:
                    cm.update_state_after_alloc(req, self.get_cache_indices(req))
        for req in generation:
            self._grow(req.request_id, len(req.device_tokens) + 1)
        if cm is not None:
            cm.build_scheduler_output(context, generation, self)

    def grow_for_next_token(self, req: PyLlmRequest) -> None:
        self._grow(req.request_id, len(req.device_tokens) + 1)

    def free_resources(self, req: PyLlmRequest) -> None:
        self.free_blocks.extend(self.blocks.pop(req.request_id, []))
        self.reserved.pop(req.request_id, None)
