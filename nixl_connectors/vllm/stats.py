"""`KVConnectorStats` of UcxConnector: bytes, transfer time, failures, expired leases."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

COUNTERS = ("bytes_read", "transfer_seconds", "reads", "read_failures", "leases_exposed",
             "leases_read", "leases_expired", "leases_aborted")


def empty_data() -> dict[str, Any]:
    return {k: 0 for k in COUNTERS}


@dataclass
class UcxConnectorStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=empty_data)

    def reset(self) -> None:
        self.data = empty_data()

    def add(self, key: str, value: float = 1) -> None:
        if key not in COUNTERS:
            raise KeyError(key)
        self.data[key] = self.data.get(key, 0) + value

    def aggregate(self, other: KVConnectorStats) -> "UcxConnectorStats":
        for k in COUNTERS:
            self.data[k] = self.data.get(k, 0) + other.data.get(k, 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        d = {k: self.data.get(k, 0) for k in COUNTERS}
        secs = d["transfer_seconds"]
        d["transfer_seconds"] = round(secs, 4)
        d["read_GBps"] = round(d["bytes_read"] / secs / 1e9, 3) if secs > 0 else 0.0
        return d

    def is_empty(self) -> bool:
        return not any(self.data.get(k, 0) for k in COUNTERS)
