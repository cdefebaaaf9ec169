"""The process-wide runtime: one asyncio loop on a background thread, and (started only when a
transfer first needs it) one ucxx context.

ucxx keeps one application context per process, so every Agent in a process shares it and the
loop that drives it. UCX settings are passed to ucxx.init as options; the process environment
is never modified. Same-host transfers (process_vm_readv, CUDA IPC) and the control plane (our
own TCP connections) need no UCX at all.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
from typing import Any, Awaitable, Callable, TypeVar

from .config import TransportSet
from .errors import TransferTimeout

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
        self._ucx_lock: asyncio.Lock | None = None
        self.ucx_ready = False
        self.worker_address = b""
        self._thread.start()
        self._ready.wait()

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

    async def ensure_ucx(self) -> bytes:
        """Start UCX on first use; returns this process's worker address."""
        if self.ucx_ready:
            return self.worker_address
        if self._ucx_lock is None:
            self._ucx_lock = asyncio.Lock()
        async with self._ucx_lock:
            if not self.ucx_ready:
                await self._init_ucx()
        return self.worker_address

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
        self.worker_address = bytes(ucxx.get_worker_address().tobytes())
        self.ucx_ready = True
        log.info("UCX %s initialised (transports %s)", ".".join(map(str, ucxx.get_ucx_version())),
                 tls or "auto")

    @staticmethod
    def new_tag_base() -> int:
        """A random tag base (39 random bits above the chunk bits): a peer cannot guess the tags
        of another peer's transfer to this worker."""
        return (secrets.randbits(38) | 1 << 38) << TAG_CHUNK_BITS

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
        done, _ = concurrent.futures.wait([fut], timeout + 5.0)
        if not done:
            fut.cancel()
            raise TransferTimeout(f"operation did not finish within {timeout:.1f}s")
        return fut.result()  # the coroutine's own (typed) error, if it failed

    async def acall(self, coro: Awaitable[T]) -> T:
        """Await `coro` (which runs on the transport loop) from any asyncio loop."""
        if self.in_loop():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)
