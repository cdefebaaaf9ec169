"""Stand-in of ``tensorrt_llm._torch.pyexecutor.kv_cache_connector`` (TensorRT-LLM 1.2).

Same class names, fields and method signatures as the real module; written for these tests.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple


@dataclass
class RequestData:
    """One scheduled request as ``build_connector_meta`` sees it."""

    request_id: int
    new_tokens: List[int]           # tokens not reported before
    new_block_ids: List[int]        # blocks not reported before
    computed_position: int          # position of the last token with valid KV
    num_scheduled_tokens: int       # tokens this iteration computes


@dataclass
class SchedulerOutput:
    new_requests: List[RequestData] = field(default_factory=list)     # first time scheduled
    cached_requests: List[RequestData] = field(default_factory=list)  # scheduled before


class KvCacheConnectorWorker(ABC):
    """Built on every rank as ``worker_cls(llm_args)``."""

    def __init__(self, llm_args: Any):
        self._llm_args = llm_args
        self._metadata: Optional[object] = None
        super().__init__()

    def bind_connector_meta(self, metadata: object) -> None:
        self._metadata = metadata

    def get_connector_meta(self) -> object:
        return self._metadata

    def _clear_connector_meta(self) -> None:
        self._metadata = None

    def register_forward_pass_callable(self) -> Optional[Callable]:
        return None

    @abstractmethod
    def register_kv_caches(self, kv_cache_tensor: Any) -> None: ...

    @abstractmethod
    def start_load_kv(self, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None: ...

    @abstractmethod
    def wait_for_save(self, stream: Any) -> None: ...

    @abstractmethod
    def get_finished(self, finished_gen_req_ids: List[int],
                     started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]: ...


class KvCacheConnectorScheduler(ABC):
    """Built on rank 0 only as ``scheduler_cls(llm_args)``."""

    def __init__(self, llm_args: Any):
        self._llm_args = llm_args
        super().__init__()

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> object: ...

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Tuple[int, bool]: ...

    @abstractmethod
    def request_finished(self, request: Any, cache_block_ids: List[int]) -> bool: ...

    @abstractmethod
    def update_state_after_alloc(self, request: Any, block_ids: List[int]) -> None: ...
