"""One fused copy kernel per transfer over (source address, destination address, length)
triples on any CUDA memory the process can address (its own, and peers' mapped through CUDA
IPC). Triton is imported lazily: CPU machines never need it."""
from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from . import copy_plan

log = logging.getLogger(__name__)

PIECE_BYTES = 8192


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton  # noqa: F401  (triton.jit)
    import triton.language as tl

    @triton.jit
    def kv_copy(src_ptr, dst_ptr, len_ptr, PIECE: tl.constexpr, WORD: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1)
        n = tl.load(len_ptr + i)
        start = j * PIECE
        if start < n:
            rem = n - start
            s = tl.load(src_ptr + i) + start
            d = tl.load(dst_ptr + i) + start
            if WORD == 8:
                sp = s.to(tl.pointer_type(tl.int64))
                dp = d.to(tl.pointer_type(tl.int64))
                offs = tl.arange(0, PIECE // 8)
                m = offs < rem // 8
            else:
                sp = s.to(tl.pointer_type(tl.uint8))
                dp = d.to(tl.pointer_type(tl.uint8))
                offs = tl.arange(0, PIECE)
                m = offs < rem
            tl.store(dp + offs, tl.load(sp + offs, mask=m), mask=m)

    return kv_copy


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
        grid = (1, len(length))
        if len(length) > 65535:  # the second grid axis is limited: fold onto the first
            return _launch_flat(src, dst, length, device, stream, word)
    table = np.stack([src, dst, length]).astype(np.int64)
    with torch.cuda.stream(stream):
        t = torch.from_numpy(table).to(device, non_blocking=False)
        _kernel()[grid](t[0], t[1], t[2], PIECE=PIECE_BYTES, WORD=word)
        ev = torch.cuda.Event()
        ev.record(stream)
    return ev, t


def _launch_flat(src, dst, length, device, stream, word):
    """More than 65,535 pieces: one launch per 65,535-piece slice, all on the same stream."""
    import torch

    keep = []
    with torch.cuda.stream(stream):
        for a in range(0, len(length), 65535):
            b = min(a + 65535, len(length))
            t = torch.from_numpy(np.stack([src[a:b], dst[a:b], length[a:b]]).astype(np.int64)).to(device)
            _kernel()[(1, b - a)](t[0], t[1], t[2], PIECE=PIECE_BYTES, WORD=word)
            keep.append(t)
        ev = torch.cuda.Event()
        ev.record(stream)
    return ev, keep
