"""The agent's control listener: a TCP server bound to exactly the configured address.

Unauthenticated connections are bounded in number (`max_pending_handshakes`; more are closed at
once) and in time (`handshake_timeout_s`), frames before authentication in size (64 KiB), and
no byte from such a connection reaches UCX: data endpoints are made only for authenticated
sessions, from worker addresses exchanged over their MAC'd control connection.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from .conn import Conn
from .core import Core
from .errors import TransferError
from .handshake_io import server_handshake
from .session import Session

log = logging.getLogger(__name__)


class Listener:
    def __init__(self, core: Core, handler, on_session: Callable[[Session], None]):
        self.core = core
        self.handler = handler
        self.on_session = on_session
        self.server: asyncio.base_events.Server | None = None
        self.pending = 0
        self._tasks: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._protocol, host, port, reuse_address=True, backlog=256)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _protocol(self) -> Conn:
        conn = Conn(f"{self.core.name}<-?", self.core.config.keepalive_s)
        if self.pending >= self.core.config.max_pending_handshakes:
            self.core.stats.connections_refused += 1
            conn.refuse_on_connect = True
            return conn
        self.pending += 1
        task = asyncio.get_running_loop().create_task(self._handshake(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _handshake(self, conn: Conn) -> None:
        try:
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
            except Exception:
                log.exception("%s: handshake crashed", self.core.name)
                conn.close("handshake crashed")
                return
        finally:
            self.pending -= 1
        conn.label = f"{self.core.name}<-{session.name}"
        self.on_session(session)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self._tasks):
            t.cancel()
