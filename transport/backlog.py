"""Work handed to a caller's executor (`on_notify` / `on_call` with an executor), bounded.

An executor queues without limit, so a peer sending notifications or calls faster than the
callback runs would grow this process's memory without end. A Backlog counts what was handed
over and has not finished (items and payload bytes); past either bound it refuses with Busy,
which the sender of a NOTIFY or CALL gets back as its error, and a notification riding on a
finished read is dropped and counted, as when the polled queue is full.
"""
from __future__ import annotations

import concurrent.futures
import threading
from concurrent.futures import Executor
from typing import Any, Callable

from .errors import Busy


class Backlog:
    def __init__(self, what: str, max_count: int, max_bytes: int):
        self.what = what
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.count = 0
        self.nbytes = 0

    def submit(self, ex: Executor, fn: Callable[..., Any], nbytes: int, *args: Any) -> concurrent.futures.Future:
        """`ex.submit(fn, *args)`, counted until it finishes; Busy when the backlog is full."""
        with self._lock:
            if self.count >= self.max_count or self.nbytes + nbytes > self.max_bytes:
                raise Busy(f"{self.what} backlog full ({self.count} waiting or running, {self.nbytes} bytes)")
            self.count += 1
            self.nbytes += nbytes
        try:
            fut = ex.submit(fn, *args)
        except BaseException:   # an executor shut down: nothing was queued
            self._done(nbytes)
            raise
        fut.add_done_callback(lambda _f: self._done(nbytes))
        return fut

    def _done(self, nbytes: int) -> None:
        with self._lock:
            self.count -= 1
            self.nbytes -= nbytes
