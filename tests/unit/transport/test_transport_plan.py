"""plan.py chunking and packing.py pack/unpack, incl. the property that packing every chunk of
one side's stream and unpacking every chunk into the other side reproduces the stream exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport import Descs
from transport import plan as planmod
from transport.packing import contiguous_view, pack, unpack
from transport.plan import StreamPlan, expand_units, unit_size
from transport.region import make_region

pytestmark = pytest.mark.timeout(120)


def pool(num_blocks: int, block_bytes: int, seed: int | None = None):
    a = np.zeros((num_blocks, block_bytes), dtype=np.uint8)
    if seed is not None:
        a[:] = np.random.default_rng(seed).integers(0, 256, a.shape, dtype=np.uint8)
    return a, make_region(a)


def stream_of(d: Descs) -> np.ndarray:
    """Reference: the bytes of d's stream, via a Python loop over descriptors."""
    parts = [d.regions[int(r)].flat.numpy()[int(o):int(o + n)] for r, o, n in zip(d.region_idx, d.offset, d.length)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def move(src: Descs, dst: Descs, chunk: int, slot_bytes: int | None = None) -> None:
    """What the data path does, without the wire: pack chunk k of src, unpack into chunk k of dst."""
    ps, pd = StreamPlan(src, chunk), StreamPlan(dst, chunk)
    assert ps.num_chunks == pd.num_chunks
    staging = torch.empty(slot_bytes or chunk, dtype=torch.uint8)
    for k in range(ps.num_chunks):
        cs, cd = ps.chunk(k), pd.chunk(k)
        assert cs.nbytes == cd.nbytes
        if cs.contiguous is not None:
            wire = contiguous_view(ps.descs, cs).clone()
        else:
            wire = pack(ps.descs, ps.unit, cs, staging).clone()
        assert wire.numel() == cs.nbytes
        if cd.contiguous is not None:
            contiguous_view(pd.descs, cd).copy_(wire)
        else:
            staging2 = torch.full((slot_bytes or chunk,), 0xEE, dtype=torch.uint8)
            staging2[:cd.nbytes] = wire
            unpack(pd.descs, pd.unit, cd, staging2)


# ----------------------------------------------------------------------------- basics
def test_expand_units():
    out = expand_units(np.array([5, 0, 10]), np.array([2, 0, 3]))
    assert out.tolist() == [5, 6, 10, 11, 12]
    assert expand_units(np.array([], np.int64), np.array([], np.int64)).size == 0
    assert expand_units(np.array([7]), np.array([0])).size == 0


def test_unit_size():
    _, r = pool(64, 4096)
    assert unit_size(Descs.from_blocks(r, [0, 3], 4096), 1 << 20) == 4096
    assert unit_size(Descs.from_blocks(r, [1, 3], 1024, base_offset=512), 1 << 20) == 512
    assert unit_size(Descs.from_blocks(r, [0], 4096), 1024) == 1024  # bounded by the chunk
    assert unit_size(Descs.from_blocks(r, [], 4096), 8192) == 8192
    # all offsets zero, length a multiple of the chunk
    assert unit_size(Descs.from_blocks(r, [0], 65536), 4096) == 4096


def test_plan_chunk_counts_and_sizes():
    _, r = pool(64, 4096)
    d = Descs.from_blocks(r, [5, 1, 9], 4096)           # 12 KiB
    p = StreamPlan(d, 8192)
    assert p.num_chunks == 2 and p.nbytes == 12288
    assert [p.chunk(k).nbytes for k in range(2)] == [8192, 4096]
    with pytest.raises(IndexError):
        p.chunk(2)
    with pytest.raises(IndexError):
        p.chunk(-1)
    with pytest.raises(ValueError):
        StreamPlan(d, 0)


def test_plan_empty():
    _, r = pool(4, 4096)
    p = StreamPlan(Descs.from_blocks(r, [], 4096), 4096)
    assert p.num_chunks == 0 and p.nbytes == 0


def test_plan_contiguous_chunks_are_zero_copy():
    _, r = pool(64, 4096)
    p = StreamPlan(Descs.from_blocks(r, np.arange(10, 42), 4096), 1 << 15)
    assert p.num_chunks == 4
    for k in range(4):
        c = p.chunk(k)
        assert c.contiguous == (0, (10 + 8 * k) * 4096, 1 << 15) and c.segments == ()


def test_plan_scattered_chunk_segments():
    _, r1 = pool(16, 1024)
    _, r2 = pool(16, 1024)
    d = Descs.concat([Descs.from_blocks(r1, [3, 1], 1024), Descs.from_blocks(r2, [0], 1024),
                      Descs.from_blocks(r1, [7], 1024)])
    p = StreamPlan(d, 4096)
    assert p.unit == 1024 and p.num_chunks == 1
    c = p.chunk(0)
    assert c.contiguous is None
    assert [(s.region, s.stage_start, s.index.tolist()) for s in c.segments] == [
        (0, 0, [3, 1]), (1, 2, [0]), (0, 3, [7])]


def test_plan_contiguous_run_split_across_chunk_boundary():
    # two runs of 3 blocks, chunk of 2 blocks: chunk 1 straddles the gap
    _, r = pool(32, 1024)
    p = StreamPlan(Descs.from_blocks(r, [0, 1, 2, 10, 11, 12], 1024), 2048)
    cs = [p.chunk(k) for k in range(3)]
    assert cs[0].contiguous == (0, 0, 2048)
    assert cs[1].contiguous is None and [s.index.tolist() for s in cs[1].segments] == [[2, 10]]
    assert cs[2].contiguous == (0, 11 * 1024, 2048)


def test_plan_rejects_too_fine_alignment(monkeypatch):
    monkeypatch.setattr(planmod, "MAX_UNITS", 1000)
    _, r = pool(4, 4096)
    with pytest.raises(ValueError, match="alignment"):
        StreamPlan(Descs.from_ranges(r, [1], [4000]), 4096)


def test_pack_unpack_roundtrip_simple():
    a, ra = pool(16, 1024, seed=1)
    b, rb = pool(16, 1024)
    src = Descs.from_blocks(ra, [4, 2, 9, 3], 1024)
    dst = Descs.from_blocks(rb, [0, 15, 7, 8], 1024)
    move(src, dst, 4096)
    assert np.array_equal(b[[0, 15, 7, 8]], a[[4, 2, 9, 3]])
    untouched = np.setdiff1d(np.arange(16), [0, 15, 7, 8])
    assert not b[untouched].any()


def test_pack_into_larger_slot_uses_prefix():
    a, ra = pool(8, 1024, seed=2)
    d = Descs.from_blocks(ra, [6, 1], 1024)
    p = StreamPlan(d, 4096)
    slot = torch.zeros(8192, dtype=torch.uint8)
    out = pack(p.descs, p.unit, p.chunk(0), slot)
    assert out.numel() == 2048
    assert np.array_equal(out.numpy(), np.concatenate([a[6], a[1]]))


def test_different_block_sizes_on_each_side():
    a, ra = pool(8, 4096, seed=3)        # 4 KiB source blocks
    b, rb = pool(64, 1024)                # 1 KiB destination blocks
    src = Descs.from_blocks(ra, [7, 0], 4096)
    dst_ids = np.array([63, 1, 2, 40, 5, 6, 7, 9])
    move(src, Descs.from_blocks(rb, dst_ids, 1024), 2048)
    assert np.array_equal(b[dst_ids].reshape(-1), np.concatenate([a[7], a[0]]))


# ----------------------------------------------------------------------------- property
UNIT = st.sampled_from([256, 512, 1024, 4096])


@st.composite
def side(draw, total_units: int, unit: int, per_block: int, unique: bool):
    """A Descs with total_units*unit bytes over 1-3 regions, as blocks of per_block units."""
    nblocks = total_units // per_block
    bb = per_block * unit
    nregions = draw(st.integers(1, 3))
    pool_blocks = nblocks + draw(st.integers(0, 8))
    arrays = [np.zeros((pool_blocks, bb), dtype=np.uint8) for _ in range(nregions)]
    regions = [make_region(x) for x in arrays]
    stride_extra = draw(st.sampled_from([0, 0, unit]))
    if stride_extra:   # blocks with gaps between them (a strided layout)
        arrays = [np.zeros((pool_blocks, bb + stride_extra), dtype=np.uint8) for _ in range(nregions)]
        regions = [make_region(x) for x in arrays]
    # split the blocks into runs, each assigned to a region
    assign = draw(st.lists(st.integers(0, nregions - 1), min_size=nblocks, max_size=nblocks))
    kind = draw(st.sampled_from(["random", "contiguous", "reversed"]))
    parts = []
    for ri in range(nregions):
        cnt = assign.count(ri)
        if kind == "contiguous":
            start = draw(st.integers(0, pool_blocks - cnt))
            ids = np.arange(start, start + cnt)
        elif unique:
            perm = draw(st.permutations(list(range(pool_blocks))))
            ids = np.array(perm[:cnt], dtype=np.int64)
        else:
            ids = np.array(draw(st.lists(st.integers(0, pool_blocks - 1), min_size=cnt, max_size=cnt)),
                           dtype=np.int64)
        if kind == "reversed":
            ids = np.sort(ids)[::-1].copy()
        parts.append(Descs.from_blocks(regions[ri], ids, bb, stride=bb + stride_extra))
    # interleave the per-region lists in the drawn order
    order = np.argsort(np.array(assign, dtype=np.int64), kind="stable")
    pos = np.empty(nblocks, dtype=np.int64)
    pos[order] = np.arange(nblocks)
    cat = Descs.concat(parts)
    # rows of `cat` are grouped per region; reorder so stream order follows `assign`
    d = Descs(cat.regions, cat.region_idx[pos], cat.offset[pos], cat.length[pos])
    return d, arrays


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(st.data())
def test_pack_all_then_unpack_all_reproduces_stream(data):
    unit = data.draw(UNIT, label="unit")
    a = data.draw(st.integers(1, 4), label="src units/block")
    b = data.draw(st.integers(1, 4), label="dst units/block")
    k = data.draw(st.integers(1, 12), label="multiplier")
    total_units = math.lcm(a, b) * k
    src, src_arrays = data.draw(side(total_units, unit, a, unique=False), label="src")
    dst, _ = data.draw(side(total_units, unit, b, unique=True), label="dst")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    for x in src_arrays:
        x[:] = rng.integers(0, 256, x.shape, dtype=np.uint8)
    chunk = data.draw(st.sampled_from([4096, 8192, 16384, 65536, 1 << 20]), label="chunk")
    slot = chunk * data.draw(st.sampled_from([1, 2]))
    expected = stream_of(src)
    assert expected.size == total_units * unit == dst.nbytes

    # the packed chunks, concatenated, are exactly the source stream
    ps = StreamPlan(src, chunk)
    staging = torch.empty(slot, dtype=torch.uint8)
    packed = []
    for kk in range(ps.num_chunks):
        cp = ps.chunk(kk)
        if cp.contiguous is not None:
            packed.append(contiguous_view(ps.descs, cp).numpy().copy())
        else:
            packed.append(pack(ps.descs, ps.unit, cp, staging).numpy().copy())
    assert np.array_equal(np.concatenate(packed), expected)

    move(src, dst, chunk, slot)
    assert np.array_equal(stream_of(dst), expected)
