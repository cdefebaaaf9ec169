"""Engine-agnostic request lifecycle of a KV hand-off over the transport.

Both engine adapters (vLLM, TensorRT-LLM) use these two books from their *worker* side,
where the `transport.Agent` lives. Nothing here imports an engine.

Producer side (`ProducerBook`, e.g. the prefill worker)
    A finished request's blocks are exposed under one lease per worker. The engine must not
    reuse those blocks until the book says so. The book ends a lease when
      * the reader's completion notification arrives (`notify` payload = request id),
      * the engine aborts the request (`abort`), or
      * the transport expires it (TTL passed without a `renew` from the reader);
    and it reports the request as *freeable* only once the transport lists the lease in
    `Agent.freed_leases()`, i.e. no transfer is still touching its blocks. An aborted request
    whose lease is being read is therefore quarantined until the read finishes or fails.

Consumer side (`ConsumerBook`, e.g. the decode worker)
    A pending pull names a peer address, a lease id and the local destination descriptors.
    The book connects (one `Peer` per address, cached), starts `Agent.read`, renews the lease
    while the pull has not started yet, and `poll()` sorts pulls into done and failed.
    Failed pulls carry their local block ids so the engine can mark them as load errors.

All calls are non-blocking except `ConsumerBook.start` work, which runs on a small
thread pool so that a slow or dead peer never stalls the engine step.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

from transport.errors import CompatMismatch, PeerLost, ProtocolMismatch, Unauthorized

logger = logging.getLogger(__name__)

# failures after which a cached connection to that peer is not reused
_PEER_UNUSABLE = (PeerLost, ProtocolMismatch, CompatMismatch, Unauthorized)


_READER_SEP = "\x1f"


def read_done_payload(request_id: str, reader: int = 0, readers: int = 1) -> bytes:
    """Notification payload a reader sends with its completed read. With several readers of one
    lease (e.g. two decode TP ranks reading the heads of one prefill rank), the owner releases
    the lease once all `readers` distinct readers have reported; one reader sends the plain id."""
    if readers <= 1:
        return request_id.encode("utf-8")
    if not 0 <= reader < readers:
        raise ValueError(f"reader {reader} out of range for {readers} readers")
    return f"{request_id}{_READER_SEP}{reader}/{readers}".encode("utf-8")


def parse_read_done(text: str) -> tuple[str, int, int]:
    """(request id, reader, readers) of a payload; a plain id is (id, 0, 1)."""
    rid, sep, tail = text.rpartition(_READER_SEP)
    if sep:
        a, slash, b = tail.partition("/")
        if slash and a.isdigit() and b.isdigit() and 0 <= int(a) < int(b):
            return rid, int(a), int(b)
    return text, 0, 1


class LeaseEnd(str, Enum):
    """Why a producer lease ended."""

    READ = "read"          # the reader confirmed completion
    ABORTED = "aborted"    # the engine aborted the request
    EXPIRED = "expired"    # TTL passed without a renewal
    FAILED = "failed"      # expose itself failed; nothing was ever exposed


@dataclass
class HeldRequest:
    """One request whose blocks a producer holds under a lease."""

    request_id: str
    lease_id: str | None
    nbytes: int
    exposed_at: float
    ended: LeaseEnd | None = None
    readers_done: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class FreedRequest:
    """A request whose blocks the engine may reuse now, and why."""

    request_id: str
    reason: LeaseEnd


class ProducerBook:
    """Tracks leases over finished requests' blocks on the owner side.

    `agent` is a `transport.Agent` (only expose/release/freed_leases/notifications are used).
    """

    def __init__(self, agent: Any, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self._agent = agent
        self._ttl_s = ttl_s
        self._clock = clock
        self._held: dict[str, HeldRequest] = {}
        self._by_lease: dict[str, str] = {}
        self._freed: list[FreedRequest] = []

    def hold(self, request_id: str, descs: Any) -> HeldRequest:
        """Expose `descs` under a fresh lease for `request_id` (any authenticated peer may read)."""
        if request_id in self._held:
            return self._held[request_id]
        lease = self._agent.expose(descs, peer=None, ttl_s=self._ttl_s)
        held = HeldRequest(request_id, lease.id, lease.nbytes, self._clock())
        self._held[request_id] = held
        self._by_lease[lease.id] = request_id
        logger.debug("holding %s under lease %s (%d bytes)", request_id, lease.id, lease.nbytes)
        return held

    def hold_nothing(self, request_id: str) -> None:
        """Record a request that has nothing to expose (e.g. zero blocks): freeable at once."""
        self._freed.append(FreedRequest(request_id, LeaseEnd.FAILED))

    def lease_id(self, request_id: str) -> str | None:
        held = self._held.get(request_id)
        return held.lease_id if held else None

    def abort(self, request_id: str) -> None:
        """End the request's lease early; its blocks become freeable once no read touches them."""
        held = self._held.get(request_id)
        if held is None or held.ended is not None:
            return
        held.ended = LeaseEnd.ABORTED
        self._release(held)

    def _release(self, held: HeldRequest) -> None:
        try:
            self._agent.release(held.lease_id)
        except Exception as e:  # already expired / unknown: freed_leases() reports it anyway
            logger.debug("release of lease %s: %s", held.lease_id, e)

    def on_notifications(self, notes: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        """Consume read-completion notifications (payload = request id). Returns the others."""
        others = []
        for peer_name, payload in notes:
            try:
                rid, reader, readers = parse_read_done(payload.decode("utf-8"))
            except UnicodeDecodeError:
                others.append((peer_name, payload))
                continue
            held = self._held.get(rid)
            if held is None:
                others.append((peer_name, payload))
                continue
            held.readers_done.add(reader)
            if held.ended is None and len(held.readers_done) >= readers:
                held.ended = LeaseEnd.READ
                self._release(held)
        return others

    def poll(self) -> list[FreedRequest]:
        """Drain the transport's freed leases; return requests whose blocks may now be reused."""
        notes = self._agent.notifications()
        rest = self.on_notifications(notes)
        for peer_name, payload in rest:
            logger.debug("ignoring notification %r from %s", payload[:64], peer_name)
        for lease_id in self._agent.freed_leases():
            rid = self._by_lease.pop(lease_id, None)
            if rid is None:
                continue
            held = self._held.pop(rid)
            reason = held.ended or LeaseEnd.EXPIRED
            if reason is LeaseEnd.EXPIRED:
                logger.warning("lease %s of request %s expired before it was read", lease_id, rid)
            self._freed.append(FreedRequest(rid, reason))
        out, self._freed = self._freed, []
        return out

    @property
    def held_ids(self) -> set[str]:
        return set(self._held)

    def close(self) -> None:
        for held in list(self._held.values()):
            if held.ended is None:
                held.ended = LeaseEnd.ABORTED
                self._release(held)


class PullState(str, Enum):
    QUEUED = "queued"        # waiting to connect/start
    READING = "reading"      # Agent.read in flight
    DONE = "done"
    FAILED = "failed"


@dataclass
class PendingPull:
    """One request's pull of a remote lease into local blocks."""

    request_id: str
    address: str
    lease_id: str
    local_descs: Any
    block_ids: Sequence[int]
    state: PullState = PullState.QUEUED
    started_at: float = 0.0
    future: Future | None = None
    transfer: Any = None
    error: BaseException | None = None
    nbytes: int = 0
    seconds: float = 0.0
    cancelled: bool = False
    ranges: Any = None       # [n, 2] (offset, length) into the lease's stream; None: all of it


@dataclass
class PollResult:
    done: list[PendingPull] = field(default_factory=list)
    failed: list[PendingPull] = field(default_factory=list)


class ConsumerBook:
    """Tracks pending pulls on the reader side.

    `agent` is a `transport.Agent` (connect/read/renew are used). `notify` payloads are the
    producer's request id so its `ProducerBook` can release the lease at once.
    """

    def __init__(self, agent: Any, ttl_s: float, max_workers: int = 2,
                 clock: Callable[[], float] = time.monotonic):
        self._agent = agent
        self._ttl_s = ttl_s
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ucx-pull")
        self._peers: dict[str, Any] = {}
        self._peer_lock = threading.Lock()
        self._pulls: dict[str, PendingPull] = {}

    def peer(self, address: str) -> Any:
        """Connected `Peer` for `address` (connects once; thread-safe)."""
        with self._peer_lock:
            p = self._peers.get(address)
        if p is not None:
            return p
        p = self._agent.connect(address)
        with self._peer_lock:
            self._peers.setdefault(address, p)
            return self._peers[address]

    def forget_peer(self, address: str) -> None:
        with self._peer_lock:
            self._peers.pop(address, None)

    def start(self, pull: PendingPull, notify: bytes) -> None:
        """Queue a pull: connect (cached) and start the read off the engine thread."""
        if pull.request_id in self._pulls:
            raise ValueError(f"pull for {pull.request_id} already pending")
        pull.started_at = self._clock()
        self._pulls[pull.request_id] = pull

        def _go() -> Any:
            peer = self.peer(pull.address)
            if pull.ranges is None:
                return self._agent.read(peer, pull.local_descs, pull.lease_id, notify=notify)
            return self._agent.read(peer, pull.local_descs, pull.lease_id, notify=notify,
                                    ranges=pull.ranges)

        pull.future = self._pool.submit(_go)

    def run_async(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the book's thread pool (e.g. a notification to a peer)."""
        return self._pool.submit(fn)

    def renew(self, address: str, lease_id: str) -> Future:
        """Heartbeat for a lease we have not started reading yet (runs off-thread)."""
        def _go() -> None:
            self._agent.renew(self.peer(address), lease_id, ttl_s=self._ttl_s)
        return self._pool.submit(_go)

    def poll(self) -> PollResult:
        """Advance pulls; return those that finished or failed since the last poll."""
        res = PollResult()
        for rid, pull in list(self._pulls.items()):
            if pull.state is PullState.QUEUED and pull.future is not None and pull.future.done():
                err = pull.future.exception()
                if err is not None:
                    self._fail(pull, err)
                else:
                    pull.transfer = pull.future.result()
                    pull.state = PullState.READING
                    if pull.cancelled:
                        self._cancel_transfer(pull)
            if pull.state is PullState.READING and pull.transfer.done():
                err = getattr(pull.transfer, "error", None)
                if err is None:
                    try:
                        pull.transfer.wait(timeout=0.0)
                    except Exception as e:  # noqa: BLE001 - any transfer failure is a load error
                        err = e
                if err is not None:
                    self._fail(pull, err)
                else:
                    pull.state = PullState.DONE
                    pull.nbytes = int(getattr(pull.transfer, "nbytes", 0))
                    pull.seconds = self._clock() - pull.started_at
            if pull.state is PullState.DONE:
                res.done.append(self._pulls.pop(rid))
            elif pull.state is PullState.FAILED:
                res.failed.append(self._pulls.pop(rid))
        return res

    def _fail(self, pull: PendingPull, err: BaseException) -> None:
        pull.state = PullState.FAILED
        pull.error = err
        pull.seconds = self._clock() - pull.started_at
        logger.warning("pull of %s from %s failed: %s: %s", pull.request_id, pull.address,
                       type(err).__name__, err)
        if isinstance(err, _PEER_UNUSABLE):
            self.forget_peer(pull.address)

    def cancel(self, request_id: str) -> None:
        """Cancel a pull (engine abort). It is still reported by `poll` once it settles."""
        pull = self._pulls.get(request_id)
        if pull is None:
            return
        pull.cancelled = True
        if pull.transfer is not None:
            self._cancel_transfer(pull)

    @staticmethod
    def _cancel_transfer(pull: PendingPull) -> None:
        try:
            pull.transfer.cancel()
        except Exception as e:  # noqa: BLE001
            logger.debug("cancel %s: %s", pull.request_id, e)

    @property
    def pending_ids(self) -> set[str]:
        return set(self._pulls)

    def close(self) -> None:
        for rid in list(self._pulls):
            self.cancel(rid)
        self._pool.shutdown(wait=False, cancel_futures=True)
