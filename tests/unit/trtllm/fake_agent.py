"""An in-memory fake of `transport.Agent`'s public API, for adapter unit tests only.

Agents on one `FakeNetwork` reach each other by address. Reads copy the leased bytes at once,
or, with ``hold_reads``, wait until the test completes or fails them (deterministic timing).
Integration tests use the real transport; this fake only makes the adapter's bookkeeping
testable without processes.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from transport import CallFailed, Descs, Lease, LeaseRejected, MemoryKind, Peer, PeerLost, Region


def _stream(descs: Descs) -> list[torch.Tensor]:
    return [descs.regions[int(r)].view(int(o), int(n))
            for r, o, n in zip(descs.region_idx, descs.offset, descs.length)]


class FakeTransfer:
    def __init__(self, run: Callable[[], None], nbytes: int, hold: bool):
        self._run, self.nbytes, self.error = run, nbytes, None
        self._done = False
        self.cancelled = False
        if not hold:
            self.complete()

    def complete(self) -> None:
        if not self._done:
            self._run()
            self._done = True

    def fail(self, err: BaseException) -> None:
        self.error, self._done = err, True

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: Optional[float] = None) -> None:
        if not self._done:
            raise TimeoutError("fake transfer still pending")
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        """Asks for the cancel; the transfer settles when the test says so (as UCX confirms)."""
        self.cancelled = True


@dataclass
class FakeNetwork:
    agents: dict = field(default_factory=dict)
    _ports: Any = field(default_factory=lambda: itertools.count(1000))


class FakeAgent:
    def __init__(self, name: str, net: FakeNetwork, hold_reads: bool = False):
        self.name, self.net, self.hold_reads = name, net, hold_reads
        self.address = f"127.0.0.1:{next(net._ports)}"
        net.agents[self.address] = self
        self.leases: dict[str, tuple[Descs, float]] = {}
        self._freed: list[str] = []
        self._notes: list[tuple[str, bytes]] = []
        self._notify_cb: Optional[Callable] = None
        self._call: Optional[Callable] = None
        self._ids = itertools.count(1)
        self.transfers: list[FakeTransfer] = []
        self.calls = 0
        self.closed = False

    def register(self, obj: torch.Tensor, whole_storage: bool = False) -> Region:
        flat = (torch.empty(0, dtype=torch.uint8).set_(obj.untyped_storage()) if whole_storage
                else obj.reshape(-1).view(torch.uint8))
        return Region(flat=flat, kind=MemoryKind.HOST, device_index=None, owner_obj=obj)

    def expose(self, descs: Descs, peer: Optional[str] = None, ttl_s: float = 30.0,
               writable: bool = False) -> Lease:
        lid = f"{self.name}-lease-{next(self._ids)}"
        self.leases[lid] = (descs, time.time() + ttl_s)
        return Lease(lid, descs.nbytes, time.time() + ttl_s)

    def release(self, lease_id: str) -> bool:
        if self.leases.pop(lease_id, None) is None:
            return False
        self._freed.append(lease_id)
        return True

    def freed_leases(self) -> list[str]:
        out, self._freed = self._freed, []
        return out

    def notifications(self) -> list[tuple[str, bytes]]:
        out, self._notes = self._notes, []
        return out

    def on_notify(self, callback: Optional[Callable], executor: Any = None) -> None:
        self._notify_cb = callback

    def on_call(self, handler: Optional[Callable], executor: Any = None) -> None:
        self._call = handler

    def _peer_agent(self, peer: Any) -> "FakeAgent":
        address = peer.address if isinstance(peer, Peer) else peer
        other = self.net.agents.get(address)
        if other is None or other.closed or self.closed:
            raise PeerLost(f"not connected to {address}")
        return other

    def connect(self, address: str, timeout: Optional[float] = None) -> Peer:
        return Peer(self._peer_agent(address).name, address)

    def call(self, peer: Any, payload: bytes, timeout: Optional[float] = None) -> bytes:
        other = self._peer_agent(peer)
        self.calls += 1
        if other._call is None:
            raise CallFailed(f"{other.name} has no call handler")
        try:
            return other._call(self.name, bytes(payload))
        except Exception as e:  # noqa: BLE001 - as the transport reports it
            raise CallFailed(f"call handler failed: {type(e).__name__}: {e}") from None

    def notify(self, peer: Any, payload: bytes, timeout: Optional[float] = None) -> None:
        self._peer_agent(peer)._deliver(self.name, bytes(payload))

    def _deliver(self, sender: str, payload: bytes) -> None:
        if self._notify_cb is not None:
            self._notify_cb(sender, payload)
        else:
            self._notes.append((sender, payload))

    def read(self, peer: Any, local: Descs, lease_id: str, notify: Optional[bytes] = None,
             timeout: Optional[float] = None, ranges: Any = None) -> FakeTransfer:
        owner = self._peer_agent(peer)
        entry = owner.leases.get(lease_id)
        if entry is None:
            raise LeaseRejected(f"no lease {lease_id}")
        if entry[0].nbytes != local.nbytes:
            raise LeaseRejected("size mismatch")

        def run() -> None:
            src = torch.cat(_stream(entry[0])) if len(entry[0]) else torch.empty(0, dtype=torch.uint8)
            pos = 0
            for dst in _stream(local):
                dst.copy_(src[pos:pos + dst.numel()])
                pos += dst.numel()
            if notify is not None:
                owner._deliver(self.name, notify)

        t = FakeTransfer(run, local.nbytes, self.hold_reads)
        self.transfers.append(t)
        return t

    def renew(self, peer: Any, lease_id: str, ttl_s: float = 30.0, timeout: Optional[float] = None) -> float:
        return ttl_s

    def close(self) -> None:
        self.closed = True


class ImmediateExecutor:
    """Runs submitted work at once on the caller's thread (deterministic unit tests)."""

    def submit(self, fn: Callable, *args: Any, **kw: Any):
        from concurrent.futures import Future
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kw))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        return None
