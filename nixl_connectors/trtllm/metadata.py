"""Connector metadata: what the rank-0 scheduler tells every worker each iteration.

TensorRT-LLM broadcasts the object returned by ``build_connector_meta`` to all ranks (pickled
by MPI), so these are plain frozen dataclasses of ints and strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class HandoffSpec:
    """One request's prompt blocks that move between instances.

    ``block_ids`` are this instance's block ids (pool dimension 0) in token order; they hold
    ``num_tokens`` prompt tokens (whole blocks only).
    """

    request_id: int
    routing_key: str
    block_ids: tuple[int, ...]
    num_tokens: int


@dataclass(frozen=True)
class ConnectorMetadata:
    """One iteration's instructions for the workers.

    saves: (context side) requests whose blocks the worker exposes once the engine reports the
        request finished (``finished_gen_req_ids``).
    loads: (generation side) pulls to start in ``start_load_kv``.
    dropped: requests whose save spec the worker should forget (aborted before finishing).
    """

    saves: tuple[HandoffSpec, ...] = ()
    loads: tuple[HandoffSpec, ...] = ()
    dropped: tuple[int, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return bool(self.saves or self.loads or self.dropped)
