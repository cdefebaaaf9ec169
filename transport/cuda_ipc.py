"""CUDA IPC for the one-sided same-host GPU path.

Owner: each registered CUDA region is shared once (torch's storage sharing: the caching
allocator's segment handle plus the storage's offset in it; expandable-segment (VMM)
allocations too), and the handle goes only to authenticated peers on this host, only for
regions holding a lease exposed to them, encrypted under the session's secret when a key is set.

Reader: opens each (session, region) handle once and keeps it until the session ends or the
owner says the region is gone; the mapping keeps the owner's allocation alive in the driver even
if the owner dies, so dropping it is what frees that memory.

Trust: a mapping exposes the owner's whole allocation (segment) to the reader process, the same
trust as process_vm_readv on host memory (an authenticated peer on the same host); the lease
check decides which bytes a correct reader touches.
"""
from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import msgpack

from .region import Region

log = logging.getLogger(__name__)


_serials = itertools.count(1)


@dataclass(eq=False)
class Mapping:
    """One opened region. Only the session's map (and a kernel in flight over it) may hold it:
    the storage in `keep` closes the IPC mapping when the last reference goes, and only then does
    the driver free a dead owner's memory. Plans name it by `serial`."""

    ptr: int            # device address of the region's first byte in this process
    nbytes: int
    keep: Any = None    # the storage holding the IPC mapping open
    device: int | None = None   # the CUDA device it was opened on (None: this process's own memory)
    serial: int = field(default_factory=lambda: next(_serials))


# (pointer, size) of every region this process exported: the only memory a blob claiming this
# very process may point at (a lying owner could otherwise claim our pid and hand us any pointer)
_exported_here: set[tuple[int, int]] = set()


class Exporter:
    """Owner side: a share blob per region, made on first use."""

    def __init__(self) -> None:
        self._blobs: dict[int, bytes] = {}

    def blob(self, region: Region) -> bytes:
        b = self._blobs.get(region.uid)
        if b is None:
            flat = region.flat
            storage = flat.untyped_storage()
            share = list(storage._share_cuda_())
            b = msgpack.packb([os.getpid(), flat.data_ptr(), region.nbytes, flat.storage_offset(), share],
                              use_bin_type=True)
            self._blobs[region.uid] = b
            _exported_here.add((flat.data_ptr(), region.nbytes))
        return b

    def forget(self, region: Region) -> None:
        if self._blobs.pop(region.uid, None) is not None:
            _exported_here.discard((region.flat.data_ptr(), region.nbytes))


def open_blob(blob: bytes, device_index: int) -> Mapping:
    """Map a peer's region on our device. Raises ValueError for a malformed blob."""
    import torch

    try:
        pid, ptr, nbytes, offset, share = msgpack.unpackb(blob, raw=False, max_bin_len=1 << 16,
                                                          max_array_len=16, max_str_len=1 << 12)
    except Exception:
        raise ValueError("malformed IPC blob") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (pid, ptr, nbytes, offset)):
        raise ValueError("malformed IPC blob")
    if pid == os.getpid():  # the owner is this very process: its pointer is valid here
        if (ptr, nbytes) not in _exported_here:
            raise ValueError("IPC blob claims memory of this process that it never exported")
        return Mapping(ptr, nbytes)
    if not isinstance(share, list) or len(share) != 8:
        raise ValueError("malformed IPC share tuple")
    _, handle, size, soff, rc_handle, rc_off, ev_handle, ev_sync = share
    storage = torch.UntypedStorage._new_shared_cuda(device_index, handle, size, soff, rc_handle, rc_off,
                                                    ev_handle, ev_sync)
    if offset > storage.nbytes() or nbytes > storage.nbytes() - offset:
        raise ValueError("IPC region lies outside the shared storage")
    return Mapping(storage.data_ptr() + offset, nbytes, storage, device_index)


def export_unavailable() -> str | None:
    """Why this process cannot share its CUDA regions (None: it can)."""
    try:
        import torch
    except Exception:
        return "torch is not importable"
    if not torch.cuda.is_available():
        return "no CUDA device in this process"
    return None


def unavailable() -> str | None:
    """Why this process cannot run the reader's side of the CUDA IPC path (None: it can)."""
    reason = export_unavailable()
    if reason:
        return reason
    from .gpu_copy import triton_missing

    return triton_missing()
