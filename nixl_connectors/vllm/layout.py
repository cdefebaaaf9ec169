"""Pure mapping from vLLM's per-layer KV tensors and block ids to transport descriptors.

A block is treated as opaque bytes: for each layer tensor we find the dimension that indexes
blocks and, for every combination of the dimensions *before* it (e.g. the K/V axis of a
`[2, num_blocks, ...]` layout), one contiguous *segment* of `block_bytes` per block at
`base_offset + block_id * stride`. This covers vLLM 0.33's packed
`[num_blocks, kv_heads, block_size, 2*head_size]`, the `[2, num_blocks, ...]` layouts, and
the CPU kernel's own inner layout alike, as long as everything after the block dimension is
contiguous.

The byte stream of a request is, in this order: for each layer (sorted by name), for each
segment of that layer, the request's blocks in order. Producer and consumer build it the
same way, so equal layouts give equal streams.

No I/O here: `plan_segments` works on shapes and strides, `segments_for` on tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from itertools import product
from typing import Mapping, Sequence

import numpy as np

from ..handoff.layout_transform import PagedLayout


class LayoutError(ValueError):
    """The KV tensors cannot be described as blocks of opaque bytes."""


class BlockKind(str, Enum):
    """What the inside of one block of a segment looks like."""

    HEADS_OUTER = "HND"    # [heads, block_size, ...]: heads split for TP, tokens for block sizes
    TOKENS_OUTER = "NHD"   # [block_size, ...]: tokens split for block sizes, heads not separable
    OPAQUE = "opaque"      # unknown: whole blocks only (same block size and TP on both sides)


@dataclass(frozen=True)
class Segment:
    """Blocks of one layer (and one outer index, e.g. K or V) inside one storage.

    `storage_key` identifies the storage (registered once as a region); offsets are bytes
    from the start of that storage. `paged` describes a block as `[heads, block_size,
    head_bytes]` (heads = 1 unless `kind` is HEADS_OUTER); `group` is the KV-cache group.
    """

    layer: str
    storage_key: int
    base_offset: int
    stride: int
    block_bytes: int
    kind: BlockKind = BlockKind.OPAQUE
    paged: PagedLayout | None = None
    group: int = 0


def block_kind(inner: Sequence[int], itemsize: int, local_heads: int | None,
               block_size: int | None, head_parts: int = 1,
               part_rows: tuple[int, ...] = ()) -> tuple[BlockKind, PagedLayout | None]:
    """Kind and paged shape of a block whose dims (after the block dim) are `inner`.
    `head_parts`: how many parts (K, V) a head's slab of a HEADS_OUTER block is split into,
    each holding all tokens of the block (vLLM CPU attention: 2); `part_rows`: rows of a
    channel-major part (vLLM CPU attention keeps K as [head_size, block_size])."""
    elems = int(np.prod(inner, dtype=np.int64)) if len(inner) else 1
    if block_size and local_heads and len(inner) >= 3 and inner[0] == local_heads \
            and inner[1] == block_size:
        return BlockKind.HEADS_OUTER, PagedLayout(local_heads, block_size,
                                                  elems // (local_heads * block_size) * itemsize, head_parts,
                                                  part_rows)
    if block_size and len(inner) >= 2 and inner[0] == block_size:
        return BlockKind.TOKENS_OUTER, PagedLayout(1, block_size, elems // block_size * itemsize)
    if block_size and (elems * itemsize) % block_size == 0:
        return BlockKind.OPAQUE, PagedLayout(1, block_size, elems * itemsize // block_size)
    return BlockKind.OPAQUE, None


def find_block_dim(shape: Sequence[int], num_blocks: int, hint: int | None = None) -> int:
    """Index of the dimension that indexes blocks.

    `hint` (from the attention backend's shape) wins when given; otherwise exactly one
    dimension of size `num_blocks` must exist, preferring dim 0 then dim 1.
    """
    if hint is not None:
        if not 0 <= hint < len(shape) or shape[hint] != num_blocks:
            raise LayoutError(f"block dim hint {hint} does not match shape {tuple(shape)}")
        return hint
    for d in (0, 1):
        if d < len(shape) and shape[d] == num_blocks:
            return d
    cands = [d for d, n in enumerate(shape) if n == num_blocks]
    if len(cands) != 1:
        raise LayoutError(f"cannot find the block dimension ({num_blocks} blocks) in shape "
                          f"{tuple(shape)}")
    return cands[0]


def plan_segments(shape: Sequence[int], strides: Sequence[int], itemsize: int,
                  storage_offset_bytes: int, block_dim: int) -> list[tuple[int, int, int]]:
    """(base_offset, stride, block_bytes) of each segment; strides in elements.

    Requires the dimensions after `block_dim` to be contiguous (row-major).
    """
    if len(shape) != len(strides):
        raise LayoutError("shape and strides differ in length")
    inner = shape[block_dim + 1:]
    inner_strides = strides[block_dim + 1:]
    expect = 1
    for n, s in zip(reversed(inner), reversed(inner_strides)):
        if n != 1 and s != expect:
            raise LayoutError(f"dims after the block dim are not contiguous: shape "
                              f"{tuple(shape)}, strides {tuple(strides)}")
        expect *= n
    block_elems = int(np.prod(inner, dtype=np.int64)) if inner else 1
    block_stride = strides[block_dim]
    if block_stride < block_elems and shape[block_dim] > 1:
        raise LayoutError("blocks overlap: block stride smaller than a block")
    outer = shape[:block_dim]
    outer_strides = strides[:block_dim]
    segs = []
    for idx in product(*(range(n) for n in outer)):
        off = sum(i * s for i, s in zip(idx, outer_strides))
        segs.append((storage_offset_bytes + off * itemsize, block_stride * itemsize,
                     block_elems * itemsize))
    return segs


def segments_for(kv_caches: Mapping[str, "object"], num_blocks: int,
                 block_dim_hint: int | None = None, *, local_heads: int | None = None,
                 block_size: int | None = None, head_parts: int = 1, part_rows: tuple[int, ...] = (),
                 group_of: Mapping[str, int] | None = None) -> list[Segment]:
    """Segments of every layer tensor (torch tensors), by group, then layer name."""
    out: list[Segment] = []
    group_of = group_of or {}
    for name in sorted(kv_caches, key=lambda n: (group_of.get(n, 0), n)):
        t = kv_caches[name]
        tensors = list(t) if isinstance(t, (list, tuple)) else [t]
        for sub in tensors:
            d = find_block_dim(tuple(sub.shape), num_blocks, block_dim_hint)
            key = sub.untyped_storage().data_ptr()
            kind, paged = block_kind(tuple(sub.shape)[d + 1:], sub.element_size(), local_heads,
                                     block_size, head_parts, part_rows)
            for base, stride, nbytes in plan_segments(
                    tuple(sub.shape), tuple(sub.stride()), sub.element_size(),
                    sub.storage_offset() * sub.element_size(), d):
                out.append(Segment(name, key, base, stride, nbytes, kind, paged,
                                   group_of.get(name, 0)))
    return out


def distinct_storages(kv_caches: Mapping[str, "object"]) -> dict[int, "object"]:
    """One tensor per distinct storage (key = storage data pointer), to register once each."""
    out: dict[int, object] = {}
    for name in sorted(kv_caches):
        t = kv_caches[name]
        for sub in (list(t) if isinstance(t, (list, tuple)) else [t]):
            out.setdefault(sub.untyped_storage().data_ptr(), sub)
    return out


def bytes_per_block(segments: Sequence[Segment]) -> int:
    """Bytes one block id contributes to the stream (all layers, all segments)."""
    return sum(s.block_bytes for s in segments)


def stream_ranges(segments: Sequence[Segment], block_ids: Sequence[int]
                  ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """For each segment: (storage_key, offsets, lengths) of `block_ids`, in stream order."""
    ids = np.asarray(block_ids, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise LayoutError("negative block id")
    out = []
    for s in segments:
        offs = s.base_offset + ids * s.stride
        out.append((s.storage_key, offs, np.full(ids.shape, s.block_bytes, dtype=np.int64)))
    return out


def build_descs(segments: Sequence[Segment], regions: Mapping[int, "object"],
                block_ids: Sequence[int]):
    """`transport.Descs` of `block_ids` over `regions` (storage_key -> Region), stream order."""
    from transport import Descs

    parts = [Descs.from_blocks(regions[s.storage_key], np.asarray(block_ids, dtype=np.int64),
                               s.block_bytes, base_offset=s.base_offset, stride=s.stride)
             for s in segments]
    return Descs.concat(parts)
