"""Handles returned by read()/write(): wait synchronously, or await from any asyncio loop."""
from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

from .errors import TransferCancelled, TransferTimeout


@dataclass(frozen=True)
class Peer:
    """A connected peer, as returned by `Agent.connect`."""

    name: str
    address: str


class Transfer:
    """One read or write in flight.

    `wait(timeout)` raises the transfer's typed error, or TransferTimeout if `timeout` passes
    first (the transfer itself keeps its own deadline, `AgentConfig.timeout_s` or the one given
    to read/write, and fails by itself when that passes). `cancel()` stops it; the memory it
    touched is safe to reuse once `wait()` returns or raises.
    """

    def __init__(self, fut: "concurrent.futures.Future[None]", nbytes: int, cancel_cb):
        self._fut = fut
        self.nbytes = nbytes
        self._cancel_cb = cancel_cb

    def done(self) -> bool:
        return self._fut.done()

    @property
    def error(self) -> BaseException | None:
        if not self._fut.done():
            return None
        if self._fut.cancelled():
            return TransferCancelled("transfer cancelled")
        return self._fut.exception()

    def wait(self, timeout: float | None = None) -> None:
        try:
            self._fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TransferTimeout(f"transfer not finished after {timeout}s") from None
        except concurrent.futures.CancelledError:
            raise TransferCancelled("transfer cancelled") from None

    def cancel(self) -> None:
        """Ask the transfer to stop; it then fails with TransferCancelled (unless it finished)."""
        if not self._fut.done():
            self._cancel_cb()

    def __await__(self):
        return asyncio.wrap_future(self._fut).__await__()


