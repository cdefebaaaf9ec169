"""Messages between UcxConnector's scheduler side and its worker side (both directions)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from .params import RemotePrefill


@dataclass
class RecvSpec:
    """Decode: pull `remote` into `local_block_ids`; the first `num_scratch` remote blocks are
    already in the local prefix cache and land in scratch."""

    remote: RemotePrefill
    local_block_ids: list[int]
    num_scratch: int


@dataclass
class UcxConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    # producer (prefill)
    to_expose: dict[str, list[int]] = field(default_factory=dict)
    to_release: list[str] = field(default_factory=list)
    # consumer (decode)
    to_recv: dict[str, RecvSpec] = field(default_factory=dict)
    to_renew: list[RemotePrefill] = field(default_factory=list)
    to_dismiss: list[RemotePrefill] = field(default_factory=list)
    to_cancel: list[str] = field(default_factory=list)


@dataclass
class UcxWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: lease ids exposed this step, per TP rank."""

    leases: dict[str, dict[int, str]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "UcxWorkerMetadata":
        if isinstance(other, UcxWorkerMetadata):
            for rid, by_rank in other.leases.items():
                self.leases.setdefault(rid, {}).update(by_rank)
        return self


@dataclass
class UcxHandshakeMetadata(KVConnectorHandshakeMetadata):
    """Worker -> scheduler at start-up: where this rank's agent listens."""

    tp_rank: int
    address: str
