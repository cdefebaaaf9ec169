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
        lane = lanes.get(peer.address)
        t0 = time.monotonic()
        try:
            if lane is None or lane.broken or lane.peer_instance != s.peer.instance:
                if lane is not None:
                    self._drop(lanes, lane)
                lane = DirectLane(self.core, peer.address, timeout)
                lanes[peer.address] = lane
                with self._lock:
                    self._all.append(lane)
                if lane.peer_instance != s.peer.instance:  # not the process the session checked
                    self._drop(lanes, lane)
                    return False
            deadline = time.monotonic() + timeout
            p = lane.request(s.peer.pid, local, lease_id, ranges, notify, xfer)
            try:
                f = lane._recv(min(deadline, time.monotonic() + LANE_WAIT_S), soft=True)
            except NotYet:
                self._detach(lanes, lane, p, deadline, t0)
                return True
            lane.finish(p, f, deadline + 5.0)
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

    def _detach(self, lanes: dict, lane: DirectLane, p: Pending, deadline: float, t0: float) -> None:
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
                lane.finish(p, f, None)
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
