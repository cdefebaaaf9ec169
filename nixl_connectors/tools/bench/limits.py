"""What a transfer is compared with, measured in one process on this machine (host memory).

- ``contiguous_copy``: ``np.copyto`` of one contiguous buffer of the same size (the
  memory-bandwidth limit: no transfer of these bytes between two processes can beat it);
- ``scattered_copy_one_process``: the same blocks gathered into a touched staging buffer
  (``np.take``) and scattered into the destination pool (``dst[ids] = staging``), as a
  one-process gather/scatter would do it; a reference, not a limit.

Every buffer is written before timing (no page faults in the timed part); results are the
same ``Timings`` as the transfers (warm-up reps discarded). CUDA twins: ``cuda_limits.py``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .host_memory import host_pool
from .timing import Timings

log = logging.getLogger(__name__)

CONTIGUOUS = "contiguous_copy"
SCATTERED = "scattered_copy_one_process"
INDEX_COPY = "index_select_index_copy"  # CUDA (cuda_limits.py)
NAMES = {
    CONTIGUOUS: "contiguous copy of the same bytes (limit)",
    SCATTERED: "scattered copy in one process",
    INDEX_COPY: "index_select + index_copy_ in one process",
}


@dataclass(frozen=True)
class Reference:
    key: str           # CONTIGUOUS or SCATTERED (or a CUDA key, see cuda_limits.py)
    timings: Timings
    how: str           # what exactly was timed

    def to_json(self) -> dict[str, Any]:
        return {"name": NAMES.get(self.key, self.key), "how": self.how, **self.timings.to_json()}


def _timed(fn, reps: int, warmup: int) -> list[float]:
    if reps < 1 or warmup < 0:
        raise ValueError("reps must be >= 1 and warmup >= 0")
    out = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


def host_contiguous_copy(nbytes: int, reps: int = 5, warmup: int = 1) -> Reference:
    """``np.copyto`` of one contiguous ``nbytes`` buffer into another."""
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    src = host_pool((nbytes,), fill=1)
    dst = host_pool((nbytes,))
    secs = _timed(lambda _: np.copyto(dst, src), reps, warmup)
    if not np.array_equal(dst[:: max(1, nbytes // 4096)], src[:: max(1, nbytes // 4096)]):
        raise RuntimeError("contiguous copy reference did not copy")
    return Reference(CONTIGUOUS, Timings.of(secs, nbytes), "np.copyto of one contiguous buffer, best of reps")


def host_scattered_copy(block_bytes: int, num_blocks: int, pool_blocks: int | None = None,
                        reps: int = 5, warmup: int = 1, same_blocks: bool = False, seed: int = 0) -> Reference:
    """Gather ``num_blocks`` random blocks of a pool into a staging buffer and scatter them into
    random blocks of another pool (distinct ids on each side, as the two-process benchmarks use);
    ``same_blocks``: the same ids every rep (the latency workloads' policy)."""
    if block_bytes <= 0 or num_blocks <= 0:
        raise ValueError("block_bytes and num_blocks must be positive")
    pool_blocks = 2 * num_blocks if pool_blocks is None else pool_blocks
    if pool_blocks < num_blocks:
        raise ValueError(f"pool_blocks ({pool_blocks}) < num_blocks ({num_blocks})")
    rng = np.random.default_rng(seed)
    src = host_pool((pool_blocks, block_bytes), fill=1)
    dst = host_pool((pool_blocks, block_bytes))
    staging = host_pool((num_blocks, block_bytes))
    ids = [rng.permutation(pool_blocks)[:num_blocks] for _ in range(2 * (1 if same_blocks else warmup + reps))]

    def copy(i: int) -> None:
        k = 0 if same_blocks else 2 * i
        np.take(src, ids[k], axis=0, out=staging)
        dst[ids[k + 1]] = staging

    secs = _timed(copy, reps, warmup)
    how = "np.take into a staging buffer + dst[ids] = staging" + (", same blocks every rep" if same_blocks else "")
    return Reference(SCATTERED, Timings.of(secs, num_blocks * block_bytes), how)


def host_references(w: Any) -> dict[str, dict[str, Any]]:
    """Both host references for a Workload, as JSON entries; a failure is reported, not raised."""
    from .workloads import Measure

    latency = w.measure is Measure.LATENCY
    reps = w.reps if latency else max(5, w.reps)
    out: dict[str, dict[str, Any]] = {}
    jobs = {CONTIGUOUS: lambda: host_contiguous_copy(w.nbytes, reps, w.warmup),
            SCATTERED: lambda: host_scattered_copy(w.block_bytes, w.num_blocks * w.num_layers,
                                                   w.pool_blocks * w.num_layers, reps, w.warmup, latency)}
    for key, job in jobs.items():
        try:
            out[key] = job().to_json()
        except (MemoryError, ValueError, RuntimeError) as e:
            log.warning("reference %s failed for %s: %s", key, w.name, e)
            out[key] = {"name": NAMES[key], "error": f"{type(e).__name__}: {e}"}
    return out
