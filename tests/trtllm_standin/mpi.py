"""Stand-in of ``tensorrt_llm._utils``'s rank query, with ranks simulated in one process.

The executor builds each rank's connector objects inside `as_rank(r)`, so code that asks
``tensorrt_llm._utils.mpi_rank()`` in its constructor (as TensorRT-LLM code does) gets ``r``.
With the real TensorRT-LLM installed, `as_rank` patches the real module's function the same way.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

_current = [0]


def mpi_rank() -> int:
    return _current[0]


def mpi_world_size() -> int:
    return 1


@contextlib.contextmanager
def as_rank(rank: int, utils_module: str = "tensorrt_llm._utils") -> Iterator[None]:
    mod = sys.modules.get(utils_module)
    saved_fn = getattr(mod, "mpi_rank", None) if mod is not None else None
    saved = _current[0]
    _current[0] = rank
    if mod is not None and saved_fn is not mpi_rank:
        mod.mpi_rank = mpi_rank
    try:
        yield
    finally:
        _current[0] = saved
        if mod is not None and saved_fn is not None and saved_fn is not mpi_rank:
            mod.mpi_rank = saved_fn
