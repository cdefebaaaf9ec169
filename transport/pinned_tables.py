"""Descriptor arrays in pinned host memory that the GPU reads where they lie.

A `Descs` over CUDA regions keeps its run offsets (and, over several regions, its region index
per run) here instead of in ordinary heap memory (descs.py). Pinned memory is mapped into every
device's address space at its own address (unified addressing; checked once per chunk and
device), so the fused copy kernel reads a read's own runs straight from the `Descs` the engine
built (gpu_direct.py): no table to fill and no slot to take on the read's path.

The arena is process-wide and bounded (`MAX_BYTES`): blocks are powers of two (16-byte aligned)
carved from chunks that are never returned; a block comes back when the last array over it is
collected (its owner object's `__del__`, which only appends to a queue: it may run inside any
allocation, on any thread). When pinned memory cannot be had (no CUDA, the budget is spent), a
caller gets None and keeps ordinary arrays: the read then writes its table as before (slower,
never wrong). Why the arena is off is kept in `disabled`.

A forked child does not own its parent's pinned memory (CUDA cannot be used there, and the driver
keeps pinned pages out of the child): each arena turns itself off in a forked child, keeping the
chunks' objects untouched (freeing them there would be a CUDA call), so nothing new is placed in
memory that is not the child's.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
import threading
import weakref
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20       # pinned memory is asked for in chunks of this size (larger blocks: their own)
MAX_BYTES = 256 << 20       # pinned memory the arena may hold in all
MIN_BLOCK = 256             # bytes: the smallest block (every block is a power of two, 16-byte aligned)

# chunk allocator: bytes -> (address, object keeping the memory alive, or None to say "none to be had")
ChunkAlloc = Callable[[int], "tuple[int, Any] | None"]


def _torch_pinned(nbytes: int) -> tuple[int, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return int(t.data_ptr()), t


def block_size(nbytes: int) -> int:
    """The block a request of `nbytes` takes: the next power of two, at least MIN_BLOCK (pure)."""
    return max(MIN_BLOCK, 1 << max(0, nbytes - 1).bit_length())


class PinnedArena:
    def __init__(self, alloc: ChunkAlloc = _torch_pinned, chunk_bytes: int = CHUNK_BYTES,
                 max_bytes: int = MAX_BYTES):
        self._alloc = alloc
        self.chunk_bytes, self.max_bytes = chunk_bytes, max_bytes
        self._lock = threading.Lock()
        self._chunks: list[tuple[int, int, Any]] = []   # (address, bytes, keep-alive)
        self._free: dict[int, list[int]] = {}          # block size -> free addresses
        self._freed: collections.deque = collections.deque()   # (address, size) from finalizers
        self._bump = (0, 0)                              # (next free address, end) in the newest chunk
        self.held = 0                                    # bytes of chunks
        self.in_use = 0                                  # bytes of live blocks
        self.disabled: str | None = None
        self.refused = 0                                 # requests answered None (budget spent)
        self.mapped: dict[int, bool] = {}               # device index -> every chunk mapped at its address
        self._types: dict[int, Any] = {}                # block size -> its owner type
        self._orphans: tuple = ()                        # a forked child: its parent's chunks, never used
        _ARENAS.add(self)

    # -- blocks ---------------------------------------------------------------------------------
    def array(self, n: int, dtype: Any) -> tuple[np.ndarray, int] | None:
        """A new array of `n` elements of `dtype` in pinned memory (contents undefined) and its
        address, or None."""
        if self.disabled is not None or n <= 0:
            return None
        dt = np.dtype(dtype)
        size = block_size(n * dt.itemsize)
        addr = self._take(size)
        if addr is None:
            return None
        owner = self._owner_type(size).from_address(addr)
        return np.frombuffer(owner, dtype=dt, count=n), addr

    def _owner_type(self, size: int) -> Any:
        """The ctypes type of a block of `size` bytes whose instances give their block back when
        collected (the last array over it gone: numpy keeps its buffer's owner alive)."""
        t = self._types.get(size)
        if t is None:
            freed = self._freed

            def __del__(block: Any) -> None:   # (only a queue append: any thread, inside any allocation)
                freed.append((ctypes.addressof(block), size))

            t = type(f"PinnedBlock{size}", (ctypes.c_byte * size,), {"__del__": __del__})
            self._types[size] = t
        return t

    def _take(self, size: int) -> int | None:
        with self._lock:
            self._drain()
            free = self._free.get(size)
            if free:
                self.in_use += size
                return free.pop()
            at, end = self._bump
            if end - at < size:
                if not self._grow(size):
                    self.refused += 1
                    return None
                at, end = self._bump
            self._bump = (at + size, end)
            self.in_use += size
            return at

    def _grow(self, size: int) -> bool:
        nbytes = self.chunk_bytes if size <= self.chunk_bytes else size + 16   # (room to align a big one)
        if self.held + nbytes > self.max_bytes:
            return False
        try:
            got = self._alloc(nbytes)
        except Exception as e:   # no CUDA runtime, out of pinned memory: ordinary arrays from now on
            got = None
            self.disabled = f"pinned memory unavailable: {type(e).__name__}: {e}"
            log.info("descriptor tables stay in ordinary memory (%s)", self.disabled)
        if got is None:
            if self.disabled is None and not self._chunks:
                self.disabled = "pinned memory unavailable: no CUDA device"
            return False
        addr, keep = got
        at = (addr + 15) // 16 * 16   # (page-aligned from a CUDA allocator)
        usable = nbytes - (at - addr)
        self._chunks.append((addr, nbytes, keep))
        self.held += nbytes
        self.mapped.clear()   # (asked again for the new chunk)
        # what is left of the previous chunk goes to the free lists, biggest blocks first
        prev_at, prev_end = self._bump
        while prev_end - prev_at >= MIN_BLOCK:
            b = 1 << ((prev_end - prev_at).bit_length() - 1)
            self._free.setdefault(b, []).append(prev_at)
            prev_at += b
        self._bump = (at, at + usable)
        return usable >= size

    def _drain(self) -> None:
        q = self._freed
        while q:
            try:
                addr, size = q.popleft()
            except IndexError:
                break
            self._free.setdefault(size, []).append(addr)
            self.in_use -= size

    def forked(self) -> None:
        """In a forked child (os.register_at_fork): hand out nothing more. The chunks' objects are
        kept, not freed (that would be a CUDA call in a process that cannot make one)."""
        self._lock = threading.Lock()   # (another thread may have held it at the fork)
        self._orphans = (self._chunks, self._free)
        self._chunks, self._free, self._bump = [], {}, (0, 0)
        self._freed = collections.deque()   # (inherited blocks' frees go to the old queue, never drained)
        self._types = {}
        self.held = self.in_use = 0
        self.mapped = {}
        self.disabled = "a forked child: its parent's pinned memory is not this process's"

    # -- what the launch asks --------------------------------------------------------------------
    def holds(self, addr: int, nbytes: int) -> bool:
        for a, n, _ in self._chunks:
            if a <= addr and addr + nbytes <= a + n:
                return True
        return False

    def chunk_of(self, addr: int) -> tuple[int, Any] | None:
        """(chunk address, keep-alive object: a pinned uint8 tensor for the torch allocator) of
        the chunk holding `addr`."""
        for a, n, keep in self._chunks:
            if a <= addr < a + n:
                return a, keep
        return None

    def mapped_on(self, device_index: int, check: Callable[[int], int | None]) -> bool:
        """Does device `device_index` see every chunk at its host address? (`check(addr)`: the
        device address of pinned host memory, asked once per device and set of chunks.)"""
        ok = self.mapped.get(device_index)
        if ok is None:
            with self._lock:
                chunks = list(self._chunks)
            ok = bool(chunks) and all(check(a) == a for a, _, _ in chunks)
            if not ok and chunks:
                log.info("pinned descriptor tables are not mapped at their address on device %d: "
                         "reads write their tables as before", device_index)
            self.mapped[device_index] = ok
        return ok

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._drain()
            return {"held_bytes": self.held, "in_use_bytes": self.in_use, "chunks": len(self._chunks),
                    "refused": self.refused, "disabled": self.disabled}


_ARENAS: "weakref.WeakSet[PinnedArena]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for arena in list(_ARENAS):
        arena.forked()


os.register_at_fork(after_in_child=_after_fork_in_child)

TABLES = PinnedArena()
