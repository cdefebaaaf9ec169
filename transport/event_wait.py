"""Waiting for a CUDA event on the calling thread without letting the thread go cold.

`torch.cuda.Event.synchronize()` parks the thread inside the driver until the event completes.
On the GPU machine this project is measured on (one H100 in a VM, 2026-12-07) a thread that
came back from a few hundred microseconds of such a wait ran the next hundred microseconds of
Python and CUDA calls 4-7x slower than a thread that had kept running: a read's O(1) steps took
20-25 us after a long wait against 5 us after a short one (docs/latency-breakdown.md). The
reads whose kernels end within a few milliseconds therefore poll the event (`cuEventQuery`
through ctypes, which releases the GIL during each call, so other Python threads still run) for
at most `spin_s`, then block as before. Errors are torch's: any answer of the driver other
than "done" or "not ready" ends the poll, and `synchronize()` raises it.
"""
from __future__ import annotations

import ctypes
import functools
import time
from typing import Any, Callable

CUDA_SUCCESS = 0
CUDA_ERROR_NOT_READY = 600
DEFAULT_SPIN_S = 0.002   # longer kernels block in the driver (a core is not spun for more than this)
MAX_SPIN_S = 1.0


@functools.lru_cache(maxsize=1)
def _driver_query() -> Callable[[int], int] | None:
    """The driver's cuEventQuery (None where there is no libcuda: CPU machines)."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuEventQuery
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def handle_of(ev: Any) -> int:
    """The raw CUevent behind a torch.cuda.Event (0 when it has none yet: never recorded)."""
    try:
        return int(getattr(ev, "cuda_event", 0) or 0)
    except (TypeError, ValueError, RuntimeError):
        return 0


def poll(query: Callable[[int], int], handle: int, spin_s: float, clock: Callable[[], float] = time.perf_counter) -> bool:
    """Query `handle` until it is done (True) or `spin_s` has passed or the driver answered
    anything but "not ready" (False: the caller blocks, and sees any error there) (pure loop)."""
    end = clock() + spin_s
    while True:
        rc = query(handle)
        if rc == CUDA_SUCCESS:
            return True
        if rc != CUDA_ERROR_NOT_READY or clock() > end:
            return False


def wait(ev: Any, spin_s: float = DEFAULT_SPIN_S) -> None:
    """Return once the torch.cuda.Event `ev` has completed: polled for up to `spin_s`, then
    `ev.synchronize()` (which also raises the driver's errors)."""
    if spin_s > 0:
        q = _driver_query()
        h = handle_of(ev) if q is not None else 0
        if h and poll(q, h, spin_s):
            return
    ev.synchronize()


def wait_stream(stream: Any, spin_s: float = DEFAULT_SPIN_S) -> None:
    """Return once everything enqueued on `stream` so far has completed (hot, as `wait`)."""
    import torch

    ev = torch.cuda.Event()
    ev.record(stream)
    wait(ev, spin_s)
