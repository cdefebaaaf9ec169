"""Typed configuration of an `Agent`."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class TransportSet(str, Enum):
    """Which UCX transports the process may use (maps to UCX_TLS for the UCX context).

    AUTO lets UCX pick among everything it has (shared memory, cma, tcp, cuda_ipc, verbs).
    Every set includes tcp: the listener (control plane) needs a sockaddr-capable transport.
    """

    AUTO = "auto"
    TCP = "tcp"            # tcp only: what crosses hosts without RDMA
    SHM = "shm"            # shared memory + cma for data, tcp only for the control plane
    CUDA = "cuda"          # shared memory + cuda_copy/cuda_ipc, tcp for control

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


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one agent.

    listen: "host:port" of the control listener (port 0: ephemeral).
    auth_key: shared secret; when set, peers must prove it (HMAC-SHA256) in the handshake.
    timeout_s: default deadline of every blocking call.
    compat: what must match between peers (model, dtype, layout, block size, ...), compared
        key by key in the handshake before anything else is trusted.
    transports: which UCX transports the process uses (process-wide, first agent decides).
    chunk_bytes: size of one pipelined data message.
    staging_bytes: bound on the staging memory one agent uses for packing (per direction).
    zero_copy_min_bytes: a chunk that lies inside one contiguous run goes without packing.
    max_ttl_s: longest lease lifetime a peer may ask for in renew().
    sweep_interval_s: how often expired leases are reclaimed.
    max_message_bytes: size limit of one control message, checked before decoding.
    same_host_copy: read host memory of a peer on the same host with one kernel copy
        (process_vm_readv with scatter/gather lists, see cma.py) instead of pack/UCX/unpack.
    gpu_ipc: read CUDA memory of a peer on the same host through CUDA IPC with one fused
        kernel per transfer (see cuda_ipc.py) instead of pack/UCX/unpack.
    ucx_options: extra UCX settings (names without the UCX_ prefix) for the process's UCX
        context; like `transports`, the first agent of a process decides them.
    """

    listen: str = "127.0.0.1:0"
    auth_key: bytes | None = None
    timeout_s: float = 30.0
    compat: dict[str, str | int | float | bool] = field(default_factory=dict)
    transports: TransportSet = TransportSet.AUTO
    chunk_bytes: int = 8 << 20
    staging_bytes: int = 64 << 20
    zero_copy_min_bytes: int = 1 << 20
    max_ttl_s: float = 600.0
    sweep_interval_s: float = 0.5
    max_message_bytes: int = 8 << 20
    same_host_copy: bool = True
    gpu_ipc: bool = True
    ucx_options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_hostport(self.listen)
        if self.auth_key is not None and not isinstance(self.auth_key, (bytes, bytearray)):
            raise TypeError("auth_key must be bytes or None")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.chunk_bytes < 4096 or self.chunk_bytes & (self.chunk_bytes - 1):
            raise ValueError("chunk_bytes must be a power of two >= 4096")
        if self.staging_bytes < 2 * self.chunk_bytes:
            raise ValueError("staging_bytes must hold at least two chunks")
        if not isinstance(self.transports, TransportSet):
            object.__setattr__(self, "transports", TransportSet(self.transports))
        for k, v in self.compat.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
                raise TypeError(f"compat entries must be str -> str/int/float/bool, got {k!r}: {v!r}")

    @property
    def staging_slots(self) -> int:
        return max(2, self.staging_bytes // self.chunk_bytes)
