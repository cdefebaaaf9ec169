"""One vocabulary for the transport settings of both engine adapters."""
from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from transport import TransportSet

from .coerce import ConfigError

DEFAULT_AUTH_KEY_ENV = "NIXL_CONNECTORS_AUTH_KEY"

# old spellings (vLLM connector 0.1 / TensorRT-LLM connector 0.1) -> AgentSettings names
DEPRECATED_ALIASES = {
    "base_port": "listen_port_base",
    "transfer_timeout_s": "timeout_s",
}


@dataclass(frozen=True)
class AgentSettings:
    """How an engine rank's transport agent listens, authenticates and moves bytes.

    listen_host: interface the agent listens on (127.0.0.1 by default; nothing else is bound).
    advertise_host: host written into hand-off metadata for peers (default: listen_host).
    listen_port_base: rank r listens on listen_port_base + r; 0 = ephemeral ports.
    auth_key_env: name of the environment variable holding the shared secret.
    auth_key_file: path of a file holding the shared secret (mode 0600 or stricter);
        wins over auth_key_env. Without either, the agent runs without authentication,
        which the transport allows on loopback only.
    timeout_s: deadline of connect / read / renew / call.
    transports: UCX transport set of the process ("auto", "tcp", "shm", "cuda").
    same_host_copy: host memory of a peer on this host is read with one kernel copy.
    gpu_ipc: CUDA memory of a peer on this host is read through CUDA IPC with one kernel.
    gpu_direct_tables: that kernel reads a read's runs from its descriptors' pinned tables
        (off: each read writes its run table first; AgentConfig.gpu_direct_tables).
    """

    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    listen_port_base: int = 0
    auth_key_env: str = DEFAULT_AUTH_KEY_ENV
    auth_key_file: str | None = None
    timeout_s: float = 30.0
    transports: TransportSet = TransportSet.AUTO
    same_host_copy: bool = True
    gpu_ipc: bool = True
    gpu_direct_tables: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.listen_port_base <= 65535:
            raise ConfigError("listen_port_base must be in [0, 65535]")
        if self.timeout_s <= 0:
            raise ConfigError("timeout_s must be > 0")
        if not self.listen_host:
            raise ConfigError("listen_host must not be empty")

    @property
    def host(self) -> str:
        return self.advertise_host or self.listen_host

    def listen_address(self, rank: int) -> str:
        port = self.listen_port_base + rank if self.listen_port_base else 0
        if self.listen_port_base and port > 65535:
            raise ConfigError(f"listen_port_base {self.listen_port_base} + rank {rank} exceeds 65535")
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{port}"

    def advertised(self, agent_address: str) -> str:
        """The address peers should use: the agent's real port on `host`."""
        port = agent_address.rpartition(":")[2]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{port}"

    def auth_key(self, environ: dict[str, str] | None = None) -> bytes | None:
        """The shared secret from `auth_key_file` or `$auth_key_env`; None when neither is set."""
        if self.auth_key_file:
            p = Path(self.auth_key_file)
            try:
                st = p.stat()
            except OSError as e:
                raise ConfigError(f"auth_key_file {p}: {e.strerror}") from None
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"auth_key_file {p} is readable by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it")
            key = p.read_bytes().strip()
            if not key:
                raise ConfigError(f"auth_key_file {p} is empty")
            return key
        env = os.environ if environ is None else environ
        value = env.get(self.auth_key_env, "")
        return value.encode("utf-8") if value else None

    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.listen_host).is_loopback
        except ValueError:
            return self.listen_host == "localhost"
