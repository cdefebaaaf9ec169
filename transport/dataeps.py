"""Per-peer pool of data endpoints (UCX peer error handling off), one per transfer at a time.

A transfer borrows an endpoint and gives it back when it succeeded; a failed or cancelled
transfer aborts its endpoint instead, which cancels that transfer's UCX requests (the sending
side first waits for sends still blocked in UCX: `abort_when_idle`). Endpoints
given back stay in the pool until the session ends: closing one endpoint disturbs the other
endpoints between the same two workers (measured: after a burst of 32 concurrent reads, closing
the surplus made transfers of the next burst fail with "Request canceled"), so the pool grows to
the session's highest concurrency and no healthy endpoint is closed while the session lives.
(Aborting a failed transfer's endpoint has the same effect on the pair's other endpoints:
tests/faults/test_fault_ucx_endpoints.py, open.)
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# How long ucxx's blocking abort waits for each step it hands to the progress thread.
ABORT_PERIOD_NS = 1_000_000_000
SLOW_ABORT_S = 1.0


async def abort_endpoint(ep: Any) -> None:
    """Abort without blocking the event loop (ucxx's abort waits for its progress thread)."""
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        await loop.run_in_executor(None, lambda: ep.abort(period=ABORT_PERIOD_NS, max_attempts=1))
    except Exception as e:
        log.debug("endpoint abort failed: %s", e)
    took = time.monotonic() - t0
    if took >= SLOW_ABORT_S:
        log.warning("endpoint abort took %.2fs: UCX's progress thread was slow to take it (bound %.0fs a step)",
                    took, ABORT_PERIOD_NS * 1e-9)


# At most this many endpoints per agent wait in `abort_when_idle`; beyond that the oldest is
# aborted anyway (a peer stopped for good never drains its socket, and each parked endpoint keeps
# a socket open).
MAX_PARKED = 64


def abort_when_idle(ep: Any, sends: list[asyncio.Task], parked: dict[asyncio.Task, Any]) -> None:
    """Abort `ep` once `sends` (its sends that outlived a failed transfer) have ended; until then
    its closer is in `parked` (oldest first).

    Why not at once: aborting an endpoint whose tcp socket is blocked on writes (a partition, a
    peer that stopped reading) leaves UCX's tcp endpoint, with only its receive side, waiting
    for the socket. When the peer's own close arrives in the same wake-up as the socket turning
    writable, UCX 1.21 frees that endpoint on the receive and then runs its send progress on the
    freed memory (uct_tcp_cm_handle_conn_fin, then uct_tcp_iface_handle_events: SIGSEGV; seen
    after a partition healed). An endpoint that still sends keeps its send side, so the peer's
    close only ends its receive side; the blocked send ends when the socket drains, or fails when
    the peer resets it (after a partition heals) or TCP gives up on it (its retransmission
    timeout, about 15 minutes), and the abort after that finds nothing blocked. No time limit:
    aborting at one would bring the crash back to a partition that outlasts it."""
    if len(parked) >= MAX_PARKED:
        oldest = next(iter(parked))
        log.error("%d UCX endpoints kept open for blocked sends: aborting the oldest anyway", len(parked))
        oldest.cancel()  # its closer aborts its endpoint on the way out

    async def closer() -> None:
        try:
            left = [t for t in sends if not t.done()]
            if left:
                await asyncio.wait(left)
        finally:
            await abort_endpoint(ep)

    task = asyncio.get_running_loop().create_task(closer())
    parked[task] = ep
    task.add_done_callback(lambda t: parked.pop(t, None))


class DataEndpoints:
    """Endpoints to one peer's worker. `error_handling`: UCX peer error handling (on by default,
    and always for peers on other hosts: UCX then fails, rather than strands, the requests of a
    peer that dies; `AgentConfig(ucx_error_handling=False)` turns it off on one host, which
    allows shared memory)."""

    def __init__(self, worker_address: bytes, error_handling: bool):
        self._address = worker_address
        self.error_handling = error_handling
        self._idle: list[Any] = []
        self._closed = False

    async def borrow(self) -> Any:
        if self._idle:
            return self._idle.pop()
        import ucxx

        addr = ucxx.get_ucx_address_from_buffer(self._address)
        return await ucxx.create_endpoint_from_worker_address(addr, endpoint_error_handling=self.error_handling)

    async def give_back(self, ep: Any) -> None:
        if self._closed:
            await abort_endpoint(ep)
        else:
            self._idle.append(ep)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for ep in idle:
            await abort_endpoint(ep)
