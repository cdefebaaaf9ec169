"""Confused deputy on the same-host copy path: the reader runs process_vm_readv / writev against
the pid its peer *claims* in the handshake. An authenticated but lying owner that claims the pid
of another process (here: an innocent agent process of the same user) and hands out iovecs into
that process's memory made the reader copy the innocent process's memory into its own blocks
(read), or its own blocks over the innocent process's memory (write), with the reader's ptrace
rights rather than the liar's. The reader must use the same-host copy only with a peer whose
claimed pid really holds the other end of the control connection.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
from rawpeer import RawServer
from xport_fixtures import agent
from xport_helpers import RemoteError, pattern

from transport.wire import Msg

pytestmark = pytest.mark.timeout(180)
KEY = b"pid-suite-key"
BB = 4096


@pytest.fixture
def innocent(sec):
    """An agent process with recognisable memory: (node, agent name, address of its pool)."""
    n = sec["reader2"]
    name, _ = agent(n, "innocent", 16, BB, seed=77)
    addr, size = n.pool_address(name)
    return n, name, addr


@pytest.mark.parametrize("op", ["read", "write"])
def test_lying_owner_cannot_aim_the_same_host_copy_at_another_process(sec, innocent, op):
    inode, iname, iaddr = innocent
    nblocks = 8
    iov = struct.pack("<QQ", iaddr, nblocks * BB)

    def handler(conn, f):
        if f.type in (Msg.READ_REQ, Msg.WRITE_REQ):
            extra = {"tag": 0} if f.type is Msg.WRITE_REQ else {"grant": None}
            reply = Msg.WRITE_ACK if f.type is Msg.WRITE_REQ else Msg.READ_ACK
            conn.send(reply, f.rid, xid=f.body["xid"], hold_ms=30000.0, iov=iov, ipc=None, table=None, **extra)
        elif f.type is Msg.XFER_DONE and f.rid:
            conn.send(Msg.OK, f.rid, expires_in=None)
        # UCX_HELLO is never answered: this liar has no UCX

    liar = RawServer("pid-liar", KEY, pid=inode.pid, paths=["cma"], handler=handler)
    try:
        r = sec["reader"]
        rd, _ = agent(r, f"deputy-{op}", 16, BB, seed=None if op == "read" else 99, auth_key=KEY, timeout_s=5.0)
        r.connect(rd, liar.address)
        try:
            getattr(r, op)(rd, liar.address, np.arange(nblocks), "0" * 32, timeout=5, wait_timeout=30)
        except RemoteError as e:
            assert e.type in ("TransferTimeout", "PeerLost", "BadMessage"), e
        if op == "read":
            leaked = nblocks - r.bad_blocks(rd, np.arange(nblocks), np.arange(nblocks), 77)
            assert leaked == 0, f"{leaked} blocks of another process's memory were copied into the reader"
        else:
            hit = inode.bad_blocks(iname, np.arange(nblocks), np.arange(nblocks), 77)
            assert hit == 0, f"the reader overwrote {hit} blocks of another process"
        assert r.stats(rd)["paths"].get("cma", 0) == 0
    finally:
        liar.close()


def test_honest_same_host_peer_still_gets_the_same_host_copy(sec):
    o, r = sec["owner"], sec["reader"]
    owner, oaddr = agent(o, "honest-cma-owner", 32, BB, seed=78, auth_key=KEY)
    rd, _ = agent(r, "honest-cma-reader", 32, BB, auth_key=KEY)
    r.connect(rd, oaddr)
    lid, _, _ = o.expose(owner, np.arange(8, 16))
    r.read(rd, oaddr, np.arange(8), lid)
    assert r.bad_blocks(rd, np.arange(8), np.arange(8, 16), 78) == 0
    assert r.stats(rd)["paths"].get("cma", 0) == 1
    assert not r.stats(rd)["fallbacks"], r.stats(rd)["fallbacks"]
    # and in one process (owner and reader agents side by side)
    own2, oaddr2 = agent(r, "same-process-owner", 32, BB, seed=79, auth_key=KEY)
    r.connect(rd, oaddr2)
    lid, _, _ = r.expose(own2, np.arange(4))
    r.read(rd, oaddr2, np.arange(4), lid)
    assert r.bad_blocks(rd, np.arange(4), np.arange(4), 79) == 0
    assert r.stats(rd)["paths"].get("cma", 0) == 2
    assert np.array_equal(pattern([0], BB, 79)[0], np.frombuffer(r.pool(rd), np.uint8)[:BB])
