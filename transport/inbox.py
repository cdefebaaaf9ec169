"""Notifications received by an agent: pushed to a callback, or queued (bounded) for polling."""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from typing import Callable

from .errors import Busy

log = logging.getLogger(__name__)

NotifyCallback = Callable[[str, bytes], None]


class Inbox:
    """Without a callback, notifications queue up to `max_count` entries / `max_bytes` payload
    bytes; `put` then raises Busy (the sender of a NOTIFY gets it back as an error; a payload
    riding on a finished read is dropped and counted by the caller)."""

    def __init__(self, max_bytes: int, max_count: int):
        self.max_bytes = max_bytes
        self.max_count = max_count
        self._lock = threading.Lock()
        self._queue: list[tuple[str, bytes]] = []
        self._bytes = 0
        self._cb: NotifyCallback | None = None
        self._executor: Executor | None = None
        self.dropped = 0

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
            self._deliver(cb, executor, peer, payload)

    @staticmethod
    def _deliver(cb: NotifyCallback, ex: Executor | None, peer: str, payload: bytes) -> None:
        if ex is not None:
            ex.submit(_run, cb, peer, payload)
        else:
            _run(cb, peer, payload)


def _run(cb: NotifyCallback, peer: str, payload: bytes) -> None:
    try:
        cb(peer, payload)
    except Exception:
        log.exception("notification callback failed")
