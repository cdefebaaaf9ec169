"""How the rank-0 scheduler reaches its own process's worker (pure bookkeeping, no I/O).

TensorRT-LLM builds the scheduler (rank 0 only) and the worker of the same rank concurrently,
from the same ``llm_args`` object, and registers the KV pool with the worker before the first
request. The scheduler needs two things only the worker has: the transport agent (to ask the
context instance whether a hand-off is ready) and the pool's real geometry (tokens per block,
bytes per block). The worker publishes them here once its pool is registered; the scheduler
looks them up on first use. Neither constructor waits for the other.

Keyed by the ``llm_args`` object (held strongly while published, so its id cannot be reused):
several engines in one process (tests) each find their own worker.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class WorkerLink:
    """What a worker shares with the scheduler of its process."""

    rank: int
    agent: Any              # transport.Agent
    tokens_per_block: int   # the real value (from the layout TensorRT-LLM registered)
    block_bytes: int        # bytes of one block of this rank's pool


_lock = threading.Lock()
_links: dict[int, tuple[Any, dict[int, WorkerLink]]] = {}


def publish(llm_args: Any, link: WorkerLink) -> None:
    with _lock:
        _, ranks = _links.setdefault(id(llm_args), (llm_args, {}))
        ranks[link.rank] = link


def withdraw(llm_args: Any, rank: int) -> None:
    with _lock:
        entry = _links.get(id(llm_args))
        if entry is None:
            return
        entry[1].pop(rank, None)
        if not entry[1]:
            del _links[id(llm_args)]


def find(llm_args: Any, rank: int = 0) -> WorkerLink | None:
    with _lock:
        entry = _links.get(id(llm_args))
        return None if entry is None else entry[1].get(rank)
