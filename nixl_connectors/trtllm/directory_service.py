"""The worker's notification router and lease directory (both legs).

One background thread per worker is the only caller of ``Agent.notifications()``:

* directory lookups from generation workers are answered at once from `DirectoryTable`
  (the engine loop may be idle, so answers cannot wait for the next engine iteration);
* directory answers are handed to whoever waits for them (`AnswerMailbox`);
* release requests are queued for the engine thread;
* everything else (read-completion notifications) is queued for the lifecycle's
  `ProducerBook`, which sees it through `BookAgent.notifications()`.
"""
from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from . import directory as d

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.002
IDLE_INTERVAL_S = 0.01


@dataclass(frozen=True)
class _Entry:
    status: d.LeaseStatus
    lease_id: str = ""
    nbytes: int = 0


class DirectoryTable:
    """routing key -> lease status, shared by the engine thread and the router thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def pending(self, key: str) -> None:
        with self._lock:
            self._entries.setdefault(key, _Entry(d.LeaseStatus.PENDING))

    def ready(self, key: str, lease_id: str, nbytes: int) -> None:
        with self._lock:
            self._entries[key] = _Entry(d.LeaseStatus.READY, lease_id, int(nbytes))

    def failed(self, key: str) -> None:
        with self._lock:
            self._entries[key] = _Entry(d.LeaseStatus.FAILED)

    def remove(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def answer(self, lookup: d.Lookup) -> d.Answer:
        with self._lock:
            e = self._entries.get(lookup.key, _Entry(d.LeaseStatus.UNKNOWN))
        return d.Answer(lookup.key, lookup.nonce, e.status, e.lease_id, e.nbytes)


class AnswerMailbox:
    """Directory answers by nonce, for threads that wait on them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._answers: dict[int, d.Answer] = {}
        self._nonces = itertools.count(1)

    def new_nonce(self) -> int:
        return next(self._nonces)

    def put(self, answer: d.Answer) -> None:
        with self._cond:
            self._answers[answer.nonce] = answer
            self._cond.notify_all()

    def take(self, nonce: int, timeout: float) -> d.Answer | None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while nonce not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._answers.pop(nonce)

    def discard(self, nonce: int) -> None:
        with self._cond:
            self._answers.pop(nonce, None)


class BookAgent:
    """The agent as the lifecycle's `ProducerBook` sees it: notifications come from the router."""

    def __init__(self, agent: Any, inbox: "collections.deque[tuple[str, bytes]]"):
        self._agent = agent
        self._inbox = inbox

    def expose(self, *args: Any, **kw: Any) -> Any:
        return self._agent.expose(*args, **kw)

    def release(self, lease_id: str) -> Any:
        return self._agent.release(lease_id)

    def freed_leases(self) -> list[str]:
        return self._agent.freed_leases()

    def notifications(self) -> list[tuple[str, bytes]]:
        out = []
        while self._inbox:
            out.append(self._inbox.popleft())
        return out


class NotificationRouter:
    """Background thread that drains the agent's notifications and routes them."""

    def __init__(self, agent: Any, table: DirectoryTable, mailbox: AnswerMailbox, name: str):
        self._agent = agent
        self._table = table
        self._mailbox = mailbox
        self.book_inbox: collections.deque[tuple[str, bytes]] = collections.deque()
        self.releases: collections.deque[str] = collections.deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-router", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        idle = 0
        while not self._stop.is_set():
            try:
                notes = self._agent.notifications()
            except Exception as e:  # noqa: BLE001 - agent closed under us
                logger.debug("router stops: %s", e)
                return
            for peer_name, payload in notes:
                self._route(peer_name, payload)
            idle = 0 if notes else idle + 1
            self._stop.wait(POLL_INTERVAL_S if idle < 50 else IDLE_INTERVAL_S)

    def _route(self, peer_name: str, payload: bytes) -> None:
        if not d.is_directory_message(payload):
            self.book_inbox.append((peer_name, payload))
            return
        try:
            msg = d.decode(payload)
        except d.DirectoryMessageError as e:
            logger.warning("bad directory message from %s: %s", peer_name, e)
            return
        if isinstance(msg, d.Answer):
            self._mailbox.put(msg)
        elif isinstance(msg, d.Release):
            self.releases.append(msg.key)
        else:
            self._reply(peer_name, msg)

    def _reply(self, peer_name: str, lookup: d.Lookup) -> None:
        # Answer over the asker's own connection. Connecting back to `reply_to` would give the
        # asker a second connection under our name, which its agent treats as a reconnect.
        try:
            self._agent.notify(peer_name, d.encode(self._table.answer(lookup)))
        except Exception as e:  # noqa: BLE001 - the asker retries or times out
            logger.warning("cannot answer lookup of %s from %s: %s", lookup.key, peer_name, e)
