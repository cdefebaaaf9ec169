"""The fused copy's run table (gpu_runs.fill_table): the addresses the kernel computes from the
uploaded table are exactly each run's, and the kernel variant (word size, alignment, even
pieces) follows the bits of every offset, length and base. Pure numpy: no GPU needed."""
from __future__ import annotations

import numpy as np
import pytest

from transport.gpu_runs import MAX_UNIFORM_LEN, PIECE_BYTES, RunSide, emulate, fill_table, table_words

BASE = 0x7F00_0000_0000   # where the upload buffer would live on the device


def _side(rng, n, regions, align):
    bases = (rng.integers(1, 1 << 20, regions) * 4096 + 0x7E00_0000_0000).astype(np.int64)
    slot = rng.integers(0, regions, n).astype(np.int64) if regions > 1 else None
    off = (rng.integers(0, 1 << 20, n) * align).astype(np.int64)
    return RunSide(bases, slot, off)


@pytest.mark.parametrize("n", [1, 7, 64, 16384])
@pytest.mark.parametrize("sregions,dregions", [(1, 1), (32, 1), (1, 6), (4, 3)])
@pytest.mark.parametrize("lengths", ["uniform", "varied"])
def test_kernel_addresses_are_the_runs(n, sregions, dregions, lengths):
    rng = np.random.default_rng(n * 31 + sregions * 7 + dregions)
    src, dst = _side(rng, n, sregions, 16), _side(rng, n, dregions, 16)
    length = (np.full(n, 32768, np.int64) if lengths == "uniform"
              else (rng.integers(1, 64, n) * 512).astype(np.int64))
    h = np.full(table_words(src, dst, length) + 5, -1, np.int64)
    t = fill_table(src, dst, length, h, BASE)
    assert t.total <= len(h) - 5 and (h[t.total:] == -1).all(), "wrote past its table"
    s_addr, d_addr, lens = emulate(h, t, BASE)
    assert np.array_equal(s_addr, src.bases[src.slot if src.slot is not None else 0] + src.offset)
    assert np.array_equal(d_addr, dst.bases[dst.slot if dst.slot is not None else 0] + dst.offset)
    assert np.array_equal(lens, length)
    assert t.per == -(-int(length.max()) // t.piece) and t.piece >= PIECE_BYTES
    assert (t.ulen != 0) == bool((length == length[0]).all())


@pytest.mark.parametrize("what,word,align", [("aligned16", 8, 2), ("offset8", 8, 1), ("offset1", 1, 1),
                                             ("length8", 8, 1), ("base8", 8, 1)])
def test_kernel_variant_follows_every_bit(what, word, align):
    rng = np.random.default_rng(5)
    src, dst = _side(rng, 100, 3, 16), _side(rng, 100, 1, 16)
    length = np.full(100, 16384, np.int64)
    if what == "offset8":
        dst.offset[37] += 8
    elif what == "offset1":
        src.offset[99] += 1
    elif what == "length8":
        length = np.full(100, 16384 + 8, np.int64)
    elif what == "base8":
        src.bases[2] += 8
    h = np.zeros(table_words(src, dst, length), np.int64)
    t = fill_table(src, dst, length, h, BASE)
    assert (t.word, t.align) == (word, align)
    assert t.even == (what != "length8")


def test_lengths_beyond_the_compiled_in_limit_are_uploaded():
    rng = np.random.default_rng(1)
    src, dst = _side(rng, 2, 1, 16), _side(rng, 2, 1, 16)
    length = np.full(2, MAX_UNIFORM_LEN + PIECE_BYTES, np.int64)
    h = np.zeros(table_words(src, dst, length), np.int64)
    t = fill_table(src, dst, length, h, BASE)
    assert t.ulen == 0 and np.array_equal(emulate(h, t, BASE)[2], length)


def test_launch_shape_grows_with_the_runs_and_divides_them():
    from transport.gpu_runs import LAUNCH_SHAPES, launch_shape

    last = (0, 0)
    for longest in [1, 4096, 8192, 32768, 65536, 1 << 20, 1 << 30]:
        piece, warps = launch_shape(longest)
        assert piece >= PIECE_BYTES and piece % PIECE_BYTES == 0 and warps in (1, 2, 4, 8, 16, 32)
        assert (piece, warps) >= last
        last = (piece, warps)
    assert [m for m, _, _ in LAUNCH_SHAPES] == sorted(m for m, _, _ in LAUNCH_SHAPES)
    assert all(p <= m or m == 0 for m, p, _ in LAUNCH_SHAPES), "a piece longer than the runs it serves"
