"""One authenticated control connection and everything that belongs to it.

A `Session` owns its connection, the peer's proven identity, the transfers it serves (keyed by
the peer's transfer id) and the ones it initiated (keyed by ours), its UCX data endpoints and
its CUDA IPC mappings. A message naming a transfer is looked up only among that session's
transfers, so no peer can finish or abort another peer's transfer.
"""
from __future__ import annotations

import itertools
from collections import deque
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from . import cma
from .conn import Conn
from .errors import BadMessage
from .grant_words import WordReader
from .grants import GrantCache
from .wire import DataPath, Frame

log = logging.getLogger(__name__)


class MapTable(dict):
    """A session's CUDA IPC mappings by owner region uid, with `epoch`: a number that changes
    whenever an entry is added, replaced or removed, so a plan checked against the mappings at
    one epoch knows, by comparing one integer, that every mapping it names is still the one
    it checked (IpcPlan.live)."""

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        self.epoch += 1
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self.epoch += 1
        super().__delitem__(key)

    def pop(self, *args: Any) -> Any:
        self.epoch += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.epoch += 1
        return super().popitem()

    def clear(self) -> None:
        self.epoch += 1
        super().clear()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.epoch += 1
        return super().setdefault(key, default)

    def update(self, *args: Any, **kw: Any) -> None:
        self.epoch += 1
        super().update(*args, **kw)

    def __ior__(self, other: Any) -> "MapTable":
        self.update(other)
        return self


@dataclass(frozen=True)
class PeerInfo:
    """What the handshake proved about the peer (every field is in the MAC'd transcript)."""

    name: str
    instance: bytes
    host: str
    pid: int
    chunk: int
    serves: frozenset[DataPath]
    lane: bool = False      # a direct lane (lane.py): only answers its own thread's reads

    @property
    def same_host(self) -> bool:
        return bool(self.host) and self.host == cma.host_key()

    def alive(self) -> bool:
        """For a peer on this host: does its process still exist (a zombie counts as gone)?"""
        if not self.same_host:
            return True
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        return state not in (b"Z", b"X")


@dataclass(eq=False)
class Session:
    conn: Conn
    peer: PeerInfo
    inbound: bool
    address: str | None                      # what we dialed (outbound sessions)
    secret: bytes | None                     # per-session secret (IPC handle keystream)
    served: dict[int, Any] = field(default_factory=dict)      # peer's xid -> owner.Served
    initiated: dict[int, Any] = field(default_factory=dict)   # our xid -> initiator.Initiated
    off: dict[DataPath, str] = field(default_factory=dict)    # one-sided paths off for this peer
    ucx: Any = None                          # ucx_link.UcxLink once worker addresses were exchanged
    ipc_sent: set[int] = field(default_factory=set)           # region uids whose handles went out
    ipc_maps: MapTable = field(default_factory=MapTable)     # owner region uid -> mapping
    grants: GrantCache = field(default_factory=GrantCache)    # leases we may re-read without asking
    grant_reports: deque = field(default_factory=deque)       # (lease, nbytes, path) granted reads not yet reported
    words: WordReader = field(default_factory=WordReader)    # the owner's grant words (its board mapped)
    one_sided_reader: bool = False           # it read from us one-sidedly (grants are sent ahead to it)
    pid_checked: bool = False                # the peer's claimed pid was checked against the connection
    _xids: Any = field(default_factory=lambda: itertools.count(1))

    @property
    def name(self) -> str:
        return self.peer.name

    @property
    def lost(self) -> BaseException | None:
        return self.conn.lost

    def next_xid(self) -> int:
        return next(self._xids)

    def serves_pid(self) -> bool:
        return self.peer.pid != os.getpid()

    def start(self, handler: Callable[["Session", Frame], None]) -> None:
        self.conn.start(lambda f: handler(self, f))

    def served_entry(self, xid: int) -> Any:
        e = self.served.get(xid)
        if e is None:
            raise BadMessage(f"transfer {xid} is not one of this connection's")
        return e

    def close(self, reason: str = "closed locally") -> None:
        self.conn.close(reason)
