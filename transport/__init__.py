"""Engine-agnostic async transport core: moves leased KV blocks between processes.

Control plane: the agent's own authenticated TCP connections. Data: on one host the initiator
copies itself (process_vm_readv for host memory, CUDA IPC + one fused kernel for GPU memory);
across hosts, and as the fallback, UCX. Importing this package starts nothing; UCX starts only
when a transfer first needs it.
"""
from .agent import Agent
from .config import AgentConfig, TransportSet
from .descs import Descs
from .errors import (BadMessage, Busy, CallFailed, CompatMismatch, ErrorCode, LeaseRejected, PathUnavailable,
                     PeerLost, ProtocolMismatch, TransferCancelled, TransferError, TransferTimeout, Unauthorized)
from .leases import Lease
from .region import MemoryKind, Region
from .stats import AgentStats
from .transfer import Peer, Transfer
from .wire import DataPath

__all__ = [
    "Agent", "AgentConfig", "TransportSet", "Descs", "Region", "MemoryKind", "Lease", "Peer", "Transfer",
    "AgentStats", "DataPath", "TransferError", "TransferTimeout", "PeerLost", "LeaseRejected", "ProtocolMismatch",
    "CompatMismatch", "Unauthorized", "TransferCancelled", "BadMessage", "CallFailed", "PathUnavailable", "Busy",
    "ErrorCode",
]
