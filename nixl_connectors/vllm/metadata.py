"""Messages between UcxConnector's scheduler side and its worker side (both directions)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from .params import RemotePrefill
from .pullplan import LocalTarget


@dataclass
class RecvSpec:
    """Decode: pull what `target` lacks from `remote` (see pullplan.py). `remote` is None and
    `error` says why when the request's kv_transfer_params were unusable: the worker then fails
    the request into the load-failure policy at once. `load_block_ids` are the local blocks the
    pull fills (reported as load errors if it fails)."""

    remote: RemotePrefill | None
    target: LocalTarget | None
    load_block_ids: tuple[int, ...] = ()
    error: str | None = None
    sync: bool = False      # load inside this step's forward (vLLM load_kv_async=False)


@dataclass
class UcxConnectorMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    # producer (prefill): block ids per KV-cache group
    to_expose: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
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
