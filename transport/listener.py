"""The agent's control listener: a TCP socket bound to exactly the configured address.

Unauthenticated connections are bounded in number (`max_pending_handshakes`; more are closed at
once) and in time (`handshake_timeout_s`), frames before authentication in size (64 KiB), and
no byte from such a connection reaches UCX: data endpoints are made only for authenticated
sessions, from worker addresses exchanged over their MAC'd control connection.

The listener accepts by itself rather than through `loop.create_server`: asyncio's server wraps
every accepted socket in a transport in a later loop iteration, so a flood held up to a whole
backlog of sockets (and file descriptors) before the bound could close them. Here a connection
over the bound is closed inside the accept call that took it: at any moment the process holds at
most `max_pending_handshakes` unauthenticated connections, whatever the loop's load.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Callable

from .conn import Conn
from .core import Core
from .errors import TransferError
from .handshake_io import server_handshake
from .session import Session

log = logging.getLogger(__name__)

BACKLOG = 256
ACCEPTS_PER_WAKE = 64              # accepts per readable event, so one flood cannot starve the loop
RESOURCE_PAUSE_S = 0.5             # out of descriptors or buffers: stop accepting this long
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind_listening_socket(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A non-blocking listening TCP socket on the first address `host` resolves to."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"no address to listen on for {host!r}")
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    def __init__(self, core: Core, handler, on_session: Callable[[Session], None]):
        self.core = core
        self.handler = handler
        self.on_session = on_session
        self.sock: socket.socket | None = None
        self.pending = 0
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock = bind_listening_socket(host, port)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)

    @property
    def port(self) -> int:
        if self.sock is None:
            raise RuntimeError("listener not started")
        return self.sock.getsockname()[1]

    def _on_readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                conn_sock, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in _RESOURCE_ERRNOS:
                    log.error("%s: cannot accept connections (%s); pausing %.1fs",
                              self.core.name, e, RESOURCE_PAUSE_S)
                    self._pause()
                else:
                    log.warning("%s: accept failed: %s", self.core.name, e)
                return
            if self.pending >= self.core.config.max_pending_handshakes:
                self.core.stats.connections_refused += 1
                conn_sock.close()
                continue
            self.pending += 1
            task = self._loop.create_task(self._serve(conn_sock))  # type: ignore[union-attr]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _pause(self) -> None:
        if self.sock is None or self._loop is None:
            return
        self._loop.remove_reader(self.sock.fileno())
        self._paused = self._loop.call_later(RESOURCE_PAUSE_S, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.sock is not None and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._on_readable)

    def _protocol(self) -> Conn:
        return Conn(f"{self.core.name}<-?", self.core.config.keepalive_s)

    async def _serve(self, conn_sock: socket.socket) -> None:
        """One admitted connection: wrap it, run the server handshake under its deadline."""
        try:
            try:
                _, conn = await self._loop.connect_accepted_socket(  # type: ignore[union-attr]
                    self._protocol, conn_sock)
            except OSError as e:
                self.core.stats.handshake_failures += 1
                log.warning("%s: could not take an accepted connection: %s", self.core.name, e)
                conn_sock.close()
                return
            except BaseException:
                conn_sock.close()
                raise
            try:
                await asyncio.wait_for(conn.connected(), self.core.config.handshake_timeout_s)
                session = await server_handshake(self.core, conn, self.handler)
            except (TransferError, asyncio.TimeoutError) as e:
                self.core.stats.handshake_failures += 1
                log.warning("%s: refused connection from %s: %s", self.core.name, conn.peer_addr,
                            e if isinstance(e, TransferError) else "handshake deadline passed")
                if isinstance(e, TransferError):
                    conn.send_error(0, e)
                conn.close_after_flush()
                return
            except asyncio.CancelledError:
                conn.close("listener closed")
                raise
            except Exception:
                log.exception("%s: handshake crashed", self.core.name)
                conn.close("handshake crashed")
                return
        finally:
            self.pending -= 1
        conn.label = f"{self.core.name}<-{session.name}"
        self.on_session(session)

    async def close(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for t in list(self._tasks):
            t.cancel()
