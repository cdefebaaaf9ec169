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

from . import gpu_upload, trace, triton_fast

PIECE_BYTES = 8192          # bytes one program moves (the smallest launch shape's)
# Launch shapes by the longest run: (runs at least this long, piece bytes, warps). Longer runs
# get longer pieces and more warps per program (fewer, fuller programs); measured with
# scripts/gpu_kernel_sweep.py (one H100, 2026-12-06: 1 GiB of 1 MiB runs 1,378 GB/s with 8 KiB pieces,
# 1,447 GB/s with 32 KiB pieces and 8 warps; 32 KiB and 64 KiB runs the same, ~1,340 GB/s, either way).
LAUNCH_SHAPES: tuple[tuple[int, int, int], ...] = ((0, PIECE_BYTES, 4), (65536, 32768, 8))
MAX_PAIRS = 65535          # the launch grid's second axis
MAX_UNIFORM_LEN = 1 << 30  # a uniform run length is compiled in (one variant per block size)


@dataclass(frozen=True)
class RunSide:
    """One side's runs: `bases[slot[i]] + offset[i]` is run i's first byte (slot None: one region)."""

    bases: np.ndarray            # int64 device addresses of the regions
    slot: np.ndarray | None      # int64 region slot per run, or None for a single region
    offset: np.ndarray           # int64 byte offset per run


def launch_shape(longest: int) -> tuple[int, int]:
    """(piece bytes, warps) for runs of at most `longest` bytes (pure)."""
    piece, warps = PIECE_BYTES, 4
    for min_len, p, w in LAUNCH_SHAPES:
        if longest >= min_len:
            piece, warps = p, w
    return piece, warps


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


@dataclass(frozen=True)
class Table:
    """Where each part of an uploaded run table lies (int64 words) and the kernel's variant.

    Layout: [soff | doff | lens? | sbase | dbase | sslot? | dslot?]; region bases are stored as
    byte offsets from the upload buffer's address (the kernel's one base pointer)."""

    n: int                # runs
    total: int            # words used
    edge: int             # end of the part the alignment depends on (offsets, lengths, bases)
    ulen: int             # the uniform run length (compiled in), or 0: lengths are uploaded
    at_bases: int
    ks: int               # source / destination region count
    kd: int
    s_multi: bool         # per-run region slots uploaded for the source / destination
    d_multi: bool
    word: int             # 8: the kernel moves int64 words; 1: bytes
    align: int            # 2: every address is 16-byte aligned
    even: bool            # every run is a multiple of the piece
    per: int              # programs per run (grid axis 0)
    piece: int = PIECE_BYTES   # bytes per program
    warps: int = 4

    @property
    def at_slots(self) -> int:
        return self.edge


def table_words(src: RunSide, dst: RunSide, length: np.ndarray) -> int:
    n = len(length)
    return (2 + (src.slot is not None) + (dst.slot is not None) + 1) * n + len(src.bases) + len(dst.bases)


def fill_table(src: RunSide, dst: RunSide, length: np.ndarray, h: np.ndarray, base_addr: int) -> Table:
    """Write the run table into `h` (int64, at least `table_words` long) for an upload buffer at
    device address `base_addr`; returns its layout and the kernel variant (pure)."""
    n = len(length)
    lo, hi = int(length.min()), int(length.max())
    ulen = lo if lo == hi and lo <= MAX_UNIFORM_LEN else 0
    parts = [src.offset, dst.offset] + ([] if ulen else [length]) + [src.bases, dst.bases]
    edge = sum(len(p) for p in parts)
    if src.slot is not None:
        parts.append(src.slot)
    if dst.slot is not None:
        parts.append(dst.slot)
    total = sum(len(p) for p in parts)
    np.concatenate(parts, out=h[:total], casting="same_kind")
    bits = int(np.bitwise_or.reduce(h[:edge])) | ulen
    ks, kd = len(src.bases), len(dst.bases)
    h[edge - ks - kd:edge] -= base_addr
    piece, warps = launch_shape(hi)
    even = (ulen % piece == 0) if ulen else bool((length % piece == 0).all())
    return Table(n, total, edge, ulen, edge - ks - kd, ks, kd, src.slot is not None, dst.slot is not None,
                 8 if bits & 7 == 0 else 1, 2 if bits & 15 == 0 else 1, even, -(-hi // piece), piece, warps)


def emulate(h: np.ndarray, t: Table, base_addr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source address, destination address, length) of every run, computed from an uploaded
    table the way the kernel computes them (for tests on machines without a GPU)."""
    n = t.n
    sb, db = h[t.at_bases:t.at_bases + t.ks] + base_addr, h[t.at_bases + t.ks:t.edge] + base_addr
    sslot = h[t.at_slots:t.at_slots + n] if t.s_multi else np.zeros(n, np.int64)
    dslot = h[t.at_slots + n * t.s_multi:][:n] if t.d_multi else np.zeros(n, np.int64)
    lens = np.full(n, t.ulen, np.int64) if t.ulen else h[2 * n:3 * n]
    return sb[sslot] + h[:n], db[dslot] + h[n:2 * n], lens


_LAUNCHER = triton_fast.FastLauncher("kv_copy_runs")


def arg_addresses(buf_addr: int, t: Table) -> tuple[int, ...]:
    """Device addresses of the kernel's pointer arguments in an upload buffer at `buf_addr`, in
    its order (base, sbase, sslot, soff, dbase, dslot, doff, lens); unused ones point at the
    buffer, as the tensor arguments of the first launch do (pure)."""
    n, w = t.n, 8
    return (buf_addr, buf_addr + t.at_bases * w,
            buf_addr + t.at_slots * w if t.s_multi else buf_addr, buf_addr,
            buf_addr + (t.at_bases + t.ks) * w,
            buf_addr + (t.at_slots + n * t.s_multi) * w if t.d_multi else buf_addr,
            buf_addr + n * w, buf_addr + 2 * n * w if not t.ulen else buf_addr)


def launch(src: RunSide, dst: RunSide, length: np.ndarray, device: Any, stream: Any) -> tuple[Any, Any]:
    """Enqueue the copy of run i of `src` to run i of `dst` (equal lengths) on `stream`; returns
    (event recorded after it, buffers to keep alive until the event completes)."""
    import torch

    slot = gpu_upload.SLOTS.take(device, table_words(src, dst, length))
    trace.mark("ipc", "slot")
    ev = None
    try:
        buf = slot.dev
        addr = buf.data_ptr()
        t = fill_table(src, dst, length, slot.words, addr)
        trace.mark("ipc", "filled")
        with torch.cuda.stream(stream):
            buf[:t.total].copy_(slot.host[:t.total], non_blocking=True)
        trace.mark("ipc", "uploaded")
        consts = (t.piece, t.word, t.even, t.align, t.s_multi, t.d_multi, t.ulen)

        def through_triton():
            n = t.n
            soff, doff = buf[:n], buf[n:2 * n]
            lens = buf if t.ulen else buf[2 * n:3 * n]
            sslot = buf[t.at_slots:t.at_slots + n] if t.s_multi else buf
            dslot = buf[t.at_slots + n * t.s_multi:][:n] if t.d_multi else buf
            sbase, dbase = buf[t.at_bases:t.at_bases + t.ks], buf[t.at_bases + t.ks:t.edge]
            base = buf if t.word == 8 else buf.view(torch.uint8)
            _, kernel = _kernel()
            with torch.cuda.stream(stream):
                return kernel[(t.per, n)](base, sbase, sslot, soff, dbase, dslot, doff, lens,
                                          PIECE=t.piece, WORD=t.word, EVEN=t.even, ALIGN=t.align,
                                          S_MULTI=t.s_multi, D_MULTI=t.d_multi, ULEN=t.ulen, num_warps=t.warps)

        if torch.cuda.current_device() == device.index:
            _LAUNCHER.launch((t.per, t.n), device.index, stream, arg_addresses(addr, t), consts, through_triton,
                              options=(t.warps,))
        else:   # the compiled kernel is loaded per device: Triton's path switches device itself
            with torch.cuda.device(device):
                through_triton()
        ev = torch.cuda.Event()
        ev.record(stream)
    finally:
        gpu_upload.SLOTS.release(slot, ev)
    return ev, slot
