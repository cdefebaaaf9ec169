"""An authenticated but hostile peer (it holds the key): what it says is checked before UCX,
the kernel or the GPU sees it, and no answer of it crashes or hangs the agent.

- UCX worker addresses are parsed by UCX without bounds checks (a garbage address aborted the
  owner process with a UCX assertion): both directions check them first.
- A lying owner's iovecs (sizes that do not add up, wrap around, zero lengths) are refused by
  the reader, which then copies nothing.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from rawpeer import RawPeer, RawServer
from xport_fixtures import agent
from xport_helpers import RemoteError, wait_until

from transport.wire import Msg

pytestmark = pytest.mark.timeout(180)
KEY = b"hostile-peer-key"


def _good_read(sec, owner, oaddr, reader_label="reader2"):
    r = sec[reader_label]
    rd, _ = agent(r, "good", 64, 4096, auth_key=KEY)
    r.connect(rd, oaddr)
    lid, _, _ = sec["owner"].expose(owner, np.arange(16, 48))
    r.read(rd, oaddr, np.arange(32), lid, timeout=20)
    assert r.bad_blocks(rd, np.arange(32), np.arange(16, 48), 5) == 0


@pytest.mark.parametrize("worker", [
    pytest.param(b"\x07" + np.random.default_rng(1).bytes(299), id="random-300"),
    pytest.param(b"\x04" + np.random.default_rng(2).bytes(200), id="version-4"),
    pytest.param(b"", id="empty"),
    pytest.param(b"\x00", id="one-byte"),
])
def test_garbage_ucx_worker_address_is_refused(sec, worker):
    """Before the fix a garbage UCX_HELLO worker address killed the owner process (UCX
    'address.c: Assertion addr_version == UCP_OBJECT_VERSION_V2 failed') at its next UCX read."""
    o = sec["owner"]
    owner, oaddr = agent(o, "owner", 64, 4096, seed=5, auth_key=KEY)
    lid, _, _ = o.expose(owner, np.arange(8))
    with RawPeer(oaddr, "ucx-liar", KEY).handshake() as p:
        f, _ = p.request(Msg.UCX_HELLO, worker=worker, timeout=60)
        assert f.type is Msg.ERROR and f.body["code"] == "bad_message", f
        f, _ = p.request(Msg.READ_REQ, xid=1, lease=lid, nbytes=8 * 4096, ranges=None, path="ucx",
                         tag=1 << 30, notify=None, timeout=30)
        assert f.type is Msg.ERROR and f.body["code"] == "bad_message", f
        assert p.ping() == []
    assert o.alive()
    _good_read(sec, owner, oaddr)


def test_lying_owner_garbage_ucx_worker_address(sec):
    """The other direction: an owner answering UCX_HELLO with garbage fails the reader's transfer
    with a typed error; the reader process lives on."""
    def handler(conn, f):
        if f.type is Msg.UCX_HELLO:
            conn.send(Msg.UCX_ACK, f.rid, worker=b"\x04" + np.random.default_rng(3).bytes(200))

    srv = RawServer("ucx-liar-owner", KEY, paths=[], handler=handler)
    try:
        r = sec["reader"]
        rd, _ = agent(r, "victim", 64, 4096, auth_key=KEY, same_host_copy=False, timeout_s=10.0)
        r.connect(rd, srv.address)
        with pytest.raises(RemoteError) as ei:
            r.read(rd, srv.address, np.arange(8), "f" * 32, timeout=10, wait_timeout=30)
        assert ei.value.type == "BadMessage", ei.value
        assert r.alive()
        assert not srv.errors
    finally:
        srv.close()


# ---------------------------------------------------------------------------------- lying iovecs
def _iov(pairs) -> bytes:
    return b"".join(struct.pack("<QQ", a, n) for a, n in pairs)


@pytest.mark.parametrize("case", ["short", "long", "wrap", "zero-length", "odd-bytes", "huge-sum", "empty"])
def test_lying_owner_iovecs_are_refused(sec, case):
    """The reader checks the owner's (address, length) list before its process_vm_readv: sizes
    must add up exactly (no wrapping), lengths be positive, nothing wrap the address space. A
    refused reply copies nothing: the reader's blocks stay as they were."""
    r = sec["reader"]
    nblocks, bb = 8, 4096
    nbytes = nblocks * bb
    lies = {
        "short": _iov([(0x10000, nbytes - 1)]),
        "long": _iov([(0x10000, nbytes + 4096)]),
        "wrap": _iov([((1 << 64) - 4096, 8192), (0x10000, nbytes - 8192)]),
        "zero-length": _iov([(0x10000, 0), (0x20000, nbytes)]),
        "odd-bytes": _iov([(0x10000, nbytes)]) + b"\x00" * 7,
        "huge-sum": _iov([(0x10000, 1 << 63), (0x20000, 1 << 63), (0x30000, nbytes)]),
        "empty": b"",
    }

    def handler(conn, f):
        if f.type is Msg.READ_REQ:
            conn.send(Msg.READ_ACK, f.rid, xid=f.body["xid"], hold_ms=30000.0, iov=lies[case], ipc=None, table=None, grant=None)

    srv = RawServer("iov-liar", KEY, paths=["cma"], handler=handler)
    try:
        rd, _ = agent(r, "victim", 64, bb, auth_key=KEY, timeout_s=10.0)
        r.fill(rd, 3)
        r.connect(rd, srv.address)
        with pytest.raises(RemoteError) as ei:
            r.read(rd, srv.address, np.arange(nblocks), "a" * 32, timeout=10, wait_timeout=30)
        assert ei.value.type == "BadMessage", ei.value
        assert r.bad_blocks(rd, np.arange(64), np.arange(64), 3) == 0, "a refused reply copied bytes"
        # the reader told the owner it stopped
        wait_until(lambda: any(f.type is Msg.XFER_ABORT for f in srv.frames), 10, what="XFER_ABORT to the owner")
    finally:
        srv.close()


# ---------------------------------------------------------------------------------- host claims
@pytest.mark.parametrize("host,expect", [("another-boot-id/pid:[4026531836]", "path_unavailable"), ("", "path_unavailable"),
                                         (None, "read_ack")])
def test_same_host_addresses_only_for_a_peer_claiming_this_host(sec, host, expect):
    """The owner hands iovecs (addresses of its memory) only to a peer whose MAC'd handshake
    claims this host (boot id and PID namespace); others get PathUnavailable (and use UCX)."""
    o = sec["owner"]
    owner, oaddr = agent(o, "host-owner", 16, 4096, seed=5, auth_key=KEY)
    lid, _, _ = o.expose(owner, np.arange(4))
    with RawPeer(oaddr, "host-claimer", KEY, host=host).handshake() as p:
        f, _ = p.request(Msg.READ_REQ, xid=1, lease=lid, nbytes=4 * 4096, ranges=None, path="cma", tag=0,
                         notify=None)
        if expect == "read_ack":
            assert f.type is Msg.READ_ACK and f.body["iov"], f
            p.send(Msg.XFER_DONE, xid=1)
        else:
            assert f.type is Msg.ERROR and f.body["code"] == expect, f
        assert p.ping() == []
