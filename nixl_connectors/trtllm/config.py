"""Typed settings of the TensorRT-LLM connector.

TensorRT-LLM's ``kv_connector_config`` carries only the module and class names, so the
connector's own settings come from a JSON document named by the environment variable
``NIXL_TRTLLM_CONNECTOR_CONFIG`` (a path, or the JSON text itself). It is read when the
scheduler/worker objects are built, never at import.

One flat document holds two kinds of keys: the transport agent's (the adapter kit's
`AgentSettings` vocabulary: ``listen_host``, ``listen_port_base``, ``auth_key_env``,
``auth_key_file``, ``timeout_s``, ``transports``, ...) and this connector's own
(`TrtllmSettings`). Old names are accepted for one release with a warning
(``transfer_timeout_s`` -> ``timeout_s``); keys that no longer do anything are named in the
warning; unknown keys are an error.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

from ..kit import AgentSettings, ConfigError, coerce_mapping
from ..kit.settings import DEPRECATED_ALIASES

logger = logging.getLogger(__name__)

CONFIG_ENV = "NIXL_TRTLLM_CONNECTOR_CONFIG"

# keys of the 0.1 connector that no longer have an effect (accepted for one release)
RETIRED_KEYS = {
    "routing_prefix": "routing uses the request's cache_salt_id; no prefix is parsed",
    "unknown_grace_s": "the generation side asks once (with lookup_wait_s) instead of retrying",
    "lookup_timeout_s": "replaced by lookup_wait_s and probe_timeout_s",
}


class ConnectorRole(str, Enum):
    """What an instance does with the connector."""

    CONTEXT = "context"        # computes prompts, holds finished requests' blocks for a puller
    GENERATION = "generation"  # pulls prompt blocks, then decodes


class RoutingSource(str, Enum):
    """Where the proxy-supplied routing id is read from on a TensorRT-LLM request.

    Only ``cache_salt_id`` exists: ``get_num_new_matched_tokens`` is handed the C++
    ``LlmRequest``, whose bindings carry the salt's 64-bit hash (``cache_salt_id``) and not
    the ``cache_salt`` string (see docs/trtllm-notes.md).
    """

    CACHE_SALT_ID = "cache_salt_id"


def _check_hostport(value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"context_agents entry {value!r} is not 'host:port'")


@dataclass(frozen=True)
class TrtllmSettings:
    """The connector's own settings (same document on every rank of an instance).

    role: ``context`` or ``generation`` (a request carries only its salt's hash, so an
        instance cannot tell which leg a request is; each instance plays one).
    context_agents: (generation side) ``host:port`` of the context instance's agent of each
        TP rank, index = rank.
    model_key: identifies the checkpoint; part of the compatibility dict both sides compare.
    lease_ttl_s: how long a context worker holds a finished request's blocks for a reader.
    lookup_wait_s: how long the context side lets a lookup wait for a request that is still
        finishing (the proxy may forward the generation leg a moment before the blocks are
        exposed). The generation side claims a hand-off only when every rank's lease is ready.
    probe_timeout_s: deadline of one lookup round trip, on top of lookup_wait_s.
    connect_timeout_s: deadline of connecting to a context worker.
    peer_retry_s: after a context worker could not be reached, requests compute locally
        without asking it again for this long (a dead peer never stalls every request).
    tokens_per_block: only for TensorRT-LLM versions that neither hand the connector a
        layout with the real value nor write it back to ``kv_cache_config`` (see notes).
    routing_source: see `RoutingSource`.
    """

    role: ConnectorRole = ConnectorRole.CONTEXT
    context_agents: tuple[str, ...] = ()
    model_key: str = ""
    lease_ttl_s: float = 60.0
    lookup_wait_s: float = 1.0
    probe_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    peer_retry_s: float = 5.0
    tokens_per_block: int | None = None
    routing_source: RoutingSource = RoutingSource.CACHE_SALT_ID

    def __post_init__(self) -> None:
        for name in ("lease_ttl_s", "probe_timeout_s", "connect_timeout_s"):
            if float(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be > 0")
        for name in ("lookup_wait_s", "peer_retry_s"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if self.tokens_per_block is not None and self.tokens_per_block <= 0:
            raise ConfigError("tokens_per_block must be > 0")
        if self.role is ConnectorRole.GENERATION and not self.context_agents:
            raise ConfigError("role generation needs context_agents: the context instance's agent "
                              "address of every TP rank")
        for address in self.context_agents:
            _check_hostport(address)

    @property
    def pulls(self) -> bool:
        return self.role is ConnectorRole.GENERATION

    @property
    def holds(self) -> bool:
        return self.role is ConnectorRole.CONTEXT

    def check_tp(self, tp_size: int) -> None:
        """The generation side needs the context instance's agent of every one of its TP ranks."""
        if self.pulls and len(self.context_agents) != tp_size:
            raise ConfigError(f"context_agents lists {len(self.context_agents)} address(es) for "
                              f"tensor_parallel_size={tp_size}: list the context instance's agent of "
                              "every TP rank (both instances use the same TP size)")

    def context_agent(self, rank: int) -> str:
        if not 0 <= rank < len(self.context_agents):
            raise ConfigError(
                f"rank {rank} has no entry in context_agents ({len(self.context_agents)} given); "
                "list the context instance's agent address of every TP rank")
        return self.context_agents[rank]


@dataclass(frozen=True)
class ConnectorSettings:
    """Everything one connector object needs: its own settings and its agent's."""

    trtllm: TrtllmSettings = dataclasses.field(default_factory=TrtllmSettings)
    agent: AgentSettings = dataclasses.field(default_factory=AgentSettings)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> "ConnectorSettings":
        data = dict(data or {})
        role = data.get("role")
        if role == "both":
            raise ConfigError("role 'both' is not supported: TensorRT-LLM hands the connector only "
                              "the salt's hash (cache_salt_id), which cannot say which leg a request "
                              "is; run one context and one generation instance")
        if data.get("routing_source") == "cache_salt":
            raise ConfigError("routing_source 'cache_salt' cannot work: get_num_new_matched_tokens "
                              "receives the C++ LlmRequest, which carries cache_salt_id, not the "
                              "cache_salt string; use 'cache_salt_id' (the default)")
        for key, why in RETIRED_KEYS.items():
            if key in data:
                data.pop(key)
                logger.warning("connector setting %r is deprecated and ignored (%s); it goes away "
                               "in the next release", key, why)
        agent_names = {f.name for f in dataclasses.fields(AgentSettings)} | set(DEPRECATED_ALIASES)
        agent_part = {k: v for k, v in data.items() if k in agent_names}
        own_part = {k: v for k, v in data.items() if k not in agent_names}
        agent = AgentSettings(**coerce_mapping(AgentSettings, agent_part, aliases=DEPRECATED_ALIASES,
                                               what="agent settings"))
        own = TrtllmSettings(**coerce_mapping(TrtllmSettings, own_part, what="connector settings"))
        return cls(own, agent)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ConnectorSettings":
        """Read ``$NIXL_TRTLLM_CONNECTOR_CONFIG`` (path or JSON text); defaults when unset."""
        env = os.environ if environ is None else environ
        raw = env.get(CONFIG_ENV, "").strip()
        if not raw:
            logger.info("%s unset: connector uses default settings", CONFIG_ENV)
            return cls()
        if raw.startswith("{"):
            text = raw
        else:
            try:
                text = Path(raw).read_text(encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"{CONFIG_ENV}={raw!r}: cannot read: {e.strerror}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{CONFIG_ENV}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{CONFIG_ENV}: expected a JSON object")
        return cls.from_mapping(data)
