"""Host pools of the benchmarks, allocated the same way for every implementation.

Same-host reads of host memory (ours: process_vm_readv; NIXL's UCX: cma) pin the owner's pages
for every read, so the page size of the owner's pool decides much of a small read's cost:
measured on the 2-core CI machine (AMD EPYC VM, THP "madvise"), one process_vm_readv of 64
random 32 KiB blocks took 0.13 ms from a pool on transparent huge pages and 0.28 ms from the
same pool on 4 KiB pages. numpy madvises huge pages for large arrays by default, torch's CPU
allocator does not (unless ``THP_MEM_ALLOC_ENABLE=1``): before this module our owner and reader
used torch pools and NIXL's workers numpy ones, which compared different memory, not different
transports. Now every pool of a run (ours, NIXL's, the in-process references) comes from
``host_pool`` with one page policy, and the report says which one and how much of it the
kernel really backed with huge pages.
"""
from __future__ import annotations

import ctypes
import enum
import mmap
import os

import numpy as np

from .env_choice import choice_from_env

PAGES_ENV = "NIXL_CONNECTORS_BENCH_HOST_PAGES"

_MADV_HUGEPAGE = 14
_MADV_NOHUGEPAGE = 15
_HUGE = 2 << 20


class HostPages(enum.Enum):
    HUGE = "huge"   # madvise(MADV_HUGEPAGE) before first touch (numpy's default for large arrays)
    SMALL = "4k"    # madvise(MADV_NOHUGEPAGE): 4 KiB pages (torch's CPU allocator by default)


def pages_from_env() -> HostPages:
    """The page policy of this run (``NIXL_CONNECTORS_BENCH_HOST_PAGES``; default huge)."""
    return choice_from_env(PAGES_ENV, HostPages, HostPages.HUGE)


def _madvise(addr: int, length: int, advice: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"madvise({advice}) of the bench pool: {os.strerror(e)}")


def host_pool(shape: tuple[int, ...], pages: HostPages | None = None, fill: int | None = 0) -> np.ndarray:
    """A uint8 array of ``shape`` on private anonymous memory aligned to 2 MiB, advised ``pages``
    before any page is touched, then touched (``fill``) as an engine's allocated KV pool is.
    ``fill=None`` leaves it untouched (the caller fills it)."""
    pages = pages or pages_from_env()
    nbytes = int(np.prod(shape, dtype=np.int64))
    if nbytes <= 0:
        raise ValueError(f"empty bench pool {shape}")
    # A fresh anonymous mapping, never numpy's allocator: malloc may hand back memory an earlier
    # pool already faulted in (as huge pages, since numpy advises them), and advice given after
    # the first touch does not change the pages already there.
    mm = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = np.frombuffer(mm, dtype=np.uint8)          # keeps `mm` alive as long as the array lives
    start = (-raw.ctypes.data) % _HUGE
    arr = raw[start:start + nbytes]
    span = (nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    _madvise(arr.ctypes.data, span, _MADV_HUGEPAGE if pages is HostPages.HUGE else _MADV_NOHUGEPAGE)
    if fill is not None:
        arr.fill(fill)
    return arr.reshape(shape)


def huge_fraction(arr: np.ndarray) -> float:
    """Fraction of ``arr``'s mapping backed by transparent huge pages now (/proc/self/smaps:
    AnonHugePages of the mapping that holds it); 0.0 where the kernel does not say."""
    addr = arr.ctypes.data
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0.0
    inside = False
    size = huge = 0
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("Size:"):
            size = int(line.split()[1])
        elif inside and line.startswith("AnonHugePages:"):
            huge = int(line.split()[1])
    return huge / size if size else 0.0
