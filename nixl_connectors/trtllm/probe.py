"""Generation side: is a hand-off ready on every context rank? (asked by the rank-0 scheduler)

TensorRT-LLM's connector API has no way to report a failed load: once
``get_num_new_matched_tokens`` has claimed tokens, the engine parks the request until every
worker reports it loaded, and then decodes from whatever the blocks hold. So the scheduler
claims a hand-off only after every context rank has answered READY with a lease of the
expected size; anything else (unknown or dropped key, request still computing, context
instance unreachable or incompatible) makes it answer "0 tokens": the request computes its
prompt locally. The answer is broadcast to every rank by TensorRT-LLM, so the ranks stay in step.

One lookup is a request/reply on the transport's authenticated channel (``Agent.call``),
bounded by ``lookup_wait_s + probe_timeout_s``. A context worker that could not be reached is
not asked again for ``peer_retry_s``: during that time salted requests compute locally at once
instead of each waiting for a deadline.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from transport import CallFailed, TransferError

from . import directory as d
from .config import TrtllmSettings
from .metadata import RankLease

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeResult:
    """READY on every rank (``leases`` set) or not, and why not."""

    leases: tuple[RankLease, ...] = ()
    reason: str = ""

    @property
    def ready(self) -> bool:
        return bool(self.leases) and not self.reason


class HandoffProbe:
    """Asks each context rank for a routing key's lease; remembers unreachable peers."""

    def __init__(self, settings: TrtllmSettings, tp_size: int,
                 clock: Callable[[], float] = time.monotonic):
        self._s = settings
        self._tp = tp_size
        self._clock = clock
        self._down_until: dict[str, float] = {}

    def _address(self, rank: int) -> str:
        return self._s.context_agent(rank)

    def probe(self, agent: Any, key: str, expected_nbytes: int) -> ProbeResult:
        asked: list[int] = []
        leases: list[RankLease] = []
        for rank in range(self._tp):
            address = self._address(rank)
            down = self._down_until.get(address, 0.0) - self._clock()
            if down > 0:
                return self._give_up(agent, key, asked, f"context rank {rank} ({address}) "
                                     f"unreachable; not asked again for {down:.1f}s")
            try:
                ans = self._ask(agent, address, key)
            except CallFailed as e:
                return self._give_up(agent, key, asked, f"context rank {rank} refused the lookup: {e}")
            except (TransferError, d.DirectoryMessageError) as e:
                self._down_until[address] = self._clock() + self._s.peer_retry_s
                return self._give_up(agent, key, asked, f"context rank {rank} ({address}): "
                                     f"{type(e).__name__}: {e}")
            asked.append(rank)
            if ans.key != key or ans.rank != rank:
                return self._give_up(agent, key, asked, f"context rank {rank} answered for "
                                     f"{ans.key!r} rank {ans.rank}: misconfigured context_agents?")
            if ans.status is not d.LeaseStatus.READY:
                return self._give_up(agent, key, asked, f"context rank {rank}: {ans.status.value}")
            if ans.nbytes != expected_nbytes:
                return self._give_up(agent, key, asked, f"context rank {rank} holds {ans.nbytes} "
                                     f"bytes, {expected_nbytes} expected: the layouts differ")
            leases.append(RankLease(rank, ans.lease_id, ans.nbytes))
        self._down_until.clear()
        return ProbeResult(tuple(leases))

    def _ask(self, agent: Any, address: str, key: str) -> d.Answer:
        peer = agent.connect(address, timeout=self._s.connect_timeout_s)
        raw = agent.call(peer, d.encode(d.Lookup(key, int(self._s.lookup_wait_s * 1000))),
                         timeout=self._s.lookup_wait_s + self._s.probe_timeout_s)
        msg = d.decode(raw)
        if not isinstance(msg, d.Answer):
            raise d.DirectoryMessageError(f"expected an answer, got {type(msg).__name__}")
        return msg

    def _give_up(self, agent: Any, key: str, asked: list[int], reason: str) -> ProbeResult:
        logger.info("hand-off %s computed locally: %s", key, reason)
        self.release(agent, key, asked)
        return ProbeResult((), reason)

    def release(self, agent: Any, key: str, ranks: list[int]) -> None:
        """Tell those context ranks the key's blocks are not wanted (best effort)."""
        for rank in ranks:
            address = self._address(rank)
            try:
                agent.notify(agent.connect(address, timeout=self._s.connect_timeout_s),
                             d.encode(d.Release(key)), timeout=self._s.probe_timeout_s)
            except TransferError as e:
                logger.debug("release of %s at rank %d not delivered (the lease expires): %s",
                             key, rank, e)
