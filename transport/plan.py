"""Pure mapping from a Descs stream to fixed-size chunks of units (no I/O).

A transfer moves the stream of a Descs (its ranges concatenated) in chunks of `chunk_bytes`.
Each side plans its own Descs independently, with the same chunk size, so the two sides agree
on which stream bytes each chunk carries. Within a side, every range is cut into equal
*units* (the gcd of all offsets, lengths and the chunk size), so packing a chunk is one
`index_select` per region segment and unpacking one `index_copy_`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .descs import Descs

MAX_UNITS = 1 << 25  # beyond this the per-unit index arrays would cost too much memory


@dataclass(frozen=True)
class Segment:
    """Units [stage_start, stage_start+len(index)) of a chunk's staging buffer come from/go to
    the units `index` (unit-sized rows) of region `region`."""

    region: int
    stage_start: int
    index: np.ndarray


@dataclass(frozen=True)
class ChunkPlan:
    number: int
    nbytes: int
    # Set when the whole chunk is one contiguous byte range of one region: move it zero-copy.
    contiguous: tuple[int, int, int] | None  # (region, byte offset, nbytes)
    segments: tuple[Segment, ...]


def unit_size(descs: Descs, chunk_bytes: int) -> int:
    """Largest unit dividing every offset, every length and the chunk size."""
    if len(descs) == 0:
        return chunk_bytes
    g = int(np.gcd.reduce(np.concatenate([descs.offset, descs.length])))
    g = int(np.gcd(g, chunk_bytes)) if g else chunk_bytes
    return g


def expand_units(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate arange(starts[i], starts[i]+counts[i]) for all i without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(starts - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    return first + np.arange(total, dtype=np.int64)


class StreamPlan:
    """Chunking of one side's stream; `chunk(k)` is cheap after construction."""

    def __init__(self, descs: Descs, chunk_bytes: int):
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be > 0")
        d = descs.coalesced()
        self.descs = d
        self.nbytes = d.nbytes
        self.chunk_bytes = chunk_bytes
        self.num_chunks = -(-self.nbytes // chunk_bytes) if self.nbytes else 0
        self.unit = unit_size(d, chunk_bytes)
        nunits = self.nbytes // self.unit
        if nunits > MAX_UNITS:
            raise ValueError(f"descriptor alignment too fine ({self.unit} B units for {self.nbytes} B); "
                             "align blocks to at least 256 bytes")
        counts = d.length // self.unit
        self.uidx = expand_units(d.offset // self.unit, counts)
        self.ureg = np.repeat(d.region_idx, counts).astype(np.int32)
        brk = np.ones(nunits, dtype=np.int64)
        if nunits > 1:
            brk[1:] = ((self.ureg[1:] != self.ureg[:-1]) | (self.uidx[1:] != self.uidx[:-1] + 1))
        self._cumbrk = np.cumsum(brk)

    def units_per_chunk(self) -> int:
        return self.chunk_bytes // self.unit

    def chunk(self, k: int) -> ChunkPlan:
        if not 0 <= k < self.num_chunks:
            raise IndexError(k)
        upc = self.units_per_chunk()
        s = k * upc
        e = min(s + upc, self.nbytes // self.unit)
        nbytes = (e - s) * self.unit
        if self._cumbrk[e - 1] == self._cumbrk[s]:
            return ChunkPlan(k, nbytes, (int(self.ureg[s]), int(self.uidx[s]) * self.unit, nbytes), ())
        reg = self.ureg[s:e]
        cuts = np.flatnonzero(reg[1:] != reg[:-1]) + 1
        bounds = np.concatenate(([0], cuts, [e - s]))
        segs = tuple(Segment(int(reg[a]), int(a), self.uidx[s + a:s + b])
                     for a, b in zip(bounds[:-1], bounds[1:]))
        return ChunkPlan(k, nbytes, None, segs)
