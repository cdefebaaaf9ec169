"""Typed configuration of the TensorRT-LLM connector.

TensorRT-LLM 1.2's ``kv_connector_config`` carries only the module and class names, so the
connector's own settings come from a JSON document named by the environment variable
``NIXL_TRTLLM_CONNECTOR_CONFIG`` (a path, or the JSON text itself). It is read when the
scheduler/worker objects are built, never at import.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

CONFIG_ENV = "NIXL_TRTLLM_CONNECTOR_CONFIG"
DEFAULT_AUTH_KEY_ENV = "NIXL_CONNECTORS_AUTH_KEY"


class ConnectorRole(str, Enum):
    """What an instance does with the connector."""

    CONTEXT = "context"        # computes prompts, holds finished requests' blocks for a puller
    GENERATION = "generation"  # pulls prompt blocks, then decodes
    BOTH = "both"              # either, per request


class RoutingSource(str, Enum):
    """Where the proxy-supplied routing id is read from on a TensorRT-LLM request."""

    CACHE_SALT = "cache_salt"        # request.cache_salt (string) starting with `routing_prefix`
    CACHE_SALT_ID = "cache_salt_id"  # request.cache_salt_id (int): every salted request takes part


class ConfigError(ValueError):
    """The connector configuration is invalid."""


@dataclass(frozen=True)
class TrtllmConnectorConfig:
    """Settings of one TensorRT-LLM instance's connector (same document on every rank).

    role: context, generation or both.
    listen_host: interface the per-rank transport agent listens on.
    listen_port_base: rank r listens on ``listen_port_base + r``; 0 = ephemeral ports.
    context_agents: (generation side) ``host:port`` of the context instance's agent of each TP
        rank, index = rank; the generation worker of rank r pulls from entry r.
    auth_key_env: environment variable holding the shared secret (HMAC handshake); unset or
        empty variable = no authentication.
    model_key: identifies the checkpoint; part of the compatibility hash both sides compare.
    lease_ttl_s: how long a context worker holds a finished request's blocks for a reader.
    lookup_timeout_s: how long a generation worker waits for the context side to announce a
        request's lease (covers a proxy that forwards before the context request finished).
    unknown_grace_s: how long a routing id the context side has never heard of is retried.
    connect_timeout_s: deadline of connecting to a context worker (a dead one is found this fast).
    transfer_timeout_s: deadline of a pull.
    routing_prefix / routing_source: which requests take part (see `RoutingSource`).
    tokens_per_block: overrides ``llm_args.kv_cache_config.tokens_per_block``.
    transports: UCX transport set name of `transport.TransportSet` ("auto", "tcp", "shm", "cuda").
    """

    role: ConnectorRole = ConnectorRole.BOTH
    listen_host: str = "127.0.0.1"
    listen_port_base: int = 0
    context_agents: tuple[str, ...] = ()
    auth_key_env: str = DEFAULT_AUTH_KEY_ENV
    model_key: str = ""
    lease_ttl_s: float = 60.0
    lookup_timeout_s: float = 30.0
    unknown_grace_s: float = 5.0
    connect_timeout_s: float = 5.0
    transfer_timeout_s: float = 60.0
    routing_prefix: str = "nixl-rt:"
    routing_source: RoutingSource = RoutingSource.CACHE_SALT
    tokens_per_block: int | None = None
    transports: str = "auto"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.role, ConnectorRole):
            object.__setattr__(self, "role", ConnectorRole(self.role))
        if not isinstance(self.routing_source, RoutingSource):
            object.__setattr__(self, "routing_source", RoutingSource(self.routing_source))
        object.__setattr__(self, "context_agents", tuple(self.context_agents))
        for name in ("lease_ttl_s", "lookup_timeout_s", "transfer_timeout_s", "unknown_grace_s",
                     "connect_timeout_s"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if not 0 <= int(self.listen_port_base) <= 65535:
            raise ConfigError("listen_port_base must be in [0, 65535]")
        if self.tokens_per_block is not None and int(self.tokens_per_block) <= 0:
            raise ConfigError("tokens_per_block must be > 0")
        if self.routing_source is RoutingSource.CACHE_SALT and not self.routing_prefix:
            raise ConfigError("routing_prefix must be non-empty with routing_source=cache_salt")

    @property
    def pulls(self) -> bool:
        return self.role in (ConnectorRole.GENERATION, ConnectorRole.BOTH)

    @property
    def holds(self) -> bool:
        return self.role in (ConnectorRole.CONTEXT, ConnectorRole.BOTH)

    def listen_address(self, rank: int) -> str:
        port = self.listen_port_base + rank if self.listen_port_base else 0
        return f"{self.listen_host}:{port}"

    def context_agent(self, rank: int) -> str:
        if rank >= len(self.context_agents):
            raise ConfigError(
                f"rank {rank} has no entry in context_agents ({len(self.context_agents)} given); "
                "list the context instance's agent address of every TP rank")
        return self.context_agents[rank]

    def auth_key(self) -> bytes | None:
        value = os.environ.get(self.auth_key_env, "")
        return value.encode("utf-8") if value else None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TrtllmConnectorConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown connector settings: {sorted(unknown)}")
        try:
            return cls(**dict(data))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"bad connector config: {e}") from e

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TrtllmConnectorConfig":
        """Read ``$NIXL_TRTLLM_CONNECTOR_CONFIG`` (path or JSON text); defaults when unset."""
        env = os.environ if environ is None else environ
        raw = env.get(CONFIG_ENV, "").strip()
        if not raw:
            logger.info("%s unset: connector uses default settings", CONFIG_ENV)
            return cls()
        text = raw if raw.startswith("{") else Path(raw).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{CONFIG_ENV}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{CONFIG_ENV}: expected a JSON object")
        return cls.from_mapping(data)
