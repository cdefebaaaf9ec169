"""The common case of the fused copy, addressed on the device: both sides list the same number
of runs with the same lengths (a KV hand-off between caches of one block size, whatever the
block order and the number of per-layer regions). The host uploads the two run tables as they
are (region slot, byte offset) plus the few region base addresses, and the kernel computes every
address itself: no per-block arithmetic in Python, one upload, one launch.

Everything is addressed relative to one base pointer (the upload buffer; all device memory
shares one virtual address space), so the compiler knows the alignment of the element type; told
that every offset is a multiple of 16 bytes and every length a multiple of the piece, it issues
unmasked 16-byte loads and stores.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import gpu_upload, trace

PIECE_BYTES = 8192
MAX_PAIRS = 65535          # the launch grid's second axis
MAX_UNIFORM_LEN = 1 << 30  # a uniform run length is compiled in (one variant per block size)


@dataclass(frozen=True)
class RunSide:
    """One side's runs: `bases[slot[i]] + offset[i]` is run i's first byte (slot None: one region)."""

    bases: np.ndarray            # int64 device addresses of the regions
    slot: np.ndarray | None      # int64 region slot per run, or None for a single region
    offset: np.ndarray           # int64 byte offset per run


def paired(a_len: np.ndarray, b_len: np.ndarray) -> bool:
    """Do the two sides pair run for run?"""
    return len(a_len) == len(b_len) and 0 < len(a_len) <= MAX_PAIRS and np.array_equal(a_len, b_len)


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kv_copy_runs(base, sbase, sslot, soff, dbase, dslot, doff, lens,
                     PIECE: tl.constexpr, WORD: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr,
                     S_MULTI: tl.constexpr, D_MULTI: tl.constexpr, ULEN: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1)
        if ULEN > 0:
            n = ULEN
        else:
            n = tl.load(lens + i)
        start = j * PIECE
        if start < n:
            if S_MULTI:
                sb = tl.load(sbase + tl.load(sslot + i))
            else:
                sb = tl.load(sbase)
            if D_MULTI:
                db = tl.load(dbase + tl.load(dslot + i))
            else:
                db = tl.load(dbase)
            s = (sb + tl.load(soff + i) + start) // WORD
            d = (db + tl.load(doff + i) + start) // WORD
            if ALIGN > 1:
                s = tl.multiple_of(s, ALIGN)
                d = tl.multiple_of(d, ALIGN)
            offs = tl.arange(0, PIECE // WORD)
            if EVEN:
                tl.store(base + d + offs, tl.load(base + s + offs))
            else:
                m = offs < (n - start) // WORD
                tl.store(base + d + offs, tl.load(base + s + offs, mask=m), mask=m)

    return triton, kv_copy_runs


def launch(src: RunSide, dst: RunSide, length: np.ndarray, device: Any, stream: Any) -> tuple[Any, Any]:
    """Enqueue the copy of run i of `src` to run i of `dst` (equal lengths) on `stream`; returns
    (event recorded after it, buffers to keep alive until the event completes)."""
    import torch

    n = len(length)
    uniform = bool((length == length[0]).all())
    ulen = int(length[0]) if uniform and length[0] <= MAX_UNIFORM_LEN else 0
    bits = int(np.bitwise_or.reduce(src.offset)) | int(np.bitwise_or.reduce(dst.offset))
    bits |= int(length[0]) if uniform else int(np.bitwise_or.reduce(length))
    bits |= int(np.bitwise_or.reduce(src.bases)) | int(np.bitwise_or.reduce(dst.bases))
    word = 8 if bits & 7 == 0 else 1
    align = 2 if bits & 15 == 0 else 1
    even = (ulen % PIECE_BYTES == 0) if ulen else bool((length % PIECE_BYTES == 0).all())
    # one upload: [soff | doff | sslot? | dslot? | lens? | sbase | dbase]
    parts = [src.offset, dst.offset]
    if src.slot is not None:
        parts.append(src.slot)
    if dst.slot is not None:
        parts.append(dst.slot)
    if not ulen:
        parts.append(length)
    parts += [src.bases, dst.bases]
    total = sum(len(p) for p in parts)
    slot = gpu_upload.SLOTS.take(device, total)
    ev = None
    try:
        buf = slot.dev
        base_addr = buf.data_ptr()
        h = slot.words
        views, pos = [], 0
        for p in parts:
            h[pos:pos + len(p)] = p
            views.append((pos, len(p)))
            pos += len(p)
        # region bases become byte offsets from the upload buffer (the kernel's base pointer)
        ks, kd = len(src.bases), len(dst.bases)
        h[total - ks - kd:total] -= base_addr
        with torch.cuda.stream(stream):
            buf[:total].copy_(slot.host[:total], non_blocking=True)
            trace.mark("ipc", "uploaded")

            def view(k: int):
                a, m = views[k]
                return buf[a:a + m]
            k = 2
            sslot = view(k) if src.slot is not None else buf
            k += src.slot is not None
            dslot = view(k) if dst.slot is not None else buf
            k += dst.slot is not None
            lens = buf if ulen else view(k)
            sbase, dbase = buf[total - ks - kd:total - kd], buf[total - kd:total]
            base = buf if word == 8 else buf.view(torch.uint8)
            per = int(-(-int(length.max()) // PIECE_BYTES))
            _, kernel = _kernel()
            kernel[(per, n)](base, sbase, sslot, view(0), dbase, dslot, view(1), lens,
                             PIECE=PIECE_BYTES, WORD=word, EVEN=even, ALIGN=align,
                             S_MULTI=src.slot is not None, D_MULTI=dst.slot is not None, ULEN=ulen)
            ev = torch.cuda.Event()
            ev.record(stream)
    finally:
        gpu_upload.SLOTS.release(slot, ev)
    return ev, slot
