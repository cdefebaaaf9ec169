"""Stand-in of TensorRT-LLM's request objects, as a connector sees them.

TensorRT-LLM has two views of one request:

* the Python ``LlmRequest`` (``_torch/pyexecutor/llm_request.py``, a subclass of the C++
  binding with ``py_*`` attributes) that the executor, the scheduled batch,
  ``update_state_after_alloc`` and ``request_finished`` see: `PyLlmRequest`;
* the C++ ``LlmRequest`` that ``KVCacheManager::addSequence`` hands to the connector manager's
  ``get_num_new_matched_tokens`` (nanobind casts it to the base class): only what
  ``nanobind/batch_manager/bindings.cpp`` binds is readable there. `CppLlmRequest` exposes
  exactly the bound names a connector would read, and nothing else: ``cache_salt_id`` (the
  salt's 64-bit hash), never a ``cache_salt`` string nor ``py_*`` attributes.

``cache_salt_id`` is computed as TensorRT-LLM's OpenAI layer does (``get_cache_salt_id``:
the first 8 bytes of blake3 of the salt, little-endian).
"""
from __future__ import annotations

import enum
from typing import List, Optional

from blake3 import blake3


class LlmRequestState(enum.Enum):
    CONTEXT_INIT = "context_init"
    GENERATION_IN_PROGRESS = "generation_in_progress"
    GENERATION_COMPLETE = "generation_complete"
    DISAGG_GENERATION_TRANS_IN_PROGRESS = "disagg_generation_trans_in_progress"  # async loading
    DISAGG_CONTEXT_TRANS_IN_PROGRESS = "disagg_context_trans_in_progress"        # async saving


def cache_salt_id(salt: Optional[str]) -> Optional[int]:
    if salt is None:
        return None
    return int.from_bytes(blake3(salt.encode("utf-8")).digest(length=8), "little", signed=False)


class PyLlmRequest:
    """The Python-side request (one copy per rank, as each rank process has its own)."""

    def __init__(self, request_id: int, prompt: List[int], max_new_tokens: int,
                 cache_salt: Optional[str] = None, is_generation_only_request: bool = False):
        self.request_id = int(request_id)
        self.py_request_id = self.request_id
        self.prompt = list(prompt)
        self.prompt_len = len(self.prompt)
        self.py_prompt_len = self.prompt_len
        self.orig_prompt_len = self.prompt_len
        self.max_new_tokens = int(max_new_tokens)
        self.cache_salt_id = cache_salt_id(cache_salt)
        self.is_generation_only_request = is_generation_only_request
        self.state = LlmRequestState.CONTEXT_INIT
        self.context_current_position = 0
        self.prepopulated_prompt_len = 0
        self.context_chunk_size = 0
        self.device_tokens: List[int] = list(self.prompt)   # sampled on the device (overlap)
        self.committed = 0                                  # sampled tokens the host has seen
        self.finish_reason: Optional[str] = None

    # -- bound on the C++ request ------------------------------------------------------------
    def get_tokens(self, beam: int) -> List[int]:
        if beam != 0:
            raise ValueError("beam width 1 only")
        return self.device_tokens[:self.prompt_len + self.committed]

    @property
    def context_remaining_length(self) -> int:
        return self.prompt_len - self.context_current_position

    @property
    def is_first_context_chunk(self) -> bool:
        return self.context_current_position == self.prepopulated_prompt_len

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def finish_by_reason(self, reason: str) -> None:
        self.finish_reason = reason
        self.state = LlmRequestState.GENERATION_COMPLETE

    @property
    def generated(self) -> List[int]:
        return self.device_tokens[self.prompt_len:self.prompt_len + self.committed]


class CppLlmRequest:
    """What ``get_num_new_matched_tokens`` is handed: the C++ binding's attributes only."""

    __slots__ = ("_r",)

    def __init__(self, py: PyLlmRequest):
        object.__setattr__(self, "_r", py)

    def __setattr__(self, name: str, value: object) -> None:
        if name != "context_current_position":
            raise AttributeError(f"C++ LlmRequest binding has no writable attribute {name!r}")
        self._r.context_current_position = value

    request_id = property(lambda self: self._r.request_id)
    prompt_len = property(lambda self: self._r.prompt_len)
    orig_prompt_len = property(lambda self: self._r.orig_prompt_len)
    max_new_tokens = property(lambda self: self._r.max_new_tokens)
    cache_salt_id = property(lambda self: self._r.cache_salt_id)
    state = property(lambda self: self._r.state)
    context_current_position = property(lambda self: self._r.context_current_position)
    is_generation_only_request = property(lambda self: self._r.is_generation_only_request)
    is_dummy_request = property(lambda self: False)
    is_finished = property(lambda self: self._r.is_finished)

    def get_tokens(self, beam: int) -> List[int]:
        return self._r.get_tokens(beam)
