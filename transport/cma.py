"""Same-host fast path for host memory: one kernel copy (process_vm_readv) from the owner's
leased blocks straight into the reader's blocks, with scatter/gather lists.

UCX's own shared-memory path moves one contiguous message at a time, so scattered blocks would
cost a pack, a copy and an unpack; cross-memory attach with iovecs does it in one copy. It needs
the two processes on one host, in one PID namespace, with ptrace permission (the same rule as
UCX's cma transport); any failure makes the caller fall back to the UCX path.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
from concurrent.futures import Executor

import numpy as np

from .descs import Descs

log = logging.getLogger(__name__)

IOV_MAX = 1024


class CmaUnavailable(Exception):
    """The kernel refused cross-memory attach (permissions, namespaces, unsupported)."""


@functools.lru_cache(maxsize=1)
def host_key() -> str:
    """Identifies this host boot and PID namespace: equal keys mean CMA can work."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{ns}"


@functools.lru_cache(maxsize=1)
def _readv():
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.process_vm_readv
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


def iovecs(descs: Descs) -> np.ndarray:
    """[n, 2] uint64 (address, length) of the coalesced host descriptors."""
    d = descs.coalesced()
    bases = np.array([r.flat.data_ptr() for r in d.regions], dtype=np.uint64)
    out = np.empty((len(d), 2), dtype=np.uint64)
    out[:, 0] = bases[d.region_idx] + d.offset.astype(np.uint64)
    out[:, 1] = d.length.astype(np.uint64)
    return out


def split_batches(local: np.ndarray, remote: np.ndarray, max_iov: int = IOV_MAX,
                  max_bytes: int = 64 << 20) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut two iovec lists of equal total length into aligned batches of at most `max_iov`
    entries each (entries split at batch edges), so each batch is one syscall (pure)."""
    if int(local[:, 1].sum()) != int(remote[:, 1].sum()):
        raise ValueError("local and remote iovecs differ in total length")
    # Every byte position where either list has a boundary, plus batch limits.
    lc = np.concatenate(([0], np.cumsum(local[:, 1], dtype=np.uint64)))
    rc = np.concatenate(([0], np.cumsum(remote[:, 1], dtype=np.uint64)))
    total = int(lc[-1])
    batches = []
    pos, li, ri = 0, 0, 0
    while pos < total:
        # Largest end such that both sides use <= max_iov entries and <= max_bytes.
        l_end = int(lc[min(li + max_iov, len(local))])
        r_end = int(rc[min(ri + max_iov, len(remote))])
        end = min(l_end, r_end, pos + max_bytes, total)
        batches.append((_slice(local, lc, li, pos, end), _slice(remote, rc, ri, pos, end)))
        pos = end
        li = int(np.searchsorted(lc, pos, side="right")) - 1
        ri = int(np.searchsorted(rc, pos, side="right")) - 1
    return batches


def _slice(iov: np.ndarray, cum: np.ndarray, first: int, pos: int, end: int) -> np.ndarray:
    last = int(np.searchsorted(cum, end, side="left"))  # entries first..last-1 overlap [pos, end)
    part = iov[first:last].copy()
    part[0, 0] += np.uint64(pos - int(cum[first]))
    part[0, 1] -= np.uint64(pos - int(cum[first]))
    over = int(cum[last]) - end
    part[-1, 1] -= np.uint64(over)
    return part


def _copy_batch(pid: int, local: np.ndarray, remote: np.ndarray) -> None:
    want = int(local[:, 1].sum())
    got = _readv()(pid, local.ctypes.data, len(local), remote.ctypes.data, len(remote), 0)
    if got < 0:
        e = ctypes.get_errno()
        if e in (errno.EPERM, errno.ESRCH, errno.ENOSYS, errno.EACCES):
            raise CmaUnavailable(f"process_vm_readv: {os.strerror(e)}")
        raise OSError(e, f"process_vm_readv: {os.strerror(e)}")
    if got != want:
        raise OSError(errno.EFAULT, f"process_vm_readv copied {got} of {want} bytes")


async def read_from(pid: int, local: Descs, remote_iov: np.ndarray, executor: Executor, loop, stop) -> None:
    """Copy the remote iovecs of process `pid` into `local`, batches spread over the executor.
    Batches not yet started are skipped once `stop.is_set()`; all started ones finish before
    this returns, so the local memory is no longer written to when it does."""
    import asyncio

    def run(lo: np.ndarray, re: np.ndarray) -> None:
        if not stop.is_set():
            _copy_batch(pid, lo, re)

    batches = split_batches(iovecs(local), remote_iov)
    results = await asyncio.gather(*(loop.run_in_executor(executor, run, lo, re) for lo, re in batches),
                                   return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
