"""The one-process copy limit of a workload: the same bytes gathered and scattered in one process."""
from __future__ import annotations

import time

import numpy as np


def host_copy_limit(block_bytes: int, num_blocks: int, scattered: bool = True, reps: int = 5,
                    seed: int = 0) -> float:
    """Best GB/s of a numpy scattered copy (dst[dst_ids] = src[src_ids]) of the workload's bytes."""
    rng = np.random.default_rng(seed)
    pool = 2 * num_blocks if scattered else num_blocks
    src = np.ones((pool, block_bytes), dtype=np.uint8)
    dst = np.zeros((pool, block_bytes), dtype=np.uint8)
    if scattered:
        s_ids, d_ids = rng.permutation(pool)[:num_blocks], rng.permutation(pool)[:num_blocks]
    else:
        s_ids = d_ids = np.arange(num_blocks)
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        if scattered:
            dst[d_ids] = src[s_ids]
        else:
            dst[:num_blocks] = src[:num_blocks]
        best = min(best, time.perf_counter() - t0)
    return block_bytes * num_blocks / best / 1e9
