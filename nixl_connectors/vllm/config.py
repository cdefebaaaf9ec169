"""Typed settings of `UcxConnector`, read from `kv_transfer_config.kv_connector_extra_config`.

The transport settings are the adapter kit's `AgentSettings` (one vocabulary for both engines);
the connector adds its lease and pull settings. Keys of both live side by side in the extra
config; unknown keys are an error naming them; `base_port` is a deprecated alias of
`listen_port_base`. A literal `auth_key` is refused: keys come from an environment variable
(`auth_key_env`) or a 0600 file (`auth_key_file`), never from a command line.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..kit import AgentSettings, ConfigError, coerce_mapping
from ..kit.settings import DEPRECATED_ALIASES

logger = logging.getLogger(__name__)

_AGENT_KEYS = frozenset(f.name for f in dataclasses.fields(AgentSettings)) | frozenset(DEPRECATED_ALIASES)


@dataclass(frozen=True)
class PullSettings:
    """lease_ttl_s: how long prefill keeps a finished request's blocks without a renewal.
    renew_interval_s: how often decode renews a lease it has not pulled yet.
    pull_workers: threads that connect / start reads off the engine thread.
    sync_load_max_tokens: a request whose pull is at most this many tokens is loaded synchronously
        (vLLM's `load_kv_async=False`): scheduled at once, its pull done inside that step's forward
        before the model runs, its last prompt token computed locally. That saves the engine steps
        an asynchronous load waits (the short-prompt TTFT), at the price of stalling that step for
        the pull (a same-host pull of a short prompt: about a millisecond). 0 (default): every load
        is asynchronous, as vLLM's NixlConnector does. Models with several KV-cache groups always
        load asynchronously (vLLM maps sync load errors for one group only)."""

    lease_ttl_s: float = 60.0
    renew_interval_s: float = 10.0
    pull_workers: int = 2
    sync_load_max_tokens: int = 0

    def __post_init__(self) -> None:
        if self.lease_ttl_s <= 0 or self.renew_interval_s <= 0:
            raise ConfigError("lease_ttl_s and renew_interval_s must be > 0")
        if self.renew_interval_s >= self.lease_ttl_s:
            raise ConfigError("renew_interval_s must be shorter than lease_ttl_s")
        if self.pull_workers < 1:
            raise ConfigError("pull_workers must be >= 1")
        if self.sync_load_max_tokens < 0:
            raise ConfigError("sync_load_max_tokens must be >= 0")


@dataclass(frozen=True)
class UcxConnectorConfig:
    """Settings of one engine's connector: `agent` (transport, see `AgentSettings`) and `pull`."""

    agent: AgentSettings = field(default_factory=AgentSettings)
    pull: PullSettings = field(default_factory=PullSettings)

    # short-hands used all over the adapter
    @property
    def host(self) -> str:
        return self.agent.host

    @property
    def timeout_s(self) -> float:
        return self.agent.timeout_s

    @property
    def lease_ttl_s(self) -> float:
        return self.pull.lease_ttl_s

    @property
    def renew_interval_s(self) -> float:
        return self.pull.renew_interval_s

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> "UcxConnectorConfig":
        """Build from `kv_connector_extra_config` (raises `ConfigError`, a ValueError)."""
        extra = dict(extra or {})
        if "auth_key" in extra:
            raise ConfigError("UcxConnector: a literal 'auth_key' is not accepted (it would sit on "
                              "the command line); name an environment variable with 'auth_key_env' "
                              "or a mode-0600 file with 'auth_key_file'")
        agent_part = {k: v for k, v in extra.items() if k in _AGENT_KEYS}
        pull_part = {k: v for k, v in extra.items() if k not in _AGENT_KEYS}
        pull_known = {f.name for f in dataclasses.fields(PullSettings)}
        unknown = sorted(k for k in pull_part if k not in pull_known)
        if unknown:
            raise ConfigError(f"unknown UcxConnector settings {unknown}; known: "
                              f"{sorted(pull_known | _AGENT_KEYS)}")
        agent = AgentSettings(**coerce_mapping(AgentSettings, agent_part, aliases=DEPRECATED_ALIASES,
                                               what="UcxConnector settings"))
        pull = PullSettings(**coerce_mapping(PullSettings, pull_part, what="UcxConnector settings"))
        return cls(agent, pull)
