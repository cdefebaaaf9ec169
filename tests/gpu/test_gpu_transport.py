"""CUDA regions between two processes: bytes verified exactly, both directions, every data path.

Owner and reader are child processes (see gpu_peer.py): on cuda:0 and cuda:1, or both on cuda:0
with NIXL_CONNECTORS_GPU_TESTS_ONE_GPU=1. On one host the reader maps the owner's regions
through CUDA IPC and one fused kernel copies (the `ipc` path); with `gpu_ipc=False` the UCX
path is the fallback. Every transfer is checked block by block against a regenerated source
pattern, and blocks outside the transfer must be untouched.
"""
from __future__ import annotations

import itertools
import socket
import time

import numpy as np
import pytest

from gpu_peer import OWNER_DEVICE, READER_DEVICE, PeerProc

pytestmark = pytest.mark.gpu

_keys = itertools.count(1)
_rng = np.random.default_rng(2026)


def _key(prefix: str) -> str:
    return f"{prefix}-{next(_keys)}"


def _ids(pool: int, n: int) -> np.ndarray:
    return _rng.permutation(pool)[:n].astype(np.int64)


def _bufs(tag: str, num_blocks: int, block_shape, dtype: str, seed: int, layers: int = 2, view=None):
    return ("bufs", [(f"{tag}.{i}", num_blocks, tuple(block_shape), dtype, seed + 101 * i, view)
                     for i in range(layers)])


def _wait(fn, timeout: float, what: str):
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > end:
            raise AssertionError(f"{what} not reached within {timeout}s (last {v!r})")
        time.sleep(0.05)


def _move(owner: PeerProc, reader: PeerProc, direction: str, src_spec, dst_spec, s_ids, d_ids,
          timeout: float = 60.0) -> dict:
    """Move blocks s_ids of src_spec into blocks d_ids of dst_spec; verify on the receiving side."""
    ko, kr = _key("o"), _key("r")
    if direction == "read":
        owner.call("alloc", ko, src_spec)
        reader.call("alloc", kr, dst_spec)
        lease = owner.call("expose", ko, s_ids)
        res = reader.call("read", owner.address, kr, d_ids, lease, timeout=timeout + 30)
        assert res["error"] is None, res
        check = reader.call("verify", kr, d_ids, src_spec, s_ids)
    else:
        owner.call("alloc", ko, dst_spec)
        reader.call("alloc", kr, src_spec)
        lease = owner.call("expose", ko, d_ids, writable=True)
        res = reader.call("write", owner.address, kr, s_ids, lease, timeout=timeout + 30)
        assert res["error"] is None, res
        check = owner.call("verify", ko, d_ids, src_spec, s_ids)
    assert check["bad"] == 0, f"{check['bad']} of {check['blocks']} blocks differ"
    assert check["clobbered"] == 0, f"{check['clobbered']} blocks outside the transfer changed"
    owner.call("drop", ko)
    reader.call("drop", kr)
    return res


DTYPE_CASES = [
    ("bfloat16", (8, 16, 128), None),     # 32 KiB blocks
    ("float16", (16, 1024), None),        # 32 KiB
    ("float32", (3, 4096), None),         # 48 KiB
    ("int8", (16384,), None),             # 16 KiB
    ("int8", (1000,), None),              # 1000-byte blocks: not 8-byte aligned, byte kernel
    ("bfloat16", (8, 16, 128), "int8"),   # a bf16 pool registered through an int8 view
]


@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("dtype,shape,view", DTYPE_CASES,
                         ids=[f"{d}{'-as-' + v if v else ''}-{np.prod(s)}" for d, s, v in DTYPE_CASES])
def test_random_blocks_over_ipc(owner, reader, direction, dtype, shape, view):
    pool, n = 2048, 1000
    before = reader.call("stats")["paths"].get("ipc", 0)
    _move(owner, reader, direction, _bufs("src", pool, shape, dtype, seed=11, view=view),
          _bufs("dst", pool, shape, dtype, seed=12, view=view), _ids(pool, n), _ids(pool, n))
    assert reader.call("stats")["paths"].get("ipc", 0) == before + 1, "the one-sided CUDA IPC path was not used"


@pytest.mark.parametrize("direction", ["read", "write"])
def test_contiguous_256mib(owner, reader, direction):
    pool = 8192  # x 32 KiB
    ids = np.arange(pool, dtype=np.int64)
    _move(owner, reader, direction, _bufs("csrc", pool, (16384,), "bfloat16", seed=21, layers=1),
          _bufs("cdst", pool, (16384,), "bfloat16", seed=22, layers=1), ids, ids)


@pytest.mark.parametrize("direction", ["read", "write"])
def test_vllm_shaped_kv(owner, reader, direction):
    """Per layer [num_blocks, 8, 16, 256] bf16, 6 layers, descriptors from the vLLM adapter's
    layout module: one kernel over 6 IPC-mapped regions."""
    num_blocks, n = 1024, 256
    _move(owner, reader, direction, ("vllm", "model", 6, num_blocks, 41), ("vllm", "model", 6, num_blocks, 42),
          _ids(num_blocks, n), _ids(num_blocks, n))


def test_many_small_requests_and_notifications(owner, reader):
    pool = 512
    src = _bufs("nsrc", pool, (8, 16, 256), "bfloat16", seed=51, layers=4)
    dst = _bufs("ndst", pool, (8, 16, 256), "bfloat16", seed=52, layers=4)
    owner.call("notifications")
    for n in (1, 3, 16, 64):
        _move(owner, reader, "read", src, dst, _ids(pool, n), _ids(pool, n))
    got = _wait(lambda: [b for _, b in owner.call("notifications") if b.startswith(b"read-")] or None, 10,
                "notifications")
    more = [b for _, b in owner.call("notifications") if b.startswith(b"read-")]
    assert len(got) + len(more) == 4


@pytest.mark.parametrize("ptp,dtp,bs,bd", [(1, 2, 16, 32), (2, 1, 32, 16)])
def test_layout_transform_on_gpu(owner, reader, ptp, dtp, bs, bd):
    """Different block sizes and TP head splits, applied by the one kernel (layout_transform's
    runs on both sides); every token of every head checked."""
    from nixl_connectors.handoff.layout_transform import PagedLayout, lease_runs, reader_runs, tp_head_ranges

    heads, hb, tokens, pool = 8, 64, 77, 16
    src, dst = PagedLayout(heads // ptp, bs, hb), PagedLayout(heads // dtp, bd, hb)
    owners = {}
    for p in range(ptp):
        k = _key(f"tp{p}")
        owner.call("alloc", k, ("bufs", [(f"{k}.0", pool, (src.block_bytes,), "uint8", 300 + p, None)]))
        owners[p] = (k, _rng.permutation(pool)[:-(-tokens // bs)])
    for rank in range(dtp):
        kr = _key(f"dec{rank}")
        reader.call("alloc", kr, ("bufs", [(f"{kr}.0", pool, (dst.block_bytes,), "uint8", 999, None)]))
        dblocks = _rng.permutation(pool)[:-(-tokens // bd)]
        for p, hr in tp_head_ranges(heads, ptp, dtp, rank):
            ko, sblocks = owners[p]
            offs, lens = lease_runs(src, sblocks, hr)
            lid = owner.call("expose_runs", ko, offs, lens)
            rr = reader_runs(src, len(sblocks), dst, dblocks, hr)
            reader.call("read_runs", owner.address, kr, rr.offsets, rr.lengths, rr.scratch, lid)
        got = np.frombuffer(reader.call("raw_bytes", kr), np.uint8).reshape(pool, dst.heads, bd, hb)
        hp, hd = heads // ptp, heads // dtp
        t = np.arange(tokens)
        for hl in range(hd):
            p, hsrc = divmod(rank * hd + hl, hp)
            ko, sblocks = owners[p]
            srcc = np.frombuffer(owner.call("raw_bytes", ko), np.uint8).reshape(pool, src.heads, bs, hb)
            assert np.array_equal(got[dblocks[t // bd], hl, t % bd], srcc[sblocks[t // bs], hsrc, t % bs]), \
                f"rank {rank} head {hl}"


def test_fallback_when_ipc_is_off_is_ucx_and_visible(owner):
    """gpu_ipc=False on the reader: UCX moves the bytes, correctly, and the reason (CUDA memory
    staged through host memory by UCX between processes) is counted, not silent."""
    slow = PeerProc(READER_DEVICE, "no-ipc-reader", timeout_s=60.0, gpu_ipc=False)
    try:
        pool, n = 512, 200
        for direction in ("read", "write"):
            _move(owner, slow, direction, _bufs("fsrc", pool, (16384,), "bfloat16", seed=81, layers=2),
                  _bufs("fdst", pool, (16384,), "bfloat16", seed=82, layers=2), _ids(pool, n), _ids(pool, n))
        st = slow.call("stats")
        assert st["paths"].get("ucx", 0) == 2 and not st["paths"].get("ipc"), st["paths"]
        assert any(k.startswith("ipc:") for k in st["fallbacks"]), st["fallbacks"]
        assert any(k.startswith("ucx-cuda:") for k in st["fallbacks"]), st["fallbacks"]
    finally:
        slow.close()


def test_owner_killed_while_reader_maps_its_memory(reader):
    """The reader's context survives, the mappings of the dead owner are closed (the driver
    frees its memory only then), and the reader serves the next owner."""
    doomed = PeerProc(OWNER_DEVICE, "doomed-owner", timeout_s=20.0)
    try:
        pool = 4096  # 4096 x 64 KiB = 256 MiB per layer, 2 layers
        spec_s, spec_d = (_bufs("dsrc", pool, (32768,), "bfloat16", seed=91),
                          _bufs("ddst", pool, (32768,), "bfloat16", seed=92))
        ko, kr = _key("do"), _key("dr")
        free0 = reader.call("device_free_bytes")
        doomed.call("alloc", ko, spec_s)
        reader.call("alloc", kr, spec_d)
        ids = _ids(pool, 2048)
        lease = doomed.call("expose", ko, ids)
        res = reader.call("read", doomed.address, kr, ids, lease, 20.0, timeout=60)
        assert res["error"] is None, res
        assert reader.call("mapped_regions", "doomed-owner") >= 2
        lease2 = doomed.call("expose", ko, ids)
        reader.send_nowait("read", doomed.address, kr, ids, lease2, 20.0)
        doomed.send_nowait("die")
        res2 = reader.result(60)
        if res2["error"] is not None:
            assert res2["typed"], res2           # a typed error within the deadline ...
            assert res2["elapsed"] < 25.0, res2
        else:                                     # ... or the bytes are right (never a silent wrong read)
            assert reader.call("verify", kr, ids, spec_s, ids)["bad"] == 0
        doomed.proc.join(10)
        assert not doomed.proc.is_alive()
        _wait(lambda: reader.call("mapped_regions", "doomed-owner") == 0, 20, "the dead owner's mappings closed")
        reader.call("forget_peer", doomed.address)
        reader.call("drop", kr)
        # the dead owner's 512 MiB come back to the device once no process maps them
        _wait(lambda: reader.call("device_free_bytes") >= free0 - (128 << 20), 30,
              "the dead owner's GPU memory freed")
    finally:
        doomed.close()
    fresh = PeerProc(OWNER_DEVICE, "fresh-owner", timeout_s=30.0)
    try:
        _move(fresh, reader, "read", _bufs("esrc", 1024, (16384,), "bfloat16", seed=93),
              _bufs("edst", 1024, (16384,), "bfloat16", seed=94), _ids(1024, 500), _ids(1024, 500))
    finally:
        fresh.close()


def test_reader_killed_mid_kernel_owner_serves_new_peer(owner):
    """A reader dies right after launching its kernel over the owner's memory: the owner sees the
    process gone, ends its hold (the lease comes back), and serves the next reader."""
    doomed = PeerProc(READER_DEVICE, "doomed-reader", timeout_s=20.0)
    try:
        pool, n = 4096, 2048
        ko, kd = _key("ro"), _key("rd")
        owner.call("alloc", ko, _bufs("rsrc", pool, (16384,), "bfloat16", seed=71, layers=1))
        doomed.call("alloc", kd, _bufs("rdst", pool, (16384,), "bfloat16", seed=72, layers=1))
        lease = owner.call("expose", ko, _ids(pool, n))
        doomed.call("arm_die", "kernel", 0)
        doomed.send_nowait("read", owner.address, kd, _ids(pool, n), lease, 20.0)
        doomed.proc.join(60)
        assert not doomed.proc.is_alive(), "the doomed reader should have killed itself"
        assert owner.call("release", lease)
        _wait(lambda: lease in owner.call("freed"), 20, "the lease freed after the reader died")
    finally:
        doomed.close()
    fresh = PeerProc(READER_DEVICE, "fresh-reader", timeout_s=30.0)
    try:
        src = _bufs("rsrc2", 1024, (8, 16, 256), "bfloat16", seed=73, layers=3)
        dst = _bufs("rdst2", 1024, (8, 16, 256), "bfloat16", seed=74, layers=3)
        _move(owner, fresh, "read", src, dst, _ids(1024, 300), _ids(1024, 300))
        _move(owner, fresh, "write", src, dst, _ids(1024, 300), _ids(1024, 300))
    finally:
        fresh.close()


def test_reader_killed_mid_read_on_the_ucx_fallback(owner):
    """The same on the UCX path (gpu_ipc off): stranded sends must not wedge the owner."""
    doomed = PeerProc(READER_DEVICE, "doomed-ucx-reader", timeout_s=20.0, gpu_ipc=False, chunk_bytes=1 << 20)
    try:
        pool, n = 4096, 2048
        ko, kd = _key("uo"), _key("ud")
        owner.call("alloc", ko, _bufs("usrc", pool, (16384,), "bfloat16", seed=77, layers=1))
        doomed.call("alloc", kd, _bufs("udst", pool, (16384,), "bfloat16", seed=78, layers=1))
        lease = owner.call("expose", ko, _ids(pool, n))
        doomed.call("arm_die", "unpack", 3)
        doomed.send_nowait("read", owner.address, kd, _ids(pool, n), lease, 20.0)
        doomed.proc.join(60)
        assert not doomed.proc.is_alive()
    finally:
        doomed.close()
    for ipc in (False, True):
        fresh = PeerProc(READER_DEVICE, f"fresh-{ipc}", timeout_s=30.0, gpu_ipc=ipc)
        try:
            _move(owner, fresh, "read", _bufs("usrc2", 1024, (16384,), "bfloat16", seed=79, layers=2),
                  _bufs("udst2", 1024, (16384,), "bfloat16", seed=80, layers=2), _ids(1024, 400), _ids(1024, 400))
        finally:
            fresh.close()


def test_owner_restarted_at_the_same_address_never_uses_stale_mappings(reader):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = ("bufs", [("same.0", 1024, (16384,), "bfloat16", 0, None)])
    for seed in (101, 202):
        o = PeerProc(OWNER_DEVICE, f"restart-owner-{seed}", timeout_s=20.0, listen=f"127.0.0.1:{port}")
        try:
            src = ("bufs", [(f"same.{seed}", 1024, (16384,), "bfloat16", seed, None)])
            _move(o, reader, "read", src, spec, _ids(1024, 300), _ids(1024, 300))
        finally:
            o.close()
        reader.call("forget_peer", f"127.0.0.1:{port}")
        _wait(lambda: reader.call("mapped_regions", f"restart-owner-{seed}") == 0, 20,
              "mappings of the closed owner dropped")


def test_rereads_copy_under_the_lease_grant(owner, reader):
    """Re-reads of a lease run the kernel over the checked, cached IPC plan with no round trip;
    reads of two leases alternate into the same blocks, so every verify proves a fresh copy; a
    released lease is refused again by the owner (its grant's word changed)."""
    pool, n = 1024, 256
    ka, kb, kr = _key("ga"), _key("gb"), _key("gr")
    spec_a = _bufs("gsa", pool, (8, 16, 128), "bfloat16", seed=61, layers=3)
    spec_b = _bufs("gsb", pool, (8, 16, 128), "bfloat16", seed=62, layers=3)
    owner.call("alloc", ka, spec_a)
    owner.call("alloc", kb, spec_b)
    reader.call("alloc", kr, _bufs("gdst", pool, (8, 16, 128), "bfloat16", seed=63, layers=3))
    s_ids, d_ids = _ids(pool, n), _ids(pool, n)
    la, lb = owner.call("expose", ka, s_ids), owner.call("expose", kb, s_ids)
    granted0 = reader.call("stats")["granted_reads"]
    for rnd in range(3):
        for lease, spec in ((la, spec_a), (lb, spec_b)):
            res = reader.call("read", owner.address, kr, d_ids, lease)
            assert res["error"] is None, res
            assert reader.call("verify", kr, d_ids, spec, s_ids)["bad"] == 0, f"round {rnd}"
    st = reader.call("stats")
    assert st["granted_reads"] - granted0 == 4, st   # the first read of each lease asks the owner
    assert owner.call("release", la)
    res = reader.call("read", owner.address, kr, d_ids, la)
    assert res["error"] == "LeaseRejected", res
    assert reader.call("stats")["granted_reads"] - granted0 == 4
    # the owner heard of every read (notifications at once, counters with the sweep)
    seen: list[bytes] = []
    _wait(lambda: seen.extend(b for _, b in owner.call("notifications") if b == f"read-{kr}".encode())
          or len(seen) >= 6, 10, "a notification for each of the 6 reads")
    assert len(seen) == 6, seen
    for k in (ka, kb):
        owner.call("drop", k)
    reader.call("drop", kr)


def test_contiguous_leases_take_the_drivers_copy(owner, reader):
    """A lease that is one contiguous range, read into one contiguous range: the driver's copy
    (no kernel), on the first read (asked) and on re-reads under the grant (waited for on the
    calling thread with no event); two leases alternate into the same blocks, so every verify
    proves a fresh copy. Then a write the same way, and a read whose blocks have a gap: the kernel."""
    pool = 2048   # x 32 KiB: 64 MiB per lease
    ka, kb, kr = _key("ca"), _key("cb"), _key("cr")
    spec_a = _bufs("mca", pool, (16384,), "bfloat16", seed=71, layers=1)
    spec_b = _bufs("mcb", pool, (16384,), "bfloat16", seed=72, layers=1)
    owner.call("alloc", ka, spec_a)
    owner.call("alloc", kb, spec_b)
    reader.call("alloc", kr, _bufs("mcr", pool, (16384,), "bfloat16", seed=73, layers=1))
    s_ids = np.arange(100, 1100, dtype=np.int64)
    d_ids = np.arange(900, 1900, dtype=np.int64)
    la, lb = owner.call("expose", ka, s_ids), owner.call("expose", kb, s_ids)
    granted0 = reader.call("stats")["granted_reads"]
    for rnd in range(3):
        for lease, spec in ((la, spec_a), (lb, spec_b)):
            res, points = reader.call("traced", "read", owner.address, kr, d_ids, lease)
            assert res["error"] is None, res
            assert "memcpy" in points and "kernel" not in points, (rnd, points)
            assert reader.call("verify", kr, d_ids, spec, s_ids)["bad"] == 0, f"round {rnd}"
    assert reader.call("stats")["granted_reads"] - granted0 == 4
    gap = np.concatenate([d_ids[:500], d_ids[500:] + 1])   # one block skipped: two ranges
    res, points = reader.call("traced", "read", owner.address, kr, gap, la)
    assert res["error"] is None and "memcpy" not in points and "kernel" in points, (res, points)
    assert reader.call("verify", kr, gap, spec_a, s_ids)["bad"] == 0
    kw = _key("cw")
    owner.call("alloc", kw, _bufs("mcw", pool, (16384,), "bfloat16", seed=74, layers=1))
    lw = owner.call("expose", kw, d_ids, writable=True)
    res, points = reader.call("traced", "write", owner.address, kr, gap, lw)   # (gap: reader blocks are two ranges)
    assert res["error"] is None and "memcpy" not in points, (res, points)
    assert owner.call("release", lw)
    lw2 = owner.call("expose", kw, d_ids, writable=True)
    src_ids = np.arange(0, 1000, dtype=np.int64)
    reader.call("alloc", kr + "s", spec_b)
    res, points = reader.call("traced", "write", owner.address, kr + "s", src_ids, lw2)
    assert res["error"] is None and "memcpy" in points, (res, points)
    assert owner.call("verify", kw, d_ids, spec_b, src_ids)["bad"] == 0
    for k in (ka, kb, kw):
        owner.call("drop", k)
    for k in (kr, kr + "s"):
        reader.call("drop", k)


def test_reads_and_writes_take_their_runs_from_the_descs_own_tables(owner, reader):
    """The reader's Descs (from_blocks per layer, joined) keep their run tables in pinned memory:
    the kernel reads them there (no table slot filled on the read's path), on the first read
    (asked), on re-reads under the grant, and on a write; every block verified."""
    pool, n = 1024, 300
    ko, kr, kw = _key("dt"), _key("dtr"), _key("dtw")
    spec = _bufs("dts", pool, (8, 16, 128), "bfloat16", seed=81, layers=4)
    owner.call("alloc", ko, spec)
    reader.call("alloc", kr, _bufs("dtd", pool, (8, 16, 128), "bfloat16", seed=82, layers=4))
    s_ids, d_ids = _ids(pool, n), _ids(pool, n)
    lease = owner.call("expose", ko, s_ids)
    for rnd in range(3):
        res, points = reader.call("traced", "read", owner.address, kr, d_ids, lease)
        assert res["error"] is None, res
        assert "kernel" in points and "slot" not in points and "filled" not in points, (rnd, points)
        assert reader.call("verify", kr, d_ids, spec, s_ids)["bad"] == 0, f"round {rnd}"
        d_ids = _ids(pool, n)   # (a new Descs each round: other blocks)
    owner.call("alloc", kw, _bufs("dtw", pool, (8, 16, 128), "bfloat16", seed=83, layers=4))
    lw = owner.call("expose", kw, d_ids, writable=True)
    src_spec = _bufs("dtx", pool, (8, 16, 128), "bfloat16", seed=84, layers=4)
    reader.call("alloc", kr + "x", src_spec)
    src = _ids(pool, n)
    res, points = reader.call("traced", "write", owner.address, kr + "x", src, lw)
    assert res["error"] is None and "kernel" in points and "slot" not in points, (res, points)
    assert owner.call("verify", kw, d_ids, src_spec, src)["bad"] == 0
    fb = reader.call("stats")["fallbacks"]
    assert not any(k.startswith("gpu-direct") for k in fb), fb
    reader.call("drop", kr + "x")
    for k in (ko, kw):
        owner.call("drop", k)
    reader.call("drop", kr)


def test_reads_with_direct_tables_off_fill_a_slot(owner):
    """With AgentConfig(gpu_direct_tables=False) (the default until the direct kernel has run on a
    GPU) a read writes its run table into a pinned slot first: asked and granted, every block
    verified."""
    reader = PeerProc(READER_DEVICE, "reader-slot", timeout_s=30.0, gpu_direct_tables=False)
    try:
        pool, n = 1024, 300
        ko, kr = _key("sl"), _key("slr")
        spec = _bufs("sls", pool, (8, 16, 128), "bfloat16", seed=91, layers=3)
        owner.call("alloc", ko, spec)
        reader.call("alloc", kr, _bufs("sld", pool, (8, 16, 128), "bfloat16", seed=92, layers=3))
        s_ids, d_ids = _ids(pool, n), _ids(pool, n)
        lease = owner.call("expose", ko, s_ids)
        for rnd in range(2):
            res, points = reader.call("traced", "read", owner.address, kr, d_ids, lease)
            assert res["error"] is None and "slot" in points and "kernel" in points, (rnd, points)
            assert reader.call("verify", kr, d_ids, spec, s_ids)["bad"] == 0, f"round {rnd}"
        assert reader.call("stats")["gpu_run_tables"]["direct_launches"] == 0
        owner.call("drop", ko)
    finally:
        reader.close()
