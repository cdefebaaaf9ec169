"""UcxConnector's Prometheus metrics: vLLM's KVConnectorProm builds them through the connector
class, and each step's stats increment the per-engine counters."""
import functools
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nixl_connectors.vllm.connector import UcxConnector
from nixl_connectors.vllm.prom import METRICS
from nixl_connectors.vllm.stats import UcxConnectorStats


def _types(reg):
    return {cls: functools.partial(cls, registry=reg) for cls in (Gauge, Counter, Histogram)}


def test_counters_follow_the_steps_stats_per_engine():
    reg = CollectorRegistry()
    prom = UcxConnector.build_prom_metrics(SimpleNamespace(kv_transfer_config=None), _types(reg), ["model_name", "engine"],
                                           {0: ["m", "0"], 1: ["m", "1"]})
    s = UcxConnectorStats()
    s.add("bytes_read", 4096)
    s.add("reads", 2)
    s.add("transfer_seconds", 0.5)
    prom.observe(s.data, engine_idx=1)
    prom.observe(UcxConnectorStats(data=dict(s.data, leases_expired=3)).data, engine_idx=1)

    def value(key, engine):
        return reg.get_sample_value(f"{METRICS[key][0]}_total",
                                    {"model_name": "m", "engine": engine})
    assert value("bytes_read", "1") == 8192 and value("reads", "1") == 4
    assert value("transfer_seconds", "1") == 1.0 and value("leases_expired", "1") == 3
    assert value("bytes_read", "0") == 0 and value("read_failures", "1") == 0


def test_every_stats_counter_has_a_metric():
    assert set(METRICS) == set(UcxConnectorStats().data)
