"""Layout transforms between paged KV caches of different block sizes and TP head splits,
checked exhaustively against a token-by-token reference over small shapes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixl_connectors.handoff.layout_transform import HeadRange, PagedLayout, lease_runs, reader_runs, tp_head_ranges

TOTAL_HEADS = 8
HB = 4  # bytes of one token of one head


def _cache(layout: PagedLayout, nblocks: int, rng) -> np.ndarray:
    return rng.integers(1, 255, size=(nblocks, layout.heads, layout.block_size, layout.head_bytes), dtype=np.uint8)


def _apply(src_cache, src, sblocks, dst_cache, dst, dblocks, heads):
    """Move bytes as the transport does: the lease's runs concatenated, cut into the reader's runs."""
    offs, lens = lease_runs(src, sblocks, heads)
    flat = src_cache.reshape(-1)
    stream = np.concatenate([flat[o:o + n] for o, n in zip(offs, lens)]) if len(offs) else np.zeros(0, np.uint8)
    rr = reader_runs(src, len(sblocks), dst, dblocks, heads)
    assert int(rr.lengths.sum()) == len(stream)
    out = dst_cache.reshape(-1)
    scratch = np.zeros(rr.scratch_bytes, np.uint8)
    pos = 0
    for o, n, s in zip(rr.offsets, rr.lengths, rr.scratch):
        (scratch if s else out)[o:o + n] = stream[pos:pos + n]
        pos += n


@pytest.mark.parametrize("bs,bd", [(a, b) for a, b in itertools.product([1, 2, 4, 8, 16], repeat=2)
                                   if max(a, b) % min(a, b) == 0])
@pytest.mark.parametrize("ptp,dtp", list(itertools.product([1, 2, 4, 8], repeat=2)))
def test_every_token_of_every_head_lands_where_the_reader_expects_it(bs, bd, ptp, dtp):
    rng = np.random.default_rng(bs * 131 + bd * 17 + ptp * 5 + dtp)
    hp, hd = TOTAL_HEADS // ptp, TOTAL_HEADS // dtp
    src, dst = PagedLayout(hp, bs, HB), PagedLayout(hd, bd, HB)
    for tokens in (1, bs, bd, 3 * max(bs, bd) - 1, 37):
        ns, nd = -(-tokens // bs), -(-tokens // bd)
        pool_s, pool_d = ns + 3, nd + 3
        sblocks = {p: rng.permutation(pool_s)[:ns] for p in range(ptp)}
        caches = {p: _cache(src, pool_s, rng) for p in range(ptp)}
        for rank in range(dtp):
            dblocks = rng.permutation(pool_d)[:nd]
            dcache = np.zeros((pool_d, hd, bd, HB), np.uint8)
            for p, heads in tp_head_ranges(TOTAL_HEADS, ptp, dtp, rank):
                _apply(caches[p], src, sblocks[p], dcache, dst, dblocks, heads)
            # reference: global head g of token t
            for t in range(tokens):
                for hl in range(hd):
                    g = rank * hd + hl
                    p, hs = divmod(g, hp)
                    want = caches[p][sblocks[p][t // bs], hs, t % bs]
                    assert np.array_equal(dcache[dblocks[t // bd], hl, t % bd], want), (t, hl)
            # blocks the reader did not allocate stay untouched
            others = np.setdiff1d(np.arange(pool_d), dblocks)
            assert not dcache[others].any()


def test_tp_head_ranges_cover_each_decode_rank_once():
    for ptp, dtp in itertools.product([1, 2, 4, 8], repeat=2):
        for rank in range(dtp):
            ranges = tp_head_ranges(TOTAL_HEADS, ptp, dtp, rank)
            got = [h for p, r in ranges for h in range(p * (8 // ptp) + r.src_start,
                                                        p * (8 // ptp) + r.src_start + r.count)]
            assert got == list(range(rank * (8 // dtp), (rank + 1) * (8 // dtp)))
            assert [r.dst_start for _, r in ranges] == list(np.cumsum([0] + [r.count for _, r in ranges])[:-1])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([1, 2, 4, 8, 16]), st.sampled_from([1, 2, 4, 8, 16]), st.integers(1, 100),
       st.integers(0, 7), st.integers(1, 8))
def test_runs_are_consistent_and_the_scratch_is_only_the_tail(bs, bd, tokens, start, count):
    if max(bs, bd) % min(bs, bd) or start + count > TOTAL_HEADS:
        return
    src, dst = PagedLayout(TOTAL_HEADS, bs, HB), PagedLayout(TOTAL_HEADS, bd, HB)
    heads = HeadRange(start, start, count)
    ns, nd = -(-tokens // bs), -(-tokens // bd)
    _, lens = lease_runs(src, np.arange(ns), heads)
    rr = reader_runs(src, ns, dst, np.arange(nd), heads)
    assert rr.lengths.sum() == lens.sum() == ns * count * bs * HB
    # scratch holds only slots past the reader's last block: fewer than one prefill block per head
    assert rr.scratch_bytes < count * bs * HB or rr.scratch_bytes == 0
    placed = rr.offsets[~rr.scratch]
    assert len(np.unique(placed)) == len(placed)          # no two runs write the same place


def test_mismatches_are_clear_errors():
    a = PagedLayout(8, 16, 4)
    with pytest.raises(ValueError, match="divide"):
        reader_runs(a, 1, PagedLayout(8, 24, 4), np.arange(1), HeadRange(0, 0, 8))
    with pytest.raises(ValueError, match="dtype or head size"):
        reader_runs(a, 1, PagedLayout(8, 16, 8), np.arange(1), HeadRange(0, 0, 8))
    with pytest.raises(ValueError, match="does not fit"):
        reader_runs(a, 1, PagedLayout(4, 16, 4), np.arange(1), HeadRange(0, 0, 8))
    with pytest.raises(ValueError, match="split"):
        tp_head_ranges(8, 3, 1, 0)


# ----------------------------------------------------------------------------------------------
# pull_runs: the reader names the subset of a whole-block lease it lacks (transport `ranges`)
# ----------------------------------------------------------------------------------------------
from nixl_connectors.handoff.layout_transform import coalesce_ranges, pull_runs  # noqa: E402


def _pull(src_cache, src, sblocks, first, dst_cache, dst, table, heads, start, end, stride):
    """Move bytes as the transport does: the lease is the owner's whole blocks back to back; the
    read takes `runs.src` ranges of it, in order, into the reader's runs (scratch ones aside)."""
    lease = src_cache[sblocks].reshape(-1)                       # whole blocks, in block order
    runs = pull_runs(src, first, len(sblocks), dst, table, heads, start, end, dst_stride=stride)
    stream = np.concatenate([lease[o:o + n] for o, n in runs.src]) if len(runs.src) else lease[:0]
    assert len(stream) == runs.nbytes
    out = dst_cache.reshape(-1)
    scratch = np.zeros(runs.scratch_bytes, np.uint8)
    pos = 0
    for o, n, sc in zip(runs.dst_offsets, runs.dst_lengths, runs.scratch):
        (scratch if sc else out)[o:o + n] = stream[pos:pos + n]
        pos += n
    return runs


LAYOUTS = {"token-major": ((), 1), "two parts": ((1, 1), 2), "K transposed": ((2, 1), 2)}


def _shape(n, lay):
    """A cache as [blocks, heads, bytes of one head's slab]; `_token_bytes` reads a token out of
    a slab the way the layout keeps it (part q: [rows, tokens, tb // rows])."""
    return (n, lay.heads, lay.head_bytes * lay.block_size)


def _token_bytes(cache, lay, block, head, tok):
    """The bytes of one token of one head, part by part, wherever the layout keeps them."""
    blk = cache[block, head]
    tb = lay.head_bytes // lay.parts
    out = []
    for q, rows in enumerate(lay.rows):
        part = blk[q * lay.block_size * tb:(q + 1) * lay.block_size * tb].reshape(rows, lay.block_size, tb // rows)
        out.append(part[:, tok].reshape(-1))
    return np.concatenate(out)


@pytest.mark.parametrize("bs,bd", [(a, b) for a, b in itertools.product([1, 2, 4, 8], repeat=2)
                                   if max(a, b) % min(a, b) == 0])
@pytest.mark.parametrize("ptp,dtp", [(1, 1), (1, 2), (2, 1), (2, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_pull_runs_fill_exactly_the_missing_tokens(bs, bd, ptp, dtp, kind):
    rows, parts = LAYOUTS[kind]
    rng = np.random.default_rng(bs * 7 + bd * 3 + ptp * 101 + dtp + parts)
    hp, hd = TOTAL_HEADS // ptp, TOTAL_HEADS // dtp
    src, dst = PagedLayout(hp, bs, HB, parts, rows), PagedLayout(hd, bd, HB, parts, rows)
    piece = min(bs, bd)
    for tokens in (1, bd, 3 * max(bs, bd) - 1, 29):
        ns, nd = -(-tokens // bs), -(-tokens // bd)
        for cached_dst_blocks in (0, nd // 2, nd - 1):
            start = cached_dst_blocks * bd
            first = min(start // bs, ns - 1)                  # owner exposes a tail window
            pool_s, pool_d = ns + 2, nd + 3
            caches = {p: rng.integers(1, 255, size=_shape(pool_s, src), dtype=np.uint8) for p in range(ptp)}
            sblocks = {p: rng.permutation(pool_s)[:ns][first:] for p in range(ptp)}
            table = rng.permutation(pool_d)[:nd].astype(np.int64)
            null = rng.random(nd) < 0.2                        # reader keeps no block there
            table[null] = -1
            for rank in range(dtp):
                dcache = np.zeros(_shape(pool_d, dst), np.uint8)
                moved = 0
                for p, heads in tp_head_ranges(TOTAL_HEADS, ptp, dtp, rank):
                    runs = _pull(caches[p], src, sblocks[p], first, dcache, dst, table, heads, start,
                                 tokens, dst.block_bytes)
                    moved += runs.nbytes
                    assert np.all(runs.src[1:, 0] != runs.src[:-1].sum(axis=1)), "not coalesced"
                    assert len(runs.src) <= len(sblocks[p]), "at most one wire range per owner block"
                taken = set()
                for t in range(0, -(-tokens // piece) * piece, piece):
                    if t >= start and t // bs >= first and table[t // bd] >= 0:
                        taken.add(t // bs)
                assert moved == len(taken) * hd * bs * HB, "whole owner blocks that hold a missing piece"
                for t in range(tokens):
                    d = table[t // bd]
                    if d < 0:
                        continue
                    for hl in range(hd):
                        got = _token_bytes(dcache, dst, d, hl, t % bd)
                        if t < start or t // bs < first:
                            assert not got.any(), "cached or unexposed tokens are never written"
                            continue
                        g = rank * hd + hl
                        p, hs = divmod(g, hp)
                        want = _token_bytes(caches[p], src, sblocks[p][t // bs - first], hs, t % bs)
                        assert np.array_equal(got, want), (t, hl)


def test_pull_runs_whole_lease_same_layout_is_one_range_and_strided_reader():
    src = dst = PagedLayout(2, 4, HB)
    heads = HeadRange(0, 0, 2)
    runs = pull_runs(src, 0, 5, dst, np.array([9, 3, 4, 0, 7]), heads, 0, 20, dst_stride=3 * dst.block_bytes)
    assert runs.src.tolist() == [[0, 5 * src.block_bytes]] and not runs.scratch.any()
    assert runs.dst_offsets[0] == 9 * 3 * dst.block_bytes
    # suffix only: blocks 3.. of the lease, still one range
    runs = pull_runs(src, 0, 5, dst, np.array([9, 3, 4, 0, 7]), heads, 12, 20)
    assert runs.src.tolist() == [[3 * src.block_bytes, 2 * src.block_bytes]]


def test_pull_runs_rejects_bad_input():
    src, dst = PagedLayout(2, 4, HB), PagedLayout(2, 8, HB)
    with pytest.raises(ValueError, match="multiple"):
        pull_runs(src, 0, 2, dst, np.array([1]), HeadRange(0, 0, 2), 2, 8)
    with pytest.raises(ValueError, match="divide"):
        pull_runs(PagedLayout(2, 3, HB), 0, 2, dst, np.array([1]), HeadRange(0, 0, 2), 0, 8)
    with pytest.raises(ValueError, match="head range"):
        pull_runs(src, 0, 2, dst, np.array([1]), HeadRange(1, 0, 2), 0, 8)
    with pytest.raises(ValueError, match="split differently"):
        pull_runs(src, 0, 2, PagedLayout(2, 8, HB, 2), np.array([1]), HeadRange(0, 0, 2), 0, 8)
    with pytest.raises(ValueError, match="part_rows"):
        PagedLayout(2, 8, HB, 2, (3, 1))


def test_coalesce_ranges():
    assert coalesce_ranges(np.array([0, 4, 10, 12]), np.array([4, 2, 2, 1])).tolist() == [[0, 6], [10, 3]]
    assert coalesce_ranges(np.array([], np.int64), np.array([], np.int64)).shape == (0, 2)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("bs", [1, 4, 8])
def test_pull_runs_same_layout_shortcut_equals_the_general_mapping(kind, bs):
    """Same layout on both sides, every head: `pull_runs` takes a per-block shortcut; its runs
    are the general per-head/part/row mapping's, run for run (offsets, lengths, scratch)."""
    from nixl_connectors.handoff.layout_transform import _pull_runs_general

    rows, parts = LAYOUTS[kind]
    rng = np.random.default_rng(bs * 13 + parts)
    lay = PagedLayout(4, bs, HB, parts, rows)
    heads = HeadRange(0, 0, 4)
    for _ in range(40):
        nd = int(rng.integers(1, 9))
        table = rng.permutation(nd + 6)[:nd].astype(np.int64)
        if rng.random() < 0.5:
            table[:] = np.arange(nd) + int(rng.integers(0, 4))     # adjacent blocks merge
        table[rng.random(nd) < 0.2] = -1
        tokens = int(rng.integers(1, nd * bs + 1))
        first = int(rng.integers(0, -(-tokens // bs)))
        count = -(-tokens // bs) - first
        start = int(rng.integers(0, -(-tokens // bs))) * bs
        end = int(rng.integers(start, tokens + 1))
        stride = lay.block_bytes * int(rng.integers(1, 3))
        fast = pull_runs(lay, first, count, lay, table, heads, start, end, dst_stride=stride)
        slow = _pull_runs_general(lay, first, count, lay, table, heads, start, end, stride)
        assert fast.src.tolist() == slow.src.tolist()
        assert fast.dst_offsets.tolist() == slow.dst_offsets.tolist()
        assert fast.dst_lengths.tolist() == slow.dst_lengths.tolist()
        assert fast.scratch.tolist() == slow.scratch.tolist()
