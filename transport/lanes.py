"""Which reads take a direct lane (lane.py), and the lanes of each calling thread."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import trace
from .core import Core
from .descs import Descs
from .errors import PeerLost, TransferError, TransferTimeout
from .lane import DirectLane, LaneFallback, NotYet, Pending
from .region import MemoryKind
from .transfer import Peer, Transfer
from .wire import DataPath, Msg

log = logging.getLogger(__name__)

# how long read() itself waits for the owner's reply on a lane; a slower reply is finished by
# the transport's loop (read() never blocks longer than this plus the copy)
LANE_WAIT_S = 0.05


class LanePool:
    def __init__(self, core: Core):
        self.core = core
        self._local = threading.local()
        self._all: list[DirectLane] = []
        self._lock = threading.Lock()
        self._closed = False

    def _eligible(self, peer: Any, local: Descs):
        cfg = self.core.config
        if (self._closed or not cfg.direct_lanes or not cfg.same_host_copy or not isinstance(peer, Peer)
                or local.nbytes > cfg.inline_copy_bytes or local.regions[0].kind is not MemoryKind.HOST):
            return None
        s = self.core.sessions.by_addr.get(peer.address)
        if (s is None or s.lost is not None or not s.peer.same_host or DataPath.CMA not in s.peer.serves
                or not s.pid_checked or DataPath.CMA in s.off):
            return None  # (the first same-host read goes the normal way: it checks the peer's pid)
        return s

    def try_read(self, peer: Any, local: Descs, lease_id: str, ranges: bytes | None, notify: bytes | None,
                 timeout: float, xfer: Transfer) -> bool:
        """Run the read on this thread if it qualifies; True when `xfer` is settled."""
        s = self._eligible(peer, local)
        if s is None:
            return False
        lanes: dict[str, DirectLane] = self._local.__dict__.setdefault("by_addr", {})
        lane = None
        t0 = time.monotonic()
        try:
            lane = self._lane(lanes, peer.address, s, timeout)
            if lane is None:
                return False
            deadline = time.monotonic() + timeout
            p = lane.request(s.peer.pid, local, lease_id, ranges, notify, xfer)
            try:
                f = lane._recv(min(deadline, time.monotonic() + LANE_WAIT_S), soft=True)
            except NotYet:
                self._detach(lanes, lane, p, deadline, t0, (s.grants, lease_id, ranges is None))
                return True
            lane.finish(p, f, deadline + 5.0, s.grants, lease_id, ranges is None)
        except LaneFallback as e:
            s.off[DataPath.CMA] = str(e)
            self.core.fallback(DataPath.CMA, str(e), s.name)
            return False
        except PeerLost as e:
            if lane is not None:
                self._drop(lanes, lane)
            log.debug("lane to %s unusable (%s); using the loop", peer.address, e)
            return False  # the normal path decides whether the peer is really gone
        except TransferError as e:
            if lane is not None and lane.broken:
                self._drop(lanes, lane)
            with self.core.lock:
                self.core.stats.transfers_failed += 1
            xfer._finish(e)
            return True
        with self.core.lock:
            self.core.stats.record_in(local.nbytes, time.monotonic() - t0)
            self.core.stats.paths[DataPath.CMA.value] += 1
        trace.mark(xfer, "settled")
        xfer._finish(None)
        return True

    def _detach(self, lanes: dict, lane: DirectLane, p: Pending, deadline: float, t0: float, grant_args) -> None:
        """The reply is late: the loop finishes this read (the lane leaves this thread)."""
        lanes.pop(lane.address, None)
        loop = self.core.runtime.loop
        state = {"done": False, "timer": None}
        fd = lane.sock.fileno()

        def end(err: BaseException | None) -> None:
            if state["done"]:
                return
            state["done"] = True
            loop.remove_reader(fd)
            if state["timer"] is not None:
                state["timer"].cancel()
            self._drop({}, lane)
            if err is None:
                with self.core.lock:
                    self.core.stats.record_in(p.nbytes, time.monotonic() - t0)
                    self.core.stats.paths[DataPath.CMA.value] += 1
            else:
                with self.core.lock:
                    self.core.stats.transfers_failed += 1
            p.xfer._finish(err)

        def ready() -> None:
            try:
                f = lane.poll()
                if f is None:
                    return
                lane.finish(p, f, None, *grant_args)
            except LaneFallback as e:
                end(TransferError(f"same-host copy unavailable after the request was sent: {e}"))
                return
            except TransferError as e:
                end(e)
                return
            end(None)

        def stop(err: TransferError) -> None:
            if not state["done"]:
                try:
                    lane._send(Msg.XFER_ABORT, xid=p.xid, reason=str(err)[:200], by_owner=False)
                except TransferError:
                    pass
                end(err)

        def start() -> None:
            lane.sock.setblocking(False)
            loop.add_reader(fd, ready)
            state["timer"] = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()), stop,
                                          TransferTimeout(f"transfer did not finish within its deadline "
                                                          f"({deadline - t0:.1f}s)"))
            ready()  # the reply may be in already
        p.xfer._attach(stop)
        loop.call_soon_threadsafe(start)

    def _lane(self, lanes: dict, address: str, s, timeout: float) -> DirectLane | None:
        """This thread's lane to `address` (made if needed); None if it reaches another process
        than session `s` checked. Raises PeerLost / TransferError when it cannot be made."""
        lane = lanes.get(address)
        if lane is not None and not lane.broken and lane.peer_instance == s.peer.instance:
            return lane
        if lane is not None:
            self._drop(lanes, lane)
        lane = DirectLane(self.core, address, timeout)
        lanes[address] = lane
        with self._lock:
            self._all.append(lane)
        if lane.peer_instance != s.peer.instance:  # not the process the session checked
            self._drop(lanes, lane)
            return None
        return lane

    def enabled(self) -> bool:
        return not self._closed and self.core.config.direct_lanes

    def existing(self, s) -> DirectLane | None:
        """This thread's working lane to session `s`'s peer, if it has one (never makes one)."""
        lane = self._local.__dict__.get("by_addr", {}).get(s.address) if s.address is not None else None
        if lane is None or lane.broken or lane.peer_instance != s.peer.instance:
            return None
        return lane

    def _drop(self, lanes: dict, lane: DirectLane) -> None:
        lane.close()
        lanes.pop(lane.address, None)
        with self._lock:
            if lane in self._all:
                self._all.remove(lane)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            lanes, self._all = self._all, []
        for lane in lanes:
            lane.close()
