"""Deterministic, verifiable block contents for the demo, benchmarks and tests (pure, no I/O).

Every block of a benchmark pool is filled with a pattern that depends only on the
block id, the block size and a seed, so a reader can check the blocks it received
without a copy of the owner's pool: it regenerates just the expected blocks.
"""

from __future__ import annotations

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)
_SHIFT = np.uint64(29)
WORD_BYTES = 8


def check_block_bytes(block_bytes: int) -> None:
    """Raise ValueError unless block_bytes is a positive multiple of 8."""
    if block_bytes <= 0 or block_bytes % WORD_BYTES:
        raise ValueError(f"block_bytes must be a positive multiple of {WORD_BYTES}, got {block_bytes}")


def block_pattern(block_ids: np.ndarray, block_bytes: int, seed: int) -> np.ndarray:
    """Return the expected contents of ``block_ids`` as a uint8 array ``[len(ids), block_bytes]``.

    Vectorised: no Python loop over blocks.
    """
    check_block_bytes(block_bytes)
    ids = np.asarray(block_ids, dtype=np.uint64).reshape(-1, 1)
    words = block_bytes // WORD_BYTES
    x = ids * np.uint64(words) + np.arange(words, dtype=np.uint64)
    x ^= np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x *= _MIX
    x ^= x >> _SHIFT
    return x.view(np.uint8).reshape(len(ids), block_bytes)


def fill_pool(pool: np.ndarray, block_bytes: int, seed: int, chunk_blocks: int = 4096) -> None:
    """Fill a uint8 pool of whole blocks (flat, or ``[num_blocks, block_bytes]``) with
    ``block_pattern``, chunk by chunk."""
    check_block_bytes(block_bytes)
    if pool.dtype != np.uint8 or pool.ndim not in (1, 2) or pool.size % block_bytes:
        raise ValueError("pool must be a uint8 array of whole blocks")
    blocks = pool.reshape(-1, block_bytes)
    for start in range(0, blocks.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, blocks.shape[0])
        blocks[start:stop] = block_pattern(np.arange(start, stop), block_bytes, seed)


def mismatched_blocks(got: np.ndarray, block_ids: np.ndarray, block_bytes: int, seed: int) -> int:
    """Number of rows of ``got`` ([n, block_bytes] uint8) that differ from the expected pattern."""
    expected = block_pattern(block_ids, block_bytes, seed)
    if got.shape != expected.shape:
        raise ValueError(f"shape {got.shape} != expected {expected.shape}")
    return int(np.count_nonzero((got != expected).any(axis=1)))


# ------------------------------------------------------------------ the same pattern with torch
# (on any device: GPU pools are filled and checked where they live). int64 arithmetic wraps
# like uint64; the right shift is made logical by masking the sign-extended bits.
def _signed(v: int) -> int:
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


_MIX_I64 = _signed(int(_MIX))
_LOW_BITS = (1 << (64 - int(_SHIFT))) - 1


def block_pattern_torch(block_ids, block_bytes: int, seed: int):
    """``block_pattern`` as a torch uint8 tensor ``[len(ids), block_bytes]`` on ``block_ids``'s
    device (``block_ids``: an int64 tensor)."""
    import torch

    check_block_bytes(block_bytes)
    words = block_bytes // WORD_BYTES
    ids = block_ids.to(torch.int64).reshape(-1, 1)
    x = ids * words + torch.arange(words, dtype=torch.int64, device=ids.device)
    x ^= _signed(seed)
    x *= _MIX_I64
    x ^= (x >> int(_SHIFT)) & _LOW_BITS
    return x.view(torch.uint8).reshape(ids.shape[0], block_bytes)


def fill_pool_torch(pool, block_bytes: int, seed: int, chunk_blocks: int = 2048) -> None:
    """``fill_pool`` for a torch uint8 tensor of whole blocks (any device), chunk by chunk."""
    import torch

    check_block_bytes(block_bytes)
    if pool.dtype != torch.uint8 or pool.numel() % block_bytes:
        raise ValueError("pool must be a uint8 tensor of whole blocks")
    blocks = pool.view(-1, block_bytes)
    for start in range(0, blocks.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, blocks.shape[0])
        ids = torch.arange(start, stop, dtype=torch.int64, device=pool.device)
        blocks[start:stop] = block_pattern_torch(ids, block_bytes, seed)


def mismatched_blocks_torch(got, block_ids, block_bytes: int, seed: int, chunk_blocks: int = 2048) -> int:
    """``mismatched_blocks`` for torch tensors (``got`` [n, block_bytes] uint8, ``block_ids`` int64),
    computed on ``got``'s device."""
    if tuple(got.shape) != (int(block_ids.numel()), block_bytes):
        raise ValueError(f"shape {tuple(got.shape)} != expected {(int(block_ids.numel()), block_bytes)}")
    bad = 0
    for start in range(0, got.shape[0], chunk_blocks):
        stop = min(start + chunk_blocks, got.shape[0])
        expected = block_pattern_torch(block_ids[start:stop], block_bytes, seed)
        bad += int((got[start:stop] != expected).any(dim=1).sum().item())
    return bad
