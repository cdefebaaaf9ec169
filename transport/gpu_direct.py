"""The paired copy (gpu_runs.py) with a read's own runs read straight from its `Descs`: the
offsets (and, over several regions, the region index per run) that `Descs.from_blocks`,
`from_ranges`, `from_parts` and `concat` wrote into pinned, device-mapped memory
(pinned_tables.py). Nothing is written on the read's path: no slot is taken, no addresses are
folded on the host, and the copy goes in one launch (gpu_runs.py fills a table first and so
launches a large read in two parts).

The remote side is the device-resident half of the plan (gpu_remote.py), addressed relative to
its buffer (`base`), as in gpu_runs.py. The local side is addressed relative to its first
region's base pointer (`lbase`): run i starts at `loff[i]`, plus, over several regions,
`lrel[lidx[i]]`, that region's base relative to the first one (a small device table kept per set
of regions and device). Both base pointers have the element type, so the compiler knows their
alignment; told that every offset is a multiple of 16 bytes it issues 16-byte loads and stores.
"""
from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from . import gpu_upload, pinned_tables, trace, triton_fast
from .gpu_runs import WORD, Variant, word_align

if TYPE_CHECKING:
    from .descs import Descs
    from .gpu_remote import DeviceHalf, RemoteTable

log = logging.getLogger(__name__)

REL_TABLES = 64   # region-base tables kept on the devices (least recently used dropped first)

disabled: str | None = None   # why reads fill a table instead (a launch that failed); None: in use
direct_launches = 0


def disable(reason: str) -> bool:
    """Turn the path off (logged once); True the first time."""
    global disabled
    if disabled is not None:
        return False
    disabled = reason
    log.warning("CUDA reads write their run tables again (the direct kernel failed: %s)", reason)
    return True


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kv_copy_direct(base, raddr, lens, lbase, loff, lidx, lrel,
                       PIECE: tl.constexpr, WORD: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr,
                       ULEN: tl.constexpr, MULTI: tl.constexpr, TO_LOCAL: tl.constexpr):
        j = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1)
        if ULEN > 0:
            n = ULEN
        else:
            n = tl.load(lens + i)
        start = j * PIECE
        if start < n:
            r = (tl.load(raddr + i) + start) // WORD
            lo = tl.load(loff + i)
            if MULTI:
                lo += tl.load(lrel + tl.load(lidx + i))
            q = (lo + start) // WORD
            if ALIGN > 1:
                r = tl.multiple_of(r, ALIGN)
                q = tl.multiple_of(q, ALIGN)
            offs = tl.arange(0, PIECE // WORD)
            if EVEN:
                if TO_LOCAL:
                    tl.store(lbase + q + offs, tl.load(base + r + offs))
                else:
                    tl.store(base + r + offs, tl.load(lbase + q + offs))
            else:
                m = offs < (n - start) // WORD
                if TO_LOCAL:
                    tl.store(lbase + q + offs, tl.load(base + r + offs, mask=m), mask=m)
                else:
                    tl.store(base + r + offs, tl.load(lbase + q + offs, mask=m), mask=m)

    return kv_copy_direct


# -- arguments (pure) ------------------------------------------------------------------------------
def local_bits(offset_low_bits: int, base_low_bits: int) -> int:
    """Bits 0-3 any local address relative to the first region's base may have: every relative
    base has only bits its region's base has (pure)."""
    return (offset_low_bits | base_low_bits) & 15


def kernel_args(base: int, at_lens: int | None, remote_bits: int, v: Variant, lbase: int, loff: int,
                lidx: int | None, lrel: int | None, lbits: int, write: bool) -> tuple[tuple[int, ...], tuple]:
    """(pointer arguments, constexprs) of kv_copy_direct: `base` the remote half's buffer (its
    run addresses first, then its lengths at word `at_lens` when they differ), `lbase` the first
    local region's address, `loff`/`lidx` the addresses of the local offsets and region indices
    (lidx None: one region), `lrel` the device table of region bases relative to `lbase` (pure)."""
    lens = base + at_lens * WORD if at_lens is not None else base
    word, align = word_align(remote_bits | lbits | v.ulen)
    multi = lidx is not None
    ptrs = (base, base, lens, lbase, loff, lidx if multi else loff, lrel if multi else loff)
    return ptrs, (v.piece, word, v.even, align, v.ulen, multi, not write)


def emulate(ptrs: tuple[int, ...], consts: tuple, n: int, read_words, read_idx) -> tuple[np.ndarray, ...]:
    """(source address, destination address, length) of every run, computed the way the kernel
    computes them; `read_words(addr, count)` reads int64 words, `read_idx(addr, count)` int32
    ones (for tests on machines without a GPU)."""
    base, raddr, lens, lbase, loff, lidx, lrel = ptrs
    ulen, multi, to_local = consts[4], consts[5], consts[6]
    lengths = np.full(n, ulen, np.int64) if ulen else read_words(lens, n)
    remote = read_words(raddr, n) + base
    lo = read_words(loff, n)
    if multi:
        idx = read_idx(lidx, n).astype(np.int64)
        rel = read_words(lrel, int(idx.max()) + 1)
        lo = lo + rel[idx]
    local = lo + lbase
    return (remote, local, lengths) if to_local else (local, remote, lengths)


# -- the region-base tables -------------------------------------------------------------------------
class _RelTables:
    def __init__(self) -> None:
        self._lru: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, local: "Descs", device: Any, stream: Any) -> tuple[Any, int]:
        """(int64 device tensor, its address): each region's base relative to the first
        region's (uploaded on `stream` once per set of regions and device)."""
        key = (device.index, local.region_uids)
        with self._lock:
            t = self._lru.get(key)
            if t is not None:
                self._lru.move_to_end(key)
                return t
        import torch

        rel = local.bases - local.bases[0]
        with torch.cuda.device(device), torch.cuda.stream(stream):
            t = torch.as_tensor(rel, dtype=torch.int64).to(device, non_blocking=False)
        t = (t, int(t.data_ptr()))
        with self._lock:
            self._lru[key] = t
            while len(self._lru) > REL_TABLES:
                self._lru.popitem(last=False)
        return t

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()


REL = _RelTables()


# -- the launch ------------------------------------------------------------------------------------
def usable(local: "Descs", device_index: int) -> bool:
    """Can a paired copy into (or from) `local` read its runs from its own tables on this device?"""
    if disabled is not None or local.device_tables is None:
        return False
    ok = pinned_tables.TABLES.mapped.get(device_index)
    if ok is None:
        ok = _ask_mapped(device_index)
    return ok


def _ask_mapped(device_index: int) -> bool:
    import torch

    with torch.cuda.device(device_index):
        return pinned_tables.TABLES.mapped_on(device_index, gpu_upload.device_address_of_host)


_LAUNCHER = triton_fast.FastLauncher("kv_copy_direct")


def launch(remote: "RemoteTable", local: "Descs", device: Any, stream: Any, write: bool = False,
           record: bool = True) -> tuple[Any, Any]:
    """Enqueue the copy of run i of `remote` to run i of `local` (or back, `write`) on `stream`
    in one launch (the two pair: `IpcPlan.pairs_with`; `usable(local, ...)`); returns (event
    recorded after it, or None without `record`: the caller synchronizes `stream`; what the
    kernel reads, to keep alive until then)."""
    global direct_launches
    import torch

    dh = remote.on(device, stream)
    trace.mark("ipc", "remote half")
    loff, lidx = local.device_tables
    rel, rel_addr = REL.get(local, device, stream) if lidx is not None else (None, None)
    v = dh.variant
    ptrs, consts = kernel_args(dh.addr, dh.half.at_lens, dh.half.bits, v, local.regions[0].ptr, loff, lidx,
                               rel_addr, local_bits(local.offset_low_bits, local.base_low_bits), write)
    n = len(local.offset)
    trace.mark("ipc", "args")
    if torch.cuda.current_device() == device.index:
        _LAUNCHER.launch((v.per, n), device.index, stream, ptrs, consts,
                         lambda: _through_triton(dh, local, rel, ptrs, consts, v, n, stream), options=(v.warps,))
    else:   # (the compiled kernel is loaded per device: Triton's path switches device itself)
        with torch.cuda.device(device):
            _through_triton(dh, local, rel, ptrs, consts, v, n, stream)
    direct_launches += 1
    trace.mark("ipc", "kernel")
    ev = None
    if record:
        ev = torch.cuda.Event()
        ev.record(stream)
    return ev, (dh, local, rel)


def _through_triton(dh: "DeviceHalf", local: "Descs", rel: Any, ptrs: tuple[int, ...], consts: tuple, v: Variant,
                    n: int, stream: Any):
    """The first launch of a variant (and every launch off the current device): tensors for every
    pointer argument, typed as the kernel reads them."""
    import torch

    elem = torch.int64 if consts[1] == WORD else torch.uint8
    flat = local.regions[0].flat
    lbase = flat[: flat.numel() // WORD * WORD].view(torch.int64) if elem is torch.int64 else flat
    remote = dh.dev if elem is torch.int64 else dh.dev.view(torch.uint8)
    lens = dh.dev[dh.half.at_lens:] if dh.half.at_lens is not None else dh.dev
    loff = _pinned_tensor(local.offset, torch.int64)
    lidx = _pinned_tensor(local.region_idx, torch.int32) if local.device_tables[1] is not None else loff
    args = [remote, dh.dev, lens, lbase, loff, lidx, rel if rel is not None else loff]
    for a, p in zip(args, ptrs):   # (what the raw launches will pass: the same addresses)
        if a.data_ptr() != p:
            raise ValueError(f"kernel argument {p:#x} is not its tensor's address {a.data_ptr():#x}")
    with torch.cuda.stream(stream):
        return _kernel()[(v.per, n)](*args, PIECE=consts[0], WORD=consts[1], EVEN=consts[2], ALIGN=consts[3],
                                     ULEN=consts[4], MULTI=consts[5], TO_LOCAL=consts[6], num_warps=v.warps)


def _pinned_tensor(a: np.ndarray, dtype: Any) -> Any:
    """The pinned uint8 chunk holding `a`, sliced and viewed as `a` (a tensor Triton accepts)."""
    addr = a.ctypes.data
    chunk = pinned_tables.TABLES.chunk_of(addr)
    if chunk is None:
        raise ValueError("a descriptor table is not in pinned memory")
    start, keep = chunk
    return keep[addr - start: addr - start + a.nbytes].view(dtype)
