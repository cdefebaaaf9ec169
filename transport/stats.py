"""Counters an agent keeps (engines turn them into their own metrics; `doctor` shows them)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


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
    connections_refused: int = 0     # over max_pending_handshakes, or handshake deadline passed
    leases_expired: int = 0
    notifications_dropped: int = 0
    staging_slots_quarantined: int = 0
    endpoints_parked: int = 0        # UCX endpoints of failed transfers open until their blocked sends end
    granted_reads: int = 0           # reads done under a lease grant, with no round trip (grants.py)
    paths: Counter = field(default_factory=Counter)       # DataPath value -> transfers (either side)
    fallbacks: Counter = field(default_factory=Counter)   # "path: reason" -> times a path was not used

    def record_in(self, nbytes: int, seconds: float) -> None:
        self.bytes_in += nbytes
        self.transfers_in += 1
        self.transfer_seconds += seconds

    def count_granted_in(self, nbytes: int, path: str) -> None:
        """A read under a lease grant (grant_read.py; its seconds are added when it ended)."""
        self.bytes_in += nbytes
        self.transfers_in += 1
        self.paths[path] += 1
        self.granted_reads += 1

    def uncount_granted_in(self, nbytes: int, path: str) -> None:
        """Take back `count_granted_in` (that read went the normal way after all)."""
        self.bytes_in -= nbytes
        self.transfers_in -= 1
        self.granted_reads -= 1
        self.paths[path] -= 1
        if self.paths[path] <= 0:
            del self.paths[path]

    def record_out(self, nbytes: int, seconds: float) -> None:
        self.bytes_out += nbytes
        self.transfers_out += 1
        self.transfer_seconds += seconds

    def snapshot(self) -> dict:
        d = asdict(self)
        d["paths"] = dict(self.paths)
        d["fallbacks"] = dict(self.fallbacks)
        return d
