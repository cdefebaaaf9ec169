"""Engine-agnostic async transport core: moves leased KV blocks between processes over UCX.

Importing this package does not start UCX; the first `Agent` does.
"""
from .agent import Agent
from .config import AgentConfig, TransportSet
from .descs import Descs
from .errors import (BadMessage, CallFailed, CompatMismatch, ErrorCode, LeaseRejected, PeerLost, ProtocolMismatch,
                     TransferCancelled, TransferError, TransferTimeout, Unauthorized)
from .leases import Lease
from .region import MemoryKind, Region
from .stats import AgentStats
from .transfer import Peer, Transfer

__all__ = [
    "Agent", "AgentConfig", "TransportSet", "Descs", "Region", "MemoryKind", "Lease", "Peer", "Transfer",
    "AgentStats", "TransferError", "TransferTimeout", "PeerLost", "LeaseRejected", "ProtocolMismatch",
    "CompatMismatch", "Unauthorized", "TransferCancelled", "BadMessage", "CallFailed", "ErrorCode",
]
