"""The remote side's half of the paired kernel's table, kept on the device (transport/gpu_runs.py).

A checked IPC plan's runs (the owner's addresses of a lease, and their lengths when they differ) go up
once: when the lease grant arrives (off the read's path) or at the plan's first read. They stay on the
device while the plan lives and while they fit in `RESIDENT_BYTES` (least recently used dropped first;
held weakly, so a plan its grant cache dropped takes its half with it).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import gpu_upload
from .gpu_runs import Half, RunSide, Variant, WORD, fill_half, half_words, variant_of

RESIDENT_BYTES = 64 << 20  # device memory kept by remote halves (least recently used dropped first)


@dataclass(eq=False)
class DeviceHalf:
    half: Half
    dev: Any           # int64 device tensor holding it
    addr: int          # its address: the kernel's base pointer
    device_index: int
    variant: Variant

    @property
    def nbytes(self) -> int:
        return self.dev.numel() * WORD


class _Resident:
    """Which remote halves stay on the device: least recently used dropped past the budget
    (dropping is safe at any time: every use is on the agent's side stream, after which the
    caching allocator reuses the memory only in that stream's order). Holds its tables weakly:
    a plan its grant cache dropped takes its half with it."""

    def __init__(self) -> None:
        self._lru: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()   # (a table collected inside keep() forgets itself)

    def keep(self, table: "RemoteTable", dh: "DeviceHalf") -> None:
        with self._lock:
            self._pop(id(table))
            table._dev = dh
            self._lru[id(table)] = (weakref.ref(table), dh.nbytes)
            self._bytes += dh.nbytes
            while self._bytes > RESIDENT_BYTES and len(self._lru) > 1:
                key = next(iter(self._lru))
                ref = self._pop(key)
                t = ref() if ref is not None else None
                if t is not None:
                    t._dev = None

    def touch(self, table: "RemoteTable") -> None:
        with self._lock:
            if id(table) in self._lru:
                self._lru.move_to_end(id(table))

    def forget(self, table: "RemoteTable") -> None:
        with self._lock:
            self._pop(id(table))
            table._dev = None

    def _pop(self, key: int):
        entry = self._lru.pop(key, None)
        if entry is None:
            return None
        self._bytes -= entry[1]
        return entry[0]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru)


RESIDENT = _Resident()


class RemoteTable:
    """The remote side of a checked IPC plan, uploaded to the device at most once while it stays
    resident (`on()`)."""

    def __init__(self, side: RunSide, length: np.ndarray):
        self.side = side
        self.length = length
        self._dev: DeviceHalf | None = None

    def on(self, device: Any, stream: Any) -> DeviceHalf:
        """Its half on `device`, uploading it on `stream` (the side stream every kernel that
        reads it runs on) if it is not there yet."""
        dh = self._dev
        if dh is not None and dh.device_index == device.index:
            RESIDENT.touch(self)
            return dh
        dh = _upload(self.side, self.length, device, stream)
        RESIDENT.keep(self, dh)
        return dh

    def resident(self) -> bool:
        return self._dev is not None

    def __del__(self) -> None:   # (weakly held: stop counting its memory)
        try:
            RESIDENT.forget(self)
        except Exception:   # interpreter shutdown
            pass


def _upload(side: RunSide, length: np.ndarray, device: Any, stream: Any) -> DeviceHalf:
    import torch

    v = variant_of(length)
    words = half_words(side, lens=not v.ulen)
    with torch.cuda.stream(stream):
        dev = torch.empty(words, dtype=torch.int64, device=device)
    addr = dev.data_ptr()
    slot = gpu_upload.SLOTS.take(device, words)
    recorded = False
    try:
        half = fill_half(side, slot.words, addr, None if v.ulen else length)
        with torch.cuda.stream(stream):
            dev.copy_(slot.host[:words], non_blocking=True)
            slot.event.record(stream)
            recorded = True
    finally:
        gpu_upload.SLOTS.release(slot, recorded)
    return DeviceHalf(half, dev, addr, device.index, v)
