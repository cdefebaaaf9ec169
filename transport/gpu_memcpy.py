"""One contiguous range to one contiguous range on the device: the driver's own copy.

When a lease is one contiguous range of one mapped region and the reader's blocks are one
contiguous range of one region (a long prompt's blocks handed out in order, a whole-cache copy),
the fused kernel has nothing to gather: the copy is `cuMemcpyDtoDAsync`, which is what the
contiguous-copy limit itself runs (torch's `copy_` of one tensor), with no table to fill and no
kernel variant to pick. Called through ctypes on the calling thread's current context (the
device's primary context, where torch keeps it); any driver error is raised as RuntimeError. The
caller then turns this path off for the process (`disable`: logged once, counted as a fallback)
and copies with the kernel, as it would have without this path: slower by a few percent, never
wrong.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

NO_CONTEXT = 201   # CUDA_ERROR_INVALID_CONTEXT: the calling thread has no current context

disabled: str | None = None   # why this process copies one-range transfers with the kernel instead


def disable(why: str) -> bool:
    """Turn the driver's copy off for this process; True the first time (the caller counts it)."""
    global disabled
    if disabled is not None:
        return False
    disabled = why
    log.warning("the driver's device copy failed (%s); one-range CUDA copies use the fused kernel from now on", why)
    return True


@functools.lru_cache(maxsize=1)
def _copy_fn() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuMemcpyDtoDAsync_v2
    fn.argtypes = (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


def copy(dst: int, src: int, nbytes: int, device: Any, stream: Any, record: bool = True) -> tuple[Any, Any]:
    """Enqueue the copy of `nbytes` from device address `src` to `dst` on `stream` (of `device`);
    returns (an event recorded after it, or None without `record`: the caller synchronizes
    `stream`; nothing to keep alive)."""
    import torch

    if nbytes <= 0 or src <= 0 or dst <= 0:
        raise ValueError(f"device copy of {nbytes} bytes {src:#x} -> {dst:#x} refused")
    try:
        fn = _copy_fn()
    except (OSError, AttributeError) as e:
        raise RuntimeError(f"the CUDA driver's copy is not available: {e}") from None
    rc = fn(dst, src, nbytes, stream.cuda_stream) if torch.cuda.current_device() == device.index else NO_CONTEXT
    if rc == NO_CONTEXT:   # another device is current, or no context is current on this thread yet
        with torch.cuda.device(device):   # (makes the device's primary context current; restores the device after)
            rc = fn(dst, src, nbytes, stream.cuda_stream)
    if rc != 0:
        raise RuntimeError(f"cuMemcpyDtoDAsync failed (CUresult {rc})")
    if not record:
        return None, None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev, None
