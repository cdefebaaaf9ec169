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
from itertools import product
from typing import Mapping, Sequence

import numpy as np


class LayoutError(ValueError):
    """The KV tensors cannot be described as blocks of opaque bytes."""


@dataclass(frozen=True)
class Segment:
    """Blocks of one layer (and one outer index, e.g. K or V) inside one storage.

    `storage_key` identifies the storage (registered once as a region); offsets are bytes
    from the start of that storage.
    """

    layer: str
    storage_key: int
    base_offset: int
    stride: int
    block_bytes: int


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
                 block_dim_hint: int | None = None) -> list[Segment]:
    """Segments of every layer tensor (torch tensors), layers sorted by name."""
    out: list[Segment] = []
    for name in sorted(kv_caches):
        t = kv_caches[name]
        tensors = list(t) if isinstance(t, (list, tuple)) else [t]
        for sub in tensors:
            d = find_block_dim(tuple(sub.shape), num_blocks, block_dim_hint)
            key = sub.untyped_storage().data_ptr()
            for base, stride, nbytes in plan_segments(
                    tuple(sub.shape), tuple(sub.stride()), sub.element_size(),
                    sub.storage_offset() * sub.element_size(), d):
                out.append(Segment(name, key, base, stride, nbytes))
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


def split_local_blocks(num_remote_blocks: int, local_block_ids: Sequence[int],
                       num_local_cached: int) -> tuple[int, list[int]]:
    """Where each remote block lands locally.

    The remote lease holds `num_remote_blocks` blocks of the whole prompt. Locally the first
    `num_local_cached` of them are already in the prefix cache and must not be overwritten
    (they may be shared); they go to scratch. Returns (number of scratch blocks, local ids
    of the rest). `local_block_ids` are the ids allocated for the request, cached first.
    """
    if num_local_cached < 0 or num_local_cached > num_remote_blocks:
        raise LayoutError("bad number of locally cached blocks")
    rest = list(local_block_ids[num_local_cached:num_remote_blocks])
    if len(rest) != num_remote_blocks - num_local_cached:
        raise LayoutError(f"{len(local_block_ids)} local blocks cannot hold "
                          f"{num_remote_blocks} remote ones")
    return num_local_cached, rest


def build_local_descs(segments: Sequence[Segment], regions: Mapping[int, "object"],
                      block_ids: Sequence[int], scratch_region=None, num_scratch: int = 0):
    """Reader-side descriptors: the first `num_scratch` blocks of each segment land in
    `scratch_region` (bytes `[k*bytes_per_block)`), the rest in `block_ids`, stream order."""
    from transport import Descs

    if num_scratch == 0:
        return build_descs(segments, regions, block_ids)
    if scratch_region is None:
        raise LayoutError("scratch blocks requested without a scratch region")
    parts = []
    scratch_off = 0
    ids = np.asarray(block_ids, dtype=np.int64)
    for s in segments:
        offs = scratch_off + np.arange(num_scratch, dtype=np.int64) * s.block_bytes
        parts.append(Descs.from_ranges(scratch_region, offs, np.full(num_scratch, s.block_bytes)))
        scratch_off += num_scratch * s.block_bytes
        if ids.size:
            parts.append(Descs.from_blocks(regions[s.storage_key], ids, s.block_bytes,
                                           base_offset=s.base_offset, stride=s.stride))
    return Descs.concat(parts)
