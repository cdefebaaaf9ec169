"""The fused copy's two half tables (gpu_runs.fill_half, kernel_args): the addresses the kernel
computes from the remote half (kept on the device) and a read's local half are exactly each run's,
in both directions, and the kernel variant (word size, alignment, even pieces) follows the bits of
every offset, length and base. Pure numpy: no GPU needed."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from transport import gpu_remote, gpu_runs
from transport.gpu_runs import (MAX_UNIFORM_LEN, PIECE_BYTES, RunSide, emulate, fill_half, half_words, kernel_args,
                                variant_of)

BASE_R = 0x7F00_0000_0000   # where the remote half's device buffer would live (the kernel's base pointer)
BASE_L = 0x7F10_0000_0000   # where a read's local half would live


def _side(rng, n, regions, align):
    bases = (rng.integers(1, 1 << 20, regions) * 4096 + 0x7E00_0000_0000).astype(np.int64)
    slot = rng.integers(0, regions, n).astype(np.int32) if regions > 1 else None
    off = (rng.integers(0, 1 << 20, n) * align).astype(np.int64)
    return RunSide(bases, slot, off)


def _reader(buffers):
    """read_words over numpy buffers placed at device addresses: {address: int64 array}."""
    def read(addr, count):
        for a, h in buffers.items():
            if a <= addr < a + 8 * len(h):
                i = (addr - a) // 8
                assert i + count <= len(h), "the kernel would read past a table"
                return h[i:i + count]
        raise AssertionError(f"address {addr:#x} is in no table")
    return read


def _tables(remote, local, length, write):
    v = variant_of(length)
    rh = np.full(half_words(remote, lens=not v.ulen) + 3, -1, np.int64)
    lh = np.full(half_words(local) + 3, -1, np.int64)
    r = fill_half(remote, rh, BASE_R, None if v.ulen else length)
    lo = fill_half(local, lh, BASE_R)
    assert (rh[r.words:] == -1).all() and (lh[lo.words:] == -1).all(), "wrote past its half"
    ptrs, consts = kernel_args(BASE_R, r, lo, BASE_L, v, write)
    return ptrs, consts, v, _reader({BASE_R: rh[:r.words], BASE_L: lh[:lo.words]})


def _addr(side):
    return side.bases[side.slot if side.slot is not None else 0] + side.offset


@pytest.mark.parametrize("n", [1, 7, 64, 16384])
@pytest.mark.parametrize("rregions,lregions", [(1, 1), (32, 1), (1, 6), (4, 3)])
@pytest.mark.parametrize("lengths", ["uniform", "varied"])
@pytest.mark.parametrize("write", [False, True])
def test_kernel_addresses_are_the_runs(n, rregions, lregions, lengths, write):
    rng = np.random.default_rng(n * 31 + rregions * 7 + lregions)
    remote, local = _side(rng, n, rregions, 16), _side(rng, n, lregions, 16)
    length = (np.full(n, 32768, np.int64) if lengths == "uniform"
              else (rng.integers(1, 64, n) * 512).astype(np.int64))
    ptrs, consts, v, read = _tables(remote, local, length, write)
    s_addr, d_addr, lens = emulate(ptrs, consts, n, read)
    src, dst = (local, remote) if write else (remote, local)
    assert np.array_equal(s_addr, _addr(src)) and np.array_equal(d_addr, _addr(dst))
    assert np.array_equal(lens, length)
    assert v.per == -(-int(length.max()) // v.piece) and v.piece >= PIECE_BYTES
    assert (v.ulen != 0) == bool((length == length[0]).all())


@pytest.mark.parametrize("what,word,align", [("aligned16", 8, 2), ("offset8", 8, 1), ("offset1", 1, 1),
                                             ("length8", 8, 1), ("base8", 8, 1), ("localbase8", 8, 1),
                                             ("varied8", 8, 1)])
def test_kernel_variant_follows_every_bit(what, word, align):
    rng = np.random.default_rng(5)
    remote, local = _side(rng, 100, 3, 16), _side(rng, 100, 1, 16)
    length = np.full(100, 16384, np.int64)
    if what == "offset8":
        local.offset[37] += 8
    elif what == "offset1":
        remote.offset[99] += 1
    elif what == "length8":
        length = np.full(100, 16384 + 8, np.int64)
    elif what == "varied8":
        length[3] = 8192 + 8
    elif what == "base8":
        remote.bases[2] += 8
    elif what == "localbase8":
        local.bases[0] += 8
    ptrs, consts, v, _ = _tables(remote, local, length, False)
    assert consts[1:4:2] == (word, align)
    assert v.even == (what not in ("length8", "varied8"))


def test_lengths_beyond_the_compiled_in_limit_are_stored():
    rng = np.random.default_rng(1)
    remote, local = _side(rng, 2, 1, 16), _side(rng, 2, 1, 16)
    length = np.full(2, MAX_UNIFORM_LEN + PIECE_BYTES, np.int64)
    ptrs, consts, v, read = _tables(remote, local, length, False)
    assert v.ulen == 0 and np.array_equal(emulate(ptrs, consts, 2, read)[2], length)


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


class _FakeHalf:
    def __init__(self, nbytes, device_index=0):
        self.nbytes, self.device_index = nbytes, device_index


def test_resident_halves_stay_within_their_budget(monkeypatch):
    """Remote halves kept on the device are bounded (least recently used dropped), and a table
    that is garbage-collected stops counting."""
    monkeypatch.setattr(gpu_remote, "RESIDENT_BYTES", 3000)
    res = gpu_remote._Resident()
    side = RunSide(np.zeros(1, np.int64), None, np.zeros(1, np.int64))
    tables = [gpu_remote.RemoteTable(side, np.ones(1, np.int64)) for _ in range(4)]
    for t in tables[:3]:
        res.keep(t, _FakeHalf(1000))
    assert res.nbytes == 3000 and all(t.resident() for t in tables[:3])
    res.touch(tables[0])                 # 0 used again: 1 is now the least recently used
    res.keep(tables[3], _FakeHalf(1000))
    assert res.nbytes == 3000 and not tables[1].resident()
    assert tables[0].resident() and tables[2].resident() and tables[3].resident()
    res.keep(tables[0], _FakeHalf(1500))  # replaced (another device): counted once
    assert res.nbytes <= 3000 and tables[0].resident()
    before = len(res)
    res.forget(tables[3])
    assert len(res) == before - 1 and not tables[3].resident()


def test_a_collected_table_leaves_the_module_budget():
    side = RunSide(np.zeros(1, np.int64), None, np.zeros(1, np.int64))
    t = gpu_remote.RemoteTable(side, np.ones(1, np.int64))
    before = gpu_remote.RESIDENT.nbytes
    gpu_remote.RESIDENT.keep(t, _FakeHalf(4096))
    assert gpu_remote.RESIDENT.nbytes == before + 4096
    del t
    gc.collect()
    assert gpu_remote.RESIDENT.nbytes == before


@pytest.mark.parametrize("hint", [0, 8, 1, None])
def test_a_low_bits_hint_replaces_the_pass_over_offsets(hint):
    """RunSide.low_bits (from Descs.offset_low_bits) stands for the offsets' OR in the variant:
    the addresses stay the runs', and the alignment follows the hint (a superset of the bits)."""
    rng = np.random.default_rng(9)
    remote, local = _side(rng, 50, 2, 16), _side(rng, 50, 1, 16)
    local = RunSide(local.bases, local.slot, local.offset, hint)
    length = np.full(50, 32768, np.int64)
    ptrs, consts, v, read = _tables(remote, local, length, False)
    s_addr, d_addr, _ = emulate(ptrs, consts, 50, read)
    assert np.array_equal(s_addr, _addr(remote)) and np.array_equal(d_addr, _addr(local))
    want = {0: (8, 2), 8: (8, 1), 1: (1, 1), None: (8, 2)}[hint]
    assert consts[1:4:2] == want


# -- a large read's two launches ------------------------------------------------------------------
def test_split_point_leaves_small_reads_whole_and_keeps_pointers_aligned():
    from transport.gpu_runs import SPLIT_ALIGN, SPLIT_MIN_RUNS, split_point

    assert split_point(1) == split_point(SPLIT_MIN_RUNS - 1) == 0
    for n in [SPLIT_MIN_RUNS, SPLIT_MIN_RUNS + 5, 16384, 65535]:
        k = split_point(n)
        assert 0 < k < n and k % SPLIT_ALIGN == 0 and k <= n // 4
        assert (k * 8) % 16 == 0   # a part's table pointers are as aligned as the whole's


@pytest.mark.parametrize("n", [4096, 8192 + 5, 16384])
@pytest.mark.parametrize("rregions,lregions", [(1, 1), (32, 3)])
@pytest.mark.parametrize("lengths", ["uniform", "varied"])
@pytest.mark.parametrize("write", [False, True])
def test_the_two_parts_address_every_run_once_in_order(n, rregions, lregions, lengths, write):
    from transport.gpu_runs import fill_rows, part_args, plan_half, split_point

    rng = np.random.default_rng(n + rregions + lregions)
    remote, local = _side(rng, n, rregions, 16), _side(rng, n, lregions, 16)
    length = (np.full(n, 32768, np.int64) if lengths == "uniform"
              else (rng.integers(1, 64, n) * 512).astype(np.int64))
    v = variant_of(length)
    rh = np.full(half_words(remote, lens=not v.ulen), -1, np.int64)
    r = fill_half(remote, rh, BASE_R, None if v.ulen else length)
    # the local half written the way launch() writes it: the first part, then the rest
    lh = np.full(half_words(local), -1, np.int64)
    half, rel = plan_half(local, BASE_R)
    k = split_point(n)
    fill_rows(local, lh, rel, 0, k)
    assert (lh[k:] == -1).all(), "the first part wrote past itself"
    fill_rows(local, lh, rel, k, n)
    whole = np.full_like(lh, -1)
    assert fill_half(local, whole, BASE_R) == half and np.array_equal(lh, whole)
    ptrs, consts = kernel_args(BASE_R, r, half, BASE_L, v, write)
    read = _reader({BASE_R: rh, BASE_L: lh})
    first = emulate(ptrs, consts, k, read)
    rest = emulate(part_args(ptrs, k, r.at_lens is not None), consts, n - k, read)
    src, dst = (local, remote) if write else (remote, local)
    got = [np.concatenate([a, b]) for a, b in zip(first, rest)]
    assert np.array_equal(got[0], _addr(src)) and np.array_equal(got[1], _addr(dst))
    assert np.array_equal(got[2], length)


@pytest.mark.parametrize("base_r", [BASE_R, BASE_R + 8])
@pytest.mark.parametrize("regions", [1, 5])
def test_a_base_bits_hint_keeps_addresses_and_never_overstates_alignment(base_r, regions):
    """RunSide.base_bits (Descs.base_low_bits) replaces the pass over the relative bases only
    where the kernel's base pointer is 16-byte aligned (then each relative base has its base's low
    bits); the addresses are the runs' either way, and the variant never claims more alignment
    than every stored address has."""
    from transport.gpu_runs import fill_rows, plan_half, word_align

    rng = np.random.default_rng(regions)
    side = _side(rng, 40, regions, 16)
    bases = side.bases + np.arange(len(side.bases), dtype=np.int64) * 8   # some bases only 8-byte aligned
    hinted = RunSide(bases, side.slot, side.offset, 0, int(np.bitwise_or.reduce(bases)) & 15)
    plain = RunSide(bases, side.slot, side.offset, 0)
    for s in (hinted, plain):
        half, rel = plan_half(s, base_r)
        h = np.zeros(40, np.int64)
        fill_rows(s, h, rel, 0, 40)
        assert np.array_equal(h + base_r, _addr(s))
        word, align = word_align(half.bits)
        assert (h % word == 0).all()
        assert align == 1 or (h % 16 == 0).all()
