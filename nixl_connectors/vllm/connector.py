"""`UcxConnector`: vLLM KV connector over the `transport` core (facade routing by role)."""
from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from .config import UcxConnectorConfig
from .metadata import UcxConnectorMetadata
from .stats import UcxConnectorStats

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _tp_rank() -> int:
    """This worker's TP rank (0 outside vLLM's distributed set-up, e.g. in tests)."""
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_rank()
    return 0


class UcxConnector(KVConnectorBase_V1, SupportsHMA):
    """Disaggregated prefill/decode: decode pulls prefill's blocks by lease over UCX.

    Supports vLLM's hybrid KV-cache manager (several KV-cache groups, e.g. sliding-window plus
    full-attention layers): block ids travel per group."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        self.cfg = UcxConnectorConfig.from_extra_config(ktc.kv_connector_extra_config)
        self.engine_id = str(ktc.engine_id or uuid.uuid4())
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .scheduler import UcxScheduler
            self._scheduler = UcxScheduler(vllm_config, self.engine_id, self.cfg, kv_cache_config)
        else:
            from .worker import UcxWorker
            self._worker = UcxWorker(vllm_config, self.engine_id, self.cfg, _tp_rank(), kv_cache_config)

    # -- scheduler side ---------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: Any,
                                 num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        mgr = self._kv_cache_manager

        def table_of(rid: str) -> list[list[int]]:
            """The request's block ids per group, -1 for null blocks."""
            if mgr is None:
                return []
            return [[-1 if b.is_null else b.block_id for b in group]
                    for group in mgr.get_blocks(rid).blocks]
        return self._scheduler.build_connector_meta(scheduler_output, table_of)

    def on_new_request(self, request: "Request") -> None:
        self._scheduler.on_new_request(request)

    def update_connector_output(self, connector_output: Any) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: "Request", block_ids: list[int]):
        return self._scheduler.request_finished(request, (list(block_ids),))

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]):
        return self._scheduler.request_finished(request, tuple(list(g) for g in block_ids))

    def set_xfer_handshake_metadata(
            self, metadata: dict[int, KVConnectorHandshakeMetadata]) -> None:
        if self._scheduler is not None:
            self._scheduler.set_handshake(metadata)

    def has_pending_block_frees(self) -> bool:
        return False

    # -- worker side ------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def get_handshake_metadata(self) -> KVConnectorHandshakeMetadata | None:
        return self._worker.handshake_metadata() if self._worker is not None else None

    def _meta(self) -> UcxConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, UcxConnectorMetadata) else None

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None:
            self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        self._worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]):
        sending, recving, _ = self._worker.get_finished(finished_req_ids)
        return sending or None, recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        sending, recving, failed = self._worker.get_finished(finished_req_ids)
        return KVConnectorTransferResults(finished_sending=sending, finished_recving=recving,
                                          failed_recving=failed)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.worker_meta() if self._worker is not None else None

    def get_kv_connector_stats(self) -> UcxConnectorStats | None:
        return self._worker.stats() if self._worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return UcxConnectorStats(data=dict(data)) if data is not None else UcxConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]):
        from .prom import UcxPromMetrics

        return UcxPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
