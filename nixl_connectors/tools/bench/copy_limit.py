"""The "limit" a transfer is compared with: a one-process numpy scattered copy of the same bytes."""

from __future__ import annotations

import logging
import time

import numpy as np

logger = logging.getLogger(__name__)


def local_copy_limit(
    block_bytes: int,
    num_blocks: int,
    pool_blocks: int | None = None,
    reps: int = 5,
    seed: int = 0,
) -> float:
    """Best-of-``reps`` GB/s (1e9 bytes/s) of ``dst[dst_ids] = src[src_ids]`` in one process.

    Both pools hold ``pool_blocks`` blocks (default ``2 * num_blocks``); block ids are random
    and distinct on both sides, as in the two-process benchmarks. Only the copy is timed.
    """
    if block_bytes <= 0 or num_blocks <= 0 or reps <= 0:
        raise ValueError("block_bytes, num_blocks and reps must be positive")
    pool_blocks = 2 * num_blocks if pool_blocks is None else pool_blocks
    if pool_blocks < num_blocks:
        raise ValueError(f"pool_blocks ({pool_blocks}) < num_blocks ({num_blocks})")
    rng = np.random.default_rng(seed)
    src = np.empty((pool_blocks, block_bytes), dtype=np.uint8)
    src.fill(1)  # touch every page before timing
    dst = np.empty((pool_blocks, block_bytes), dtype=np.uint8)
    dst.fill(0)
    best = float("inf")
    for _ in range(reps):
        src_ids = rng.choice(pool_blocks, num_blocks, replace=False)
        dst_ids = rng.choice(pool_blocks, num_blocks, replace=False)
        t0 = time.perf_counter()
        dst[dst_ids] = src[src_ids]
        best = min(best, time.perf_counter() - t0)
    gbps = num_blocks * block_bytes / best / 1e9
    logger.debug("local scattered copy %d x %d B: %.2f GB/s", num_blocks, block_bytes, gbps)
    return gbps
