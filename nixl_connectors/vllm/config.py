"""Typed settings of `UcxConnector`, read from `kv_transfer_config.kv_connector_extra_config`."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UcxConnectorConfig:
    """Settings of one engine's connector.

    listen_host: interface the per-rank agents listen on (port is always ephemeral unless
        `base_port` is set; rank r then listens on base_port + r).
    advertise_host: host written into kv_transfer_params (defaults to listen_host).
    auth_key: shared secret (str) for the HMAC handshake; None disables auth.
    lease_ttl_s: how long prefill keeps a finished request's blocks without a renewal.
    renew_interval_s: how often decode renews a lease it has not pulled yet.
    timeout_s: deadline of connect/read/renew calls.
    transports: transport.TransportSet value ("auto", "tcp", "shm", "cuda").
    pull_workers: threads that connect/start reads off the engine thread.
    """

    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    base_port: int = 0
    auth_key: str | None = None
    lease_ttl_s: float = 60.0
    renew_interval_s: float = 10.0
    timeout_s: float = 30.0
    transports: str = "auto"
    pull_workers: int = 2

    def __post_init__(self) -> None:
        if self.lease_ttl_s <= 0 or self.renew_interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError("lease_ttl_s, renew_interval_s and timeout_s must be > 0")
        if self.renew_interval_s >= self.lease_ttl_s:
            raise ValueError("renew_interval_s must be shorter than lease_ttl_s")
        if not 0 <= self.base_port <= 65535:
            raise ValueError("base_port out of range")
        if self.pull_workers < 1:
            raise ValueError("pull_workers must be >= 1")

    @property
    def host(self) -> str:
        return self.advertise_host or self.listen_host

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "UcxConnectorConfig":
        """Build from `kv_connector_extra_config`; unknown keys are an error naming the key."""
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(k for k in extra if k not in known)
        if unknown:
            raise ValueError(f"unknown UcxConnector settings {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        for k, v in extra.items():
            t = known[k].type
            if v is None:
                kwargs[k] = None
            elif "float" in str(t):
                kwargs[k] = float(v)
            elif "int" in str(t):
                kwargs[k] = int(v)
            else:
                kwargs[k] = str(v)
        return cls(**kwargs)
