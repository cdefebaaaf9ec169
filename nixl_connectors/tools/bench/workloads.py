"""Benchmark workloads and how each is measured (pure data, no I/O).

Two kinds of measurement, applied the same way to ours and to NIXL in one run:

- THROUGHPUT: every rep moves a new random block set under a new lease (NIXL: a new transfer
  request over the same prepped descriptor lists); the result is the best rep, in GB/s, with
  median and p90 times beside it.
- LATENCY: one block set and one lease, read again and again (NIXL: the same prepped lists and
  block ids, a new transfer request each rep); the result is the median and p90 time of one
  request from post (``read()``) to completion (``wait()`` returning), in ms.

In both, the first ``warmup`` reps are run and discarded, the destination blocks are zeroed
before every rep and checked byte for byte after it (both outside the timing).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Memory(str, Enum):
    HOST = "host"
    CUDA = "cuda"


class Measure(str, Enum):
    THROUGHPUT = "throughput"
    LATENCY = "latency"


class BlockPolicy(str, Enum):
    """Which blocks each rep moves; the same policy is used for ours and for NIXL."""

    NEW_EACH_REP = "new random blocks and a new lease (NIXL: a new request) every rep"
    SAME_EVERY_REP = "the same blocks every rep: one lease read repeatedly (NIXL: same prepped lists and ids)"


@dataclass(frozen=True)
class Workload:
    name: str
    block_bytes: int
    num_blocks: int                   # blocks per request (in every layer)
    scattered: bool = True
    memory: Memory = Memory.HOST
    pool_factor: int = 2              # each side's pool holds pool_factor x num_blocks blocks per layer
    reps: int = 5                     # timed reps
    warmup: int = 1                   # reps run first and discarded
    measure: Measure = Measure.THROUGHPUT
    num_layers: int = 1               # one region per layer; a request has the same block ids in each
    kv_shape: tuple[int, ...] | None = None  # per-block bf16 shape of one layer (model-shaped pools)

    def __post_init__(self) -> None:
        if self.block_bytes <= 0 or self.block_bytes % 8:
            raise ValueError("block_bytes must be a positive multiple of 8")
        if min(self.num_blocks, self.pool_factor, self.reps, self.num_layers) < 1 or self.warmup < 0:
            raise ValueError("num_blocks, pool_factor, reps and num_layers must be >= 1, warmup >= 0")

    @property
    def nbytes(self) -> int:
        """Bytes of one request (all layers)."""
        return self.block_bytes * self.num_blocks * self.num_layers

    @property
    def pool_blocks(self) -> int:
        return self.num_blocks * self.pool_factor

    @property
    def policy(self) -> BlockPolicy:
        return BlockPolicy.SAME_EVERY_REP if self.measure is Measure.LATENCY else BlockPolicy.NEW_EACH_REP

    def to_json(self) -> dict:
        d = asdict(self)
        d["memory"] = self.memory.value
        d["measure"] = self.measure.value
        d["kv_shape"] = list(self.kv_shape) if self.kv_shape else None
        d["nbytes"] = self.nbytes
        d["block_policy"] = self.policy.value
        return d


# The headline workload of DESIGN.md: 16,384 random 16 KiB host blocks (256 MiB).
HEADLINE = Workload("scattered-16k-x16384", 16 << 10, 16384)

# Small requests (issue 13): latency of one request through the public API.
SMALL_REQUEST = Workload("small-request-32k-x64", 32 << 10, 64, pool_factor=16, reps=200, warmup=20,
                         measure=Measure.LATENCY)
ONE_BLOCK = Workload("one-block-16k", 16 << 10, 1, pool_factor=64, reps=200, warmup=20,
                     measure=Measure.LATENCY)

HEADLINE_SUITE = [HEADLINE, SMALL_REQUEST, ONE_BLOCK]

HOST_SWEEP = [
    HEADLINE,
    Workload("scattered-4k-x16384", 4 << 10, 16384),
    Workload("scattered-64k-x4096", 64 << 10, 4096),
    Workload("scattered-256k-x1024", 256 << 10, 1024),
    Workload("contiguous-16k-x16384", 16 << 10, 16384, scattered=False, pool_factor=1),
    SMALL_REQUEST,
    ONE_BLOCK,
]

QUICK = [Workload("quick-scattered-16k-x1024", 16 << 10, 1024, reps=3),
         Workload("quick-small-request-32k-x64", 32 << 10, 64, pool_factor=4, reps=20, warmup=5,
                  measure=Measure.LATENCY)]
