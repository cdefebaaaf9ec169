"""The common case of the fused copy, addressed on the device: both sides list the same number
of runs with the same lengths (a KV hand-off between caches of one block size, whatever the
block order and the number of per-layer regions). The kernel reads every run's address from
two half tables, one per side: one launch (two for a large read), one load per side and run.

The remote side's half (the owner's runs of a lease: addresses, lengths) is uploaded
once per checked IPC plan, when a lease grant arrives (off the read's path) or at its first read,
and stays on the device while the plan lives (`gpu_remote.py`, bounded by its `RESIDENT_BYTES`). A read
fills only the local half (its own run addresses: region base + offset, one numpy pass or two)
in a reused pinned slot. A large read (`split_point`) launches on its first quarter as soon as
those addresses are written and writes the rest while that part copies: two launches, one event.

Everything is addressed relative to one base pointer (the remote half's buffer; all device
memory shares one virtual address space), so the compiler knows the alignment of the element
type; told that every offset is a multiple of 16 bytes and every length a multiple of the piece,
it issues unmasked 16-byte loads and stores.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from . import gpu_upload, trace, triton_fast

if TYPE_CHECKING:
    from .gpu_remote import DeviceHalf, RemoteTable

PIECE_BYTES = 8192          # bytes one program moves (the smallest launch shape's)
# Launch shapes by the longest run: (runs at least this long, piece bytes, warps). Longer runs
# get longer pieces and more warps per program (fewer, fuller programs); measured with
# scripts/gpu_kernel_sweep.py (one H100, 2026-12-06: 1 GiB of 1 MiB runs 1,378 GB/s with 8 KiB pieces,
# 1,447 GB/s with 32 KiB pieces and 8 warps; 32 KiB and 64 KiB runs the same, ~1,340 GB/s, either way).
LAUNCH_SHAPES: tuple[tuple[int, int, int], ...] = ((0, PIECE_BYTES, 4), (65536, 32768, 8))
MAX_PAIRS = 65535          # the launch grid's second axis
MAX_UNIFORM_LEN = 1 << 30  # a uniform run length is compiled in (one variant per block size)
WORD = 8                   # bytes per table entry (int64)
SPLIT_MIN_RUNS = 4096      # copies of at least this many runs launch in two parts (split_point)
SPLIT_ALIGN = 16           # the first part's run count divides by this (table pointers keep their alignment)


class TableHome(enum.Enum):
    """Where the kernel reads a read's own (local) half of the table from."""

    DEVICE = "device"   # uploaded from the pinned slot to the slot's device buffer first
    MAPPED = "mapped"   # the pinned slot itself, over the bus (mapped host memory: no copy to enqueue)


LOCAL_TABLE = TableHome.MAPPED   # (DEVICE where the driver does not map pinned memory at its address)


class RunSide(NamedTuple):
    """One side's runs: `bases[slot[i]] + offset[i]` is run i's first byte (slot None: one region).
    (A named tuple: one is made per read.)"""

    bases: np.ndarray            # int64 device addresses of the regions
    slot: np.ndarray | None      # integer region slot per run, or None for a single region
    offset: np.ndarray           # int64 byte offset per run
    low_bits: int | None = None  # bits 0-3 any offset may have (Descs.offset_low_bits), or None: computed
    base_bits: int | None = None  # bits 0-3 any base may have (Descs.base_low_bits), or None: computed


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
    def kv_copy_runs(base, saddr, daddr, lens,
                     PIECE: tl.constexpr, WORD: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr,
                     ULEN: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1)
        if ULEN > 0:
            n = ULEN
        else:
            n = tl.load(lens + i)
        start = j * PIECE
        if start < n:
            s = (tl.load(saddr + i) + start) // WORD
            d = (tl.load(daddr + i) + start) // WORD
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


# -- the two half tables (pure) -------------------------------------------------------------------
class Half(NamedTuple):
    """Where one side's part of the table lies in its buffer (int64 words):
    [address (n) | length (n; the remote half, when not uniform)]. Each run's first byte is
    stored as its byte offset from the kernel's base pointer (region base + offset, folded on the
    host): the kernel makes one load per side and run, none that depends on another (a read's
    own half is read over the bus from mapped host memory, where every dependent load costs a
    round trip)."""

    n: int
    at_lens: int | None
    words: int
    bits: int          # OR of every offset (at least bits 0-3), relative base and stored length: the alignment


def half_words(side: RunSide, lens: bool = False) -> int:
    return len(side.offset) * (1 + lens)


def plan_half(side: RunSide, base_addr: int) -> tuple[Half, Any]:
    """One side's half before any row is written: its `Half` (no stored lengths) and each
    region's base relative to the kernel's base pointer `base_addr` (for `fill_rows`: an int for
    one region, else an int64 array) (pure)."""
    n = len(side.offset)
    if side.low_bits is not None:
        bits = side.low_bits
    else:
        bits = int(np.bitwise_or.reduce(side.offset)) if n else 0
    # (an address's low bits are set only where its base's or its offset's are: for the alignment,
    # the OR of both parts is a superset)
    if side.slot is None:
        rel: Any = int(side.bases[0]) - base_addr
        bits |= rel & 15
    else:
        rel = side.bases - np.int64(base_addr)
        if side.base_bits is not None and base_addr & 15 == 0:   # (then each relative base has its base's low bits)
            bits |= side.base_bits
        else:
            bits |= int(np.bitwise_or.reduce(rel)) if len(rel) else 0
    return Half(n, None, n, bits), rel


def fill_rows(side: RunSide, h: np.ndarray, rel: Any, lo: int, hi: int) -> None:
    """Write the addresses of runs [lo, hi) into h[lo:hi] (`rel` from `plan_half`) (pure)."""
    out = h[lo:hi]
    if side.slot is None:
        np.add(side.offset[lo:hi], rel, out=out)
    else:
        rel.take(side.slot[lo:hi], out=out, mode="clip")   # (slots were checked: Descs, the owner's table)
        np.add(out, side.offset[lo:hi], out=out)


def fill_half(side: RunSide, h: np.ndarray, base_addr: int, lens: np.ndarray | None = None) -> Half:
    """Write one side's half into `h` (int64, at least `half_words` long): each run's first byte
    relative to the kernel's base pointer `base_addr`; `lens`: the run lengths to store too (pure)."""
    half, rel = plan_half(side, base_addr)
    n = half.n
    fill_rows(side, h, rel, 0, n)
    if lens is None:
        return half
    h[n:2 * n] = lens
    return Half(n, n, 2 * n, half.bits | int(np.bitwise_or.reduce(lens)))


def split_point(n: int) -> int:
    """Runs of the first of two launches of one copy (0: a single launch). A large read launches
    on its first quarter as soon as those addresses are written, and writes the rest while that
    part copies (pure)."""
    if n < SPLIT_MIN_RUNS:
        return 0
    return n // 4 // SPLIT_ALIGN * SPLIT_ALIGN


def part_args(ptrs: tuple[int, ...], first: int, stored_lens: bool) -> tuple[int, ...]:
    """The kernel's pointer arguments for its runs from `first` on, given those of all runs:
    each table pointer moves `first` entries on; the base pointer stays (pure)."""
    base, saddr, daddr, lens = ptrs
    step = first * WORD
    return base, saddr + step, daddr + step, lens + step if stored_lens else lens


@dataclass(frozen=True)
class Variant:
    """The kernel variant and grid of one paired copy (pure data)."""

    ulen: int       # the uniform run length (compiled in), or 0: lengths are stored
    piece: int      # bytes per program
    warps: int
    per: int        # programs per run (grid axis 0)
    even: bool      # every run is a multiple of the piece


def variant_of(length: np.ndarray) -> Variant:
    lo, hi = int(length.min()), int(length.max())
    ulen = lo if lo == hi and lo <= MAX_UNIFORM_LEN else 0
    piece, warps = launch_shape(hi)
    even = (ulen % piece == 0) if ulen else bool((length % piece == 0).all())
    return Variant(ulen, piece, warps, -(-hi // piece), even)


def word_align(bits: int) -> tuple[int, int]:
    """(element bytes the kernel moves, 2 when every address is 16-byte aligned else 1)."""
    return (8 if bits & 7 == 0 else 1), (2 if bits & 15 == 0 else 1)


def kernel_args(base: int, remote: Half, local: Half, local_addr: int, v: Variant,
                write: bool) -> tuple[tuple[int, ...], tuple]:
    """(pointer arguments, constexprs) of the kernel: `base` is the remote half's buffer (the
    base pointer), `local_addr` the local half's (pure)."""
    lens = base + remote.at_lens * WORD if remote.at_lens is not None else base
    word, align = word_align(remote.bits | local.bits | v.ulen)
    # (each half's run addresses start its buffer)
    ptrs = (base, local_addr, base, lens) if write else (base, base, local_addr, lens)
    return ptrs, (v.piece, word, v.even, align, v.ulen)


def emulate(ptrs: tuple[int, ...], consts: tuple, n: int, read_words) -> tuple[np.ndarray, ...]:
    """(source address, destination address, length) of every run, computed the way the kernel
    computes them from its arguments; `read_words(addr, count)` reads int64 words of the tables
    (for tests on machines without a GPU)."""
    base, saddr, daddr, lens = ptrs
    ulen = consts[4]
    lengths = np.full(n, ulen, np.int64) if ulen else read_words(lens, n)
    return read_words(saddr, n) + base, read_words(daddr, n) + base, lengths


# -- one paired copy -------------------------------------------------------------------------------
def tensor_args(ptrs: tuple[int, ...], buffers: tuple) -> list:
    """The kernel's pointer arguments as tensors (what Triton's first launch of a variant takes):
    for each address, the slice of the int64 buffer holding it that starts there."""
    out = []
    for p in ptrs:
        for t in buffers:
            a = t.data_ptr()
            if a <= p < a + t.numel() * WORD:
                out.append(t[(p - a) // WORD:])
                break
        else:
            raise ValueError(f"kernel argument {p:#x} lies in none of the table buffers")
    return out


_LAUNCHER = triton_fast.FastLauncher("kv_copy_runs")


def _go(dh: "DeviceHalf", buf: Any, device: Any, stream: Any, direct: bool, ptrs: tuple[int, ...], rows: int,
        consts: tuple) -> None:
    """Launch the kernel over `rows` runs with pointer arguments `ptrs` (the table buffers: the
    remote half `dh` and the local half's `buf`)."""
    v = dh.variant

    def through_triton():
        import torch

        args = tensor_args(ptrs, (dh.dev, buf))
        if consts[1] == 1:
            args[0] = args[0].view(torch.uint8)
        _, kernel = _kernel()
        with torch.cuda.stream(stream):
            return kernel[(v.per, rows)](*args, PIECE=consts[0], WORD=consts[1], EVEN=consts[2],
                                         ALIGN=consts[3], ULEN=consts[4], num_warps=v.warps)

    if direct:
        _LAUNCHER.launch((v.per, rows), device.index, stream, ptrs, consts, through_triton, options=(v.warps,))
    else:   # the compiled kernel is loaded per device: Triton's path switches device itself
        import torch

        with torch.cuda.device(device):
            through_triton()


def launch(remote: "RemoteTable", local: RunSide, device: Any, stream: Any, write: bool = False,
           record: bool = True) -> tuple[Any, Any]:
    """Enqueue the copy of run i of `remote` to run i of `local` (or back, `write`) on `stream`
    (the two pair: `paired()`); returns (event recorded after it, buffers to keep alive until
    the event completes). With `record` False no event is recorded (a driver call less) and the
    first item is None: the caller synchronizes `stream` and then calls the keep-alive's
    `synced()`, which frees its table slot (held busy until then)."""
    import torch

    dh = remote.on(device, stream)
    trace.mark("ipc", "remote half")
    slot = gpu_upload.SLOTS.take(device, len(local.offset))
    use = slot.uses
    trace.mark("ipc", "slot")
    ok = False
    try:
        lh, rel = plan_half(local, dh.addr)
        n = lh.n
        mapped = LOCAL_TABLE is TableHome.MAPPED and slot.mapped
        first = split_point(n) if mapped else 0   # (a copied table goes up whole)
        fill_rows(local, slot.words, rel, 0, first or n)
        trace.mark("ipc", "filled")
        if mapped:
            buf = slot.host
        else:
            buf = slot.dev
            with torch.cuda.stream(stream):
                buf[:lh.words].copy_(slot.host[:lh.words], non_blocking=True)
            trace.mark("ipc", "uploaded")
        ptrs, consts = kernel_args(dh.addr, dh.half, lh, slot.addr if mapped else buf.data_ptr(), dh.variant, write)
        direct = torch.cuda.current_device() == device.index
        trace.mark("ipc", "args")
        if first:
            _go(dh, buf, device, stream, direct, ptrs, first, consts)
            trace.mark("ipc", "kernel")
            try:
                fill_rows(local, slot.words, rel, first, n)   # (the first part copies meanwhile)
                _go(dh, buf, device, stream, direct, part_args(ptrs, first, dh.half.at_lens is not None), n - first,
                    consts)
            except BaseException:
                stream.synchronize()   # the first part reads the slot and the mappings: let it end first
                raise
            trace.mark("ipc", "second part")
        else:
            _go(dh, buf, device, stream, direct, ptrs, n, consts)
            trace.mark("ipc", "kernel")
        ev = None
        if record:
            ev = slot.event
            ev.record(stream)
        ok = True
    finally:
        if record or not ok:   # (else busy until the caller's synced(): no event says when it is free)
            gpu_upload.SLOTS.release(slot, record and ok)
    return ev, gpu_upload.Held(slot, use, dh, recorded=record)
