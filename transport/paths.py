"""Which data path a transfer takes (pure): one-sided same-host copies where both sides allow
them, UCX otherwise, and why a faster path was not taken (logged, counted in stats, shown by
`doctor`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .region import MemoryKind
from .wire import DataPath


@dataclass(frozen=True)
class PathInputs:
    local_kind: MemoryKind              # memory of the initiator's local descriptors
    same_host: bool                     # same boot and PID namespace as the peer
    peer_serves: frozenset[DataPath]    # one-sided paths the peer offered in the handshake
    cma_on: bool                        # AgentConfig.same_host_copy
    ipc_on: bool                        # AgentConfig.gpu_ipc and CUDA IPC usable in this process
    off: Mapping[DataPath, str] = field(default_factory=dict)  # turned off for this peer, with reason


def choose_path(p: PathInputs) -> tuple[DataPath, str | None]:
    """The path to ask for, and (when it is UCX) why the one-sided path was not possible."""
    want = DataPath.CMA if p.local_kind is MemoryKind.HOST else DataPath.IPC
    if not p.same_host:
        return DataPath.UCX, None  # the normal case across hosts, not a fallback
    if want is DataPath.CMA and not p.cma_on:
        return DataPath.UCX, "same_host_copy is off here"
    if want is DataPath.IPC and not p.ipc_on:
        return DataPath.UCX, "CUDA IPC is off or unavailable here"
    if want not in p.peer_serves:
        return DataPath.UCX, f"the peer does not serve {want.value}"
    if want in p.off:
        return DataPath.UCX, p.off[want]
    return want, None
