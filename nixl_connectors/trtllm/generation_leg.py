"""Generation leg of the worker: pull a claimed hand-off into the request's blocks.

The scheduler claimed the hand-off only after every context rank answered READY, and its
metadata names this rank's lease; the worker starts the pull at once (lifecycle
`ConsumerBook`: connect once per context worker, ``Agent.read`` off the engine thread).

A pull that fails after TensorRT-LLM parked the request cannot be reported as a failure
(TensorRT-LLM's connector API has none) and must not be reported as loaded (the engine would
decode from garbage): the request stays PARKED, its blocks untouched by us, until TensorRT-LLM
ends it (cancel or timeout: ``request_finished`` on 1.2, the scheduler's ``abandoned`` list on
later versions). The context side is told at once (``Release``) so it gets its blocks back.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from transport import TransferError

from ..handoff.lifecycle import ConsumerBook, PendingPull
from . import directory as d
from .metadata import LoadSpec
from .records import Phase, RequestRecord

logger = logging.getLogger(__name__)


class GenerationLeg:
    def __init__(self, agent: Any, consumer: ConsumerBook, rank: int, address: str,
                 descs_of: Callable[[tuple[int, ...]], Any], notify_timeout_s: float):
        self._agent = agent
        self._consumer = consumer
        self._rank = rank
        self._address = address
        self._descs_of = descs_of
        self._notify_timeout_s = notify_timeout_s
        self._by_key: dict[str, RequestRecord] = {}   # index over records with a pull in flight
        self.failed_pulls = 0

    def on_load_spec(self, rec: RequestRecord, spec: LoadSpec) -> None:
        rec.load, rec.key = spec, spec.key
        lease = spec.lease_for(self._rank)
        if rec.ended:
            self._park(rec, "ended before its pull started")
            return
        if lease is None:
            self._park(rec, spec.error or f"no lease for rank {self._rank} in the claim")
            return
        if spec.key in self._by_key:
            self._park(rec, f"routing key {spec.key} is already being pulled")
            return
        try:
            descs = self._descs_of(spec.block_ids)
            if descs.nbytes != lease.nbytes:
                raise ValueError(f"lease holds {lease.nbytes} bytes, local blocks {descs.nbytes}")
            self._consumer.start(PendingPull(spec.key, self._address, lease.lease_id, descs,
                                             spec.block_ids), notify=spec.key.encode("utf-8"))
        except Exception as e:  # noqa: BLE001 - reported as this request's failed pull
            self._park(rec, f"pull not started: {type(e).__name__}: {e}")
            return
        rec.phase = Phase.PULLING
        self._by_key[spec.key] = rec

    def on_ended(self, rec: RequestRecord) -> None:
        """TensorRT-LLM ended the request: stop its pull (reported once it has settled)."""
        if rec.phase is Phase.PULLING:
            self._consumer.cancel(rec.key)
            self._release(rec.key)

    def advance(self) -> None:
        res = self._consumer.poll()
        for pull in res.done:
            rec = self._by_key.pop(pull.request_id, None)
            if rec is None:
                continue
            if rec.ended:
                rec.phase = Phase.PARKED   # settled; the data does not matter any more
            else:
                rec.phase = Phase.LOADED
                logger.debug("request %d (%s): %d bytes loaded in %.3fs", rec.request_id, rec.key,
                             pull.nbytes, pull.seconds)
        for pull in res.failed:
            rec = self._by_key.pop(pull.request_id, None)
            if rec is None:
                continue
            err = pull.error
            if rec.ended:
                rec.phase = Phase.PARKED
                continue
            self._park(rec, f"pull failed: {type(err).__name__}: {err}")
            self._release(rec.key)

    def _park(self, rec: RequestRecord, why: str) -> None:
        rec.phase, rec.error = Phase.PARKED, why
        if not rec.ended:
            self.failed_pulls += 1
            logger.error("request %d (%s): KV load failed after TensorRT-LLM claimed the tokens: %s. "
                         "It stays parked (no garbage KV is decoded) until TensorRT-LLM ends it "
                         "(client cancel / timeout).", rec.request_id, rec.key, why)

    def _release(self, key: str) -> None:
        """Give the context worker its blocks back now instead of at lease expiry."""
        payload = d.encode(d.Release(key))

        def _go() -> None:
            try:
                self._agent.notify(self._consumer.peer(self._address), payload,
                                   timeout=self._notify_timeout_s)
            except TransferError as e:
                logger.debug("release of %s not delivered (the lease expires): %s", key, e)

        self._consumer.run_async(_go)

    def close(self) -> None:
        self._consumer.close()
