"""Counters an agent keeps (engines turn them into their own metrics)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class AgentStats:
    bytes_in: int = 0
    bytes_out: int = 0
    transfers_in: int = 0
    transfers_out: int = 0
    transfer_seconds: float = 0.0
    transfers_failed: int = 0
    requests_rejected: int = 0
    handshake_failures: int = 0
    leases_expired: int = 0

    def record_in(self, nbytes: int, seconds: float) -> None:
        self.bytes_in += nbytes
        self.transfers_in += 1
        self.transfer_seconds += seconds

    def record_out(self, nbytes: int, seconds: float) -> None:
        self.bytes_out += nbytes
        self.transfers_out += 1
        self.transfer_seconds += seconds

    def snapshot(self) -> dict:
        return asdict(self)
