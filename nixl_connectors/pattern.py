"""Deterministic, cheaply verifiable block contents (pure numpy, no I/O).

Word w of block b of a pool filled with `seed` is b*K1 + w*K2 + seed (uint64), so any side can
check received bytes without a copy of the source.
"""
from __future__ import annotations

import numpy as np

K1 = np.uint64(0x9E3779B97F4A7C15)
K2 = np.uint64(0xBF58476D1CE4E5B9)


def block_words(block_ids: np.ndarray, words_per_block: int, seed: int) -> np.ndarray:
    b = np.asarray(block_ids, dtype=np.uint64).reshape(-1, 1)
    w = np.arange(words_per_block, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        return b * K1 + w * K2 + np.uint64(seed)


def fill_pool(pool: np.ndarray, seed: int, chunk_blocks: int = 1024) -> None:
    """Fill a [num_blocks, block_bytes] uint8 pool (block_bytes % 8 == 0) with the pattern."""
    if pool.ndim != 2 or pool.shape[1] % 8:
        raise ValueError("pool must be [num_blocks, block_bytes] with block_bytes a multiple of 8")
    words = pool.view(np.uint64)
    for s in range(0, pool.shape[0], chunk_blocks):
        e = min(s + chunk_blocks, pool.shape[0])
        words[s:e] = block_words(np.arange(s, e), words.shape[1], seed)


def count_bad_blocks(received: np.ndarray, src_block_ids: np.ndarray, seed: int,
                     chunk_blocks: int = 1024) -> int:
    """`received[i]` must equal source block src_block_ids[i]; returns how many do not."""
    words = received.view(np.uint64)
    bad = 0
    for s in range(0, len(src_block_ids), chunk_blocks):
        e = min(s + chunk_blocks, len(src_block_ids))
        exp = block_words(src_block_ids[s:e], words.shape[1], seed)
        bad += int(np.count_nonzero(np.any(words[s:e] != exp, axis=1)))
    return bad
