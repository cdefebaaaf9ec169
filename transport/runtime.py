"""The process-wide UCX runtime: one ucxx context, one asyncio loop on a background thread.

ucxx keeps one application context per process, so every Agent in a process shares it and the
loop that drives it. UCX settings are passed to ucxx.init as options; the process environment
is never modified.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from typing import Any, Awaitable, Callable, TypeVar

from .config import TransportSet
from .errors import TransferError, TransferTimeout

log = logging.getLogger(__name__)
T = TypeVar("T")

TAG_CHUNK_BITS = 24  # low bits of a data tag number the chunk; high bits the transfer


class Runtime:
    _instance: "Runtime | None" = None
    _lock = threading.Lock()

    def __init__(self, transports: TransportSet, ucx_options: dict[str, str] | None = None):
        self.transports = transports
        self.ucx_options = dict(ucx_options or {})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="nixl-transport-loop", daemon=True)
        self._ready = threading.Event()
        self._tag_counter = itertools.count(1)
        self._thread.start()
        self._ready.wait()
        self.call(self._init_ucx(), timeout=60.0)

    @classmethod
    def get(cls, transports: TransportSet, ucx_options: dict[str, str] | None = None) -> "Runtime":
        with cls._lock:
            if cls._instance is None:
                cls._instance = Runtime(transports, ucx_options)
            elif transports is not TransportSet.AUTO and cls._instance.transports is not transports:
                raise ValueError(f"this process's UCX context already uses transports "
                                 f"{cls._instance.transports.value!r}; cannot switch to {transports.value!r}")
            return cls._instance

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    async def _init_ucx(self) -> None:
        import ucxx  # imported lazily: importing transport must not start UCX

        # Rendezvous by the receiver pulling (cma / cuda_ipc get) over a single lane measured
        # fastest here (tcp lanes otherwise join the stripe and drag large messages down).
        options = {"WARN_UNUSED_ENV_VARS": "n", "RNDV_SCHEME": "get_zcopy", "MAX_RNDV_RAILS": "1"}
        options.update(self.ucx_options)
        tls = self.transports.ucx_tls()
        if tls:
            options["TLS"] = tls
        # Python-future completion: ucxx's notifier thread completes our awaits. Without it ucxx
        # awaits every request by re-scheduling itself on the loop (asyncio.sleep(0) polling), so
        # any pending receive (each control channel has one, always) keeps the loop thread busy
        # and holding the GIL: measured on 2 cores, that halved same-host read throughput and
        # burned a core per idle process.
        ucxx.init(options=options, enable_python_future=True)
        log.info("UCX %s initialised (transports %s)", ".".join(map(str, ucxx.get_ucx_version())),
                 tls or "auto")

    def new_tag_base(self) -> int:
        return next(self._tag_counter) << TAG_CHUNK_BITS

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Awaitable[T]) -> "concurrent.futures.Future[T]":
        if self.in_loop():
            raise RuntimeError("blocking transport call made from the transport's own loop; use the async API")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def call(self, coro: Awaitable[T], timeout: float) -> T:
        """Run `coro` on the loop and wait at most `timeout` seconds (+ a small grace, since the
        coroutine enforces its own deadline)."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout + 5.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TransferTimeout(f"operation did not finish within {timeout:.1f}s") from None

    async def acall(self, coro: Awaitable[T]) -> T:
        """Await `coro` (which runs on the transport loop) from any asyncio loop."""
        if self.in_loop():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


def wrap_ucx_error(e: BaseException, what: str) -> TransferError:
    from .errors import PeerLost

    if isinstance(e, TransferError):
        return e
    return PeerLost(f"{what}: {type(e).__name__}: {e}")
