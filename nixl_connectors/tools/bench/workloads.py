"""Benchmark workloads (pure data)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum


class Memory(str, Enum):
    HOST = "host"
    CUDA = "cuda"


@dataclass(frozen=True)
class Workload:
    name: str
    block_bytes: int
    num_blocks: int
    scattered: bool = True
    memory: Memory = Memory.HOST
    pool_factor: int = 2       # pool holds pool_factor x num_blocks blocks on each side
    reps: int = 5

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.num_blocks

    def to_json(self) -> dict:
        d = asdict(self)
        d["memory"] = self.memory.value
        return d


# The headline workload of issue 2 / DESIGN.md: 16,384 random 16 KiB host blocks.
HEADLINE = Workload("scattered-16k-x16384", 16 << 10, 16384)

HOST_SWEEP = [
    HEADLINE,
    Workload("scattered-4k-x16384", 4 << 10, 16384),
    Workload("scattered-64k-x4096", 64 << 10, 4096),
    Workload("scattered-256k-x1024", 256 << 10, 1024),
    Workload("contiguous-16k-x16384", 16 << 10, 16384, scattered=False, pool_factor=1),
    Workload("small-request-32k-x64", 32 << 10, 64, reps=20),
]

QUICK = [Workload("quick-scattered-16k-x1024", 16 << 10, 1024, reps=3)]
