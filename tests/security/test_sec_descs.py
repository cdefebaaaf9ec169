"""Descriptor arithmetic (issue 8, item 7): huge block ids, offsets and lengths (2**49-1, 2**50,
sums past 2**63) are refused by `Descs` on both sides and by the owner's lease checks
(`read(..., ranges=...)` too), with overflow-safe checks; nothing lands in another block or
outside a region; and a lying owner's IPC table is refused by the reader before its kernel runs.

The old `Descs` computed `ids * stride` and `offset + length` in wrapping int64: reads landed in
the wrong block, the same-host copy wrote 65 KB past the reader's region, and the UCX path
crashed with SIGSEGV in `plan.expand_units`.
"""
from __future__ import annotations

import os
import types

import msgpack
import numpy as np
import pytest
from rawpeer import RawPeer
from xport_fixtures import agent
from xport_helpers import RemoteError

from transport import Descs
from transport import copy_plan, cuda_ipc, gpu_copy, gpu_memcpy, gpu_runs
from transport.agent import _ranges_bytes
from transport.config import AgentConfig
from transport.dataplane import DataPlane
from transport.errors import BadMessage
from transport.region import make_region
from transport.stats import AgentStats
from transport.wire import Msg

pytestmark = pytest.mark.timeout(240)
KEY = b"descs-suite-key"
BIG = [2 ** 49 - 1, 2 ** 50, 2 ** 62, 2 ** 63 - 1]


@pytest.fixture(scope="module")
def region():
    return make_region(np.zeros(64 * 4096, dtype=np.uint8))


# ---------------------------------------------------------------------------------- Descs itself
@pytest.mark.parametrize("bid", BIG + [-1])
@pytest.mark.parametrize("block_bytes", [4096, 2 ** 20, 2 ** 40])
def test_from_blocks_refuses_huge_ids(region, bid, block_bytes):
    with pytest.raises((ValueError, OverflowError, TypeError)):
        Descs.from_blocks(region, [0, bid], block_bytes)


@pytest.mark.parametrize("ids", [np.array([2 ** 63], dtype=np.uint64), np.array([2 ** 64 - 1], dtype=np.uint64),
                                 [2 ** 64], [2 ** 70], [1.5], ["1"]])
def test_from_blocks_refuses_unrepresentable_ids(region, ids):
    with pytest.raises((ValueError, OverflowError, TypeError)):
        Descs.from_blocks(region, ids, 4096)


@pytest.mark.parametrize("offsets,lengths", [
    ([2 ** 63 - 1], [1]), ([2 ** 62], [2 ** 62]), ([0, 0], [2 ** 62 + 1, 2 ** 62 + 1]),
    ([0], [2 ** 63 - 1]), ([64 * 4096 - 1], [2]), ([1], [64 * 4096]), ([0], [0]), ([-1], [1]), ([0], [-4096]),
    ([2 ** 50, 0], [4096, 4096]), ([0] * 4, [2 ** 62] * 4),
])
def test_from_ranges_refuses_overflow_and_out_of_region(region, offsets, lengths):
    with pytest.raises((ValueError, OverflowError)):
        Descs.from_ranges(region, offsets, lengths)


def test_raw_arrays_that_wrap_int64_are_refused(region):
    """Direct construction with arrays whose offset + length wraps negative."""
    for off, ln in (((1 << 63) - 8, 16), (1 << 62, (1 << 63) - 1), (8, (1 << 63) - 4)):
        with pytest.raises(ValueError):
            Descs((region,), np.zeros(1, np.int32), np.array([off], np.int64), np.array([ln], np.int64))


def test_edge_descriptors_are_accepted(region):
    d = Descs.from_blocks(region, [0, 63], 4096)
    assert d.nbytes == 8192 and int(d.offset[1]) == 63 * 4096
    with pytest.raises(ValueError):
        Descs.from_blocks(region, [64], 4096)


@pytest.mark.parametrize("ranges", [
    [[2 ** 63 - 1, 1]], [[0, 2 ** 62], [0, 2 ** 62]], [[-1, 8193]],
    [[0, 0], [0, 16384]], [[0, (1 << 63) - 1], [0, 16385]], np.array([[0, 2 ** 63]], dtype=np.uint64),
])
def test_read_ranges_refused_locally(ranges):
    """Agent.read(ranges=...) checks its ranges before anything is sent (sum computed exactly)."""
    with pytest.raises(ValueError):
        _ranges_bytes(ranges, 16384)


def test_select_stream_refuses_overflow(region):
    d = Descs.from_blocks(region, np.arange(8), 4096)
    for r in ([[2 ** 63 - 1, 1]], [[0, 2 ** 62], [2 ** 62, 2 ** 62]], [[4096, (1 << 63) - 4096]],
              [[32768, 1]], [[0, 32769]], np.array([[2 ** 63 + 5, 1]], dtype=np.uint64)):
        with pytest.raises(ValueError):
            d.select_stream(r)
    ok = d.select_stream([[4095, 2], [0, 1]])
    assert ok.nbytes == 3 and list(ok.offset) == [4095, 4096, 0]


# ---------------------------------------------------------------------------------- owner's checks
def _ranges(pairs) -> bytes:
    return np.array(pairs, dtype="<i8").reshape(-1, 2).tobytes()


@pytest.mark.parametrize("pairs,nbytes", [
    ([[2 ** 63 - 1, 1]], 1), ([[0, 2 ** 62], [0, 2 ** 62]], 0), ([[0, 2 ** 62], [2 ** 62, 2 ** 62]], 0),
    ([[-8192, 16384]], 16384), ([[0, -1]], 1), ([[0, 4096], [2 ** 50, 4096]], 8192),
    ([[0, (1 << 63) - 1], [0, 1]], 0), ([[32768, 1]], 1), ([[0, 32769]], 32769),
    ([[0, 4096]] * 4999 + [[2 ** 50, 4096]], 5000 * 4096),
])
def test_owner_refuses_overflowing_ranges(sec, pairs, nbytes):
    o = sec["owner"]
    owner, oaddr = agent(o, "ranges-owner", 64, 4096, seed=61, auth_key=KEY)
    lid, _, _ = o.expose(owner, np.arange(8))
    with RawPeer(oaddr, "ranges-attacker", KEY).handshake() as p:
        f, _ = p.request(Msg.READ_REQ, xid=1, lease=lid, nbytes=nbytes, ranges=_ranges(pairs), path="cma", tag=0,
                         notify=None)
        assert f.type is Msg.ERROR and f.body["code"] in ("size_mismatch", "bad_message"), f
        f, _ = p.request(Msg.READ_REQ, xid=2, lease=lid, nbytes=nbytes, ranges=_ranges(pairs)[:-3], path="cma",
                         tag=0, notify=None)
        assert f.type is Msg.ERROR, f
        # a sane request on the same connection still works
        f, _ = p.request(Msg.READ_REQ, xid=3, lease=lid, nbytes=2, ranges=_ranges([[4095, 2]]), path="cma", tag=0,
                         notify=None)
        assert f.type is Msg.READ_ACK, f
        p.send(Msg.XFER_DONE, xid=3)
        assert p.ping() == []
    assert o.alive()


@pytest.mark.parametrize("path", ["cma", "ucx"])
def test_edge_blocks_land_exactly(sec, path):
    """The first and last block of the reader's region, read in one transfer with others: every
    byte where it belongs, the rest of the region untouched, nothing written outside it."""
    o, r = sec["owner"], sec["reader"]
    owner, oaddr = agent(o, "edge-owner", 64, 4096, seed=62, auth_key=KEY)
    name = f"edge-reader-{path}-{os.getpid()}-{np.random.default_rng().integers(1 << 30)}"
    r.call("agent_guarded", name, 64, 4096, 16, None, auth_key=KEY, same_host_copy=path == "cma")
    r.connect(name, oaddr)
    src = [5, 63, 0, 17]
    local = [0, 63, 62, 1]
    lid, _, _ = o.expose(owner, src)
    r.read(name, oaddr, local, lid, timeout=20)
    assert r.bad_blocks(name, local, src, 62) == 0
    others = [i for i in range(64) if i not in local]
    assert r.zero_blocks(name, others) == len(others)
    assert r.guards_intact(name)
    with pytest.raises(RemoteError) as ei:       # one block past the region: refused locally
        r.read(name, oaddr, [1, 64], lid, timeout=20)
    assert ei.value.type == "ValueError"
    assert r.guards_intact(name)


# ---------------------------------------------------------------------------------- lying IPC table
class _FakeMapping:
    def __init__(self, ptr, nbytes, serial=1):
        self.ptr, self.nbytes, self.serial, self.device = ptr, nbytes, serial, None


@pytest.fixture
def plane(monkeypatch):
    launched = []
    monkeypatch.setattr(gpu_copy, "launch", lambda *a, **kw: launched.append(a) or (None, None))

    def addrs(side):  # gpu_runs addresses runs on the device; the test wants the addresses
        return side.bases[side.slot if side.slot is not None else 0] + side.offset
    def paired(remote, local, device, stream, write=False, record=True):
        r, lo = addrs(remote.side), addrs(local)
        launched.append((lo, r, remote.length) if write else (r, lo, remote.length))
        return None, None
    monkeypatch.setattr(gpu_runs, "launch", paired)

    def memcpy(dst, src, n, device, stream, record=True):   # one range each side: the driver's copy
        launched.append((np.array([src]), np.array([dst]), np.array([n])))
        return None, None
    monkeypatch.setattr(gpu_memcpy, "copy", memcpy)
    dp = DataPlane("reader", AgentConfig(), None, AgentStats())
    return dp, launched


def _session(maps=None):
    return types.SimpleNamespace(secret=None, ipc_maps=dict(maps or {}), peer=types.SimpleNamespace(pid=1))


def _local(nbytes=8192):
    return Descs.from_ranges(make_region(np.zeros(nbytes, np.uint8)), [0], [nbytes])


@pytest.mark.parametrize("case", ["slot", "offset", "negative", "past-end", "sum", "wrap", "header", "size-changed"])
def test_lying_owner_ipc_table_is_refused(plane, case):
    dp, launched = plane
    size = 1 << 20
    s = _session({7: _FakeMapping(0x7F0000000000, size)})
    offer = [[7, None, size]]
    runs = {
        "slot": ([1], [0], [8192]),
        "offset": ([0], [size], [8192]),
        "negative": ([0], [-4096], [8192]),
        "past-end": ([0], [size - 4096], [8192]),
        "sum": ([0, 0], [0, 4096], [4096, 8192]),
        "wrap": ([0] * 4, [0] * 4, [2 ** 62] * 3 + [2 ** 62 + 8192]),
    }
    if case == "header":
        table = b"\x00" * 23
    elif case == "size-changed":
        offer = [[7, None, size * 2]]
        table = copy_plan.encode_runs(np.zeros(1, np.int64), np.zeros(1, np.int64), np.array([8192]))
    else:
        sl, off, ln = (np.array(x, dtype=np.int64) for x in runs[case])
        table = copy_plan.encode_runs(sl, off, ln)
    with pytest.raises(BadMessage):
        dp.ipc_copy(s, _local(), offer, table, 8192, write=False)
    assert not launched, "the kernel was launched on a lying table"


@pytest.mark.parametrize("write", [False, True])
def test_lying_owner_cannot_claim_to_be_this_process(plane, write):
    """An IPC blob claiming the reader's own pid carries a raw pointer that would be used as is
    (the same-process shortcut): a lying owner could point the reader's copy kernel at any of
    the reader's own GPU memory (reads leak it into the KV blocks, writes corrupt it). The reader
    accepts the shortcut only for memory this process itself exported."""
    dp, launched = plane
    fake_size = 1 << 62
    blob = msgpack.packb([os.getpid(), 0x7F00DEAD0000, fake_size, 0, []], use_bin_type=True)
    offer = [[99, blob, fake_size]]
    table = copy_plan.encode_runs(np.zeros(1, np.int64), np.array([0x1000]), np.array([8192]))
    with pytest.raises(BadMessage):
        dp.ipc_copy(_session(), _local(), offer, table, 8192, write=write)
    assert not launched, "the copy kernel was launched on an address the owner made up"


def test_same_process_shortcut_still_works_for_exported_memory(plane, monkeypatch):
    """The genuine same-process case (an owner agent in this very process): memory this process
    exported itself is used through its own pointer."""
    dp, launched = plane
    region = make_region(np.zeros(1 << 16, np.uint8))

    class _Storage:  # what torch's _share_cuda_ returns is irrelevant here: the shortcut skips it
        def _share_cuda_(self):
            return [0] * 8
    monkeypatch.setattr(type(region.flat), "untyped_storage", lambda self: _Storage())
    blob = cuda_ipc.Exporter().blob(region)
    offer = [[region.uid, blob, region.nbytes]]
    table = copy_plan.encode_runs(np.zeros(1, np.int64), np.array([4096]), np.array([8192]))
    dp.ipc_copy(_session(), _local(), offer, table, 8192, write=False)
    assert len(launched) == 1
    src = launched[0][0]
    assert int(src[0]) == region.flat.data_ptr() + 4096
