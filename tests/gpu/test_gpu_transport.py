"""CUDA regions between two processes on two GPUs: bytes verified exactly, both directions.

Owner (cuda:0) and reader (cuda:1) are child processes (see gpu_peer.py); the test process only
orchestrates. Every transfer is checked block by block against a regenerated source pattern,
and blocks outside the transfer are checked to be untouched.
"""
from __future__ import annotations

import itertools

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


def _move(owner: PeerProc, reader: PeerProc, direction: str, src_spec, dst_spec, s_ids, d_ids,
          timeout: float = 60.0) -> dict:
    """Move blocks s_ids of src_spec into blocks d_ids of dst_spec; verify on the receiving side.

    direction "read": the owner holds the source and the reader pulls it.
    direction "write": the owner holds (writable) destinations and the reader pushes into them.
    """
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
    return res


DTYPE_CASES = [
    ("bfloat16", (8, 16, 128), None),     # 32 KiB blocks
    ("float16", (16, 1024), None),        # 32 KiB
    ("float32", (3, 4096), None),         # 48 KiB: units that do not divide the chunk evenly
    ("int8", (16384,), None),             # 16 KiB
    ("bfloat16", (8, 16, 128), "int8"),   # a bf16 pool registered through an int8 view
]


@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("dtype,shape,view", DTYPE_CASES,
                         ids=[f"{d}{'-as-' + v if v else ''}-{np.prod(s)}" for d, s, v in DTYPE_CASES])
def test_random_blocks(owner, reader, direction, dtype, shape, view):
    pool, n = 2048, 1000
    src = _bufs("src", pool, shape, dtype, seed=11, view=view)
    dst = _bufs("dst", pool, shape, dtype, seed=12, view=view)
    _move(owner, reader, direction, src, dst, _ids(pool, n), _ids(pool, n))


@pytest.mark.parametrize("direction", ["read", "write"])
def test_contiguous_large_run_zero_copy(owner, reader, direction):
    """256 MiB in one run on both sides: every chunk goes zero-copy (no staging)."""
    pool = 8192  # x 32 KiB = 256 MiB
    src = _bufs("csrc", pool, (16384,), "bfloat16", seed=21, layers=1)
    dst = _bufs("cdst", pool, (16384,), "bfloat16", seed=22, layers=1)
    ids = np.arange(pool, dtype=np.int64)
    _move(owner, reader, direction, src, dst, ids, ids)


@pytest.mark.parametrize("direction", ["read", "write"])
def test_contiguous_one_side_scattered_other(owner, reader, direction):
    """Zero-copy on one side, pack/unpack on the other, in both roles."""
    pool, n = 4096, 2048
    src = _bufs("msrc", pool, (16384,), "bfloat16", seed=31, layers=1)
    dst = _bufs("mdst", pool, (16384,), "bfloat16", seed=32, layers=1)
    _move(owner, reader, direction, src, dst, np.arange(100, 100 + n, dtype=np.int64), _ids(pool, n))
    _move(owner, reader, direction, src, dst, _ids(pool, n), np.arange(7, 7 + n, dtype=np.int64))


@pytest.mark.parametrize("direction", ["read", "write"])
def test_vllm_shaped_kv(owner, reader, direction):
    """Per layer [num_blocks, 8, 16, 256] bf16 (8 KV heads, block 16, K|V of 128 packed), 6
    layers, descriptors built by the vLLM adapter's layout module (Descs.concat per layer)."""
    num_blocks, n = 1024, 256  # one 4K-token request
    src = ("vllm", "model", 6, num_blocks, 41)
    dst = ("vllm", "model", 6, num_blocks, 42)
    _move(owner, reader, direction, src, dst, _ids(num_blocks, n), _ids(num_blocks, n))


def test_many_small_requests_and_notifications(owner, reader):
    pool = 512
    src = _bufs("nsrc", pool, (8, 16, 256), "bfloat16", seed=51, layers=4)
    dst = _bufs("ndst", pool, (8, 16, 256), "bfloat16", seed=52, layers=4)
    owner.call("notifications")
    for n in (1, 3, 16, 64):
        _move(owner, reader, "read", src, dst, _ids(pool, n), _ids(pool, n))
    got = owner.call("notifications")
    assert len([p for p, b in got if b.startswith(b"read-")]) == 4


def test_owner_killed_mid_read_is_a_typed_error_and_reader_goes_on(owner, reader):
    doomed = PeerProc(OWNER_DEVICE, "doomed-owner", timeout_s=30.0, chunk_bytes=1 << 20)
    try:
        pool, n = 4096, 2048  # 64 MiB in 1 MiB chunks
        spec = _bufs("ksrc", pool, (16384,), "bfloat16", seed=61, layers=1)
        kd, kr = _key("kd"), _key("kr")
        doomed.call("alloc", kd, spec)
        reader.call("alloc", kr, _bufs("kdst", pool, (16384,), "bfloat16", seed=62, layers=1))
        lease = doomed.call("expose", kd, _ids(pool, n))
        doomed.call("arm_die", "pack", 3)
        res = reader.call("read", doomed.address, kr, _ids(pool, n), lease, 20.0, timeout=90)
        assert res["error"] is not None and res["typed"], res
        assert res["elapsed"] < 25.0, res
        doomed.proc.join(10)
        assert not doomed.proc.is_alive()
    finally:
        doomed.close()
    # The reader keeps working with a live owner.
    src = _bufs("ksrc2", 1024, (16384,), "bfloat16", seed=63, layers=2)
    dst = _bufs("kdst2", 1024, (16384,), "bfloat16", seed=64, layers=2)
    _move(owner, reader, "read", src, dst, _ids(1024, 500), _ids(1024, 500))


def test_reader_killed_mid_read_owner_serves_new_peer(owner, reader):
    doomed = PeerProc(READER_DEVICE, "doomed-reader", timeout_s=30.0, chunk_bytes=1 << 20)
    try:
        pool, n = 4096, 2048
        ko, kd = _key("ro"), _key("rd")
        owner.call("alloc", ko, _bufs("rsrc", pool, (16384,), "bfloat16", seed=71, layers=1))
        doomed.call("alloc", kd, _bufs("rdst", pool, (16384,), "bfloat16", seed=72, layers=1))
        lease = owner.call("expose", ko, _ids(pool, n))
        doomed.call("arm_die", "unpack", 3)
        doomed.send_nowait("read", owner.address, kd, _ids(pool, n), lease, 20.0)
        doomed.proc.join(60)
        assert not doomed.proc.is_alive(), "the doomed reader should have killed itself"
    finally:
        doomed.close()
    # The owner survives and serves the next peer (and the fresh reader verifies every byte).
    fresh = PeerProc(READER_DEVICE, "fresh-reader", timeout_s=30.0)
    try:
        src = _bufs("rsrc2", 1024, (8, 16, 256), "bfloat16", seed=73, layers=3)
        dst = _bufs("rdst2", 1024, (8, 16, 256), "bfloat16", seed=74, layers=3)
        _move(owner, fresh, "read", src, dst, _ids(1024, 300), _ids(1024, 300))
        _move(owner, fresh, "write", src, dst, _ids(1024, 300), _ids(1024, 300))
    finally:
        fresh.close()
    # and the module's reader too
    src = _bufs("rsrc3", 256, (16384,), "float32", seed=75, layers=1)
    dst = _bufs("rdst3", 256, (16384,), "float32", seed=76, layers=1)
    _move(owner, reader, "read", src, dst, _ids(256, 100), _ids(256, 100))
