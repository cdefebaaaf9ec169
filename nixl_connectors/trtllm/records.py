"""One record per request on the worker side, with an enum state (pure).

A request's whole connector state on one rank is one `RequestRecord`: which leg it is on, its
`Phase`, the spec from the scheduler's metadata, and three facts TensorRT-LLM told the worker
(finished, loading started, loading reported). What ``get_finished`` returns is computed from
the records (`reportable`), so a request cannot be "in two places" at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .metadata import LoadSpec, SaveSpec
from .routing import Leg


class Phase(str, Enum):
    AWAITING_SPEC = "awaiting_spec"  # TensorRT-LLM spoke of it before the metadata describing it
    # context leg
    COMPUTING = "computing"          # blocks known, request still running
    HOLDING = "holding"              # blocks exposed under a lease
    # generation leg
    PULLING = "pulling"              # pull in flight into the request's blocks
    LOADED = "loaded"                # pull completed: the blocks hold the prompt's KV
    PARKED = "parked"                # no pull (failed, refused or cancelled); blocks untouched by us
    # context leg, final
    RELEASED = "released"            # lease ended and no transfer touches the blocks


@dataclass
class RequestRecord:
    request_id: int
    leg: Leg
    phase: Phase = Phase.AWAITING_SPEC
    key: str = ""
    save: SaveSpec | None = None
    load: LoadSpec | None = None
    engine_finished: bool = False     # in finished_gen_req_ids (request_finished returned True)
    loading_started: bool = False     # in started_loading_req_ids
    loading_reported: bool = False    # returned in finished_loading
    abandoned: bool = False           # loading request ended without request_finished (metadata)
    error: str = ""

    @property
    def transfer_in_flight(self) -> bool:
        return self.phase is Phase.PULLING

    @property
    def ended(self) -> bool:
        """TensorRT-LLM is done with the request (finished, cancelled or abandoned)."""
        return self.engine_finished or self.abandoned


@dataclass(frozen=True)
class Report:
    """What one record contributes to ``get_finished``, and whether it can be dropped."""

    saving: bool = False
    loading: bool = False
    drop: bool = False


def reportable(rec: RequestRecord) -> Report:
    """What to return for ``rec`` now (pure; the caller applies it)."""
    if rec.leg is Leg.CONTEXT:
        if rec.phase is Phase.RELEASED and rec.engine_finished:
            return Report(saving=True, drop=True)
        return Report()
    # generation leg: the blocks may be handed back only when no pull writes into them
    if rec.transfer_in_flight or rec.phase is Phase.AWAITING_SPEC:
        return Report()
    load_now = rec.loading_started and not rec.loading_reported and (
        rec.phase is Phase.LOADED or rec.ended)
    if rec.ended:
        return Report(saving=rec.engine_finished, loading=load_now, drop=True)
    return Report(loading=load_now)
