"""Build an engine rank's transport `Agent` from `AgentSettings` (one place for both adapters)."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from transport import Agent, AgentConfig

from .settings import AgentSettings

logger = logging.getLogger(__name__)


def agent_config(settings: AgentSettings, rank: int, compat: Mapping[str, Any]) -> AgentConfig:
    return AgentConfig(listen=settings.listen_address(rank), auth_key=settings.auth_key(),
                       timeout_s=settings.timeout_s, compat=dict(compat),
                       transports=settings.transports, same_host_copy=settings.same_host_copy,
                       gpu_ipc=settings.gpu_ipc, gpu_direct_tables=settings.gpu_direct_tables)


def make_agent(name: str, settings: AgentSettings, rank: int, compat: Mapping[str, Any]) -> Agent:
    agent = Agent(name, agent_config(settings, rank, compat))
    logger.info("agent %s (rank %d) listening on %s, advertised as %s", name, rank, agent.address,
                settings.advertised(agent.address))
    return agent
