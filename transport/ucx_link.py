"""A session's UCX data link: the peer's worker address and a pool of data endpoints to it.

Worker addresses are exchanged only over an authenticated session (UCX_HELLO / UCX_ACK, both
MAC'd when a key is set), and only when a transfer first needs UCX."""
from __future__ import annotations

from .core import Core
from .dataeps import DataEndpoints
from .errors import BadMessage
from .session import Session
from .wire import Msg

MAX_WORKER_ADDRESS = 1 << 16


def check_worker_address(peer: bytes, ours: bytes) -> None:
    """Refuse what cannot be a UCX worker address of our address format. UCX parses a worker
    address without any bounds checks (a garbage one aborted the process in address.c), so this
    stops malformed input from a peer, not a forged address from a hostile key holder."""
    if not 16 <= len(peer) <= MAX_WORKER_ADDRESS:
        raise BadMessage("UCX worker address of implausible size")
    if ours and (peer[0] & 0x0F) != (ours[0] & 0x0F):
        raise BadMessage("UCX worker address of another address format version")


class UcxLink:
    def __init__(self, peer_worker: bytes, error_handling: bool):
        self.peer_worker = peer_worker
        self.endpoints = DataEndpoints(peer_worker, error_handling)

    async def close(self) -> None:
        await self.endpoints.close()


async def ensure_link(core: Core, s: Session, timeout: float) -> UcxLink:
    if s.ucx is None:
        ours = await core.runtime.ensure_ucx()
        f = await s.conn.request(Msg.UCX_HELLO, timeout, worker=ours)
        check_worker_address(f.body["worker"], ours)
        if s.ucx is None:
            s.ucx = UcxLink(f.body["worker"], error_handling=core.config.ucx_error_handling or not s.peer.same_host)
    return s.ucx
