"""Prometheus metrics of UcxConnector: vLLM's /metrics shows the `UcxConnectorStats` counters.

vLLM builds this once per API server through `UcxConnector.build_prom_metrics` and calls
`observe` with each step's aggregated stats data (deltas since the previous step), so each
counter is incremented by the step's value.
"""
from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
from vllm.v1.metrics.utils import create_metric_per_engine

from .stats import COUNTERS

# stats key -> (metric name, help text)
METRICS: dict[str, tuple[str, str]] = {
    "bytes_read": ("vllm:ucx_kv_bytes_read", "KV bytes this instance pulled from prefill instances."),
    "transfer_seconds": ("vllm:ucx_kv_transfer_seconds", "Seconds spent in KV pulls (sum over pulls)."),
    "reads": ("vllm:ucx_kv_reads", "KV pulls completed (one per request and TP rank)."),
    "read_failures": ("vllm:ucx_kv_read_failures", "KV pulls that failed (handshake, transfer, peer lost, "
                                                  "lease gone); the request went to kv_load_failure_policy."),
    "leases_exposed": ("vllm:ucx_kv_leases_exposed", "Leases this instance exposed over finished prompts."),
    "leases_read": ("vllm:ucx_kv_leases_read", "Exposed leases freed after the decode side read them."),
    "leases_expired": ("vllm:ucx_kv_leases_expired", "Exposed leases freed because nobody read them in time."),
    "leases_aborted": ("vllm:ucx_kv_leases_aborted", "Exposed leases freed because a side aborted the request."),
}
if set(METRICS) != set(COUNTERS):
    raise ImportError("nixl_connectors.vllm.prom: metrics and stats counters disagree")


class UcxPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {
            key: create_metric_per_engine(self._counter_cls(name=name, documentation=doc,
                                                            labelnames=labelnames),
                                          per_engine_labelvalues)
            for key, (name, doc) in METRICS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for key, per_engine in self.counters.items():
            value = transfer_stats_data.get(key, 0)
            if value:
                per_engine[engine_idx].inc(value)
