"""One fused copy kernel per transfer over (source address, destination address, length)
triples on any CUDA memory the process can address (its own, and peers' mapped through CUDA
IPC). Triton is imported lazily: CPU machines never need it.

The kernel addresses everything relative to one base pointer (all device memory shares one
virtual address space), so the compiler knows the element type's alignment and, told that every
offset is a multiple of 16 bytes and every length a multiple of the piece, issues unmasked
16-byte loads and stores. Anything less aligned takes the masked (or byte-wise) variant.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from . import copy_plan, trace

log = logging.getLogger(__name__)

PIECE_BYTES = 8192
MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kv_copy(base, src_off, dst_off, lens, PIECE: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1)
        n = tl.load(lens + i)
        start = j * PIECE
        if start < n:
            s = tl.load(src_off + i) + start
            d = tl.load(dst_off + i) + start
            if ALIGN > 1:
                s = tl.multiple_of(s, ALIGN)
                d = tl.multiple_of(d, ALIGN)
            offs = tl.arange(0, PIECE)
            if EVEN:
                tl.store(base + d + offs, tl.load(base + s + offs))
            else:
                m = offs < n - start
                tl.store(base + d + offs, tl.load(base + s + offs, mask=m), mask=m)

    return triton, kv_copy


_plain_only = False


def _run(grid, base, t, piece: int, even: bool, align: int) -> None:
    """Launch the tuned variant; if this Triton cannot compile its hints, the plain one."""
    global _plain_only
    _, kernel = _kernel()
    if not _plain_only and (even or align > 1):
        try:
            kernel[grid](base, t[0], t[1], t[2], PIECE=piece, EVEN=even, ALIGN=align)
            return
        except Exception as e:  # a compiler that rejects the alignment hints: correctness first
            _plain_only = True
            log.warning("tuned copy kernel failed to compile (%s: %s); using the plain one", type(e).__name__, e)
    kernel[grid](base, t[0], t[1], t[2], PIECE=piece, EVEN=False, ALIGN=1)


def triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton is not importable ({type(e).__name__})"
    return None


def launch(src: np.ndarray, dst: np.ndarray, length: np.ndarray, device: Any, stream: Any) -> tuple[Any, Any]:
    """Enqueue the copy on `stream`; returns (event recorded after it, tensors to keep alive
    until the event completes)."""
    import torch

    if len(length) == 0:
        ev = torch.cuda.Event()
        ev.record(stream)
        return ev, None
    word = copy_plan.word_bytes(src, dst, length)
    grid = copy_plan.grid_for(length, PIECE_BYTES)
    if grid is None:
        src, dst, length = copy_plan.pieces(src, dst, length, PIECE_BYTES)
    even = bool((length % PIECE_BYTES == 0).all())
    align16 = word == 8 and copy_plan.word_bytes(src // 2, dst // 2, length // 2) == 8  # all % 16 == 0
    keep = []
    trace.mark("ipc", "prepared")
    with torch.cuda.stream(stream):
        for a in range(0, len(length), MAX_GRID_Y if grid is None else len(length)):
            b = min(a + (MAX_GRID_Y if grid is None else len(length)), len(length))
            # the table itself serves as the base pointer (an int64 / uint8 tensor on the device)
            host = torch.empty((3, b - a), dtype=torch.int64, pin_memory=_pinned_ok())
            t = torch.empty((3, b - a), dtype=torch.int64, device=device)
            base_addr = t.data_ptr()
            h = host.numpy()
            np.floor_divide(src[a:b] - base_addr, word, out=h[0])
            np.floor_divide(dst[a:b] - base_addr, word, out=h[1])
            np.floor_divide(length[a:b], word, out=h[2])
            t.copy_(host, non_blocking=True)
            trace.mark("ipc", "uploaded")
            base = t if word == 8 else t.view(torch.uint8)
            per = grid[0] if grid is not None else 1
            _run((per, b - a), base, t, PIECE_BYTES // word, even, 2 if align16 else 1)
            keep.append((t, host))
        ev = torch.cuda.Event()
        ev.record(stream)
    return ev, keep


@functools.lru_cache(maxsize=1)
def _pinned_ok() -> bool:
    """Page-locked staging for the run table (an asynchronous upload); plain memory if the
    process cannot pin."""
    import torch

    try:
        torch.empty(1, pin_memory=True)
        return True
    except Exception:
        return False
