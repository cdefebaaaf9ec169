"""Bulk data path: a stream of chunks over a UCX data endpoint, pipelined.

The source packs chunk k+1 (worker thread) while chunk k is on the wire; the sink has up to
`slots` receives posted and unpacks finished chunks in worker threads while later ones arrive.
A chunk lying inside one contiguous run moves zero-copy on that side. Staging memory is a
fixed pool of slots per agent and device, so memory stays bounded however many transfers run.

Data endpoints are made per transfer from the peer's worker address with UCX peer error
handling *off* (which keeps UCX's shared-memory transports, ~10x faster here than the tcp
that error handling forces); a dead peer is detected on the control channel, and aborting the
per-transfer endpoint cancels that transfer's UCX requests that have not matched a message yet.

A receive that has already matched its message (a rendezvous, or an eager message of several
fragments, part-way in) cannot be cancelled at all: not by aborting the endpoint, not by the
worker (ucp_request_cancel only removes a receive that is still waiting to match). If its
sender stops (SIGSTOP, a hung process), it waits for the sender, and when the sender runs again
it writes the rest of the message into its buffer and completes. So the initiator of a read
(`StagedReceiver`) never receives into the caller's memory: every chunk lands in a staging slot
of ours and is unpacked in a thread, which stops (and is waited for) on abort. A receive still
stranded after abort then holds only a staging slot, which is retired (StagingPool.retire), and
the read reports its error at its deadline. The owner's side keeps zero-copy chunks: the memory
is a lease it holds until its stranded operations end (`token.lingering`).

The mirror case: on an endpoint with UCX peer error handling (no shared memory, so a network
socket may carry it), a send blocks for as long as its peer does not read. The sending side of
such an endpoint stages every chunk, so a blocked send holds a staging slot and never the
transfer's memory, and it does not abort the endpoint under a blocked send: the endpoint is
aborted once the send ends (dataeps.abort_when_idle; UCX 1.21's tcp transport can crash on the
abort otherwise).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from typing import Any

import torch

from . import packing
from .descs import Descs
from .errors import PeerLost, TransferCancelled, TransferError, TransferTimeout
from .dataeps import abort_endpoint
from .plan import StreamPlan

log = logging.getLogger(__name__)

QUARANTINE_GRACE_S = 10.0
PEER_GONE_GRACE_S = 1.0
# After an abort, how long a UCX operation that touches only a staging slot gets to confirm its
# cancel before its slot is retired (no memory of the caller is at stake, so no longer wait).
STAGED_SETTLE_S = 0.25


class CancelToken:
    """Set to stop a transfer; `error` says why (cancelled by the caller, peer lost...)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.error: TransferError | None = None
        self.lingering: list[asyncio.Task] = []  # data-path operations that outlived an abort

    def set(self, error: TransferError) -> None:
        if not self._event.is_set():
            self.error = error
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


class StagingPool:
    """`slots` staging buffers of `slot_bytes` on one device, handed out in FIFO order.

    A slot that a stranded UCX operation still holds after an abort is *retired*: it never comes
    back, and a fresh slot takes its place, up to `max_retired` (then the pool shrinks, and says
    so), so one dead peer cannot starve every later transfer of staging memory."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int, max_retired: int | None = None):
        self.device = device
        self.slot_bytes = slot_bytes
        self.slots = slots
        self.max_retired = slots if max_retired is None else max_retired
        self._retired: set[int] = set()
        self.retired_total = 0
        self._q: asyncio.Queue[torch.Tensor] = asyncio.Queue()
        for _ in range(slots):
            self._q.put_nowait(self._new())

    def _new(self) -> torch.Tensor:
        return torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)

    async def get(self) -> torch.Tensor:
        return await self._q.get()

    def put(self, t: torch.Tensor) -> None:
        if id(t) in self._retired:
            self._retired.discard(id(t))  # its stranded operation ended: let the memory go
            return
        self._q.put_nowait(t)

    def stranded(self) -> int:
        """Retired slots that their stranded operation still holds."""
        return len(self._retired)

    def retire(self, t: torch.Tensor) -> bool:
        """`t` stays with a stranded operation; replace it if the bound allows."""
        self._retired.add(id(t))
        self.retired_total += 1
        if len(self._retired) > self.max_retired:
            log.error("staging pool %s: %d slots stranded by dead peers; not replacing more", self.device,
                      len(self._retired))
            return False
        self._q.put_nowait(self._new())
        return True


# A host chunk this small is copied out of its staging slot on the event loop, not in a thread.
INLINE_UNSTAGE_BYTES = 64 << 10


def as_ucx_buffer(t: torch.Tensor) -> Any:
    """ucxx takes numpy (host) or __cuda_array_interface__ objects (device)."""
    return t.numpy() if t.device.type == "cpu" else t


def _sync_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()


def _pack_sync(descs: Descs, unit: int, cp, slot: torch.Tensor, stream) -> torch.Tensor:
    if stream is None:
        return packing.pack(descs, unit, cp, slot)
    with torch.cuda.stream(stream):
        out = packing.pack(descs, unit, cp, slot)
    stream.synchronize()
    return out


def _unpack_sync(descs: Descs, unit: int, cp, slot: torch.Tensor, stream) -> None:
    if stream is None:
        packing.unpack(descs, unit, cp, slot)
        return
    with torch.cuda.stream(stream):
        packing.unpack(descs, unit, cp, slot)
    stream.synchronize()


def _copy_in_sync(dst: torch.Tensor, src: torch.Tensor, stream) -> None:
    if stream is None:
        dst.copy_(src)
        return
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
    stream.synchronize()


class StreamIO:
    """Shared machinery of one side of one transfer.

    Each chunk task is either waiting (for its turn or a staging slot), or busy in an operation
    that touches memory (pack/unpack in a worker thread, or a UCX send/receive). On abort, the
    endpoint is aborted first (UCX then cancels the requests that have not matched a message;
    a sender whose sends may block keeps it open for them instead: dataeps.abort_when_idle),
    waiting tasks are cancelled, and busy ones are awaited: a UCX operation on a staging slot
    for STAGED_SETTLE_S (then its slot is retired), any other (a thread, or a zero-copy UCX
    operation on the transfer's memory) up to the grace (QUARANTINE_GRACE_S). Any still busy
    after that are left in `token.lingering`, and whoever owns the memory they touch must keep it
    until they end. No chunk task touches the transfer's memory after the abort began, except
    the operations it waits for or leaves lingering.
    """

    sends = False  # the sending side of the stream (Sender)

    def __init__(self, ep: Any, plan: StreamPlan, pool: StagingPool, executor: Executor,
                 tag_base: int, stream=None, sends_may_block: bool = False):
        """`sends_may_block`: the endpoint may carry the data over a network socket (UCX peer
        error handling is on, so no shared memory), where a send can block for as long as the
        peer does not read. The sending side then stages every chunk, so that a blocked send
        holds a staging slot and never the transfer's memory, and keeps the endpoint open until
        its blocked sends end (dataeps.abort_when_idle says why)."""
        if plan.chunk_bytes > pool.slot_bytes:
            raise TransferError(f"chunk {plan.chunk_bytes} larger than staging slot {pool.slot_bytes}")
        self.ep = ep
        self.plan = plan
        self.pool = pool
        self.executor = executor
        self.tag_base = tag_base
        self.stream = stream
        self.sends_may_block = sends_may_block
        self.tasks: list[asyncio.Task] = []
        self.aborted = False
        # after an abort that left the endpoint open: the operations it waits for (maybe none);
        # the owner of the endpoint hands it to dataeps.abort_when_idle. None: nothing deferred.
        self.endpoint_busy: list[asyncio.Task] | None = None
        self._busy: set[asyncio.Task] = set()
        self._order = asyncio.Lock()  # take turns in chunk order so the pipeline fills front to back
        # At most this many chunks of the transfer have a UCX operation posted, zero-copy ones
        # included: a peer that dies can leave only that many requests behind in UCX.
        self._window = asyncio.Semaphore(max(2, pool.slots))
        self._token: CancelToken | None = None
        self._slots: dict[asyncio.Task, torch.Tensor] = {}  # staging slot held by each busy chunk task
        self._staged_ucx: set[asyncio.Task] = set()  # busy in a UCX operation on a staging slot only

    @contextlib.asynccontextmanager
    async def _turn(self, staged: bool):
        """A place in the window, in chunk order, plus a staging slot when the chunk is staged."""
        async with self._order:
            await self._window.acquire()
            try:
                slot = await self.pool.get() if staged else None
            except BaseException:
                self._window.release()
                raise
        if slot is not None:
            self._slots[asyncio.current_task()] = slot
        try:
            if self.aborted:
                raise TransferCancelled("transfer aborted")
            yield slot
        finally:
            if slot is not None:
                self._slots.pop(asyncio.current_task(), None)
                self.pool.put(slot)
            self._window.release()

    async def _busy_op(self, aw, staged_ucx: bool = False):
        """Run `aw`, an operation on memory (`staged_ucx`: a UCX operation on a staging slot only),
        unless the transfer was aborted: after that no new operation starts."""
        if self.aborted:
            if asyncio.iscoroutine(aw):
                aw.close()
            raise TransferCancelled("transfer aborted")
        task = asyncio.current_task()
        self._busy.add(task)
        if staged_ucx:
            self._staged_ucx.add(task)
        try:
            return await aw
        finally:
            self._busy.discard(task)
            self._staged_ucx.discard(task)

    async def _in_thread(self, fn, *args):
        # Checked before the work is handed to a thread: a chunk whose receive ends after the
        # abort (its sender ran again) must not unpack into the caller's memory.
        if self.aborted:
            raise TransferCancelled("transfer aborted")
        return await self._busy_op(asyncio.get_running_loop().run_in_executor(self.executor, fn, *args))

    async def _unstage(self, descs: Descs, cp, slot: torch.Tensor, view: torch.Tensor) -> None:
        """Copy a received chunk from its staging slot into the transfer's memory: a small host
        chunk on the loop (a memcpy of at most INLINE_UNSTAGE_BYTES, less work than handing it to
        a thread), anything else in a thread. Never after an abort (see `_in_thread`)."""
        if cp.nbytes <= INLINE_UNSTAGE_BYTES and self.stream is None and slot.device.type == "cpu":
            if self.aborted:
                raise TransferCancelled("transfer aborted")
            if cp.contiguous is not None:
                packing.contiguous_view(descs, cp).copy_(view)
            else:
                packing.unpack(descs, self.plan.unit, cp, slot)
        elif cp.contiguous is not None:
            await self._in_thread(_copy_in_sync, packing.contiguous_view(descs, cp), view, self.stream)
        else:
            await self._in_thread(_unpack_sync, descs, self.plan.unit, cp, slot, self.stream)

    async def _run_all(self, make_task, deadline: float, cancel: "CancelToken") -> None:
        loop = asyncio.get_running_loop()
        self._token = cancel
        self.tasks = [loop.create_task(make_task(k)) for k in range(self.plan.num_chunks)]
        if not self.tasks:
            return
        gather = asyncio.gather(*self.tasks)
        canceller = loop.create_task(cancel.wait())
        try:
            remaining = deadline - loop.time()
            done, _ = await asyncio.wait({gather, canceller}, timeout=max(0.0, remaining),
                                         return_when=asyncio.FIRST_COMPLETED)
            if gather in done:
                gather.result()
                return
            if canceller in done:
                raise cancel.error or TransferCancelled("transfer cancelled")
            raise TransferTimeout("transfer did not finish before its deadline")
        except BaseException as e:
            # A dead peer cannot touch our memory any more: its lingering requests need no long wait.
            await self.abort(PEER_GONE_GRACE_S if isinstance(cancel.error, PeerLost) else QUARANTINE_GRACE_S)
            if isinstance(e, (TransferError, asyncio.CancelledError)):
                raise
            raise PeerLost(f"data path failed: {type(e).__name__}: {e}") from None
        finally:
            canceller.cancel()
            if gather.done():
                _retrieve(gather)
            else:  # a lingering operation: its outcome no longer matters
                gather.add_done_callback(_retrieve)

    async def abort(self, grace_s: float = 10.0) -> None:
        """Cancel this transfer's UCX requests and wait (bounded) until the data path has let go
        of every buffer; operations still running after that are left in `token.lingering`.
        The sending side of an endpoint whose sends may block leaves the endpoint open while
        sends are in UCX: it lists those still running after the grace in `endpoint_busy`, and
        the owner of the endpoint aborts it once they end (dataeps.abort_when_idle)."""
        self.aborted = True
        deferred = self.sends and self.sends_may_block and bool(self._busy)
        if not deferred:
            await abort_endpoint(self.ep)
        for t in self.tasks:
            if not t.done() and t not in self._busy:
                t.cancel()
        pending = [t for t in self.tasks if not t.done()]
        if pending:
            loop = asyncio.get_running_loop()
            t_end = loop.time() + grace_s
            _, still = await asyncio.wait(pending, timeout=min(grace_s, STAGED_SETTLE_S))
            # Only operations that may touch the transfer's own memory are worth a longer wait.
            touching = [t for t in still if t not in self._staged_ucx]
            if touching and t_end > loop.time():
                await asyncio.wait(touching, timeout=t_end - loop.time())
            still = [t for t in still if not t.done()]
            if still:
                staged = sum(t in self._staged_ucx for t in still)
                if staged == len(still):
                    log.warning("%d UCX operation(s) on staging slots did not stop after abort (a send blocked "
                                "by its peer, or a matched receive waiting for its sender); their slots "
                                "are retired", staged)
                else:
                    log.error("%d chunk operation(s) did not stop after abort (%d on staging only); their "
                              "memory stays quarantined until they do", len(still), staged)
                for t in still:
                    slot = self._slots.pop(t, None)
                    if slot is not None:
                        self.pool.retire(slot)
                    t.add_done_callback(_lingering_ended)
                if self._token is not None:
                    # what may still touch the transfer's memory: an operation on a staging slot
                    # only (retired above) holds none of it, and unstages nothing after the abort
                    self._token.lingering = [t for t in still if t not in self._staged_ucx]
        for t in self.tasks:
            if t.done() and not t.cancelled():
                t.exception()  # mark retrieved
        if deferred:
            self.endpoint_busy = [t for t in self.tasks if not t.done()]


def _retrieve(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()  # mark retrieved


def _lingering_ended(t: asyncio.Task) -> None:
    _retrieve(t)  # its outcome no longer matters: the transfer failed already
    log.info("a chunk operation stranded by an abort has ended")


class Sender(StreamIO):
    sends = True

    async def run(self, descs: Descs, deadline: float, cancel: "CancelToken") -> None:
        plan = self.plan

        async def one(k: int) -> None:
            cp = plan.chunk(k)
            tag = self.tag_base + k
            async with self._turn(staged=cp.contiguous is None or self.sends_may_block) as slot:
                if slot is None:
                    buf = packing.contiguous_view(descs, cp)
                    if buf.device.type == "cuda":
                        await self._in_thread(_sync_device, buf)
                elif cp.contiguous is not None:  # staged only because the send may block
                    buf = slot.narrow(0, 0, cp.nbytes)
                    await self._in_thread(_copy_in_sync, buf, packing.contiguous_view(descs, cp), self.stream)
                else:
                    buf = await self._in_thread(_pack_sync, descs, plan.unit, cp, slot, self.stream)
                await self._busy_op(self.ep.send(as_ucx_buffer(buf), tag=tag, force_tag=True),
                                    staged_ucx=slot is not None)

        await self._run_all(one, deadline, cancel)


class Receiver(StreamIO):
    """Receives a transfer's chunks; a contiguous chunk zero-copy into the transfer's memory when
    `zero_copy` (the owner's side of a write: the lease is its memory, kept while a stranded
    receive lingers)."""

    zero_copy = True

    async def run(self, descs: Descs, deadline: float, cancel: "CancelToken") -> None:
        plan = self.plan

        async def one(k: int) -> None:
            cp = plan.chunk(k)
            tag = self.tag_base + k
            direct = self.zero_copy and cp.contiguous is not None
            async with self._turn(staged=not direct) as slot:
                if slot is None:
                    buf = packing.contiguous_view(descs, cp)
                    await self._busy_op(self.ep.recv(as_ucx_buffer(buf), tag=tag, force_tag=True))
                    return
                view = slot.narrow(0, 0, cp.nbytes)
                await self._busy_op(self.ep.recv(as_ucx_buffer(view), tag=tag, force_tag=True), staged_ucx=True)
                await self._unstage(descs, cp, slot, view)

        await self._run_all(one, deadline, cancel)


class StagedReceiver(Receiver):
    """The initiator's side of a read: the caller's memory is written only by unpack threads
    (which an abort waits for), never by UCX, so a receive stranded by a stopped sender cannot
    write it after the read has failed (see the module docstring)."""

    zero_copy = False
