"""Connector metadata: what the rank-0 scheduler tells every worker each iteration.

TensorRT-LLM broadcasts the object returned by ``build_connector_meta`` to all ranks (pickled
by MPI), so these are plain frozen dataclasses of ints and strings. Every metadata object has a
sequence number: a worker consumes each one exactly once, even when TensorRT-LLM leaves an old
object bound (current ``handle_metadata`` returns early without re-binding when it has no
scheduler output) or binds the same one again.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveSpec:
    """(context side) One request's prompt blocks to expose once the request has finished.

    ``block_ids`` are this instance's block ids (pool dimension 0) in token order; they hold
    ``num_tokens`` prompt tokens (whole blocks only).
    """

    request_id: int
    key: str
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class RankLease:
    """Under which lease the context worker of ``rank`` holds the blocks, and their size."""

    rank: int
    lease_id: str
    nbytes: int


@dataclass(frozen=True)
class LoadSpec:
    """(generation side) One request's prompt blocks to pull, into ``block_ids``.

    ``leases`` has one entry per TP rank (found ready by the scheduler before it claimed the
    tokens). Empty ``leases`` means the claim could not be completed after TensorRT-LLM had
    already parked the request: the workers then hold it as failed (see docs/trtllm-notes.md).
    """

    request_id: int
    key: str
    block_ids: tuple[int, ...]
    num_tokens: int
    leases: tuple[RankLease, ...] = ()
    error: str = ""

    def lease_for(self, rank: int) -> RankLease | None:
        for lease in self.leases:
            if lease.rank == rank:
                return lease
        return None


@dataclass(frozen=True)
class ConnectorMetadata:
    """One iteration's instructions for the workers.

    seq: strictly increasing per scheduler; a worker ignores any seq it has consumed.
    saves: (context side) requests whose blocks the worker exposes once TensorRT-LLM reports
        the request finished (``finished_gen_req_ids``).
    loads: (generation side) pulls to start in ``start_load_kv``.
    dropped: (context side) requests whose save spec the worker forgets (ended before their
        prompt was computed).
    abandoned: (generation side) loading requests that ended without the connector being told
        through ``request_finished``: report them loaded once their pull has settled, so that
        TensorRT-LLM's loading entry (``has_pending_transfers``) clears and the blocks are freed.
    forget: (generation side) loads that finished and were scheduled again: drop their records.
    """

    seq: int = 0
    saves: tuple[SaveSpec, ...] = ()
    loads: tuple[LoadSpec, ...] = ()
    dropped: tuple[int, ...] = ()
    abandoned: tuple[int, ...] = ()
    forget: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.saves or self.loads or self.dropped or self.abandoned or self.forget)
