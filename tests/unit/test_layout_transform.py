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
