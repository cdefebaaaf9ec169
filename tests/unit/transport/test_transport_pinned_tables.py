"""The pinned arena for descriptor tables (pinned_tables.py) and the Descs constructors that use it:
blocks are aligned, bounded, reused only once every array over them is gone, frees from any
thread land; over CUDA regions from_blocks / from_ranges / from_parts / concat write their run
tables there (the same values as without it) and say where; host regions, a spent budget or no
CUDA leave ordinary arrays. Chunks come from ordinary memory here (no GPU needed)."""
from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from transport import Descs, pinned_tables
from transport.pinned_tables import MIN_BLOCK, PinnedArena, block_size
from transport.region import MemoryKind, Region


class _Chunks:
    """A chunk allocator over numpy buffers (kept alive), counting what it handed out."""

    def __init__(self, fail: bool = False, misalign: int = 0):
        self.fail, self.misalign, self.given = fail, misalign, []

    def __call__(self, nbytes: int):
        if self.fail:
            raise RuntimeError("no CUDA-capable device is detected")
        buf = np.zeros(nbytes + 32, np.uint8)
        addr = (buf.ctypes.data + 15) // 16 * 16 + self.misalign   # (CUDA's are page-aligned)
        self.given.append(buf)
        return addr, buf


def _arena(chunk=1 << 16, max_bytes=1 << 20, fail=False, misalign=0):
    return PinnedArena(_Chunks(fail, misalign), chunk_bytes=chunk, max_bytes=max_bytes)


def _arr(a, n, dtype):
    got = a.array(n, dtype)
    if got is None:
        return None
    arr, addr = got
    assert addr == arr.ctypes.data, "the address said is not the array's"
    return arr


def test_block_sizes_are_powers_of_two_from_the_minimum():
    assert block_size(1) == MIN_BLOCK and block_size(MIN_BLOCK) == MIN_BLOCK
    assert block_size(MIN_BLOCK + 1) == 2 * MIN_BLOCK and block_size(5000) == 8192


def test_arrays_are_aligned_distinct_and_inside_a_chunk():
    a = _arena()
    arrs = [_arr(a, n, np.int64) for n in (1, 100, 300, 1000, 7)] + [_arr(a, 50, np.int32)]
    spans = []
    for x in arrs:
        addr = x.ctypes.data
        assert addr % 16 == 0 and a.holds(addr, x.nbytes)
        spans.append((addr, addr + block_size(x.nbytes)))
        x[:] = 7   # writable
    spans.sort()
    assert all(e <= s for (_, e), (s, _) in zip(spans, spans[1:])), "two blocks overlap"


def test_a_block_comes_back_only_when_every_view_is_gone():
    a = _arena()
    x = _arr(a, 100, np.int64)
    addr = x.ctypes.data
    view = x[10:20]
    del x
    gc.collect()
    y = _arr(a, 100, np.int64)
    assert y.ctypes.data != addr, "reused while a view of it lived"
    del view
    gc.collect()
    z = _arr(a, 100, np.int64)
    assert z.ctypes.data == addr and a.stats()["in_use_bytes"] == 2 * block_size(800)


def test_frees_from_other_threads_land():
    a = _arena()
    xs = [_arr(a, 64, np.int64) for _ in range(50)]
    t = threading.Thread(target=lambda: (xs.clear(), gc.collect()))
    t.start()
    t.join(10)
    assert a.stats()["in_use_bytes"] == 0


def test_a_chunk_that_is_not_16_byte_aligned_still_gives_aligned_blocks():
    a = _arena(chunk=4096, misalign=8)
    xs = [_arr(a, 100, np.int64) for _ in range(4)]   # 1 KiB blocks: three fit in what is left aligned
    assert all(x is not None and x.ctypes.data % 16 == 0 for x in xs) and a.held == 2 * 4096


def test_the_budget_bounds_it_and_refusals_are_counted():
    a = _arena(chunk=4096, max_bytes=8192)
    got = [_arr(a, 256, np.int64) for _ in range(5)]   # 2 KiB blocks: four fit
    assert sum(g is not None for g in got) == 4 and got[4] is None
    assert a.stats()["refused"] == 1 and a.held == 8192 and a.disabled is None
    got.pop(0)
    gc.collect()
    assert _arr(a, 256, np.int64) is not None   # a freed block is taken again
    assert _arr(a, 10_000, np.int64) is None    # larger than what is left


def test_what_is_left_of_a_chunk_is_not_lost():
    a = _arena(chunk=4096, max_bytes=1 << 20)
    kept = [_arr(a, 300, np.int64),   # a 4 KiB block: the whole first chunk
            _arr(a, 100, np.int64),   # 1 KiB from the second chunk; 3 KiB left there
            _arr(a, 400, np.int64)]   # 4 KiB: a third chunk; the 3 KiB go to the free lists
    assert a.held == 3 * 4096
    kept.append(_arr(a, 200, np.int64))  # 2 KiB: from the second chunk's rest, no new chunk
    kept.append(_arr(a, 100, np.int64))  # 1 KiB: the last of it
    assert a.held == 3 * 4096 and all(k is not None for k in kept)
    assert len({k.ctypes.data for k in kept}) == 5


def test_no_cuda_turns_it_off_once_and_says_why():
    a = _arena(fail=True)
    assert _arr(a, 10, np.int64) is None and "no CUDA-capable device" in a.disabled
    assert _arr(a, 10, np.int64) is None and len(a._alloc.given) == 0


def test_a_device_that_does_not_map_a_chunk_at_its_address_is_refused():
    a = _arena()
    x = _arr(a, 10, np.int64)
    asked = []
    assert a.mapped_on(0, lambda p: asked.append(p) or p)
    assert not a.mapped_on(1, lambda p: p + 4096)
    assert a.mapped_on(0, lambda p: 0) and len(asked) == 1   # (asked once per device)
    _arr(a, 1 << 14, np.int64)   # a new chunk: asked again
    assert a.mapped_on(0, lambda p: asked.append(p) or p) and len(asked) == 3
    del x


# -- the Descs constructors ----------------------------------------------------------------------
@pytest.fixture
def arena(monkeypatch):
    a = _arena(chunk=1 << 20, max_bytes=8 << 20)
    monkeypatch.setattr(pinned_tables, "TABLES", a)
    return a


def _cuda_region(nbytes=1 << 20):
    return Region(torch.zeros(nbytes, dtype=torch.uint8), MemoryKind.CUDA, 0)


def _host_region(nbytes=1 << 20):
    return Region(torch.zeros(nbytes, dtype=torch.uint8), MemoryKind.HOST, None)


def _in_arena(a, arr):
    return a.holds(arr.ctypes.data, arr.nbytes)


def test_from_blocks_over_cuda_writes_its_offsets_into_the_arena(arena):
    r = _cuda_region()
    ids = np.array([5, 0, 63, 17])
    d = Descs.from_blocks(r, ids, 4096, base_offset=128, stride=8192)
    assert np.array_equal(d.offset, 128 + ids * 8192) and _in_arena(arena, d.offset)
    assert d.device_tables == (d.offset.ctypes.data, None)
    plain = Descs.from_blocks(_host_region(), ids, 4096, base_offset=128, stride=8192)
    assert plain.device_tables is None and not _in_arena(arena, plain.offset)
    assert np.array_equal(plain.offset, d.offset)


def test_from_ranges_over_cuda_too(arena):
    d = Descs.from_ranges(_cuda_region(), [4096, 0, 100], [10, 20, 30])
    assert list(d.offset) == [4096, 0, 100] and d.device_tables == (d.offset.ctypes.data, None)


def test_concat_over_several_cuda_regions_puts_offsets_and_indices_there(arena):
    rs = [_cuda_region() for _ in range(3)]
    parts = [Descs.from_blocks(r, np.arange(k, k + 4), 4096) for k, r in enumerate(rs)]
    d = Descs.concat(parts + [Descs.from_blocks(rs[0], [9], 4096)])
    off, idx = d.device_tables
    assert off == d.offset.ctypes.data and idx == d.region_idx.ctypes.data
    assert _in_arena(arena, d.offset) and _in_arena(arena, d.region_idx) and d.region_idx.dtype == np.int32
    assert list(d.region_idx) == [0] * 4 + [1] * 4 + [2] * 4 + [0]
    assert np.array_equal(d.offset, np.concatenate([p.offset for p in parts] + [[9 * 4096]]))
    assert d.region_uids == tuple(r.uid for r in rs)
    bits = 0
    for r in rs:
        bits |= r.ptr
    assert d.base_low_bits == bits & 15


def test_from_parts_joins_into_the_arena_with_the_same_values(arena):
    rs = (_cuda_region(), _cuda_region())
    d = Descs.from_parts(rs, [np.array([1, 0], np.int32), np.array([1], np.int32)],
                         [np.array([4096, 0]), np.array([8192])], [np.array([16, 32]), np.array([48])])
    assert list(d.region_idx) == [1, 0, 1] and list(d.offset) == [4096, 0, 8192] and list(d.length) == [16, 32, 48]
    assert d.device_tables == (d.offset.ctypes.data, d.region_idx.ctypes.data)
    host = Descs.from_parts((_host_region(),), [np.zeros(2, np.int32)], [np.array([0, 64])], [np.array([64, 64])])
    assert host.device_tables is None and list(host.offset) == [0, 64]
    with pytest.raises(ValueError):   # (the usual checks still run)
        Descs.from_parts(rs, [np.array([2], np.int32)], [np.array([0])], [np.array([16])])
    assert len(Descs.from_parts(rs, [], [], [])) == 0


def test_a_spent_budget_or_no_cuda_leaves_ordinary_arrays(monkeypatch):
    monkeypatch.setattr(pinned_tables, "TABLES", _arena(chunk=4096, max_bytes=4096))
    r = _cuda_region()
    big = Descs.from_blocks(r, np.arange(1000), 64)   # 8,000 bytes: over the budget
    assert big.device_tables is None and np.array_equal(big.offset, np.arange(1000) * 64)
    monkeypatch.setattr(pinned_tables, "TABLES", _arena(fail=True))
    d = Descs.concat([Descs.from_blocks(r, [1, 2], 64), Descs.from_blocks(_cuda_region(), [3], 64)])
    assert d.device_tables is None and list(d.offset) == [64, 128, 192]


def test_the_tables_stay_alive_with_the_descs_and_come_back_after(arena):
    r = _cuda_region()
    d = Descs.from_blocks(r, np.arange(512), 1024)
    addr = d.offset.ctypes.data
    gc.collect()
    assert arena.stats()["in_use_bytes"] == block_size(512 * 8)
    other = Descs.from_blocks(r, np.arange(512), 1024)
    assert other.offset.ctypes.data != addr and np.array_equal(d.offset, np.arange(512) * 1024)
    del d, other
    gc.collect()
    assert arena.stats()["in_use_bytes"] == 0


def test_a_forked_child_places_nothing_in_its_parents_pinned_memory():
    """After a fork the child does not own the parent's pinned chunks (CUDA keeps them out of it):
    the child's arena hands out nothing, says why, and does not wait on a lock the parent held at
    the fork; the parent's arena goes on as before."""
    import json
    import os
    import signal
    import time

    a = _arena()
    kept = [_arr(a, 100, np.int64)]
    r, w = os.pipe()
    a._lock.acquire()   # (held by "another thread" at the fork)
    pid = os.fork()
    if pid == 0:   # the child: only os-level exits from here
        try:
            got = a.array(10, np.int64) is not None
            del kept[:]   # (an inherited block collected in the child: counted nowhere)
            gc.collect()
            out = {"got": got, "disabled": a.disabled, "stats": a.stats(), "global": pinned_tables.TABLES.disabled}
        except BaseException as e:   # noqa: BLE001 (reported to the parent, which fails the test)
            out = {"error": repr(e)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    a._lock.release()
    os.close(w)
    deadline = time.monotonic() + 60
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung (a lock held at the fork?)")
        time.sleep(0.01)
    with os.fdopen(r, "rb") as f:
        out = json.loads(f.read() or b"{}")
    assert "error" not in out and out, out
    assert out["got"] is False and "forked" in out["disabled"] and "forked" in out["global"]
    assert out["stats"]["chunks"] == 0 and out["stats"]["held_bytes"] == 0 and out["stats"]["in_use_bytes"] == 0
    assert a.disabled is None and _arr(a, 10, np.int64) is not None and len(kept) == 1
