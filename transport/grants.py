"""Lease grants: re-reads of a same-host lease without a round trip to the owner.

The first same-host read of a lease costs one round trip: the owner checks the lease and answers
with its iovecs. With grants on, that answer also names a *grant word*: an 8-byte word in the
owner's memory that holds the grant's generation while the lease is active and changes (to 0,
or to another lease's generation once the slot is reused) the moment the lease ends (release,
expiry), before any of its blocks can go back to the engine. The reader keeps the iovecs; a
later read of the same lease copies them with process_vm_readv and then reads the word (a load
from the owner's word board, mapped read-only: grant_words.py; else one more 8-byte
process_vm_readv). Word unchanged: the lease was active during the whole copy, so the
bytes are the lease's (generations are never reused, and a word never returns to a generation
it left). Word changed: the grant is dropped and the read goes the normal way (one round trip),
where the owner's lease checks answer as always. A grant is never a way around those checks:
only the peer the owner answered may hold it (one session), it ends with the lease, with the
session, and at the lease's expiry, and it covers whole-lease reads of host memory only (writes,
`ranges`, CUDA memory and UCX always ask the owner). The reader reports each granted read
afterwards (GRANT_READ: the owner counts it and delivers its notification).
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import cma, grant_words
from .descs import Descs

log = logging.getLogger(__name__)

BOARD_SLOTS = 1 << 16        # leases with a live grant at once per owner (512 KiB of words)
READER_GRANTS = 4096         # grants one session keeps (least recently used dropped first)
EXPIRY_MARGIN_S = 0.05       # a grant is not used this close to the lease's expiry

_RETIRED: list[np.ndarray] = []   # boards of closed agents: zeroed and kept, so a late check reads 0


class GrantBoard:
    """Owner side: one word per granted lease, in this process's memory (a sealed memfd that
    same-host readers map read-only: grant_words.py); slot 0 holds the board's id."""

    def __init__(self, slots: int = BOARD_SLOTS):
        self._board = grant_words.new_board(slots + 1)
        self.words = self._board.words
        self._free = list(range(slots, 0, -1))
        self._gen = itertools.count(1)
        self._high = 1   # slots below this were ever issued (slots are issued lowest first)

    @property
    def ref(self) -> grant_words.BoardRef | None:
        """What a grant names about this board (None: readers use process_vm_readv)."""
        return self._board.ref

    def issue(self, entry) -> tuple[int, int] | None:
        """(word address, generation) of `entry`'s grant, issued on first use; None when every
        slot is taken (reads then keep their round trip)."""
        if entry.grant is None:
            if not self._free:
                return None
            slot, gen = self._free.pop(), next(self._gen)
            self.words[slot] = gen
            self._high = max(self._high, slot + 1)
            entry.grant = (slot, gen)
        slot, gen = entry.grant
        return self.words.ctypes.data + 8 * slot, gen

    def close(self) -> None:
        """The agent closes: every grant ends (its words stay readable, as 0, for late checks)."""
        self.words[:self._high] = 0   # (slots never issued are 0 already, their pages untouched; the id too)
        self._free = []
        self._board.close_fd()       # (a mapped board stays mapped, and reads 0)
        _RETIRED.append(self.words)

    def revoke(self, entry) -> None:
        """The lease ended: its word changes before its blocks can be handed back."""
        if entry.grant is not None:
            slot, gen = entry.grant
            entry.grant = None
            if self.words[slot] == gen:   # (not after close())
                self.words[slot] = 0
                self._free.append(slot)


@dataclass
class Grant:
    """Reader side: what re-reading one lease needs."""

    lease: str
    nbytes: int
    remote: np.ndarray | None  # host memory: the owner's iovecs, checked (cma.parse_remote)
    word: int                 # address of the grant word in the owner's process
    gen: int
    expires: float            # time.monotonic() after which the grant is not used
    ipc: Any = None           # CUDA memory: the checked dataplane.IpcPlan
    local: Descs | None = None
    batches: list | None = None
    board: grant_words.BoardRef | None = None   # the owner's board the word is on, when shared

    def plan(self, local: Descs) -> list:
        if self.local is not local:  # callers usually re-read into the same Descs object
            self.batches, self.local = cma.plan_batches(local, self.remote), local
        return self.batches


class GrantCache:
    """Reader side: the grants of one session (one owner process)."""

    def __init__(self, limit: int = READER_GRANTS):
        self._by_lease: OrderedDict[str, Grant] = OrderedDict()
        self._limit = limit

    def add(self, lease: str, nbytes: int, iov: bytes, grant: list, sent_at: float) -> None:
        """Keep the grant of a READ_ACK of host memory (`grant` = [word address, generation,
        ttl ms])."""
        checked = _check(grant)
        if checked is None:
            return
        try:
            remote = cma.parse_remote(iov, nbytes)
        except ValueError:
            log.info("lease grant with unusable iovecs ignored")
            return
        self._keep(Grant(lease, nbytes, remote, checked[0], checked[1], sent_at + checked[2], board=checked[3]))

    def add_ipc(self, lease: str, nbytes: int, plan: Any, grant: list, sent_at: float) -> bool:
        """Keep the grant of a READ_ACK of CUDA memory, with the IPC plan already checked; False
        when the grant is unusable."""
        checked = _check(grant)
        if checked is None:
            return False
        self._keep(Grant(lease, nbytes, None, checked[0], checked[1], sent_at + checked[2], ipc=plan,
                         board=checked[3]))
        return True

    def _keep(self, g: Grant) -> None:
        self._by_lease[g.lease] = g
        self._by_lease.move_to_end(g.lease)
        while len(self._by_lease) > self._limit:
            self._by_lease.popitem(last=False)

    def get(self, lease: str, nbytes: int) -> Grant | None:
        g = self._by_lease.get(lease)   # (callers' threads and the loop share this cache)
        if g is None:
            return None
        if g.nbytes != nbytes or time.monotonic() >= g.expires:
            self._by_lease.pop(lease, None)
            return None
        return g

    def drop(self, lease: str) -> None:
        self._by_lease.pop(lease, None)

    def clear(self) -> None:
        self._by_lease.clear()

    def __len__(self) -> int:
        return len(self._by_lease)


def _check(grant: Any) -> tuple[int, int, float, grant_words.BoardRef | None] | None:
    """(word address, generation, seconds usable, the board it is on or None) of a well-formed
    grant ([word, generation, ms left] or [..., board fd, board address, board id]), else None."""
    if (not isinstance(grant, list) or len(grant) not in (3, 6)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grant)
            or not isinstance(grant[0], int) or not isinstance(grant[1], int)):
        log.info("malformed lease grant ignored")
        return None
    word, gen, ttl_ms = grant[0], grant[1], float(grant[2])
    board = grant_words.parse_ref(*grant[3:]) if len(grant) == 6 else None
    if not (0 < word < 1 << 64 and gen > 0 and 0 < ttl_ms < 1e12) or (len(grant) == 6 and board is None):
        log.info("malformed lease grant ignored")
        return None
    return word, gen, ttl_ms / 1000.0 - EXPIRY_MARGIN_S, board


def copy_granted(pid: int, g: Grant, local: Descs, words: grant_words.WordReader) -> bool:
    """Copy the granted lease into `local`, then check its word: True when the bytes are the
    lease's; False when the lease ended (the bytes may be anything; nothing was reported).
    Raises cma.CmaUnavailable / OSError as the normal copy does."""
    cma.copy_all(pid, g.plan(local), False)
    return words.read(pid, g.word, g.board) == g.gen
