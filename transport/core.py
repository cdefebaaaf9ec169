"""The state an agent's parts share, passed to them explicitly (no back-references to Agent)."""
from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Callable

from . import cma
from .config import AgentConfig
from .backlog import Backlog
from .grants import GrantBoard
from .inbox import Inbox
from .leases import LeaseTable
from .runtime import Runtime
from .session import Session
from .stats import AgentStats
from .wire import DataPath

log = logging.getLogger(__name__)

CallHandler = Callable[[str, bytes], bytes]


@dataclass
class CallSlot:
    handler: CallHandler | None = None
    executor: Executor | None = None
    backlog: Backlog | None = None   # calls waiting for / running on `executor`, bounded


class Sessions:
    """Live sessions by peer name (several per name: both directions, or reconnects of the same
    process) and outbound ones by the address dialed."""

    def __init__(self) -> None:
        self.by_name: dict[str, list[Session]] = {}
        self.by_addr: dict[str, Session] = {}

    def add(self, s: Session) -> None:
        self.by_name.setdefault(s.name, []).append(s)
        if s.address is not None:
            self.by_addr[s.address] = s

    def remove(self, s: Session) -> None:
        lst = self.by_name.get(s.name, [])
        if s in lst:
            lst.remove(s)
        if not lst:
            self.by_name.pop(s.name, None)
        if s.address is not None and self.by_addr.get(s.address) is s:
            del self.by_addr[s.address]

    def live(self, name: str) -> list[Session]:
        return [s for s in self.by_name.get(name, []) if s.lost is None]

    def all(self) -> list[Session]:
        return [s for lst in self.by_name.values() for s in lst]


@dataclass
class Core:
    name: str
    config: AgentConfig
    instance: bytes
    runtime: Runtime
    executor: Executor
    stats: AgentStats = field(default_factory=AgentStats)
    leases: LeaseTable = field(default_factory=LeaseTable)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sessions: Sessions = field(default_factory=Sessions)
    calls: CallSlot = field(default_factory=CallSlot)
    inbox: Inbox | None = None
    data: Any = None          # dataplane.DataPlane
    grants: GrantBoard = field(default_factory=GrantBoard)

    def __post_init__(self) -> None:
        if self.inbox is None:
            self.inbox = Inbox(self.config.max_notify_bytes, self.config.max_notify_count)
        if self.calls.backlog is None:
            self.calls.backlog = Backlog("call handler", self.config.max_notify_count, self.config.max_notify_bytes)
        self.leases.on_end = self.grants.revoke

    def serves(self) -> list[str]:
        """One-sided paths this agent serves to peers on its host."""
        out = []
        if self.config.same_host_copy:
            out.append(DataPath.CMA.value)
        if self.config.gpu_ipc:
            out.append(DataPath.IPC.value)
        return out

    def hello_fields(self) -> dict[str, Any]:
        return {"name": self.name, "instance": self.instance, "host": cma.host_key(), "pid": os.getpid(),
                "chunk": self.config.chunk_bytes, "paths": self.serves()}

    def fallback(self, path: DataPath, reason: str, peer: str, configured: bool = False) -> None:
        """Count (and log once per reason) that `path` was not used; `configured`: turned off
        in the settings, which is a choice, not a surprise (logged at INFO)."""
        key = f"{path.value}: {reason}"
        if key not in self.stats.fallbacks:
            log.log(logging.INFO if configured else logging.WARNING,
                    "%s: %s to/from %s is not possible (%s); using UCX", self.name, path.value, peer, reason)
        self.stats.fallbacks[key] += 1
