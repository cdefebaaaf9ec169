"""Descs construction, validation and coalescing; Region and AgentConfig validation (pure)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from transport import AgentConfig, Descs, TransportSet
from transport.config import parse_hostport
from transport.region import MemoryKind, make_region

pytestmark = pytest.mark.timeout(120)


def region(nbytes: int = 1 << 16):
    return make_region(np.zeros(nbytes, dtype=np.uint8))


def stream_bytes(d: Descs) -> np.ndarray:
    """The byte stream of `d` as (region uid, byte address) pairs, via a Python loop (reference)."""
    out = []
    for r, o, n in zip(d.region_idx, d.offset, d.length):
        uid = d.regions[int(r)].uid
        out.extend((uid, a) for a in range(int(o), int(o + n)))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------- from_blocks
def test_from_blocks_offsets_and_lengths():
    r = region(1 << 16)
    d = Descs.from_blocks(r, [3, 0, 7], 1024)
    assert d.offset.tolist() == [3072, 0, 7168]
    assert d.length.tolist() == [1024] * 3
    assert d.region_idx.tolist() == [0, 0, 0]
    assert d.offset.dtype == np.int64 and d.length.dtype == np.int64 and d.region_idx.dtype == np.int32
    assert len(d) == 3 and d.nbytes == 3072


def test_from_blocks_base_offset_and_stride():
    r = region(1 << 16)
    d = Descs.from_blocks(r, np.array([0, 2, 1]), 512, base_offset=256, stride=2048)
    assert d.offset.tolist() == [256, 256 + 4096, 256 + 2048]
    assert d.length.tolist() == [512] * 3


def test_from_blocks_accepts_numpy_int_dtypes_and_2d():
    r = region()
    for dt in (np.int8, np.int32, np.uint16, np.int64):
        d = Descs.from_blocks(r, np.array([[1, 2], [3, 4]], dtype=dt), 256)
        assert d.offset.tolist() == [256, 512, 768, 1024]


def test_from_blocks_empty():
    d = Descs.from_blocks(region(), np.array([], dtype=np.int64), 256)
    assert len(d) == 0 and d.nbytes == 0
    assert len(d.coalesced()) == 0


@pytest.mark.parametrize("ids,bb,exc", [
    ([0, 1.5], 256, TypeError),
    (np.array([0.0, 1.0]), 256, TypeError),
    ([0, -1], 256, ValueError),
    ([0, 1], 0, ValueError),
    ([0, 1], -4, ValueError),
    ([0, 256], 256, ValueError),          # block 256 ends past a 64 KiB region
])
def test_from_blocks_rejects(ids, bb, exc):
    with pytest.raises(exc):
        Descs.from_blocks(region(1 << 16), ids, bb)


def test_from_blocks_last_block_exactly_fits():
    d = Descs.from_blocks(region(1 << 16), [255], 256)
    assert d.offset.tolist() == [65280]


def test_descs_validation():
    r = region(4096)
    z32, z64 = np.zeros(1, np.int32), np.zeros(1, np.int64)
    with pytest.raises(ValueError):  # mismatched lengths
        Descs((r,), np.zeros(2, np.int32), z64, np.ones(1, np.int64))
    with pytest.raises(ValueError):  # region index out of range
        Descs((r,), np.ones(1, np.int32), z64, np.ones(1, np.int64))
    with pytest.raises(ValueError):  # zero length
        Descs((r,), z32, z64, z64)
    with pytest.raises(ValueError):  # negative offset
        Descs((r,), z32, -np.ones(1, np.int64), np.ones(1, np.int64))
    with pytest.raises(ValueError, match="exceeds its region"):
        Descs.from_ranges(r, [4000], [100])


def test_from_ranges_broadcasts_scalar_length():
    d = Descs.from_ranges(region(), [0, 4096, 100], 50)
    assert d.length.tolist() == [50, 50, 50]


# ----------------------------------------------------------------------------- concat
def test_concat_dedups_regions_and_keeps_stream_order():
    r1, r2 = region(), region()
    a = Descs.from_blocks(r1, [1, 2], 256)
    b = Descs.from_blocks(r2, [5], 256)
    c = Descs.from_blocks(r1, [9], 256)
    d = Descs.concat([a, b, c])
    assert len(d.regions) == 2
    assert [d.regions[i].uid for i in d.region_idx] == [r1.uid, r1.uid, r2.uid, r1.uid]
    assert d.offset.tolist() == [256, 512, 1280, 2304]
    assert d.nbytes == 1024
    assert np.array_equal(stream_bytes(d), np.concatenate([stream_bytes(a), stream_bytes(b), stream_bytes(c)]))


def test_concat_empty_and_with_empty_parts():
    assert len(Descs.concat([])) == 0
    r = region()
    d = Descs.concat([Descs.from_blocks(r, [], 256), Descs.from_blocks(r, [1], 256)])
    assert d.offset.tolist() == [256]


# ----------------------------------------------------------------------------- coalescing
def test_coalesce_merges_adjacent_in_stream_order_only():
    r = region()
    d = Descs.from_blocks(r, [0, 1, 2, 5, 6, 4, 3], 256).coalesced()
    assert d.offset.tolist() == [0, 1280, 1024, 768]
    assert d.length.tolist() == [768, 512, 256, 256]


def test_coalesce_fully_contiguous_is_one_run():
    d = Descs.from_blocks(region(), np.arange(64), 1024).coalesced()
    assert len(d) == 1 and d.offset[0] == 0 and d.length[0] == 65536


def test_coalesce_does_not_merge_across_regions():
    r1, r2 = region(), region()
    d = Descs.concat([Descs.from_ranges(r1, [0], [256]), Descs.from_ranges(r2, [256], [256])])
    assert len(d.coalesced()) == 2


def test_coalesce_does_not_merge_strided_gaps():
    d = Descs.from_blocks(region(), [0, 1, 2], 256, stride=512).coalesced()
    assert len(d) == 3


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_coalesce_preserves_stream_property(data):
    regions = [region(4096) for _ in range(data.draw(st.integers(1, 3)))]
    parts = []
    for _ in range(data.draw(st.integers(0, 6))):
        ri = data.draw(st.integers(0, len(regions) - 1))
        bb = data.draw(st.sampled_from([1, 16, 64, 256]))
        nblocks = 4096 // bb
        ids = data.draw(st.lists(st.integers(0, nblocks - 1), max_size=12))
        parts.append(Descs.from_blocks(regions[ri], np.array(ids, dtype=np.int64), bb))
    d = Descs.concat(parts)
    c = d.coalesced()
    assert c.nbytes == d.nbytes
    assert np.array_equal(stream_bytes(c), stream_bytes(d))
    # no two neighbours of the result are adjacent in one region
    if len(c) > 1:
        adj = (c.region_idx[1:] == c.region_idx[:-1]) & (c.offset[:-1] + c.length[:-1] == c.offset[1:])
        assert not adj.any()
    assert len(c.coalesced()) == len(c)


# ----------------------------------------------------------------------------- regions
def test_region_of_numpy_and_torch():
    a = np.arange(64, dtype=np.float32)
    r = make_region(a)
    assert r.kind is MemoryKind.HOST and r.nbytes == 256 and r.device_index is None
    r.view(4, 4).copy_(torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
    assert a.view(np.uint8)[4:8].tolist() == [1, 2, 3, 4]  # aliases, no copy
    t = torch.zeros(8, 16, dtype=torch.bfloat16)
    assert make_region(t).nbytes == 256


def test_region_view_bounds():
    r = region(1024)
    with pytest.raises(ValueError):
        r.view(1000, 100)
    with pytest.raises(ValueError):
        r.view(-1, 10)


def test_region_rejects_bad_objects():
    with pytest.raises(ValueError):
        make_region(np.zeros((8, 8), dtype=np.uint8)[:, ::2])
    ro = np.zeros(16, dtype=np.uint8)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        make_region(ro)
    with pytest.raises(ValueError):
        make_region(torch.zeros(8, 8).t())
    with pytest.raises(TypeError):
        make_region([1, 2, 3])


def test_region_whole_storage_of_non_contiguous_tensor():
    base = torch.zeros(8, 8, dtype=torch.float32)
    r = make_region(base.t(), whole_storage=True)
    assert r.nbytes == 256


def test_regions_have_unique_ids():
    assert region().uid != region().uid


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:0", ("127.0.0.1", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("[::1]:80", ("::1", 80)),
])
def test_parse_hostport(value, expected):
    assert parse_hostport(value) == expected


@pytest.mark.parametrize("value", ["127.0.0.1", ":80", "h:x", "h:70000", "h:-1", 5, None])
def test_parse_hostport_rejects(value):
    with pytest.raises(ValueError):
        parse_hostport(value)


@pytest.mark.parametrize("kw,exc", [
    (dict(listen="nohost"), ValueError),
    (dict(auth_key="str-key"), TypeError),
    (dict(timeout_s=0), ValueError),
    (dict(chunk_bytes=3000), ValueError),
    (dict(chunk_bytes=12288), ValueError),
    (dict(chunk_bytes=1 << 20, staging_bytes=1 << 20), ValueError),
    (dict(compat={"k": [1]}), TypeError),
    (dict(compat={1: "v"}), TypeError),
    (dict(transports="carrier-pigeon"), ValueError),
])
def test_agent_config_rejects(kw, exc):
    with pytest.raises(exc):
        AgentConfig(**kw)


def test_agent_config_defaults_and_coercion():
    c = AgentConfig(transports="shm", chunk_bytes=1 << 16, staging_bytes=1 << 18)
    assert c.transports is TransportSet.SHM and c.staging_slots == 4
    assert AgentConfig(chunk_bytes=1 << 16, staging_bytes=1 << 17).staging_slots == 2
    assert TransportSet.TCP.ucx_tls() == "tcp,self"
    assert "sm" in TransportSet.SHM.ucx_tls() and "tcp" in TransportSet.SHM.ucx_tls()
    assert TransportSet.AUTO.ucx_tls() is None


# -- select_stream: a read of part of a lease ------------------------------------------------


def _stream_bytes(d):
    out = []
    for ri, o, n in zip(d.region_idx, d.offset, d.length):
        out.append(d.regions[ri].flat[o:o + n].numpy())
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 9)), min_size=1, max_size=12),
       st.data())
def test_select_stream_matches_byte_slicing(rows, data):
    import torch
    from transport.region import make_region

    pool = torch.arange(80, dtype=torch.uint8)
    reg = make_region(pool)
    rows = [(o, min(n, 80 - o)) for o, n in rows]
    d = Descs.from_ranges(reg, [o for o, _ in rows], [n for _, n in rows])
    total = d.nbytes
    stream = _stream_bytes(d)
    k = data.draw(st.integers(1, 5))
    ranges = []
    for _ in range(k):
        a = data.draw(st.integers(0, total - 1))
        b = data.draw(st.integers(a + 1, total))
        ranges.append((a, b - a))
    sel = d.select_stream(np.array(ranges))
    want = np.concatenate([stream[a:a + n] for a, n in ranges])
    assert np.array_equal(_stream_bytes(sel), want)


def test_select_stream_rejects_bad_ranges():
    import torch
    from transport.region import make_region

    d = Descs.from_blocks(make_region(torch.zeros(64, dtype=torch.uint8)), [0, 2], 16)
    for bad in ([[0, 0]], [[-1, 4]], [[30, 3]], [[2**63 - 1, 2]], [[0, 2**63 - 1]], np.zeros((0, 2)), [[1, 2, 3]]):
        with pytest.raises(ValueError):
            d.select_stream(np.array(bad, dtype=np.int64) if not isinstance(bad, np.ndarray) else bad)
    with pytest.raises(ValueError):
        d.select_stream(np.array([[2**64 - 1, 1]], dtype=np.uint64))


# ----------------------------------------------------------------------------- uniform length
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=0, max_size=12), st.integers(1, 64), st.booleans())
def test_uniform_length_is_the_common_length_or_zero(ids, bb, ragged):
    """from_blocks sets it without a pass over the lengths; any other Descs computes it; both
    agree with the lengths themselves."""
    r = region()
    blocks = Descs.from_blocks(r, ids, bb)
    lens = [bb] * len(ids)
    if ragged and lens:
        lens[-1] = bb + 1
    ranges = Descs.from_ranges(r, [i * 80 for i in ids], lens) if ids else blocks
    for d in (blocks, ranges):
        want = int(d.length[0]) if len(d) and len(set(d.length.tolist())) == 1 else 0
        assert d.uniform_length == want
    assert Descs.concat([blocks, blocks]).uniform_length == (bb if ids else 0)


def test_ipc_plan_pairs_with_agrees_with_the_full_comparison():
    """The O(1) pairing of uniform runs says what comparing every length says (pure)."""
    from transport import gpu_runs
    from transport.dataplane import IpcPlan

    r = region(1 << 20)
    rng = np.random.default_rng(5)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        ln = np.full(n, int(rng.choice([64, 128])), np.int64)
        if rng.random() < 0.3:
            ln[rng.integers(0, n)] = 192
        lo = int(ln.min())
        plan = IpcPlan(np.zeros(1, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64), ln, (),
                       None, lo if lo == int(ln.max()) else 0)
        m = n + int(rng.integers(-1, 2)) if rng.random() < 0.3 else n
        if m < 1:
            m = 1
        bb = int(rng.choice([64, 128]))
        local = (Descs.from_blocks(r, np.arange(m), bb) if rng.random() < 0.5
                 else Descs.from_ranges(r, np.arange(m) * 256, rng.choice([64, 128, 192], size=m)))
        assert plan.pairs_with(local) == gpu_runs.paired(ln, local.length)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=30), st.integers(1, 70000), st.integers(0, 99),
       st.sampled_from([None, 1, 8, 16, 24, 4096, 32768]))
def test_offset_low_bits_cover_every_offset(ids, bb, base, stride):
    """from_blocks states the low bits without a pass over the offsets: a superset of their OR,
    exact when block size and base are 16-byte multiples; alignment is never overstated."""
    from transport.descs import low_bits_of_progression

    r = region(1 << 30)
    d = Descs.from_blocks(r, ids, bb, base_offset=base, stride=stride)
    exact = int(np.bitwise_or.reduce(d.offset)) & 15
    hint = d.offset_low_bits
    assert hint & exact == exact, (hint, exact)
    assert d.nbytes == int(d.length.sum()) == len(ids) * bb
    step = bb if stride is None else stride
    if step % 16 == 0 and base % 16 == 0:
        assert hint == 0
    assert low_bits_of_progression(base, step) == hint
    plain = Descs.from_ranges(r, d.offset, d.length)
    assert plain.offset_low_bits == exact


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 50), min_size=0, max_size=8), st.sampled_from([16, 24, 64]),
                          st.integers(0, 40), st.booleans()), min_size=1, max_size=5))
def test_concat_carries_what_its_parts_know(parts):
    """A concat of per-layer block lists knows its uniform length and offset bits without a pass
    over the joined arrays; the values agree with the arrays (never overstating alignment), and a
    part that knows nothing makes the concat compute them."""
    r = region(1 << 16)
    ds = [Descs.from_blocks(r, ids, bb, base_offset=base) if blocks
          else Descs.from_ranges(r, [base + 80 * i for i in ids], [bb] * len(ids)) if ids
          else Descs.from_blocks(r, ids, bb)
          for ids, bb, base, blocks in parts]
    c = Descs.concat(ds)
    lens = c.length.tolist()
    assert c.nbytes == sum(lens)
    assert c.uniform_length == (lens[0] if lens and len(set(lens)) == 1 else 0)
    exact = int(np.bitwise_or.reduce(c.offset)) & 15 if len(c) else 0
    assert c.offset_low_bits & exact == exact


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=0, max_size=20), st.sampled_from([16, 24, 4096]), st.booleans())
@example([3, 4, 5], 16, False)
@example([0, 2, 1, 3], 16, False)      # (its first and last ends are one span's; the order is not)
@example([5, 4, 3], 4096, False)
@example([7], 24, False)
def test_span_is_the_one_contiguous_range_or_none(ids, bb, two_regions):
    """`span` (the fused copy's driver-copy case) is the first offset exactly when the stream is
    one contiguous range of one region, what coalescing says; `bases` and `base_low_bits` are the
    regions' addresses and the OR of their low bits."""
    r = region(1 << 21)
    d = Descs.from_blocks(r, ids, bb)
    if two_regions:
        d = Descs.concat([d, Descs.from_blocks(region(1 << 21), ids, bb)])
    want = None
    if len(d) and len(d.regions) == 1 and len(d.coalesced()) == 1:
        want = int(d.offset[0])
    assert d.span == want
    if len(d) == 0 or len(d.regions) > 1:
        assert d.span is None
    assert d.bases.tolist() == [x.ptr for x in d.regions]
    bits = 0
    for x in d.regions:
        bits |= x.ptr & 15
    assert d.base_low_bits == bits


@pytest.mark.parametrize("offsets,lengths,want", [
    ([0, 4, 12], [8, 4, 4], None),     # an overlap and a gap that cancel: the ends match, the runs do not
    ([0, 8, 12], [8, 4, 4], 0),
    ([16, 0], [16, 16], None),
    ([100, 108], [8, 30], 100),
])
def test_span_of_ranges_of_mixed_lengths(offsets, lengths, want):
    assert Descs.from_ranges(region(4096), offsets, lengths).span == want


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 40), min_size=0, max_size=6), st.sampled_from([0, 64, 640])),
                min_size=1, max_size=4),
       st.sampled_from([(64, None), (64, 128), (48, 48)]))
@example([([0, 1, 2], 0), ([3, 4], 0)], (64, None))      # two parts, each one range, the second after the first
@example([([0, 1, 2], 0), ([4, 5], 0)], (64, None))      # a gap between them
@example([([3, 4], 0), ([0, 1, 2], 0)], (64, None))      # the second before the first
@example([([0, 0], 0)], (64, None))                      # one block twice
def test_span_known_at_construction_is_what_the_runs_say(parts, shape):
    """from_blocks and concat decide `span` while building (no pass at read time); it is what a
    Descs made from the same arrays computes from its runs."""
    bb, stride = shape
    r = region(1 << 16)
    d = Descs.concat([Descs.from_blocks(r, ids, bb, base_offset=base, stride=stride) for ids, base in parts])
    fresh = Descs(d.regions, d.region_idx, d.offset, d.length)
    assert "span" in d.__dict__ or len(d) == 0
    assert d.span == fresh.span
