"""Reusable table buffers for the fused copy: a pinned host buffer and a device buffer per slot,
per device, and one CUDA event per slot. A new pinned allocation per transfer (torch's caching
host allocator, an event query and a page-locked block each time) cost 0.1-0.2 ms of a 0.4 ms
small read; every CUDA call counts too (on the GPU machine an event query or a copy enqueue takes
7-25 us of host time), so a slot keeps its event, and a waiter that synchronized it says so
(`synced`): the next `take` then needs no query.

A slot is filled on the host; the kernel reads it either where it is (pinned host memory is
mapped into the device's address space at the same address, checked once per slot: `mapped`) or
from the device buffer it was copied to on the agent's stream. It is reused once the event
recorded after the kernel that read it has completed.
"""
from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MIN_WORDS = 1 << 14        # 128 KiB per slot at least
MAX_SLOTS = 8              # kept per device; more transfers in flight get buffers of their own
_CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3


@dataclass(eq=False)
class Slot:
    host: Any            # pinned int64 tensor
    words: Any           # its numpy view
    dev: Any             # int64 device tensor of the same length
    mapped: bool         # the device reads `host` at its own address (no copy needed)
    event: Any = None    # one torch.cuda.Event, re-recorded after each kernel that reads the slot
    pending: bool = False   # the event was recorded and nobody has seen it complete yet
    busy: bool = False   # taken, event not recorded yet
    uses: int = 0
    addr: int = 0        # `host`'s address (asked once)

    def free(self) -> bool:
        if self.busy:
            return False
        if self.pending and self.event.query():
            self.pending = False
        return not self.pending


def device_address_of_host(ptr: int) -> int | None:
    """The device address of pinned host memory at `ptr` in the current CUDA context (None when
    the driver cannot say: no libcuda, no context, not pinned)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        out = ctypes.c_uint64()
        rc = lib.cuPointerGetAttribute(ctypes.byref(out), ctypes.c_int(_CU_POINTER_ATTRIBUTE_DEVICE_POINTER),
                                       ctypes.c_uint64(ptr))
    except (OSError, AttributeError, TypeError):
        return None
    return int(out.value) if rc == 0 else None


class UploadSlots:
    def __init__(self) -> None:
        self._by_device: dict[int, list[Slot]] = {}
        self._lock = threading.Lock()

    def take(self, device: Any, n: int) -> Slot:
        """A slot of at least `n` int64 words on `device`, marked busy until `release()`."""
        import torch

        with self._lock:
            slots = self._by_device.setdefault(device.index, [])
            for sl in slots:   # first one known to be free: no event query (a driver call)
                if len(sl.words) >= n and not sl.busy and not sl.pending:
                    sl.busy = True
                    sl.uses += 1
                    return sl
            for sl in slots:
                if len(sl.words) >= n and sl.free():
                    sl.busy = True
                    sl.uses += 1
                    return sl
            grow = next((sl for sl in slots if sl.free()), None)
            if grow is not None:
                slots.remove(grow)
            keep = grow is not None or len(slots) < MAX_SLOTS
        size = max(MIN_WORDS, 1 << (n - 1).bit_length())
        with torch.cuda.device(device):
            host = torch.empty(size, dtype=torch.int64, pin_memory=True)
            dev = torch.empty(size, dtype=torch.int64, device=device)
            mapped = device_address_of_host(host.data_ptr()) == host.data_ptr()
        if not mapped:
            log.info("pinned host memory is not mapped at its own address on %s: tables are copied to the device",
                     device)
        sl = Slot(host, host.numpy(), dev, mapped, torch.cuda.Event(), busy=True, uses=1, addr=host.data_ptr())
        if keep:
            with self._lock:
                self._by_device.setdefault(device.index, []).append(sl)
        return sl

    def release(self, sl: Slot, recorded: bool) -> None:
        """The kernel reading `sl` was enqueued (`recorded`: its event recorded after it)."""
        sl.pending = recorded
        sl.busy = False

    def synced(self, sl: Slot, use: int) -> None:
        """The waiter of use number `use` of `sl` synchronized its event: no query needed."""
        with self._lock:
            if sl.uses == use and not sl.busy:
                sl.pending = False


SLOTS = UploadSlots()


@dataclass(eq=False)
class Held:
    """What a launched kernel needs kept alive until its event completes: its slot (use number
    `use`) and anything else it reads (`extra`)."""

    slot: Slot
    use: int
    extra: Any = None
    recorded: bool = True   # False: no event was recorded and the slot stays busy until synced()

    def synced(self) -> None:
        """The caller synchronized the kernel's event (or, with none recorded, its stream): the
        slot is free without a query."""
        if self.recorded:
            SLOTS.synced(self.slot, self.use)
        else:
            SLOTS.release(self.slot, False)
