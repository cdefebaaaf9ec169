"""Descriptor lists: numpy-backed rows of (region, offset, length), never looped in Python."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import pinned_tables
from .region import MemoryKind, Region


_I64_MAX = (1 << 63) - 1


def _int64(values, what: str) -> np.ndarray:
    a = np.asarray(values)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{what} must be integers")
    if a.size and a.dtype.kind == "u" and int(a.max()) > _I64_MAX:
        raise ValueError(f"{what} out of range")
    return np.ascontiguousarray(a, dtype=np.int64).reshape(-1)


def _pinned(regions, n: int, dtype) -> tuple[np.ndarray, int] | None:
    """A pinned array (and its address) for a run table over `regions` when they are all CUDA
    memory (pinned_tables.py: the copy kernel reads it where it lies), else None."""
    if not n or not regions or any(r.kind is not MemoryKind.CUDA for r in regions):
        return None
    return pinned_tables.TABLES.array(n, dtype)


def _blocks_span(ids: np.ndarray, first: int, step: int, block_bytes: int) -> int | None:
    """`Descs.span` of blocks `ids` (non-empty, each `block_bytes` long, `step` apart; the first at
    byte `first`): one range exactly when there is one block, or the blocks are adjacent
    (`step == block_bytes`) and the ids run up by one (pure)."""
    n = ids.size
    if n == 1:
        return first
    if step != block_bytes or int(ids[-1]) - int(ids[0]) != n - 1:
        return None
    return first if bool((ids[1:] - ids[:-1] == 1).all()) else None


def common_value(a: np.ndarray) -> int:
    """The value every element of `a` has, or 0 when they differ or `a` is empty (pure)."""
    if not a.size:
        return 0
    lo = int(a.min())
    return lo if lo == int(a.max()) else 0


def low_bits_of_progression(base: int, step: int) -> int:
    """A superset of bits 0-3 set in any of base + k * step (k >= 0): every such number equals
    base modulo step's lowest set bit, and may have any bit from that one up (pure)."""
    low = step & -step
    return ((base & 15) | (~(low - 1) & 15)) & 15


@dataclass(frozen=True)
class Descs:
    """An ordered list of byte ranges over registered regions.

    `regions` holds the distinct regions; `region_idx[i]` indexes into it; `offset[i]` and
    `length[i]` are in bytes. The *stream* of a Descs is the concatenation of its ranges in
    order: that is what a transfer moves.
    """

    regions: tuple[Region, ...]
    region_idx: np.ndarray  # int32
    offset: np.ndarray      # int64
    length: np.ndarray      # int64

    def __post_init__(self) -> None:
        n = len(self.offset)
        if not (len(self.region_idx) == n == len(self.length)):
            raise ValueError("region_idx, offset and length must have the same length")
        if not n:
            return
        if len(self.regions) == 1:
            if self.region_idx.min() != 0 or self.region_idx.max() != 0:
                raise ValueError("region index out of range")
        elif self.region_idx.min() < 0 or self.region_idx.max() >= len(self.regions):
            raise ValueError("region index out of range")
        if self.length.min() <= 0 or self.offset.min() < 0:
            raise ValueError("descriptor lengths must be > 0 and offsets >= 0")
        if len(self.regions) == 1:
            over = self.offset > self.regions[0].nbytes - self.length  # no overflow: all terms >= 0
        else:
            sizes = np.array([r.nbytes for r in self.regions], dtype=np.int64)
            over = self.offset > sizes[self.region_idx] - self.length
        if over.any():
            bad = int(np.argmax(over))
            raise ValueError(f"descriptor {bad} [{self.offset[bad]}, +{self.length[bad]}) exceeds its region")
        if len(self.regions) > 1 and len({r.device for r in self.regions}) > 1:
            raise ValueError("all regions of one Descs must live on the same device")

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_ranges(cls, region: Region, offsets, lengths) -> "Descs":
        off = _int64(offsets, "offsets")
        ln = _int64(lengths, "lengths")
        if ln.size == 1 and off.size > 1:
            ln = np.full(off.size, int(ln[0]), dtype=np.int64)
        pinned = _pinned((region,), off.size, np.int64)
        if pinned is not None:
            pinned[0][:] = off
            off = pinned[0]
        d = cls((region,), np.zeros(off.size, dtype=np.int32), off, ln)
        if pinned is not None:
            d.__dict__["device_tables"] = (pinned[1], None)
        return d

    @classmethod
    def from_blocks(cls, region: Region, block_ids, block_bytes: int,
                    base_offset: int = 0, stride: int | None = None) -> "Descs":
        """Block `b` is bytes [base_offset + b*stride, +block_bytes) of `region`."""
        if block_bytes <= 0:
            raise ValueError("block_bytes must be > 0")
        ids = np.asarray(block_ids)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError("block_ids must be integers")
        ids = _int64(ids, "block_ids")
        if ids.size and ids.min() < 0:
            raise ValueError("block ids must be >= 0")
        step = block_bytes if stride is None else int(stride)
        if step <= 0 or base_offset < 0:
            raise ValueError("stride must be > 0 and base_offset >= 0")
        if ids.size and int(ids.max()) > (_I64_MAX - base_offset - block_bytes) // step:
            raise ValueError(f"block id {int(ids.max())} * stride {step} is outside any region")
        pinned = _pinned((region,), ids.size, np.int64)
        if pinned is None:
            off = base_offset + ids * step
        else:   # (written where the copy kernel reads it: no table to fill at read time)
            off = np.multiply(ids, step, out=pinned[0])
            if base_offset:
                np.add(off, base_offset, out=off)
        d = cls((region,), np.zeros(ids.size, dtype=np.int32), off, np.full(ids.size, block_bytes, dtype=np.int64))
        if pinned is not None:
            d.__dict__["device_tables"] = (pinned[1], None)
        d.__dict__["uniform_length"] = block_bytes if ids.size else 0   # known: no pass over the lengths
        d.__dict__["nbytes"] = int(ids.size) * block_bytes
        d.__dict__["offset_low_bits"] = low_bits_of_progression(base_offset, step) if ids.size else 0
        if ids.size:   # (decided while the ids are at hand: a read of a new Descs asks at once)
            d.__dict__["span"] = _blocks_span(ids, int(off[0]), step, block_bytes)
        return d

    @classmethod
    def concat(cls, parts: "list[Descs]") -> "Descs":
        regions: list[Region] = []
        index: dict[int, int] = {}
        ridx, offs, lens = [], [], []
        bits = 0
        for p in parts:
            remap = np.empty(len(p.regions), dtype=np.int32)
            for i, r in enumerate(p.regions):
                if r.uid not in index:
                    index[r.uid] = len(regions)
                    regions.append(r)
                    bits |= r.ptr
                remap[i] = index[r.uid]
            ridx.append(remap[p.region_idx] if len(p.region_idx) else p.region_idx)
            offs.append(p.offset)
            lens.append(p.length)
        if not parts:
            return cls((), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        live = [p for p in parts if len(p)]
        if len(live) == 1 and len(regions) == 1 and live[0].device_tables is not None:
            only = live[0]   # (one part: its arrays, pinned already, serve as they are)
            out = cls(tuple(regions), only.region_idx, only.offset, only.length)
            out.__dict__["device_tables"] = only.device_tables
        else:
            out = cls.from_parts(tuple(regions), ridx, offs, lens)
        out.__dict__["region_uids"] = tuple(index)
        out.__dict__["base_low_bits"] = bits & 15   # (asked by every CUDA read: known here for free)
        # what every part already knows (from_blocks: per-layer block lists) needs no pass over
        # the joined arrays at read time
        known = [p.__dict__ for p in parts if len(p)]
        if len(regions) == 1 and known and all("span" in k and "nbytes" in k for k in known):
            span, end = known[0]["span"], None   # one range when each part is one and each follows the last
            for k in known:
                if k["span"] is None or (end is not None and k["span"] != end):
                    span = None
                    break
                end = k["span"] + k["nbytes"]
            out.__dict__["span"] = span
        if all("nbytes" in k for k in known):
            out.__dict__["nbytes"] = sum(k["nbytes"] for k in known)
        if known and all("uniform_length" in k for k in known):
            ul = {k["uniform_length"] for k in known}
            out.__dict__["uniform_length"] = ul.pop() if len(ul) == 1 else 0
        if known and all("offset_low_bits" in k for k in known):
            bits = 0
            for k in known:
                bits |= k["offset_low_bits"]
            out.__dict__["offset_low_bits"] = bits
        return out

    @classmethod
    def from_parts(cls, regions: "tuple[Region, ...]", region_idx, offsets, lengths) -> "Descs":
        """One Descs over `regions` from lists of per-part arrays (region index, offset, length
        per run), joined once: over CUDA regions straight into pinned memory (pinned_tables.py)."""
        regions = tuple(regions)
        if not offsets:
            return cls(regions, np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        n = sum(len(o) for o in offsets)
        off = _pinned(regions, n, np.int64)
        idx = _pinned(regions, n, np.int32) if off is not None and len(regions) > 1 else None
        d = cls(regions,
                np.concatenate(region_idx).astype(np.int32, copy=False) if idx is None
                else np.concatenate(region_idx, out=idx[0], casting="same_kind"),
                np.ascontiguousarray(np.concatenate(offsets), dtype=np.int64) if off is None
                else np.concatenate(offsets, out=off[0], casting="same_kind"),
                np.ascontiguousarray(np.concatenate(lengths), dtype=np.int64))
        if off is not None and (len(regions) == 1 or idx is not None):
            d.__dict__["device_tables"] = (off[1], None if idx is None else idx[1])
        return d

    # -- properties -----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.offset.size)

    @functools.cached_property
    def nbytes(self) -> int:
        """Total bytes of the stream (computed once: descriptors are immutable)."""
        return int(self.length.sum()) if len(self) else 0

    @functools.cached_property
    def uniform_length(self) -> int:
        """The length every descriptor has, or 0 when they differ (or there are none)."""
        return common_value(self.length)

    @functools.cached_property
    def offset_low_bits(self) -> int:
        """Bits 0-3 that some offset may have set (their OR, or a superset of it): where every
        offset is 8- or 16-byte aligned, this says so (the CUDA copy kernels' variant)."""
        return int(np.bitwise_or.reduce(self.offset)) & 15 if len(self) else 0

    @functools.cached_property
    def device_tables(self) -> tuple[int, int | None] | None:
        """(address of its offsets, of its region indices or None over one region) where they lie
        in pinned memory the copy kernel reads directly (pinned_tables.py), else None. Set by the
        constructors that put them there; a Descs made from arrays of its own has none."""
        return None

    @functools.cached_property
    def region_uids(self) -> tuple[int, ...]:
        """Its regions' uids, in order (a key for what is kept per set of regions)."""
        return tuple(r.uid for r in self.regions)

    @functools.cached_property
    def bases(self) -> np.ndarray:
        """int64 address of each region's first byte (regions are fixed: computed once)."""
        return np.array([r.ptr for r in self.regions], dtype=np.int64)

    @functools.cached_property
    def base_low_bits(self) -> int:
        """Bits 0-3 set in any region's address (their OR; computed once)."""
        bits = 0
        for r in self.regions:
            bits |= r.ptr
        return bits & 15

    @functools.cached_property
    def span(self) -> int | None:
        """The offset of the one contiguous byte range this stream is, in its one region (its
        runs follow each other there, in order), else None (computed once)."""
        n = len(self)
        if not n or len(self.regions) != 1:
            return None
        first = int(self.offset[0])
        if n == 1:
            return first
        if int(self.offset[-1]) + int(self.length[-1]) - first != self.nbytes:
            return None   # (its ends are not one span's: the common case, decided with no pass)
        off = self.offset
        return None if (off[1:] - off[:-1] != self.length[:-1]).any() else first

    def select_stream(self, ranges) -> "Descs":
        """The descriptors covering byte ranges of this stream, in the ranges' order.

        `ranges` is an [n, 2] array of (offset, length) into the stream (the concatenation of
        this Descs' ranges). Raises ValueError for an empty, negative or out-of-stream range
        (checked without overflow)."""
        r = np.asarray(ranges)
        if r.ndim != 2 or r.shape[1] != 2 or r.shape[0] == 0:
            raise ValueError("ranges must be a non-empty [n, 2] array of (offset, length)")
        if r.dtype.kind not in "iu":
            raise ValueError("ranges must be integers")
        total = self.nbytes
        if r.dtype.kind == "u" and r.size and int(r.max()) > total:
            raise ValueError("range outside the stream")
        r = r.astype(np.int64)
        s, n = r[:, 0], r[:, 1]
        if np.any(n <= 0) or np.any(s < 0) or np.any(s > total - n):
            raise ValueError(f"ranges must have length > 0 and lie inside the {total}-byte stream")
        cum = np.concatenate(([0], np.cumsum(self.length)))
        e = s + n
        first = np.searchsorted(cum, s, side="right") - 1
        last = np.searchsorted(cum, e, side="left") - 1
        count = last - first + 1
        tot = int(count.sum())
        j = np.repeat(first - np.concatenate(([0], np.cumsum(count)[:-1])), count) + np.arange(tot)
        rs, re = np.repeat(s, count), np.repeat(e, count)
        start = np.maximum(rs, cum[j])
        end = np.minimum(re, cum[j + 1])
        return Descs(self.regions, self.region_idx[j], self.offset[j] + (start - cum[j]), end - start)

    def coalesced(self) -> "Descs":
        """Merge neighbours in stream order that are adjacent in the same region."""
        n = len(self)
        if n < 2:
            return self
        cont = self.offset[:-1] + self.length[:-1] == self.offset[1:]
        if len(self.regions) > 1:
            cont &= self.region_idx[1:] == self.region_idx[:-1]
        if not cont.any():
            return self  # nothing adjacent (e.g. random blocks): no copy, no re-validation
        starts = np.flatnonzero(np.concatenate(([True], ~cont)))
        lens = np.add.reduceat(self.length, starts)
        return Descs(self.regions, self.region_idx[starts], self.offset[starts], lens)
