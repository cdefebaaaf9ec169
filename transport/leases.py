"""Lease bookkeeping of an owner: which blocks which peer may touch, until when.

A lease ends when released, or when its ttl passes; its blocks are handed back to the engine
(`drain_freed`) only once no transfer still touches them (a transfer holds a reference from the
moment it is accepted until the data path confirms it is done with the memory).
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable
from enum import Enum

from .descs import Descs
from .errors import ErrorCode, LeaseRejected

log = logging.getLogger(__name__)


class LeaseState(str, Enum):
    ACTIVE = "active"
    ENDED = "ended"      # released or expired; waiting for in-flight transfers to drop refs
    FREED = "freed"      # handed back to the engine


@dataclass(frozen=True)
class Lease:
    """What `expose` returns: the id to hand to the peer, the size, the expiry (time.time())."""

    id: str
    nbytes: int
    expires_at: float


@dataclass
class LeaseEntry:
    id: str
    descs: Descs
    peer: str | None
    writable: bool
    expires_mono: float
    state: LeaseState = LeaseState.ACTIVE
    refs: int = 0
    iov: Any = None         # same-host copy addresses of the whole lease, computed on first read
    ipc: Any = None         # CUDA IPC (regions, run table) of the whole lease, computed on first read
    grant: tuple[int, int] | None = None   # (grant board slot, generation) while granted (grants.py)


class LeaseTable:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self.on_end: Callable[[LeaseEntry], None] | None = None   # runs as a lease ends (grants revoked)
        self._leases: dict[str, LeaseEntry] = {}
        self._freed: list[str] = []
        self.expired_count = 0

    def add(self, descs: Descs, peer: str | None, ttl_s: float, writable: bool) -> LeaseEntry:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        if len(descs) == 0:
            raise ValueError("cannot expose an empty descriptor list")
        lid = secrets.token_hex(16)
        e = LeaseEntry(lid, descs, peer, writable, self._clock() + ttl_s)
        self._leases[lid] = e
        return e

    def public(self, e: LeaseEntry) -> Lease:
        return Lease(e.id, e.descs.nbytes, time.time() + (e.expires_mono - self._clock()))

    def acquire(self, lid: str, peer: str, nbytes: int, want_write: bool, ranges=None) -> tuple[LeaseEntry, Descs]:
        """Validate an access by `peer` to the whole lease, or to byte `ranges` ([n, 2] int64
        (offset, length) of its stream), and take a reference; returns the entry and the
        descriptors to move. Raises LeaseRejected."""
        e = self._leases.get(lid)
        if e is None or e.state is LeaseState.FREED:
            raise LeaseRejected(f"no such lease {lid[:12]}", ErrorCode.NO_SUCH_LEASE)
        if e.state is LeaseState.ENDED or self._clock() >= e.expires_mono:
            raise LeaseRejected(f"lease {lid[:12]} has expired or was released", ErrorCode.LEASE_EXPIRED)
        if e.peer is not None and e.peer != peer:
            raise LeaseRejected(f"lease {lid[:12]} is not exposed to {peer!r}", ErrorCode.NOT_ALLOWED)
        if want_write and not e.writable:
            raise LeaseRejected(f"lease {lid[:12]} is not writable", ErrorCode.NOT_ALLOWED)
        descs = e.descs
        if ranges is not None:
            try:
                descs = e.descs.select_stream(ranges)
            except ValueError as err:
                raise LeaseRejected(f"lease {lid[:12]}: {err}", ErrorCode.SIZE_MISMATCH) from None
        if nbytes != descs.nbytes:
            raise LeaseRejected(f"lease {lid[:12]} holds {descs.nbytes} bytes (in the ranges read), "
                                f"request names {nbytes}", ErrorCode.SIZE_MISMATCH)
        e.refs += 1
        return e, descs

    def drop(self, e: LeaseEntry) -> None:
        e.refs -= 1
        self._maybe_free(e)

    def renew(self, lid: str, peer: str, ttl_s: float, max_ttl_s: float) -> float:
        e = self._leases.get(lid)
        if e is None or e.state is not LeaseState.ACTIVE or self._clock() >= e.expires_mono:
            raise LeaseRejected(f"cannot renew lease {lid[:12]}: unknown, expired or released",
                                ErrorCode.LEASE_EXPIRED if e else ErrorCode.NO_SUCH_LEASE)
        if e.peer is not None and e.peer != peer:
            raise LeaseRejected(f"lease {lid[:12]} is not exposed to {peer!r}", ErrorCode.NOT_ALLOWED)
        if not 0 < ttl_s <= max_ttl_s:
            raise LeaseRejected(f"ttl {ttl_s} outside (0, {max_ttl_s}]", ErrorCode.NOT_ALLOWED)
        e.expires_mono = max(e.expires_mono, self._clock() + ttl_s)
        return e.expires_mono - self._clock()

    def release(self, lid: str, reason: str = "released") -> bool:
        e = self._leases.get(lid)
        if e is None or e.state is not LeaseState.ACTIVE:
            return False
        self._end(e, reason)
        return True

    def sweep(self) -> int:
        """End every lease past its ttl; returns how many ended."""
        now = self._clock()
        n = 0
        for e in list(self._leases.values()):
            if e.state is LeaseState.ACTIVE and now >= e.expires_mono:
                self._end(e, "expired")
                self.expired_count += 1
                n += 1
        return n

    def drain_freed(self) -> list[str]:
        out, self._freed = self._freed, []
        return out

    def now(self) -> float:
        return self._clock()

    def get(self, lid: str) -> LeaseEntry | None:
        return self._leases.get(lid)

    def __len__(self) -> int:
        return sum(1 for e in self._leases.values() if e.state is not LeaseState.FREED)

    def _end(self, e: LeaseEntry, reason: str) -> None:
        e.state = LeaseState.ENDED
        if self.on_end is not None:
            self.on_end(e)
        if e.refs:
            log.info("lease %s %s while %d transfer(s) still use it: quarantined", e.id[:12], reason, e.refs)
        self._maybe_free(e)

    def _maybe_free(self, e: LeaseEntry) -> None:
        if e.state is LeaseState.ENDED and e.refs <= 0:
            e.state = LeaseState.FREED
            self._freed.append(e.id)
            del self._leases[e.id]
