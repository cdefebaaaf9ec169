"""Direct launches of compiled Triton kernels (triton_fast.py, gpu_runs.tensor_args): the
addresses handed to the compiled kernel are exactly those of the tensor arguments Triton saw on
the first launch, a variant is compiled per alignment pattern, and an interface that does not
work falls back to Triton's own launch for good. No GPU needed: CPU tensors have addresses too,
and the compiled kernel is a recording stand-in for Triton's object."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transport import triton_fast
from transport.gpu_runs import RunSide, fill_half, half_words, kernel_args, tensor_args, variant_of


@pytest.mark.parametrize("n", [1, 3, 64])
@pytest.mark.parametrize("rreg,lreg", [(1, 1), (4, 1), (1, 3), (2, 5)])
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("write", [False, True])
def test_tensor_arguments_start_at_the_addresses(n, rreg, lreg, uniform, write):
    """The tensors of a variant's first launch (through Triton) start exactly at the raw addresses
    every later launch hands to the compiled kernel."""
    rng = np.random.default_rng(n + 10 * rreg + 100 * lreg)

    def side(k):
        return RunSide(np.arange(1, k + 1, dtype=np.int64) << 32,
                       rng.integers(0, k, n).astype(np.int64) if k > 1 else None,
                       (rng.integers(0, 1000, n) * 4096).astype(np.int64))
    remote, local = side(rreg), side(lreg)
    length = np.full(n, 32768, np.int64) if uniform else (rng.integers(1, 9, n) * 4096).astype(np.int64)
    v = variant_of(length)
    rbuf = torch.zeros(half_words(remote, lens=not v.ulen) + 8, dtype=torch.int64)
    lbuf = torch.zeros(half_words(local) + 8, dtype=torch.int64)
    rh = fill_half(remote, rbuf.numpy(), rbuf.data_ptr(), None if v.ulen else length)
    lh = fill_half(local, lbuf.numpy(), rbuf.data_ptr())
    ptrs, _ = kernel_args(rbuf.data_ptr(), rh, lh, lbuf.data_ptr(), v, write)
    args = tensor_args(ptrs, (rbuf, lbuf))
    assert [a.data_ptr() for a in args] == list(ptrs)
    with pytest.raises(ValueError):
        tensor_args((1 << 60,), (rbuf, lbuf))


class _Compiled:
    """Stands in for Triton's CompiledKernel: `ck[grid](*args, stream=...)` launches."""

    def __init__(self, fail: bool = False):
        self.calls: list[tuple] = []
        self.fail = fail

    def __getitem__(self, grid):
        def run(*args, stream=None):
            if self.fail:
                raise TypeError("launcher signature changed")
            self.calls.append((grid, args, stream))
        return run


class _Stream:
    cuda_stream = 0xABC


def test_first_launch_compiles_then_direct_launches_reuse_it():
    fl = triton_fast.FastLauncher("k")
    ck = _Compiled()
    slow_calls = []

    def slow():
        slow_calls.append(1)
        return ck
    ptrs, consts = (4096, 8192), (8192, 8, True)
    fl.launch((4, 10), 0, _Stream(), ptrs, consts, slow)
    assert len(slow_calls) == 1 and ck.calls == []
    fl.launch((4, 11), 0, _Stream(), (4096 + 32, 8192 + 64), consts, slow)   # same alignment: same variant
    assert len(slow_calls) == 1 and fl.fast_launches == 1
    assert ck.calls == [((4, 11, 1), (4096 + 32, 8192 + 64, 8192, 8, True), 0xABC)]
    fl.launch((4, 11), 0, _Stream(), (4096 + 8, 8192), consts, slow)   # 8-byte aligned: another variant
    fl.launch((4, 11), 1, _Stream(), ptrs, consts, slow)               # another device
    fl.launch((4, 11), 0, _Stream(), ptrs, (8192, 1, True), slow)      # other constexprs
    assert len(slow_calls) == 4 and fl.fast_launches == 1


def test_a_failing_direct_launch_falls_back_for_good():
    fl = triton_fast.FastLauncher("k")
    ck = _Compiled(fail=True)
    slow_calls = []

    def slow():
        slow_calls.append(1)
        return ck
    for _ in range(3):
        fl.launch((1, 1), 0, _Stream(), (16,), (1,), slow)
    assert len(slow_calls) == 3 and fl.disabled and "signature" in fl.disabled and fl.fast_launches == 0


def test_variant_key_is_alignment_not_address():
    assert triton_fast.variant_key(0, (32, 48), (1,)) == triton_fast.variant_key(0, (4096, 16), (1,))
    assert triton_fast.variant_key(0, (32, 40), (1,)) != triton_fast.variant_key(0, (32, 48), (1,))


class CudaLauncher:
    """Stands in for Triton 3.6's CudaLauncher (the name is what raw_launcher checks)."""

    def __init__(self, fail=False, scratch=0):
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl, self.num_ctas = False, False, 1
        self.calls, self.fail = [], fail

    def launch(self, *args):
        if self.fail:
            raise TypeError("function takes exactly 20 arguments")
        self.calls.append(args)


class _CompiledWithLauncher(_Compiled):
    def __init__(self, run):
        super().__init__()
        self.run, self.function, self.packed_metadata = run, 0xF00, (4, 1, 0)


def test_raw_launch_hands_the_c_launcher_its_arguments_in_order():
    run = CudaLauncher()
    go = triton_fast.raw_launcher(_CompiledWithLauncher(run), "3.6.0")
    go(4, 9, 0xABC, (16, 32, 8192, True))
    assert run.calls == [(4, 9, 1, 0xABC, 0xF00, False, False, None, None, (4, 1, 0), None, None, None,
                          16, 32, 8192, True)]


@pytest.mark.parametrize("why", ["version", "scratch", "launcher", "function"])
def test_raw_launch_only_where_it_is_known_to_be_right(why):
    ck = _CompiledWithLauncher(CudaLauncher(scratch=256 if why == "scratch" else 0))
    if why == "launcher":
        ck.run = object()
    if why == "function":
        ck.function = None
    assert triton_fast.raw_launcher(ck, "3.5.1" if why == "version" else "3.6.0") is None


def test_fast_launcher_goes_raw_then_falls_back_to_the_compiled_path(monkeypatch):
    monkeypatch.setattr(triton_fast, "_triton_version", lambda: "3.6.0")
    run = CudaLauncher()
    ck = _CompiledWithLauncher(run)
    fl = triton_fast.FastLauncher("k")
    fl.launch((2, 3), 0, _Stream(), (4096, 8192), (8192, 8), lambda: ck)   # first: Triton's path
    fl.launch((2, 3), 0, _Stream(), (4096, 8192), (8192, 8), lambda: ck)
    assert fl.raw_launches == 1 and fl.fast_launches == 0 and ck.calls == []
    assert run.calls[0][:4] == (2, 3, 1, 0xABC) and run.calls[0][13:] == (4096, 8192, 8192, 8)
    run.fail = True     # the launcher's interface changed: the compiled kernel's own path, for good
    fl.launch((2, 3), 0, _Stream(), (4096, 8192), (8192, 8), lambda: ck)
    fl.launch((2, 3), 0, _Stream(), (4096, 8192), (8192, 8), lambda: ck)
    assert fl.raw_disabled and "20 arguments" in fl.raw_disabled
    assert fl.raw_launches == 1 and fl.fast_launches == 2 and len(ck.calls) == 2 and fl.disabled is None
