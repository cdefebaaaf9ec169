"""`Agent`: one endpoint of the transport (owner of leased blocks, reader/writer of peers').

Sync methods are for engine threads; each has an async twin (`a...`) for asyncio users. All
network work runs on the process-wide transport loop (runtime.py); the parts are wired here and
share state through an explicit `Core` (core.py).
"""
from __future__ import annotations

import asyncio
import errno
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable

from . import dispatch, gpu_direct, grant_push, grant_read, initiated, initiator, lanes, owner, pinned_tables, trace
from . import handshake as hs
from .config import AgentConfig, parse_hostport
from .conn import Conn
from .core import Core
from .dataplane import DataPlane
from .descs import Descs
from .errors import PeerLost, TransferError, TransferTimeout
from .handshake_io import NAME_RE, client_handshake
from .leases import Lease
from .listener import Listener
from .region import Region, make_region
from .runtime import Runtime
from .session import Session
from .stats import AgentStats
from .transfer import Peer, Transfer
from .wire import Msg

log = logging.getLogger(__name__)


def _ranges_bytes(ranges: Any, nbytes: int) -> bytes:
    import numpy as np

    r = np.asarray(ranges)
    if r.ndim != 2 or r.shape[1] != 2 or r.shape[0] == 0 or r.dtype.kind not in "iu":
        raise ValueError("ranges must be a non-empty [n, 2] integer array of (offset, length)")
    if r.dtype.kind == "u" and int(r.max()) >= 1 << 63:
        raise ValueError("ranges out of range")
    r = r.astype("<i8")
    if np.any(r[:, 1] <= 0) or np.any(r[:, 0] < 0):
        raise ValueError("ranges need offsets >= 0 and lengths > 0")
    if int(r[:, 1].astype(object).sum()) != nbytes:
        raise ValueError(f"ranges add up to {int(r[:, 1].astype(object).sum())} bytes, local descriptors to {nbytes}")
    return r.tobytes()


class Agent:
    """See docs/API.md and README for the full contract.

    Example (owner)::

        with Agent("prefill-0", AgentConfig(auth_key=b"k")) as a:
            lease = a.expose(Descs.from_blocks(a.register(kv), ids, block_bytes), ttl_s=30)
    """

    def __init__(self, name: str, config: AgentConfig | None = None):
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ValueError("agent name must be 1-200 characters of [A-Za-z0-9_.:@/+-]")
        self.name = name
        self.config = config or AgentConfig()
        self._rt = Runtime.get(self.config.transports, self.config.ucx_options)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"nixl-copy-{name}")
        core = Core(name, self.config, hs.new_instance(), self._rt, self._executor)
        core.data = DataPlane(name, self.config, self._executor, core.stats)
        self._core = core
        self.stats: AgentStats = core.stats
        self._closed = False
        self._sweeper: asyncio.Task | None = None
        self._host, port = parse_hostport(self.config.listen)
        self._listener = Listener(core, self._handle, self._adopt)
        self._lanes = lanes.LanePool(core)
        self._dialing: dict[str, asyncio.Task] = {}
        try:
            self._rt.call(self._listen(port), self.config.timeout_s)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    # ------------------------------------------------------------------ lifecycle
    async def _listen(self, port: int) -> None:
        try:
            await self._listener.start(self._host, port)
        except OSError as e:
            raise TransferError(f"cannot listen on {self.config.listen}: {e.strerror or e}") from None
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        log.info("agent %s listening on %s", self.name, self.address)

    @property
    def address(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self._listener.port}"

    def close(self) -> None:
        """Close every connection and the listener; in-flight transfers fail with PeerLost."""
        if self._closed:
            return
        self._closed = True
        self._lanes.close()
        try:
            self._rt.call(self._aclose(), 15.0)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._lanes.close()
            await self._rt.acall(self._aclose())
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _aclose(self) -> None:
        with self._core.lock:
            self._core.grants.close()
        for s in self._core.sessions.all():
            grant_read.flush_reports(s)
        if self._sweeper:
            self._sweeper.cancel()
        await self._listener.close()
        for s in self._core.sessions.all():
            s.close("agent closed")
        await asyncio.sleep(0)

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ sessions
    def _handle(self, s: Session, f) -> None:
        dispatch.handle(self._core, s, f)

    def _adopt(self, s: Session) -> None:
        s.conn.on_lost(lambda err: self._lost(s))

    def _lost(self, s: Session) -> None:
        core = self._core
        core.sessions.remove(s)
        busy = bool(s.served or s.initiated)
        log.log(logging.WARNING if busy else logging.INFO, "%s: connection to %s ended%s: %s", self.name,
                s.name, " with transfers in flight" if busy else "", s.lost)
        owner.session_lost(core, s)
        initiated.session_lost(s)
        core.data.drop_mappings(s)
        if s.ucx is not None:
            asyncio.get_running_loop().create_task(s.ucx.close())

    def peers(self) -> list[str]:
        """Names of the peers with a live connection."""
        return sorted(n for n in self._core.sessions.by_name if self._core.sessions.live(n))

    # ------------------------------------------------------------------ memory and leases
    def register(self, obj: Any, whole_storage: bool = False) -> Region:
        """Register a torch tensor (cpu or cuda), numpy array or __cuda_array_interface__ object.

        By default the tensor's own bytes (it must be contiguous); `whole_storage=True` registers
        its whole underlying storage, addressed by storage byte offset."""
        return make_region(obj, whole_storage)

    def unregister(self, region: Region) -> None:
        """Stop sharing a region: peers that mapped it (CUDA IPC) drop their mapping. Leases over
        it must have ended first."""
        def run() -> None:
            for s in self._core.sessions.all():
                if region.uid in s.ipc_sent:
                    s.ipc_sent.discard(region.uid)
                    s.conn.send_quiet(Msg.REGION_GONE, slot=region.uid)
            self._core.data.exporter.forget(region)
        self._rt.call_soon(run)

    def expose(self, descs: Descs, peer: str | None = None, ttl_s: float = 30.0,
               writable: bool = False) -> Lease:
        """Let `peer` (or any authenticated peer, if None) read (or, if writable, write) exactly
        these bytes, in this order, for `ttl_s` seconds (renewable by the peer)."""
        if not isinstance(descs, Descs):
            raise TypeError("expose() takes a Descs")
        core = self._core
        with core.lock:
            e = core.leases.add(descs, peer, ttl_s, writable)
            out = core.leases.public(e)
        if self.config.lease_grants and not writable and core.sessions.by_name:
            self._rt.call_soon(grant_push.push, core, e)   # its likely readers get the grant ahead
        return out

    def release(self, lease_id: str) -> bool:
        """End a lease now. Its blocks come back from `freed_leases()` once no transfer uses them."""
        with self._core.lock:
            return self._core.leases.release(lease_id)

    def freed_leases(self) -> list[str]:
        """Drain the ids of leases that ended (released or expired) and that no transfer touches
        any more: their blocks may be reused by the engine now."""
        core = self._core
        with core.lock:
            core.stats.leases_expired += core.leases.sweep()
            return core.leases.drain_freed()

    # ------------------------------------------------------------------ notifications and calls
    def notifications(self) -> list[tuple[str, bytes]]:
        """Drain (peer_name, payload) notifications received since the last call."""
        return self._core.inbox.drain()

    def on_notify(self, callback: Callable[[str, bytes], None] | None, executor: Executor | None = None) -> None:
        """Deliver notifications to `callback(peer_name, payload)` as they arrive instead of
        queueing them for `notifications()` (None: back to queueing). The callback runs on the
        transport's loop thread (it must not block) unless `executor` is given. Notifications
        already queued are delivered first."""
        self._core.inbox.set_callback(callback, executor)

    def on_call(self, handler: Callable[[str, bytes], bytes] | None, executor: Executor | None = None) -> None:
        """Answer peers' `call()`s with `handler(peer_name, payload) -> bytes` (None: calls fail
        with CallFailed). Runs on the loop thread (must not block) unless `executor` is given;
        an exception in the handler reaches the caller as CallFailed."""
        self._core.calls.handler, self._core.calls.executor = handler, executor

    def notify(self, peer: Peer | str, payload: bytes, timeout: float | None = None) -> None:
        """Send a notification; the peer sees it in `notifications()` or its callback. Raises
        Busy when the peer's notification queue is full."""
        t = timeout or self.config.timeout_s
        self._rt.call(self._anotify(peer, payload, t), t)

    async def anotify(self, peer: Peer | str, payload: bytes, timeout: float | None = None) -> None:
        await self._rt.acall(self._anotify(peer, payload, timeout or self.config.timeout_s))

    async def _anotify(self, peer, payload: bytes, timeout: float) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError("payload must be bytes")
        await initiator.find_session(self._core, peer).conn.request(Msg.NOTIFY, timeout, payload=bytes(payload))

    def call(self, peer: Peer | str, payload: bytes, timeout: float | None = None) -> bytes:
        """Request/reply with the peer's `on_call` handler; returns its reply."""
        t = timeout or self.config.timeout_s
        return self._rt.call(self._acall(peer, payload, t), t)

    async def acall(self, peer: Peer | str, payload: bytes, timeout: float | None = None) -> bytes:
        return await self._rt.acall(self._acall(peer, payload, timeout or self.config.timeout_s))

    async def _acall(self, peer, payload: bytes, timeout: float) -> bytes:
        if not isinstance(payload, (bytes, bytearray)):
            raise TypeError("payload must be bytes")
        f = await initiator.find_session(self._core, peer).conn.request(Msg.CALL, timeout, payload=bytes(payload))
        return f.body["payload"]

    # ------------------------------------------------------------------ connect
    def connect(self, address: str, timeout: float | None = None) -> Peer:
        """Connect (or reuse the live connection) to the agent at `address`: protocol version,
        mutual authentication, compat; raises Unauthorized / ProtocolMismatch / CompatMismatch /
        PeerLost / TransferTimeout."""
        t = timeout or self.config.timeout_s
        return self._rt.call(self._aconnect(address, t), t)

    async def aconnect(self, address: str, timeout: float | None = None) -> Peer:
        return await self._rt.acall(self._aconnect(address, timeout or self.config.timeout_s))

    async def _aconnect(self, address: str, timeout: float) -> Peer:
        """Concurrent connects to one address share one dial (and one connection)."""
        old = self._core.sessions.by_addr.get(address)
        if old is not None and old.lost is None:
            return Peer(old.name, address)
        dialing = self._dialing.get(address)
        if dialing is None:
            dialing = asyncio.get_running_loop().create_task(self._dial(address, timeout))
            self._dialing[address] = dialing
            dialing.add_done_callback(lambda _: self._dialing.pop(address, None))
        return await asyncio.wait_for(asyncio.shield(dialing), timeout + 1.0)

    async def _dial(self, address: str, timeout: float) -> Peer:
        core = self._core
        host, port = parse_hostport(address)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: Conn(f"{self.name}->{address}", self.config.keepalive_s), host, port),
                timeout)
        except asyncio.TimeoutError:
            raise TransferTimeout(f"connect to {address}: no answer within {timeout:.1f}s") from None
        except OSError as e:
            raise PeerLost(f"connect to {address} failed: {e.strerror or e}"
                           f"{f' ({errno.errorcode.get(e.errno, e.errno)})' if e.errno else ''}") from None
        try:
            s = await client_handshake(core, conn, address, timeout, self._handle)
        except BaseException as e:
            core.stats.handshake_failures += 1
            conn.close("handshake failed")
            if isinstance(e, TransferError):
                log.warning("%s: handshake with %s failed: %s", self.name, address, e)
            raise
        conn.label = f"{self.name}->{s.name}"
        self._adopt(s)
        log.info("%s connected to %s at %s", self.name, s.name, address)
        return Peer(s.name, address)

    # ------------------------------------------------------------------ transfers
    def read(self, peer: Peer | str, local: Descs, lease_id: str, notify: bytes | None = None,
             timeout: float | None = None, ranges: Any = None) -> Transfer:
        """Pull the whole lease `lease_id` held by `peer` into `local` (same total size), or only
        byte `ranges` of it ([n, 2] (offset, length) into the lease's stream, in that order).
        `notify` reaches the owner once the bytes have landed."""
        rb = _ranges_bytes(ranges, local.nbytes) if ranges is not None else None
        return self._begin(peer, local, lease_id, notify, timeout, False, rb)

    def write(self, peer: Peer | str, local: Descs, lease_id: str, notify: bytes | None = None,
              timeout: float | None = None) -> Transfer:
        """Push `local` into the writable lease `lease_id` held by `peer`; `notify` reaches the
        owner once the bytes have landed."""
        return self._begin(peer, local, lease_id, notify, timeout, True, None)

    def _begin(self, peer, local, lease_id, notify, timeout, write: bool, ranges) -> Transfer:
        if not isinstance(local, Descs):
            raise TypeError("local must be a Descs")
        if len(local) == 0:
            raise ValueError("local descriptors are empty")
        if not isinstance(lease_id, str):
            raise TypeError("lease_id must be a str")
        if notify is not None and not isinstance(notify, (bytes, bytearray)):
            raise TypeError("notify must be bytes or None")
        if self._closed:
            raise PeerLost(f"agent {self.name} is closed")
        xfer = None
        if trace.on():   # (marks are keyed by the transfer: it exists from the start)
            xfer = Transfer(local.nbytes, self._rt.call_soon)
            trace.mark(xfer, "called")
        if not write and ranges is None and isinstance(peer, Peer) and not self._rt.in_loop():
            done = grant_read.try_read(self._core, self._core.sessions.by_addr.get(peer.address), local,
                                       lease_id, notify, xfer, self._lanes)
            if done is not None:   # served on this thread (without tracing: a completed Transfer, made now)
                return done
        if xfer is None:
            xfer = Transfer(local.nbytes, self._rt.call_soon)
        if not write and not self._rt.in_loop() and self._lanes.try_read(
                peer, local, lease_id, ranges, notify, timeout or self.config.timeout_s, xfer):
            return xfer
        self._rt.call_soon(initiator.start, self._core, peer, local, lease_id, ranges,
                           bytes(notify) if notify is not None else None, timeout or self.config.timeout_s,
                           write, xfer)
        return xfer

    async def aread(self, *args: Any, **kw: Any) -> None:
        await self.read(*args, **kw)

    async def awrite(self, *args: Any, **kw: Any) -> None:
        await self.write(*args, **kw)

    # ------------------------------------------------------------------ leases held by peers
    def renew(self, peer: Peer | str, lease_id: str, ttl_s: float = 30.0, timeout: float | None = None) -> float:
        """Extend a lease held by `peer`; returns the seconds it now has left."""
        t = timeout or self.config.timeout_s
        return self._rt.call(self._arenew(peer, lease_id, ttl_s, t), t)

    async def arenew(self, peer: Peer | str, lease_id: str, ttl_s: float = 30.0,
                     timeout: float | None = None) -> float:
        return await self._rt.acall(self._arenew(peer, lease_id, ttl_s, timeout or self.config.timeout_s))

    async def _arenew(self, peer, lease_id: str, ttl_s: float, timeout: float) -> float:
        f = await initiator.find_session(self._core, peer).conn.request(Msg.RENEW, timeout, lease=lease_id,
                                                                         ttl=float(ttl_s))
        return float(f.body["expires_in"] or 0.0)

    # ------------------------------------------------------------------ housekeeping
    def snapshot(self) -> dict:
        """Counters plus the data paths taken and every fallback with its reason."""
        d = self.stats.snapshot()
        d["staging_slots_quarantined"] = self._core.data.quarantined_slots()
        d["endpoints_parked"] = self._core.data.parked_endpoints()
        d["notifications_dropped"] = self._core.inbox.dropped
        # CUDA Descs' run tables (pinned_tables.py) and the reads that took them in place (gpu_direct.py)
        d["gpu_run_tables"] = dict(pinned_tables.TABLES.stats(), direct_launches=gpu_direct.direct_launches,
                                   direct_off=gpu_direct.disabled)
        return d

    async def _sweep_loop(self) -> None:
        core = self._core
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            for s in core.sessions.all():
                if s.grant_reports:
                    grant_read.flush_reports(s)
            with core.lock:
                n = core.leases.sweep()
            if n:
                core.stats.leases_expired += n
                log.info("%s: %d lease(s) expired", self.name, n)
