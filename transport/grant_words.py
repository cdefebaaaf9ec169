"""Where lease-grant words live, and how a reader on the same host reads them.

The owner keeps its grant words (grants.py) in a sealed memfd mapping ("board"): slot 0 holds a
random 63-bit board id, the other slots one word per granted lease. A reader that may read the
owner's memory at all (the same permission process_vm_readv needs: ptrace-read access) opens
``/proc/<owner pid>/fd/<board fd>`` once per session, checks it is that board, and maps it
read-only; every later word check is a plain 8-byte load instead of a process_vm_readv (measured
on the H100 machine: 20-60 us per call, the largest single host step of a granted GPU read).

What the reader checks before it maps: the link names our memfd; it is a regular file; the same
inode after opening; the owner sealed it against shrinking (a shrunk file would fault the reader
on access); its size is a whole number of words; slot 0 holds the board id the grant named (an
fd number the owner closed and reused for another board is never mistaken for this one).
Anything else, and on machines without memfd or /proc: the word is read with process_vm_readv
as before. The reader learns nothing it could not read with process_vm_readv anyway.
"""
from __future__ import annotations

import fcntl
import functools
import logging
import mmap
import os
import secrets
import stat
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import cma

log = logging.getLogger(__name__)

MEMFD_NAME = "nixl-grant-words"
MAX_BOARD_BYTES = 64 << 20
MAX_BOARDS = 4             # boards one session tries to map (an honest owner has one per agent)
_WORD = struct.Struct("<q")


@dataclass(frozen=True)
class BoardRef:
    """What a grant says about the board its word is on."""

    fd: int       # the board's fd in the owner process
    base: int     # the board's address in the owner process (word addresses are base + 8 * slot)
    ident: int    # the board id in slot 0


@dataclass
class Board:
    """Owner side: the words (slot 0: the id) and, when shared, the memfd behind them; `ref` is
    what every grant names about it (made once: each issued grant carries it)."""

    words: np.ndarray
    fd: int | None
    ident: int
    ref: BoardRef | None = None

    def __post_init__(self) -> None:
        if self.fd is not None:
            self.ref = BoardRef(self.fd, self.words.ctypes.data, self.ident)

    def close_fd(self) -> None:
        if self.fd is not None:
            fd, self.fd, self.ref = self.fd, None, None
            try:
                os.close(fd)
            except OSError:
                pass


def new_board(slots: int) -> Board:
    """`slots` words (slot 0 set to a fresh board id), on a sealed memfd when this system has
    one, else in ordinary memory (readers then use process_vm_readv)."""
    ident = secrets.randbits(63) | 1
    fd = None
    try:
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, slots * 8)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        mm = mmap.mmap(fd, slots * 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        words = np.frombuffer(mm, dtype="<i8")
    except (OSError, AttributeError, ValueError) as e:
        if fd is not None:
            os.close(fd)
        log.debug("grant words in private memory (%s: %s)", type(e).__name__, e)
        fd, words = None, np.zeros(slots, dtype="<i8")
    words[0] = ident
    return Board(words, fd, ident)


def parse_ref(fd, base, ident) -> BoardRef | None:
    """A grant's board fields, if well formed (pure)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (fd, base, ident)):
        return None
    if not (0 <= fd < 1 << 31 and 0 < base < 1 << 64 and base % 8 == 0 and 0 < ident < 1 << 63):
        return None
    return BoardRef(fd, base, ident)


class MappedBoard:
    """Reader side: an owner's board mapped read-only."""

    def __init__(self, mm: mmap.mmap, ref: BoardRef):
        self._mm, self.ref, self._size = mm, ref, len(mm)

    @property
    def mm(self) -> mmap.mmap:
        return self._mm

    def offset(self, address: int) -> int | None:
        """Where the word at `address` in the owner lies on this board, or None when it is not on it."""
        off = address - self.ref.base
        if off < 8 or off > self._size - 8 or off & 7:
            return None
        return off

    def read(self, address: int) -> int | None:
        """The word at `address` in the owner, or None when it is not on this board."""
        off = self.offset(address)
        return None if off is None else _load(self._mm, off)


def _load(mm: mmap.mmap, off: int) -> int:
    return _WORD.unpack_from(mm, off)[0]


def map_board(pid: int, ref: BoardRef) -> MappedBoard | None:
    """Map the owner's board read-only after the checks in the module's docstring; None when any
    fails (the caller then reads words with process_vm_readv)."""
    path = f"/proc/{pid}/fd/{ref.fd}"
    try:
        if not os.readlink(path).startswith(f"/memfd:{MEMFD_NAME}"):
            return None
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        f = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st2 = os.fstat(f)
            if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(st2.st_mode):
                return None
            if not fcntl.fcntl(f, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
                return None
            size = os.fstat(f).st_size   # (after the seal: it can no longer shrink)
            if not 16 <= size <= MAX_BOARD_BYTES or size % 8:
                return None
            mm = mmap.mmap(f, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(f)
    except (OSError, ValueError, AttributeError):
        return None
    if _WORD.unpack_from(mm, 0)[0] != ref.ident:
        mm.close()
        return None
    return MappedBoard(mm, ref)


class WordReader:
    """Reader side, one per session: reads an owner's grant words, mapped when its board can be
    mapped, else with process_vm_readv."""

    def __init__(self) -> None:
        self._boards: dict[BoardRef, MappedBoard | None] = {}

    def read(self, pid: int, address: int, ref: BoardRef | None) -> int:
        return self.reader(pid, address, ref)()

    def reader(self, pid: int, address: int, ref: BoardRef | None) -> Callable[[], int]:
        """What `read(pid, address, ref)` does, found once: a call that reads that word (a load
        from the mapped board, else process_vm_readv). A CUDA read makes it while its copy runs,
        so the check after the copy is one load. It holds the board's mapping: a session ended
        meanwhile leaves the last word written there, which still says whether the lease ended."""
        if ref is not None:
            b = self._boards.get(ref, False)
            if b is False and len(self._boards) < MAX_BOARDS:   # (a peer naming ever new boards gets syscalls)
                b = self._boards[ref] = map_board(pid, ref)
                if b is None:
                    log.debug("grant board of pid %d not mappable: its words are read with process_vm_readv", pid)
            if b:
                off = b.offset(address)
                if off is not None:
                    return functools.partial(_load, b.mm, off)
        return functools.partial(cma.read_word, pid, address)

    def mapped(self) -> int:
        return sum(1 for b in self._boards.values() if b is not None)

    def clear(self) -> None:
        """Forget the boards (the session ended); each is unmapped when no reader still holds it."""
        self._boards.clear()
