"""The context worker's lease directory, answered by push (no polling).

The engine thread records what it knows about each routing key (pending while the request
computes, ready once its blocks are exposed, failed, gone). Generation instances ask through
``Agent.call``: the handler runs on a small thread pool of its own (``on_call(...,
executor=...)``), answers at once for a known state and, for a pending key, waits on a
condition variable up to the asker's bound (a request that is finishing this very iteration
turns ready without another round trip). Notifications (``Agent.on_notify``) arrive on the
transport's loop thread: they are only queued here, for the engine thread, which owns the
lease book.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum

from . import directory as d

logger = logging.getLogger(__name__)

MAX_LOOKUP_WAIT_S = 10.0   # a lookup never holds a handler thread longer than this
HANDLER_THREADS = 4


class InboxKind(str, Enum):
    READ_DONE = "read_done"   # a reader confirmed it read the key's lease
    RELEASE = "release"       # a reader gives the key's lease back


@dataclass(frozen=True)
class InboxItem:
    kind: InboxKind
    key: str
    peer: str


@dataclass(frozen=True)
class _Entry:
    status: d.LeaseStatus
    lease_id: str = ""
    nbytes: int = 0
    released_early: bool = False   # a reader gave up before the lease existed: do not expose


class ContextDirectory:
    """routing key -> lease state, shared by the engine thread and the transport's threads."""

    def __init__(self, rank: int, name: str = "ctx"):
        self._rank = rank
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}
        self._inbox: collections.deque[InboxItem] = collections.deque()
        self._pool = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix=f"{name}-lookup")
        self._closed = False

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._pool

    # -- engine thread -------------------------------------------------------------------------
    def _set(self, key: str, entry: _Entry) -> None:
        with self._cond:
            self._entries[key] = entry
            self._cond.notify_all()

    def pending(self, key: str) -> None:
        with self._cond:
            if key not in self._entries:
                self._entries[key] = _Entry(d.LeaseStatus.PENDING)

    def ready(self, key: str, lease_id: str, nbytes: int) -> None:
        self._set(key, _Entry(d.LeaseStatus.READY, lease_id, int(nbytes)))

    def failed(self, key: str) -> None:
        self._set(key, _Entry(d.LeaseStatus.FAILED))

    def remove(self, key: str) -> None:
        with self._cond:
            self._entries.pop(key, None)
            self._cond.notify_all()

    def released_early(self, key: str) -> bool:
        with self._cond:
            e = self._entries.get(key)
            return e is not None and e.released_early

    def drain(self) -> list[InboxItem]:
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        return out

    # -- transport threads ---------------------------------------------------------------------
    def answer(self, lookup: d.Lookup) -> d.Answer:
        deadline = time.monotonic() + min(lookup.wait_ms / 1000.0, MAX_LOOKUP_WAIT_S)
        with self._cond:
            while True:
                e = self._entries.get(lookup.key)
                status = d.LeaseStatus.UNKNOWN if e is None else e.status
                left = deadline - time.monotonic()
                if status is not d.LeaseStatus.PENDING or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
        if e is None or e.status is not d.LeaseStatus.READY:
            return d.Answer(lookup.key, status, self._rank)
        return d.Answer(lookup.key, d.LeaseStatus.READY, self._rank, e.lease_id, e.nbytes)

    def on_call(self, peer: str, payload: bytes) -> bytes:
        """`Agent.on_call` handler (on this directory's executor): a `Lookup` -> its `Answer`."""
        msg = d.decode(payload)   # DirectoryMessageError reaches the caller as CallFailed
        if not isinstance(msg, d.Lookup):
            raise d.DirectoryMessageError(f"expected a lookup, got {type(msg).__name__}")
        ans = self.answer(msg)
        logger.debug("lookup of %s by %s: %s", msg.key, peer, ans.status.value)
        return d.encode(ans)

    def on_notify(self, peer: str, payload: bytes) -> None:
        """`Agent.on_notify` callback (transport loop thread: never blocks)."""
        if d.is_directory_message(payload):
            try:
                msg = d.decode(payload)
            except d.DirectoryMessageError as e:
                logger.warning("bad directory message from %s: %s", peer, e)
                return
            if not isinstance(msg, d.Release):
                logger.warning("unexpected %s notification from %s", type(msg).__name__, peer)
                return
            with self._cond:
                e = self._entries.get(msg.key)
                if e is not None and e.status is d.LeaseStatus.PENDING:
                    self._entries[msg.key] = _Entry(d.LeaseStatus.PENDING, released_early=True)
            self._inbox.append(InboxItem(InboxKind.RELEASE, msg.key, peer))
            return
        try:
            key = bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("ignoring undecodable notification from %s", peer)
            return
        self._inbox.append(InboxItem(InboxKind.READ_DONE, key, peer))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
