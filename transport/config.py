"""Typed configuration of an `Agent`."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Mapping


class TransportSet(str, Enum):
    """Which UCX transports the process may use (maps to UCX_TLS for the UCX context).

    AUTO lets UCX pick among everything it has (shared memory, cma, tcp, cuda_ipc, verbs).
    UCX carries only data (the control plane is the agent's own TCP connection); every set
    keeps tcp so that a peer on another host stays reachable.
    """

    AUTO = "auto"
    TCP = "tcp"            # tcp only: what crosses hosts without RDMA
    SHM = "shm"            # shared memory + cma (and tcp for other hosts)
    CUDA = "cuda"          # shared memory + cuda_copy/cuda_ipc (and tcp for other hosts)

    def ucx_tls(self) -> str | None:
        return {
            TransportSet.AUTO: None,
            TransportSet.TCP: "tcp,self",
            TransportSet.SHM: "sm,tcp,self",
            TransportSet.CUDA: "sm,cuda_copy,cuda_ipc,tcp,self",
        }[self]


def parse_hostport(value: str) -> tuple[str, int]:
    """Split "host:port" (IPv6 as "[::1]:port"); raise ValueError on anything else."""
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"expected 'host:port', got {value!r}")
    host, _, port_s = value.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise ValueError(f"missing host in {value!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port


def is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one agent.

    listen: "host:port" of the control listener (port 0: ephemeral). Only that address is
        bound. A non-loopback host needs `auth_key` (or `peer_keys`): the agent refuses to start
        otherwise.
    auth_key: shared secret; when set, peers must prove it (HMAC-SHA256 over the whole
        handshake transcript) and every later control frame carries a MAC.
    peer_keys: per-peer secrets by peer name (names become identities: a peer can only use the
        name whose key it holds); a name not listed falls back to `auth_key`, if any.
    timeout_s: default deadline of every blocking call.
    compat: what must match between peers (model, dtype, layout, ...), compared key by key
        after authentication, before anything else is trusted.
    transports: which UCX transports the process uses (process-wide, first agent decides).
    chunk_bytes: size of one pipelined UCX data message.
    staging_bytes: bound on the staging memory one agent uses for packing (per device).
    max_ttl_s: longest lease lifetime a peer may ask for in renew().
    sweep_interval_s: how often expired leases are reclaimed.
    max_message_bytes: size limit of one control message after authentication.
    handshake_timeout_s: an incoming connection that has not authenticated by then is closed.
    max_pending_handshakes: connections still in their handshake beyond this are refused.
    max_transfers_per_peer: transfers one connection may have in flight at the owner.
    max_notify_bytes / max_notify_count: bound of the queue behind `notifications()`, and each
        also of the notifications and calls waiting for (or running on) an `on_notify` /
        `on_call` executor;
        when full, further notifications are refused (`notify()` raises Busy) or dropped
        and counted (those riding on a completed read), and logged.
    same_host_copy: read/write host memory of a peer on the same host with one kernel copy
        (process_vm_readv/writev with scatter/gather lists, see cma.py).
    gpu_ipc: read/write CUDA memory of a peer on the same host through CUDA IPC with one fused
        kernel per transfer (see cuda_ipc.py) instead of pack/UCX/unpack.
    gpu_direct_tables: on the CUDA IPC path, the kernel reads a read's own runs from its Descs'
        pinned tables (pinned_tables.py, gpu_direct.py) instead of each read writing its run
        table into a pinned slot first (on since it ran on an H100: 0.72-0.81x of the contiguous
        copy against 0.70x for 16,384 scattered blocks; README, GPUs).
    inline_copy_bytes: same-host copies up to this size run on the transport's loop thread
        (no thread hand-off); larger ones are spread over worker threads.
    direct_lanes: a read of at most `inline_copy_bytes` of host memory from a peer on this host,
        called from an ordinary thread, runs entirely on that thread over a connection of its
        own (lane.py): no hand-off to the transport's loop and back.
    lease_grants: same-host re-reads of a lease without a round trip (grants.py): the owner's
        first answer names a word in its memory that changes when the lease ends; later
        whole-lease reads of host memory copy, then check that word. Off: every read asks the
        owner (both sides must have it on for grants to be used).
    grant_push_sessions: when a lease is exposed, its grant is sent ahead to the same-host
        sessions that may read it (grant_push.py), so its first read needs no round trip too; a
        lease open to any peer is sent ahead only when at most this many same-host readers are
        connected (0: never for such leases).
    keepalive_s: idle seconds before TCP keepalive probes a silent control connection.
    ucx_error_handling: UCX peer error handling on data endpoints. On (the default), UCX fails the
        requests of a peer that dies, so nothing is stranded and no core is left spinning; UCX then
        uses only transports that can report a dead peer (tcp; verbs across hosts), so a same-host
        UCX fallback moves host memory at tcp speed. Off allows UCX's shared memory for same-host
        fallbacks (about 2x faster on the 2-core machine), but a peer that dies mid-transfer can
        strand UCX requests that keep the survivor's UCX progress thread busy.
    ucx_options: extra UCX settings (names without the UCX_ prefix) for the process's UCX
        context; like `transports`, the first agent of a process decides them.
    """

    listen: str = "127.0.0.1:0"
    auth_key: bytes | None = None
    peer_keys: Mapping[str, bytes] = field(default_factory=dict)
    timeout_s: float = 30.0
    compat: dict[str, str | int | float | bool] = field(default_factory=dict)
    transports: TransportSet = TransportSet.AUTO
    chunk_bytes: int = 8 << 20
    staging_bytes: int = 64 << 20
    max_ttl_s: float = 600.0
    sweep_interval_s: float = 0.5
    max_message_bytes: int = 8 << 20
    handshake_timeout_s: float = 10.0
    max_pending_handshakes: int = 64
    max_transfers_per_peer: int = 4096
    max_notify_bytes: int = 64 << 20
    max_notify_count: int = 65536
    same_host_copy: bool = True
    gpu_ipc: bool = True
    gpu_direct_tables: bool = True
    inline_copy_bytes: int = 4 << 20
    direct_lanes: bool = True
    lease_grants: bool = True
    grant_push_sessions: int = 4
    keepalive_s: float = 5.0
    ucx_error_handling: bool = True
    ucx_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        host, _ = parse_hostport(self.listen)
        if self.auth_key is not None:
            if not isinstance(self.auth_key, (bytes, bytearray)):
                raise TypeError("auth_key must be bytes or None")
            if not self.auth_key:
                raise ValueError("auth_key must not be empty (use None for no authentication)")
        for k, v in dict(self.peer_keys).items():
            if not isinstance(k, str) or not isinstance(v, (bytes, bytearray)) or not v:
                raise TypeError("peer_keys must map peer names to non-empty bytes")
        if not self.keyed and not is_loopback_host(host):
            raise ValueError(f"listen={self.listen!r} is reachable from other hosts but no auth_key is set: "
                             "set AgentConfig.auth_key (or peer_keys), or listen on 127.0.0.1")
        for name in ("timeout_s", "handshake_timeout_s", "keepalive_s", "sweep_interval_s", "max_ttl_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.chunk_bytes < 4096 or self.chunk_bytes & (self.chunk_bytes - 1):
            raise ValueError("chunk_bytes must be a power of two >= 4096")
        if self.staging_bytes < 2 * self.chunk_bytes:
            raise ValueError("staging_bytes must hold at least two chunks")
        for name in ("max_pending_handshakes", "max_transfers_per_peer", "max_notify_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.grant_push_sessions < 0:
            raise ValueError("grant_push_sessions must be >= 0")
        if self.max_message_bytes < 64 << 10 or self.max_notify_bytes < 0 or self.inline_copy_bytes < 0:
            raise ValueError("max_message_bytes must be >= 64 KiB; byte bounds must be >= 0")
        if not isinstance(self.transports, TransportSet):
            object.__setattr__(self, "transports", TransportSet(self.transports))
        for k, v in self.compat.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
                raise TypeError(f"compat entries must be str -> str/int/float/bool, got {k!r}: {v!r}")

    @property
    def keyed(self) -> bool:
        return self.auth_key is not None or bool(self.peer_keys)

    def key_for(self, peer_name: str) -> bytes | None:
        """The secret a peer of that name must prove (None: no authentication)."""
        k = dict(self.peer_keys).get(peer_name)
        return bytes(k) if k is not None else (bytes(self.auth_key) if self.auth_key is not None else None)

    @property
    def staging_slots(self) -> int:
        return max(2, self.staging_bytes // self.chunk_bytes)
