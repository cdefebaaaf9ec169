"""Direct lanes: small same-host reads done entirely on the calling thread.

A read through the transport's loop costs two thread hand-offs (the caller's thread wakes the
loop, the loop wakes the caller), each a GIL switch and an epoll wake-up. For a small same-host
read of host memory, whose whole cost is one round trip and one process_vm_readv, those
hand-offs are a third of the time. A direct lane is a second authenticated connection to the
same peer, owned by one calling thread and used blockingly: the thread sends READ_REQ, waits
for READ_ACK on its own socket, copies with process_vm_readv, and returns; XFER_DONE then
releases the owner's hold. The owner serves it as any session (same process instance, so the
name rule admits it) but never sends it anything of its own (the HELLO says `lane`).

Same protocol, same checks: MAC'd frames when keyed, the owner's lease checks, the reader's
iovec checks, the hold time. Anything unusual (an error from the owner that a fallback can
handle, a refused copy, a broken lane) sends the read down the normal path instead.
"""
from __future__ import annotations

import itertools
import logging
import socket
import time
from typing import Any

from . import cma, trace, wire
from . import handshake as hs
from .config import parse_hostport
from .conn import HANDSHAKE_FRAME_LIMIT, raise_if_error, tune_socket
from .core import Core
from .descs import Descs
from .errors import BadMessage, PathUnavailable, PeerLost, TransferError, TransferTimeout, error_from_wire
from .framing import FrameDecoder, encode_frame
from .handshake_io import check_server
from .wire import DataPath, Frame, Msg

log = logging.getLogger(__name__)

HOLD_MARGIN_S = 0.002


class LaneFallback(Exception):
    """This read cannot use the lane (nothing was copied); use the normal path."""


class NotYet(Exception):
    """No reply yet (a soft wait ran out)."""


class Pending:
    """A lane read whose request is out: what finishing it needs."""

    def __init__(self, pid: int, local: Descs, nbytes: int, xid: int, rid: int, sent: float, xfer: Any):
        self.pid, self.local, self.nbytes, self.xid, self.rid, self.sent, self.xfer = (
            pid, local, nbytes, xid, rid, sent, xfer)


class DirectLane:
    """One thread's blocking connection to one peer (not thread-safe by design)."""

    def __init__(self, core: Core, address: str, timeout: float):
        self.core = core
        self.address = address
        host, port = parse_hostport(address)
        try:
            self.sock = socket.create_connection((host, port), timeout)
        except OSError as e:
            raise PeerLost(f"lane to {address}: {e.strerror or e}") from None
        tune_socket(self.sock, core.config.keepalive_s)
        self.decoder = FrameDecoder(HANDSHAKE_FRAME_LIMIT)
        self.mac = None
        self._rids = itertools.count(1)
        self._xids = itertools.count(1)
        self.broken = False
        self.peer_instance = b""
        try:
            self.peer_name = self._handshake(timeout)
        except BaseException:
            self.close()
            raise

    # -- framing -------------------------------------------------------------------------------
    def _send(self, msg: Msg, rid: int = 0, **body: Any) -> None:
        try:
            self.sock.sendall(encode_frame(wire.encode(msg, rid, **body), self.mac))
        except OSError as e:
            self.broken = True
            raise PeerLost(f"lane to {self.address}: send failed: {e}") from None

    def _recv(self, deadline: float, soft: bool = False) -> Frame:
        """The next frame before `deadline`; with `soft`, NotYet instead of a timeout (the lane
        stays usable)."""
        pending = getattr(self, "_pending", [])
        while not pending:
            left = deadline - time.monotonic()
            if left <= 0:
                if soft:
                    raise NotYet()
                self.broken = True
                raise TransferTimeout(f"lane to {self.address}: no reply before the deadline")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError as e:
                self.broken = True
                raise PeerLost(f"lane to {self.address}: {e}") from None
            pending = self._ingest(data)
        self._pending = pending[1:]
        return pending[0]

    def _ingest(self, data: bytes) -> list[Frame]:
        if not data:
            self.broken = True
            raise PeerLost(f"lane to {self.address}: connection closed")
        try:
            return [wire.decode(b, self.decoder.limit) for b in self.decoder.frames(data)]
        except TransferError:
            self.broken = True
            raise

    def _handshake(self, timeout: float) -> str:
        core, cfg = self.core, self.core.config
        deadline = time.monotonic() + timeout
        hello = dict(core.hello_fields(), nonce=hs.new_nonce(), compat=dict(cfg.compat), lane=True)
        self._send(Msg.HELLO, 1, **hello)
        ack = self._recv(deadline)
        peer, key, th = check_server(core, hello, ack, self.address)
        name, self.peer_instance = peer.name, peer.instance
        macs = hs.frame_macs(key, th, client=True)
        self._send(Msg.AUTH, 2, mac=hs.proof(key, b"client", th))
        # WELCOME is the last unsigned frame: switch the decoder right after it
        welcome = self._recv(deadline)
        raise_if_error(welcome, Msg.WELCOME)
        self.mac = self.decoder.mac = macs
        self.decoder.limit = cfg.max_message_bytes
        if getattr(self, "_pending", None):  # nothing may follow WELCOME unsigned
            raise BadMessage("lane: frames after WELCOME before the switch")
        return name

    # -- reads ---------------------------------------------------------------------------------
    def request(self, pid: int, local: Descs, lease_id: str, ranges: bytes | None, notify: bytes | None,
                xfer: Any) -> Pending:
        xid, rid = next(self._xids), next(self._rids)
        sent = time.monotonic()
        self._send(Msg.READ_REQ, rid, xid=xid, lease=lease_id, nbytes=local.nbytes, ranges=ranges,
                   path=DataPath.CMA.value, tag=0, notify=notify)
        trace.mark(xfer, "request_sent")
        return Pending(pid, local, local.nbytes, xid, rid, sent, xfer)

    def poll(self) -> Frame | None:
        """A frame if one has arrived (never blocks)."""
        pending = getattr(self, "_pending", [])
        if not pending:
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except OSError as e:
                self.broken = True
                raise PeerLost(f"lane to {self.address}: {e}") from None
            pending = self._ingest(data)
            if not pending:
                self._pending = []
                return None
        self._pending = pending[1:]
        return pending[0]

    def finish(self, p: Pending, f: Frame, confirm_deadline: float | None, grants=None,
               lease_id: str = "", whole: bool = False) -> None:
        """Copy what the reply names and release the owner's hold. A copy that ended after
        the owner's hold needs its confirmation: waited for until `confirm_deadline`, or, when
        that is None (on the loop thread, which must not block), reported as a timeout."""
        xfer, xid, rid, local, pid, sent = p.xfer, p.xid, p.rid, p.local, p.pid, p.sent
        trace.mark(xfer, "reply_handled")
        if f.rid != rid:
            self.broken = True
            raise BadMessage(f"lane: reply to request {f.rid}, expected {rid}")
        if f.type is Msg.ERROR:
            err = error_from_wire(f.body["code"], f.body["message"], f.body["field"])
            if isinstance(err, PathUnavailable):
                raise LaneFallback(str(err))
            raise err
        if f.type is not Msg.READ_ACK or f.body["xid"] != xid:
            self.broken = True
            raise BadMessage("lane: unexpected reply")
        hold_until = sent + f.body["hold_ms"] / 1000.0 * 0.999 - HOLD_MARGIN_S
        try:
            remote = cma.parse_remote(f.body["iov"] or b"", local.nbytes)
            cma.copy_all(pid, cma.plan_batches(local, remote), False)
        except cma.CmaUnavailable as e:
            self._send(Msg.XFER_ABORT, xid=xid, reason="falling back", by_owner=False)
            raise LaneFallback(f"the kernel refused process_vm_readv: {e}") from None
        except ValueError as e:
            self._send(Msg.XFER_ABORT, xid=xid, reason="bad iovecs", by_owner=False)
            raise BadMessage(f"owner sent unusable iovecs: {e}") from None
        except OSError as e:
            self._send(Msg.XFER_ABORT, xid=xid, reason="copy failed", by_owner=False)
            raise PeerLost(f"same-host copy failed: {e}") from None
        trace.mark(xfer, "copied")
        if grants is not None and whole and f.body["grant"] is not None:
            grants.add(lease_id, local.nbytes, f.body["iov"], f.body["grant"], sent)
        if time.monotonic() <= hold_until:
            self._send(Msg.XFER_DONE, 0, xid=xid)
            return
        crid = next(self._rids)
        self._send(Msg.XFER_DONE, crid, xid=xid)
        if confirm_deadline is None:
            self.broken = True
            raise TransferTimeout("the copy ended after the owner's hold time; not confirmed")
        ok = self._recv(confirm_deadline)
        if ok.rid != crid:
            self.broken = True
            raise BadMessage("lane: unexpected reply to xfer_done")
        raise_if_error(ok, Msg.OK)

    def report(self, msg: Msg, **body: Any) -> bool:
        """Send a message that needs no reply on this thread's lane; False if the lane broke."""
        if self.broken:
            return False
        try:
            self._send(msg, 0, **body)
        except TransferError:
            return False
        return True

    def close(self) -> None:
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass
