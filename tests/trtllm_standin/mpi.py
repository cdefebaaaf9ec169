"""Stand-in of MPI as TensorRT-LLM uses it: one rank per thread, real blocking collectives.

Each TP rank of a stand-in instance runs its executor loop on its own thread (TensorRT-LLM:
one process per rank). ``mpi_rank()`` is per thread, as it is per process in TensorRT-LLM;
`run_as_rank` gives a helper thread (the creator's construction pool) its rank's identity.

`RankGroup` implements ``mpi_broadcast`` (pickled, as mpi4py does) and ``mpi_allgather`` on a
barrier without a timeout: like MPI, a rank that never reaches a collective (it crashed) leaves
the others blocked in it forever. Tests detect that with their own deadline.
"""
from __future__ import annotations

import contextlib
import pickle
import threading
from typing import Any, Callable, Iterator, List, TypeVar

T = TypeVar("T")
_local = threading.local()


def mpi_rank() -> int:
    return getattr(_local, "rank", 0)


def mpi_world_size() -> int:
    return getattr(_local, "world", 1)


@contextlib.contextmanager
def as_rank(rank: int, world: int = 1) -> Iterator[None]:
    saved = (mpi_rank(), mpi_world_size())
    _local.rank, _local.world = rank, world
    try:
        yield
    finally:
        _local.rank, _local.world = saved


def run_as_rank(rank: int, world: int, fn: Callable[..., T], *args: Any) -> T:
    with as_rank(rank, world):
        return fn(*args)


class RankGroup:
    """Collectives among ``size`` rank threads."""

    def __init__(self, size: int):
        self.size = size
        self._barrier = threading.Barrier(size)
        self._slots: List[Any] = [None] * size

    def _wait(self) -> None:
        self._barrier.wait()   # no timeout: see module doc

    def allgather(self, rank: int, value: Any) -> List[Any]:
        if self.size == 1:
            return [pickle.loads(pickle.dumps(value))]
        self._slots[rank] = pickle.dumps(value)
        self._wait()
        out = [pickle.loads(s) for s in self._slots]
        self._wait()
        return out

    def broadcast(self, rank: int, value: Any) -> Any:
        """Rank 0's value, as every rank receives it (a pickled copy)."""
        return self.allgather(rank, value if rank == 0 else None)[0]

    def allreduce_sum(self, rank: int, value: float) -> float:
        total = 0.0
        for v in self.allgather(rank, value):   # rank order: the same sum on every rank
            total += v
        return total

    def abort(self) -> None:
        """Release ranks blocked in a collective (test clean-up of a hung instance)."""
        self._barrier.abort()
