"""Handles returned by read()/write(): wait synchronously, or await from any asyncio loop."""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Callable

from .errors import TransferCancelled, TransferError, TransferTimeout


@dataclass(frozen=True)
class Peer:
    """A connected peer, as returned by `Agent.connect`."""

    name: str
    address: str


_DONE: concurrent.futures.Future[None] = concurrent.futures.Future()
_DONE.set_result(None)   # (finished for good: every completed() transfer reads this one)


class Transfer:
    """One read or write in flight.

    `wait(timeout)` raises the transfer's typed error, or TransferTimeout if `timeout` passes
    first (the transfer itself keeps its own deadline, `AgentConfig.timeout_s` or the one given
    to read/write, and fails by itself when that passes). `cancel()` stops it; the memory it
    touched is safe to reuse once `wait()` returns or raises (a running copy or kernel is
    waited for before the transfer reports its error).
    """

    def __init__(self, nbytes: int, schedule: Callable[[Callable[[], None]], None]):
        self._fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.nbytes = nbytes
        self._schedule = schedule                       # runs a callable on the transport loop
        self._abort: Callable[[TransferError], None] | None = None

    @classmethod
    def completed(cls, nbytes: int, schedule: Callable[[Callable[[], None]], None]) -> "Transfer":
        """A transfer that already succeeded (a read served on the calling thread): it shares one
        finished future, so making it costs no lock or condition."""
        t = cls.__new__(cls)
        t._fut = _DONE
        t.nbytes = nbytes
        t._schedule = schedule
        t._abort = None
        return t

    # -- transport side (loop thread) --------------------------------------------------------
    def _attach(self, abort: Callable[[TransferError], None]) -> None:
        self._abort = abort

    def _finish(self, err: BaseException | None) -> None:
        if self._fut.done():
            return
        if err is None:
            self._fut.set_result(None)
        else:
            self._fut.set_exception(err)

    # -- caller side ---------------------------------------------------------------------------
    def done(self) -> bool:
        return self._fut.done()

    @property
    def error(self) -> BaseException | None:
        return self._fut.exception() if self._fut.done() else None

    def wait(self, timeout: float | None = None) -> None:
        if self._fut is _DONE:   # served on the calling thread: nothing to wait for
            return
        try:
            self._fut.result(timeout)  # the transfer's own typed error, if it failed
        except TimeoutError:
            if self._fut.done():
                raise  # the transfer's own deadline (TransferTimeout is a TimeoutError)
            raise TransferTimeout(f"transfer not finished after {timeout}s (it keeps running; "
                                  "wait again or cancel it)") from None

    def cancel(self) -> None:
        """Ask the transfer to stop; it then fails with TransferCancelled (unless it finished)."""
        if self._fut.done():
            return

        def run() -> None:
            if self._abort is not None:
                self._abort(TransferCancelled("transfer cancelled by caller"))
        self._schedule(run)

    def __await__(self):
        return asyncio.wrap_future(self._fut).__await__()
