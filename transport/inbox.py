"""Notifications received by an agent: pushed to a callback, or queued (bounded) for polling."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from typing import Callable

from .backlog import Backlog
from .errors import Busy

log = logging.getLogger(__name__)

NotifyCallback = Callable[[str, bytes], None]


class Inbox:
    """Without a callback, notifications queue up to `max_count` entries / `max_bytes` payload
    bytes, and as many may wait for (or run in) a callback's executor; `put` then raises Busy (the
    sender of a NOTIFY gets it back as an error; a payload riding on a finished read is dropped and
    counted by the caller)."""

    def __init__(self, max_bytes: int, max_count: int):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._lock = threading.Lock()
        self._queue: list[tuple[str, bytes]] = []
        self._bytes = 0
        self._cb: NotifyCallback | None = None
        self._executor: Executor | None = None
        self.dropped = 0
        self.backlog = Backlog("notification callback", max_count, max_bytes)

    def put(self, peer: str, payload: bytes) -> None:
        cb, ex = self._cb, self._executor
        if cb is None:
            with self._lock:
                if self._cb is None:
                    if len(self._queue) >= self.max_count or self._bytes + len(payload) > self.max_bytes:
                        raise Busy(f"notification inbox full ({len(self._queue)} queued, {self._bytes} bytes)")
                    self._queue.append((peer, payload))
                    self._bytes += len(payload)
                    return
                cb, ex = self._cb, self._executor
        self._deliver(cb, ex, peer, payload)

    def put_or_drop(self, peer: str, payload: bytes) -> bool:
        try:
            self.put(peer, payload)
            return True
        except Busy as e:
            self.dropped += 1
            log.warning("notification from %s dropped: %s", peer, e)
            return False

    def drain(self) -> list[tuple[str, bytes]]:
        with self._lock:
            out, self._queue, self._bytes = self._queue, [], 0
        return out

    def set_callback(self, cb: NotifyCallback | None, executor: Executor | None) -> None:
        with self._lock:
            self._cb, self._executor = cb, executor
            queued = []
            if cb is not None:
                queued, self._queue, self._bytes = self._queue, [], 0
        for peer, payload in queued:
            try:
                self._deliver(cb, executor, peer, payload)
            except Busy as e:
                self.dropped += 1
                log.warning("queued notification from %s dropped: %s", peer, e)

    def _deliver(self, cb: NotifyCallback, ex: Executor | None, peer: str, payload: bytes) -> None:
        if ex is not None:   # bounded: a slow callback makes senders see Busy, not this process grow
            self.backlog.submit(ex, _run, len(payload), cb, peer, payload)
        else:
            _run(cb, peer, payload)


def _run(cb: NotifyCallback, peer: str, payload: bytes) -> None:
    try:
        cb(peer, payload)
    except Exception:
        log.exception("notification callback failed")
