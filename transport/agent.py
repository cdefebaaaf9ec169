"""`Agent`: one endpoint of the transport (owner of leased blocks, reader/writer of peers').

Sync methods are for engine threads; each has an async twin (`a...`) for asyncio users. All UCX
work runs on the process-wide transport loop (runtime.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from . import cma
from . import handshake as hs
from .channel import Channel
from .config import AgentConfig, parse_hostport
from .dataeps import DataEndpoints
from .datapath import CancelToken, Receiver, Sender, StagingPool
from .descs import Descs
from .errors import (BadMessage, PeerLost, TransferCancelled, TransferError, TransferTimeout,
                     Unauthorized, error_from_wire)
from .leases import Lease, LeaseTable
from .plan import StreamPlan
from .region import Region, make_region
from .runtime import TAG_CHUNK_BITS, Runtime
from .stats import AgentStats
from .transfer import Peer, Transfer
from .wire import Frame, Msg

log = logging.getLogger(__name__)

MIN_CHUNK, MAX_CHUNK = 4096, 1 << 30


def _ranges_bytes(ranges, nbytes: int) -> bytes:
    import numpy as np

    r = np.asarray(ranges)
    if r.ndim != 2 or r.shape[1] != 2 or r.shape[0] == 0 or r.dtype.kind not in "iu":
        raise ValueError("ranges must be a non-empty [n, 2] integer array of (offset, length)")
    r = r.astype("<i8")
    if np.any(r[:, 1] <= 0) or np.any(r[:, 0] < 0):
        raise ValueError("ranges need offsets >= 0 and lengths > 0")
    if int(r[:, 1].sum()) != nbytes:
        raise ValueError(f"ranges add up to {int(r[:, 1].sum())} bytes, local descriptors to {nbytes}")
    return r.tobytes()


def _valid_chunk(c: int) -> bool:
    return MIN_CHUNK <= c <= MAX_CHUNK and c & (c - 1) == 0


class Agent:
    """See docs/API.md and README for the full contract.

    Example (owner)::

        with Agent("prefill-0", AgentConfig(auth_key=b"k")) as a:
            lease = a.expose(Descs.from_blocks(a.register(kv), ids, block_bytes), ttl_s=30)
    """

    def __init__(self, name: str, config: AgentConfig | None = None):
        if not name or not isinstance(name, str):
            raise ValueError("agent name must be a non-empty string")
        self.name = name
        self.config = config or AgentConfig()
        self.stats = AgentStats()
        self._rt = Runtime.get(self.config.transports, self.config.ucx_options)
        self._lock = threading.Lock()
        self._leases = LeaseTable()
        self._notifs: list[tuple[str, bytes]] = []
        self._notify_cb = None
        self._notify_ex = None
        self._call_handler = None
        self._call_ex = None
        self._by_name: dict[str, Channel] = {}      # every live, authenticated channel by peer name
        self._by_addr: dict[str, Channel] = {}      # outbound channels by address
        self._chans: set[Channel] = set()           # every live channel, both directions
        self._data: dict[int, DataEndpoints] = {}   # id(channel) -> data endpoint pool
        self._tokens: dict[tuple[int, int], CancelToken] = {}  # (id(channel), xid) -> token
        self._write_waiters: dict[int, asyncio.Future] = {}
        self._cma_waiters: dict[tuple[int, int], asyncio.Future] = {}
        self._cma_failed: set[tuple[int, int]] = set()
        self._xids = itertools.count(1)
        self._pools: dict[str, StagingPool] = {}
        self._streams: dict[int, Any] = {}
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"nixl-pack-{name}")
        self._closed = False
        self._listener = None
        self._sweeper: asyncio.Task | None = None
        self._worker_address = b""
        host, port = parse_hostport(self.config.listen)
        self._host = host
        self._rt.call(self._start(port), self.config.timeout_s)

    # ------------------------------------------------------------------ lifecycle
    async def _start(self, port: int) -> None:
        import ucxx

        self._worker_address = bytes(ucxx.get_worker_address().tobytes())
        self._listener = ucxx.create_listener(self._on_accept, port, endpoint_error_handling=True)
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
        try:
            self._rt.call(self._aclose(), 15.0)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._rt.acall(self._aclose())
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _aclose(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        for ch in list(self._chans):
            await self._drop_channel(ch)
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ memory and leases
    def register(self, obj: Any, whole_storage: bool = False) -> Region:
        """Register a torch tensor (cpu or cuda), numpy array or __cuda_array_interface__ object.

        Regions need no UCX registration up front: UCX registers memory on first use and caches it.
        """
        return make_region(obj, whole_storage)

    def expose(self, descs: Descs, peer: str | None = None, ttl_s: float = 30.0,
               writable: bool = False) -> Lease:
        """Let `peer` (or any authenticated peer, if None) read (or, if writable, write) exactly
        these bytes, in this order, for `ttl_s` seconds (renewable by the peer)."""
        if not isinstance(descs, Descs):
            raise TypeError("expose() takes a Descs")
        with self._lock:
            e = self._leases.add(descs, peer, ttl_s, writable)
            return self._leases.public(e)

    def release(self, lease_id: str) -> bool:
        """End a lease now. Its blocks come back from `freed_leases()` once no transfer uses them."""
        with self._lock:
            return self._leases.release(lease_id)

    def freed_leases(self) -> list[str]:
        """Drain the ids of leases that ended (released or expired) and that no transfer touches
        any more: their blocks may be reused by the engine now."""
        with self._lock:
            self.stats.leases_expired += self._leases.sweep()  # counted here too, not only by the sweeper
            return self._leases.drain_freed()

    def notifications(self) -> list[tuple[str, bytes]]:
        """Drain (peer_name, payload) notifications received since the last call."""
        with self._lock:
            out, self._notifs = self._notifs, []
            return out

    def on_notify(self, callback, executor=None) -> None:
        """Deliver notifications to `callback(peer_name, payload)` as they arrive instead of
        queueing them for `notifications()` (None: back to queueing). The callback runs on the
        transport's loop thread (it must not block) unless `executor` is given. Notifications
        already queued are delivered first."""
        def _set() -> None:
            self._notify_cb, self._notify_ex = callback, executor
            if callback is not None:
                with self._lock:
                    queued, self._notifs = self._notifs, []
                for peer, payload in queued:
                    self._deliver(peer, payload)
        self._rt.call_soon(_set)

    def _deliver(self, peer: str, payload: bytes) -> None:
        cb, ex = self._notify_cb, self._notify_ex
        if cb is None:
            with self._lock:
                self._notifs.append((peer, payload))
            return
        if ex is not None:
            ex.submit(self._run_cb, cb, peer, payload)
        else:
            self._run_cb(cb, peer, payload)

    @staticmethod
    def _run_cb(cb, peer: str, payload: bytes) -> None:
        try:
            cb(peer, payload)
        except Exception:
            log.exception("notification callback failed")

    def on_call(self, handler, executor=None) -> None:
        """Answer peers' `call()`s with `handler(peer_name, payload) -> bytes` (None: calls fail
        with CallFailed). Runs on the loop thread (must not block) unless `executor` is given;
        an exception in the handler reaches the caller as CallFailed."""
        self._call_handler, self._call_ex = handler, executor

    def call(self, peer: Peer | str, payload: bytes, timeout: float | None = None) -> bytes:
        """Request/reply with the peer's `on_call` handler; returns its reply."""
        t = timeout or self.config.timeout_s
        return self._rt.call(self._acall(peer, payload, t), t)

    async def acall(self, peer: Peer | str, payload: bytes, timeout: float | None = None) -> bytes:
        return await self._rt.acall(self._acall(peer, payload, timeout or self.config.timeout_s))

    async def _acall(self, peer, payload: bytes, timeout: float) -> bytes:
        f = await self._channel(peer).request(Msg.CALL, timeout, payload=bytes(payload))
        return f.body["payload"]

    async def _serve_call(self, peer: str, payload: bytes) -> bytes:
        from .errors import CallFailed

        h, ex = self._call_handler, self._call_ex
        if h is None:
            raise CallFailed(f"{self.name} has no call handler")
        try:
            if ex is None:
                out = h(peer, payload)
            else:
                out = await asyncio.get_running_loop().run_in_executor(ex, h, peer, payload)
        except Exception as e:
            log.warning("%s: call handler failed for %s: %s", self.name, peer, e)
            raise CallFailed(f"call handler failed: {type(e).__name__}: {e}") from None
        if not isinstance(out, (bytes, bytearray)):
            raise CallFailed("call handler returned no bytes")
        return bytes(out)

    def peers(self) -> list[str]:
        return [n for n, ch in self._by_name.items() if ch.lost is None]

    # ------------------------------------------------------------------ connect
    def connect(self, address: str, timeout: float | None = None) -> Peer:
        t = timeout or self.config.timeout_s
        return self._rt.call(self._aconnect(address, t), t)

    async def aconnect(self, address: str, timeout: float | None = None) -> Peer:
        return await self._rt.acall(self._aconnect(address, timeout or self.config.timeout_s))

    async def _aconnect(self, address: str, timeout: float) -> Peer:
        import ucxx

        old = self._by_addr.get(address)
        if old is not None and old.lost is None:
            return Peer(old.peer_name, address)
        host, port = parse_hostport(address)
        try:
            ep = await asyncio.wait_for(
                ucxx.create_endpoint(host, port, endpoint_error_handling=True, connect_timeout=timeout),
                timeout)
        except asyncio.TimeoutError:
            raise TransferTimeout(f"connect to {address}: no answer within {timeout:.1f}s") from None
        except Exception as e:
            raise PeerLost(f"connect to {address} failed: {type(e).__name__}: {e}") from None
        ch = Channel(ep, self.config.max_message_bytes, f"{self.name}->{address}")
        key = self.config.auth_key
        try:
            nonce_c = hs.new_nonce()
            await ch.send(Msg.HELLO, 1, name=self.name, nonce=nonce_c, compat=dict(self.config.compat),
                          worker=self._worker_address, host=cma.host_key(), pid=os.getpid())
            ack = await ch.recv_frame(timeout)
            self._raise_if_error(ack, Msg.HELLO_ACK)
            server = ack.body["name"]
            want = hs.mac(key, b"S", nonce_c, ack.body["nonce"], self.name, server)
            if not hs.macs_equal(want, ack.body["mac"]):
                raise Unauthorized(f"{address} ({server}) failed to authenticate: wrong or missing auth_key")
            await ch.send(Msg.AUTH, 2, mac=hs.mac(key, b"C", nonce_c, ack.body["nonce"], self.name, server))
            self._raise_if_error(await ch.recv_frame(timeout), Msg.WELCOME)
        except BaseException as e:
            self.stats.handshake_failures += 1
            await ch.close()
            if isinstance(e, TransferError):
                log.warning("%s: handshake with %s failed: %s", self.name, address, e)
            raise
        ch.peer_name, ch.peer_worker = server, ack.body["worker"]
        ch.peer_host, ch.peer_pid = ack.body["host"], ack.body["pid"]
        self._adopt(ch, address)
        log.info("%s connected to %s at %s", self.name, server, address)
        return Peer(server, address)

    @staticmethod
    def _raise_if_error(f: Frame, expected: Msg) -> None:
        if f.type is Msg.ERROR:
            raise error_from_wire(f.body["code"], f.body["message"], f.body["field"])
        if f.type is not expected:
            raise BadMessage(f"expected {expected.value}, got {f.type.value}")

    async def _on_accept(self, ep: Any) -> None:
        ch = Channel(ep, self.config.max_message_bytes, f"{self.name}<-?")
        timeout = self.config.timeout_s
        key = self.config.auth_key
        rid = 0
        try:
            hello = await ch.recv_frame(timeout)
            rid = hello.rid
            if hello.type is not Msg.HELLO:
                raise BadMessage(f"expected hello, got {hello.type.value}")
            hs.check_compat(dict(self.config.compat), hello.body["compat"])
            client, nonce_c, nonce_s = hello.body["name"], hello.body["nonce"], hs.new_nonce()
            ch.label = f"{self.name}<-{client}"
            await ch.send(Msg.HELLO_ACK, rid, name=self.name, nonce=nonce_s, worker=self._worker_address,
                          mac=hs.mac(key, b"S", nonce_c, nonce_s, client, self.name),
                          host=cma.host_key(), pid=os.getpid())
            auth = await ch.recv_frame(timeout)
            rid = auth.rid
            if auth.type is not Msg.AUTH:
                raise BadMessage(f"expected auth, got {auth.type.value}")
            if not hs.macs_equal(hs.mac(key, b"C", nonce_c, nonce_s, client, self.name), auth.body["mac"]):
                raise Unauthorized(f"peer {client!r} failed to authenticate")
            await ch.send(Msg.WELCOME, rid)
        except TransferError as e:
            self.stats.handshake_failures += 1
            log.warning("%s: rejected incoming handshake: %s", self.name, e)
            await ch.reply_error(rid, e)
            await asyncio.sleep(0.2)  # let the error reach the peer before closing
            await ch.close()
            return
        ch.peer_name, ch.peer_worker = client, hello.body["worker"]
        ch.peer_host, ch.peer_pid = hello.body["host"], hello.body["pid"]
        self._adopt(ch, None)
        log.info("%s accepted %s", self.name, client)

    def _adopt(self, ch: Channel, address: str | None) -> None:
        ch.inbound = address is None
        old = self._by_name.get(ch.peer_name)
        if old is not None and old is not ch and ch.inbound and old.inbound:
            # the same peer connected to us again (e.g. it restarted): its old connection is stale
            log.info("%s: %s reconnected; dropping its old connection", self.name, ch.peer_name)
            asyncio.get_running_loop().create_task(self._drop_channel(old))
        self._by_name[ch.peer_name] = ch
        self._chans.add(ch)
        if address is not None:
            self._by_addr[address] = ch
        self._data[id(ch)] = DataEndpoints(ch.peer_worker)
        ch.on_lost(self._on_channel_lost)
        ch.start(self._handle)

    def _on_channel_lost(self, ch: Channel, err: BaseException) -> None:
        busy = any(cid == id(ch) for cid, _ in self._tokens)
        level = logging.WARNING if busy and not ch.graceful else logging.INFO
        log.log(level, "%s: connection to %s ended%s: %s", self.name, ch.peer_name,
                " with transfers in flight" if busy else "", err)
        perr = err if isinstance(err, TransferError) else PeerLost(str(err))
        for (cid, _), tok in list(self._tokens.items()):
            if cid == id(ch):
                tok.set(perr)
        self._chans.discard(ch)
        if self._by_name.get(ch.peer_name) is ch:
            # another live connection with the same peer (the other direction) takes over
            alive = [c for c in self._chans if c.peer_name == ch.peer_name and c.lost is None]
            if alive:
                self._by_name[ch.peer_name] = alive[-1]
            else:
                del self._by_name[ch.peer_name]
        for a, c in list(self._by_addr.items()):
            if c is ch:
                del self._by_addr[a]
        pool = self._data.pop(id(ch), None)
        if pool is not None:
            asyncio.get_running_loop().create_task(pool.close())

    async def _drop_channel(self, ch: Channel) -> None:
        await ch.close()

    def _channel(self, peer: Peer | str) -> Channel:
        ch = None
        if isinstance(peer, Peer):
            ch = self._by_addr.get(peer.address) or self._by_name.get(peer.name)
        elif isinstance(peer, str):
            ch = self._by_name.get(peer) or self._by_addr.get(peer)
        if ch is None or ch.lost is not None:
            raise PeerLost(f"not connected to {peer}")
        return ch

    # ------------------------------------------------------------------ reader / writer side
    def read(self, peer: Peer | str, local: Descs, lease_id: str, notify: bytes | None = None,
             timeout: float | None = None, ranges=None) -> Transfer:
        """Pull the whole lease `lease_id` held by `peer` into `local` (same total size), or only
        byte `ranges` of it ([n, 2] (offset, length) into the lease's stream, in that order)."""
        rb = _ranges_bytes(ranges, local.nbytes) if ranges is not None else None
        return self._start_xfer(self._xfer_read, peer, local, lease_id, notify, timeout, rb)

    def write(self, peer: Peer | str, local: Descs, lease_id: str, notify: bytes | None = None,
              timeout: float | None = None) -> Transfer:
        """Push `local` into the writable lease `lease_id` held by `peer`."""
        return self._start_xfer(self._xfer_write, peer, local, lease_id, notify, timeout)

    async def aread(self, *args: Any, **kw: Any) -> None:
        await self.read(*args, **kw)

    async def awrite(self, *args: Any, **kw: Any) -> None:
        await self.write(*args, **kw)

    def _start_xfer(self, fn, peer, local, lease_id, notify, timeout, *extra) -> Transfer:
        if not isinstance(local, Descs):
            raise TypeError("local must be a Descs")
        if notify is not None and not isinstance(notify, (bytes, bytearray)):
            raise TypeError("notify must be bytes or None")
        tok_holder: list[CancelToken] = []
        ready = threading.Event()

        async def run() -> None:
            tok = CancelToken()
            tok_holder.append(tok)
            ready.set()
            await fn(peer, local, lease_id, notify, timeout or self.config.timeout_s, tok, *extra)

        fut = asyncio.run_coroutine_threadsafe(run(), self._rt.loop)

        def cancel() -> None:
            def _set() -> None:
                if tok_holder:
                    tok_holder[0].set(TransferCancelled("transfer cancelled by caller"))
            self._rt.call_soon(_set)
        return Transfer(fut, local.nbytes, cancel)

    def _pool(self, device: torch.device) -> StagingPool:
        key = str(device)
        if key not in self._pools:
            self._pools[key] = StagingPool(device, self.config.chunk_bytes, self.config.staging_slots)
        return self._pools[key]

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device.index not in self._streams:
            self._streams[device.index] = torch.cuda.Stream(device=device)
        return self._streams[device.index]

    def _device(self, d: Descs) -> torch.device:
        return d.regions[0].device if d.regions else torch.device("cpu")

    async def _run_stream(self, kind, ch: Channel, descs: Descs, chunk: int, tag: int, deadline: float,
                          tok: CancelToken) -> None:
        pool = self._data.get(id(ch))
        if pool is None:
            raise PeerLost(f"not connected to {ch.peer_name}")
        ep = await pool.borrow()
        dev = self._device(descs)
        io = kind(ep, StreamPlan(descs, chunk), self._pool(dev), self._executor, tag, self._stream(dev))
        try:
            await io.run(descs, deadline, tok)
        finally:
            if io.aborted:
                pass  # already aborted: the endpoint is gone
            elif ch.lost is None:
                await pool.give_back(ep)

    def _can_cma(self, ch: Channel, local: Descs) -> bool:
        return (self.config.same_host_copy and ch.cma_ok and bool(ch.peer_host)
                and ch.peer_host == cma.host_key() and ch.peer_pid != os.getpid()
                and all(r.device.type == "cpu" for r in local.regions))

    async def _xfer_read(self, peer, local: Descs, lease_id: str, notify, timeout: float,
                         tok: CancelToken, ranges: bytes | None = None) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ch = self._channel(peer)
        t0 = loop.time()
        try:
            try:
                await self._read_once(ch, local, lease_id, notify, deadline, tok, self._can_cma(ch, local), ranges)
            except cma.CmaUnavailable as e:
                log.warning("%s: same-host copy from %s unavailable (%s); using UCX", self.name, ch.peer_name, e)
                ch.cma_ok = False
                await self._read_once(ch, local, lease_id, notify, deadline, tok, False, ranges)
        except TransferError:
            self.stats.transfers_failed += 1
            raise
        self.stats.record_in(local.nbytes, loop.time() - t0)

    async def _read_once(self, ch: Channel, local: Descs, lease_id: str, notify, deadline: float,
                         tok: CancelToken, want_cma: bool, ranges: bytes | None = None) -> None:
        loop = asyncio.get_running_loop()
        xid = next(self._xids)
        tag = self._rt.new_tag_base()
        try:
            ack = await ch.request(Msg.READ_REQ, max(0.0, deadline - loop.time()), xid=xid, lease=lease_id,
                                   nbytes=local.nbytes, chunk=self.config.chunk_bytes, tag=tag, cma=want_cma,
                                   ranges=ranges)
            chunk, iov = ack.body["chunk"], ack.body["iov"]
            if not _valid_chunk(chunk) or chunk > self.config.chunk_bytes:
                raise BadMessage(f"owner chose an invalid chunk size {chunk}")
            self._tokens[(id(ch), xid)] = tok
            if ch.lost is not None:
                tok.set(PeerLost(f"lost {ch.peer_name}"))
            try:
                if iov is not None:
                    await self._cma_read(ch, local, iov, deadline, tok)
                else:
                    await self._run_stream(Receiver, ch, local, chunk, tag, deadline, tok)
            except (TransferError, cma.CmaUnavailable) as e:
                await self._send_quiet(ch, Msg.XFER_ABORT, xid=xid, reason=str(e)[:200])
                raise
            # The owner confirms it still held the lease for the whole read.
            await ch.request(Msg.READ_DONE, max(0.1, deadline - loop.time()), xid=xid, lease=lease_id,
                             notify=bytes(notify) if notify else None)
        finally:
            self._tokens.pop((id(ch), xid), None)

    async def _cma_read(self, ch: Channel, local: Descs, iov: bytes, deadline: float, tok: CancelToken) -> None:
        import numpy as np

        if len(iov) % 16:
            raise BadMessage("iovec list is not a whole number of (address, length) pairs")
        remote = np.frombuffer(iov, dtype=np.uint64).reshape(-1, 2)
        if int(remote[:, 1].sum()) != local.nbytes:
            raise BadMessage("owner's iovecs do not add up to the lease size")
        loop = asyncio.get_running_loop()
        copy = loop.create_task(cma.read_from(ch.peer_pid, local, remote, self._executor, loop, tok))
        waiter = loop.create_task(tok.wait())
        try:
            done, _ = await asyncio.wait({copy, waiter}, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if copy not in done:
            tok.set(tok.error or TransferTimeout("same-host copy did not finish before the deadline"))
            await asyncio.wait({copy})  # batches stop at their next boundary; memory is ours again after
            raise tok.error  # type: ignore[misc]
        try:
            copy.result()
        except OSError as e:
            raise PeerLost(f"same-host copy failed: {e}") from None

    async def _xfer_write(self, peer, local: Descs, lease_id: str, notify, timeout: float,
                          tok: CancelToken) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ch = self._channel(peer)
        xid = next(self._xids)
        done = loop.create_future()
        self._write_waiters[xid] = done
        t0 = loop.time()
        try:
            ack = await ch.request(Msg.WRITE_REQ, timeout, xid=xid, lease=lease_id, nbytes=local.nbytes,
                                   chunk=self.config.chunk_bytes, notify=bytes(notify) if notify else None)
            chunk, tag = ack.body["chunk"], ack.body["tag"]
            if not _valid_chunk(chunk) or chunk > self.config.chunk_bytes or tag & ((1 << TAG_CHUNK_BITS) - 1):
                raise BadMessage("owner answered with an invalid chunk size or tag")
            self._tokens[(id(ch), xid)] = tok
            if ch.lost is not None:
                tok.set(PeerLost(f"lost {ch.peer_name}"))
            try:
                await self._run_stream(Sender, ch, local, chunk, tag, deadline, tok)
                waiter = loop.create_task(tok.wait())
                try:
                    fin, _ = await asyncio.wait({done, waiter}, timeout=max(0.0, deadline - loop.time()),
                                                return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
                if done in fin:
                    done.result()
                elif waiter in fin:
                    raise tok.error or TransferCancelled("cancelled")
                else:
                    raise TransferTimeout("owner did not confirm the write before the deadline")
            except TransferError as e:
                await self._send_quiet(ch, Msg.XFER_ABORT, xid=xid, reason=str(e)[:200])
                raise
        except TransferError:
            self.stats.transfers_failed += 1
            raise
        finally:
            self._write_waiters.pop(xid, None)
            self._tokens.pop((id(ch), xid), None)
        self.stats.record_out(local.nbytes, loop.time() - t0)

    async def _send_quiet(self, ch: Channel, msg: Msg, **body: Any) -> None:
        try:
            await ch.send(msg, **body)
        except TransferError:
            pass

    # ------------------------------------------------------------------ misc peer calls
    def renew(self, peer: Peer | str, lease_id: str, ttl_s: float = 30.0, timeout: float | None = None) -> float:
        """Extend a lease held by `peer`; returns the seconds it now has left."""
        t = timeout or self.config.timeout_s
        return self._rt.call(self._arenew(peer, lease_id, ttl_s, t), t)

    async def arenew(self, peer: Peer | str, lease_id: str, ttl_s: float = 30.0,
                     timeout: float | None = None) -> float:
        return await self._rt.acall(self._arenew(peer, lease_id, ttl_s, timeout or self.config.timeout_s))

    async def _arenew(self, peer, lease_id: str, ttl_s: float, timeout: float) -> float:
        f = await self._channel(peer).request(Msg.RENEW, timeout, lease=lease_id, ttl=float(ttl_s))
        return float(f.body["expires_in"] or 0.0)

    def notify(self, peer: Peer | str, payload: bytes, timeout: float | None = None) -> None:
        """Send a notification; the peer sees it in its `notifications()`."""
        t = timeout or self.config.timeout_s
        self._rt.call(self._anotify(peer, payload), t)

    async def anotify(self, peer: Peer | str, payload: bytes) -> None:
        await self._rt.acall(self._anotify(peer, payload))

    async def _anotify(self, peer, payload: bytes) -> None:
        await self._channel(peer).send(Msg.NOTIFY, payload=bytes(payload))

    # ------------------------------------------------------------------ owner side
    async def _handle(self, ch: Channel, f: Frame) -> None:
        from .serve import serve_frame  # owner-side request handling lives in serve.py

        await serve_frame(self, ch, f)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            with self._lock:
                n = self._leases.sweep()
            if n:
                self.stats.leases_expired += n
                log.info("%s: %d lease(s) expired", self.name, n)
