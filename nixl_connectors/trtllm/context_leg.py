"""Context leg of the worker: expose a finished request's prompt blocks, hold them for a reader.

When TensorRT-LLM reports a request finished (``finished_gen_req_ids``) the worker exposes the
prompt blocks the scheduler's metadata named under one lease (lifecycle `ProducerBook`, keyed
by routing key) and publishes it in the `ContextDirectory`. The request's blocks go back to
TensorRT-LLM (``finished_saving``) once the lease has ended and no transfer touches them: read
(the reader's completion notification), released by the reader, or expired.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from ..handoff.lifecycle import ProducerBook
from .context_directory import ContextDirectory, InboxKind
from .metadata import SaveSpec
from .records import Phase, RequestRecord

logger = logging.getLogger(__name__)


class ContextLeg:
    def __init__(self, producer: ProducerBook, directory: ContextDirectory,
                 descs_of: Callable[[tuple[int, ...]], Any], wait_for_writes: Callable[[], None]):
        self._producer = producer
        self._dir = directory
        self._descs_of = descs_of
        self._wait_for_writes = wait_for_writes
        self._by_key: dict[str, RequestRecord] = {}   # index over records holding a key

    def on_save_spec(self, rec: RequestRecord, spec: SaveSpec) -> None:
        other = self._by_key.get(spec.key)
        if other is not None and other is not rec:
            # The scheduler gives a key to one request at a time; a second one holds nothing.
            logger.error("request %d reuses routing key %s of request %d; not exposing it",
                         rec.request_id, spec.key, other.request_id)
            rec.phase, rec.error = Phase.RELEASED, "duplicate routing key"
            return
        rec.save, rec.key = spec, spec.key
        self._by_key[spec.key] = rec
        self._dir.pending(spec.key)
        rec.phase = Phase.COMPUTING
        if rec.engine_finished:
            self.expose(rec)

    def on_dropped(self, rec: RequestRecord) -> None:
        """The request ended before its prompt was computed: nothing will be exposed."""
        self.forget(rec)

    def on_finished(self, rec: RequestRecord) -> None:
        rec.engine_finished = True
        if rec.phase is Phase.COMPUTING:
            self.expose(rec)

    def expose(self, rec: RequestRecord) -> None:
        spec = rec.save
        if spec is None:
            return
        if self._dir.released_early(spec.key):
            logger.info("request %d (%s): the reader gave up before it finished; holding nothing",
                        rec.request_id, spec.key)
            self._settle(rec)
            return
        try:
            self._wait_for_writes()
            held = self._producer.hold(spec.key, self._descs_of(spec.block_ids))
        except Exception as e:  # noqa: BLE001 - nothing exposed: the blocks go back at once
            logger.error("cannot expose blocks of request %d (%s): %s: %s", rec.request_id, spec.key,
                         type(e).__name__, e)
            rec.error = f"{type(e).__name__}: {e}"
            self._dir.failed(spec.key)
            rec.phase = Phase.RELEASED
            return
        rec.phase = Phase.HOLDING
        self._dir.ready(spec.key, held.lease_id, held.nbytes)
        logger.debug("request %d (%s): %d blocks under lease %s", rec.request_id, spec.key,
                     len(spec.block_ids), held.lease_id)

    def advance(self) -> None:
        """Apply readers' notifications and the transport's freed leases (engine thread)."""
        for item in self._dir.drain():
            if item.kind is InboxKind.READ_DONE:
                self._producer.on_notifications([(item.peer, item.key.encode("utf-8"))])
            else:
                logger.info("generation side released %s", item.key)
                self._producer.abort(item.key)
        for freed in self._producer.poll():
            rec = self._by_key.get(freed.request_id)
            if rec is None:
                continue
            logger.debug("request %d (%s) freed: %s", rec.request_id, freed.request_id, freed.reason.value)
            self._settle(rec)

    def _settle(self, rec: RequestRecord) -> None:
        rec.phase = Phase.RELEASED
        self._dir.remove(rec.key)
        if self._by_key.get(rec.key) is rec:
            del self._by_key[rec.key]

    def forget(self, rec: RequestRecord) -> None:
        if rec.key:
            self._dir.remove(rec.key)
            if self._by_key.get(rec.key) is rec:
                del self._by_key[rec.key]

    def close(self) -> None:
        self._producer.close()
