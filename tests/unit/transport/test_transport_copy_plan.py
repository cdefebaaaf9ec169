"""copy_plan.py: the pairs and pieces one fused GPU kernel moves, checked against a byte-level
simulation of the kernel on host memory (every program (j, i) copies bytes [j*P, (j+1)*P) of
pair i), for random run lists on both sides."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import copy_plan

MEM = 1 << 16


def _simulate(src, dst, length, piece, mem):
    grid = copy_plan.grid_for(length, piece)
    if grid is None:
        src, dst, length = copy_plan.pieces(src, dst, length, piece)
        grid = (1, len(length))
    per, n = grid
    out = mem.copy()
    for i in range(n):
        for j in range(per):
            start = j * piece
            if start < length[i]:
                k = min(piece, int(length[i]) - start)
                out[dst[i] + start:dst[i] + start + k] = mem[src[i] + start:src[i] + start + k]
    return out


def _runs(draw, total, base):
    """Random disjoint runs covering `total` bytes, placed in [base, base + 4*total)."""
    cuts = sorted(set(draw(st.lists(st.integers(1, total - 1), max_size=8)))) if total > 1 else []
    lens = np.diff([0, *cuts, total]).astype(np.int64)
    order = draw(st.permutations(range(len(lens))))
    slots = np.cumsum(np.concatenate(([0], lens[list(order)] * 2)))[:-1]
    addr = np.empty(len(lens), np.int64)
    addr[list(order)] = base + slots
    return addr, lens


@settings(max_examples=150, deadline=None)
@given(st.data(), st.integers(1, 900), st.sampled_from([8, 64, 256]))
def test_pairs_and_pieces_copy_the_streams_in_order(data, total, piece):
    sa, sl = _runs(data.draw, total, 0)
    da, dl = _runs(data.draw, total, MEM // 2)
    mem = np.random.default_rng(total).integers(0, 255, MEM, dtype=np.uint8)
    s, d, n = copy_plan.pair_streams(sa, sl, da, dl)
    assert int(n.sum()) == total and (n > 0).all()
    got = _simulate(s, d, n, piece, mem)
    want = mem.copy()
    stream = np.concatenate([mem[a:a + k] for a, k in zip(sa, sl)])
    pos = 0
    for a, k in zip(da, dl):
        want[a:a + k] = stream[pos:pos + k]
        pos += k
    assert np.array_equal(got, want)


def test_equal_runs_pair_one_to_one():
    s, d, n = copy_plan.pair_streams(np.array([0, 100]), np.array([10, 20]), np.array([500, 700]),
                                     np.array([10, 20]))
    assert s.tolist() == [0, 100] and d.tolist() == [500, 700] and n.tolist() == [10, 20]


def test_total_mismatch_is_an_error():
    with pytest.raises(ValueError):
        copy_plan.pair_streams(np.array([0]), np.array([10]), np.array([0]), np.array([11]))


def test_grid_choice():
    assert copy_plan.grid_for(np.full(16384, 32768), 8192) == (4, 16384)
    assert copy_plan.grid_for(np.array([1 << 30]), 8192) == (131072, 1)
    assert copy_plan.grid_for(np.array([1 << 30] + [4096] * 100), 8192) is None  # uneven: host pieces
    assert copy_plan.grid_for(np.full(70000, 4096), 8192) is None                # too many pairs
    assert copy_plan.word_bytes(np.array([8, 16]), np.array([0]), np.array([24])) == 8
    assert copy_plan.word_bytes(np.array([8, 16]), np.array([0]), np.array([1000 + 4])) == 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 40), st.integers(1, 1 << 20)), min_size=1,
                max_size=40), st.booleans())
def test_run_table_roundtrip(rows, uniform):
    slot = np.array([r[0] for r in rows], np.int64)
    off = np.array([r[1] for r in rows], np.int64)
    ln = np.array([rows[0][2] if uniform else r[2] for r in rows], np.int64)
    s, o, n = copy_plan.decode_runs(copy_plan.encode_runs(slot, off, ln))
    assert np.array_equal(s, slot) and np.array_equal(o, off) and np.array_equal(n, ln)


@pytest.mark.parametrize("raw", [b"", b"\0" * 23, np.array([0, 0, 0], "<i8").tobytes(),
                                 np.array([2, 8, 0], "<i8").tobytes() + b"\0" * 32,
                                 np.array([2, 1, 4], "<i8").tobytes() + b"\0" * 15,
                                 np.array([1 << 40, 1, 4], "<i8").tobytes()])
def test_malformed_run_tables_are_rejected(raw):
    with pytest.raises(ValueError):
        copy_plan.decode_runs(raw)
