"""Pure mapping from TensorRT-LLM's KV pool tensor to transport descriptors.

TensorRT-LLM hands the connector its whole KV pool once, as one tensor shaped
``[num_blocks, num_layers, kv_factor, kv_heads * head_dim * tokens_per_block]``; block ids index
dimension 0, so block ``b`` is the contiguous byte range ``pool[b]``. Nothing here does I/O or
loops over blocks in Python: the functions work on shapes, strides and numpy arrays only, so
they can be tested exhaustively.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

POOL_NDIM = 4


class PoolLayoutError(ValueError):
    """The pool tensor does not have the layout this connector supports."""


@dataclass(frozen=True)
class PoolLayout:
    """Byte geometry of a KV pool inside the memory that is registered with the transport.

    Block ``b`` occupies ``[base_offset + b * stride, + block_bytes)`` of the registered region.
    ``whole_storage`` says whether the region must be the tensor's whole storage (the pool is a
    strided view) rather than the tensor itself (the pool is contiguous).
    """

    num_blocks: int
    num_layers: int
    kv_factor: int
    block_bytes: int
    stride: int
    base_offset: int
    whole_storage: bool

    @property
    def layer_bytes(self) -> int:
        return self.block_bytes // self.num_layers

    def block_range(self, block_ids: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Byte (offsets, lengths) of ``block_ids`` in the order given; validates the ids."""
        ids = validate_block_ids(block_ids, self.num_blocks)
        return (self.base_offset + ids * self.stride,
                np.full(ids.size, self.block_bytes, dtype=np.int64))


def pool_layout(shape: Sequence[int], strides: Sequence[int], itemsize: int,
                storage_offset: int = 0) -> PoolLayout:
    """Describe a pool from its shape, element strides, element size and storage offset.

    Each block (``pool[b]``) must itself be contiguous; blocks may be further apart than their
    size (a view over a larger buffer), which then needs the whole storage registered.
    """
    shape = tuple(int(s) for s in shape)
    strides = tuple(int(s) for s in strides)
    if len(shape) != POOL_NDIM or len(strides) != POOL_NDIM:
        raise PoolLayoutError(
            f"expected a 4-D pool [num_blocks, num_layers, kv_factor, per_block], got shape {shape}")
    if itemsize <= 0:
        raise PoolLayoutError(f"bad itemsize {itemsize}")
    if min(shape) <= 0:
        raise PoolLayoutError(f"empty pool dimension in shape {shape}")
    num_blocks, num_layers, kv_factor, _ = shape
    # pool[b] must be one contiguous run: row-major strides over dims 1..3.
    expect = 1
    for dim in (3, 2, 1):
        if shape[dim] != 1 and strides[dim] != expect:
            raise PoolLayoutError(
                f"pool[block] is not contiguous (shape {shape}, strides {strides}); "
                "this connector needs each block to be one byte range")
        expect *= shape[dim]
    block_elems = math.prod(shape[1:])
    stride0 = strides[0] if num_blocks > 1 else block_elems
    if stride0 < block_elems:
        raise PoolLayoutError(f"blocks overlap: stride {stride0} < block size {block_elems} elements")
    whole = stride0 != block_elems or storage_offset != 0
    return PoolLayout(
        num_blocks=num_blocks,
        num_layers=num_layers,
        kv_factor=kv_factor,
        block_bytes=block_elems * itemsize,
        stride=stride0 * itemsize,
        base_offset=storage_offset * itemsize if whole else 0,
        whole_storage=whole,
    )


def validate_block_ids(block_ids: Sequence[int] | np.ndarray, num_blocks: int) -> np.ndarray:
    """Block ids as int64 numpy, checked to lie in ``[0, num_blocks)``."""
    ids = np.asarray(block_ids)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(ids.dtype, np.integer):
        raise PoolLayoutError(f"block ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False).reshape(-1)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_blocks:
        raise PoolLayoutError(f"block id out of range [0, {num_blocks}): min {lo}, max {hi}")
    return ids


def full_blocks(num_tokens: int, tokens_per_block: int) -> int:
    """How many whole blocks ``num_tokens`` tokens fill."""
    if tokens_per_block <= 0:
        raise ValueError("tokens_per_block must be > 0")
    return max(0, int(num_tokens)) // tokens_per_block


def transferable_tokens(prompt_len: int, tokens_per_block: int) -> int:
    """Prompt tokens handed from the context instance to the generation instance.

    Only whole blocks move, and at least one prompt token is always left for the generation
    instance to compute, so that its first forward pass yields logits: the result is the
    largest multiple of ``tokens_per_block`` that is at most ``prompt_len - 1``.
    """
    return full_blocks(prompt_len - 1, tokens_per_block) * tokens_per_block
