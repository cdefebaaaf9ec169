"""Run the paired copy kernels in Triton's interpreter (TRITON_INTERPRET=1, set by the caller before
Triton is imported) over host memory standing in for device memory, at the same raw addresses the
kernels compute on a GPU: gpu_direct's (the local runs read from a Descs' own tables) and
gpu_runs' (both halves filled as a read fills them, in one launch or two parts). Every byte of both
sides is compared with the runs copied one by one. Prints one line per case and `ALL OK` or
`FAILURES`. Called by test_transport_gpu_direct.py in a child process."""
from __future__ import annotations

import sys

import numpy as np
import torch

from transport import gpu_direct, gpu_runs
from transport.gpu_runs import RunSide, fill_half, half_words, kernel_args, part_args, split_point, variant_of


class _Expected:
    """What both sides must hold after the copy of run i of the remote side to run i of the local
    one (or back, `write`): computed run by run before the kernel runs."""

    def __init__(self, remote: tuple, local: tuple, ln: np.ndarray, write: bool):
        (src_p, src_s, src_o), (dst_p, dst_s, dst_o) = (local, remote) if write else (remote, local)
        self.src, self.dst = src_p, dst_p
        self.src_before = [p.clone() for p in src_p]
        self.want = [p.clone() for p in dst_p]
        for i in range(len(ln)):
            a, b, m = int(src_o[i]), int(dst_o[i]), int(ln[i])
            self.want[int(dst_s[i])][b:b + m] = src_p[int(src_s[i])][a:a + m]

    def holds(self) -> bool:
        return (all(torch.equal(g, w) for g, w in zip(self.dst, self.want))
                and all(torch.equal(g, w) for g, w in zip(self.src, self.src_before)))


def run_case(n: int, rk: int, lk: int, uniform: bool, write: bool, bb: int, misalign: int = 0, seed: int = 0) -> bool:
    rng = np.random.default_rng(seed)
    blocks = max(64, n + 8)
    rpools = [torch.randint(0, 255, (blocks * bb,), dtype=torch.uint8) for _ in range(rk)]
    lpools = [torch.randint(0, 255, (blocks * bb + 16,), dtype=torch.uint8)[misalign:misalign + blocks * bb]
              for _ in range(lk)]
    rb, lb = rng.permutation(blocks * rk)[:n], rng.permutation(blocks * lk)[:n]
    rslot, roff = rb // blocks, ((rb % blocks) * bb).astype(np.int64)
    lslot, loff = (lb // blocks).astype(np.int32), ((lb % blocks) * bb).astype(np.int64)
    ln = np.full(n, bb, np.int64) if uniform else (rng.integers(1, bb // 16 + 1, n) * 16).astype(np.int64)
    remote = RunSide(np.array([p.data_ptr() for p in rpools], np.int64), rslot.astype(np.int64) if rk > 1 else None,
                     roff)
    v = variant_of(ln)
    dev = torch.empty(half_words(remote, lens=not v.ulen), dtype=torch.int64)   # the remote half's "device" buffer
    half = fill_half(remote, dev.numpy(), dev.data_ptr(), None if v.ulen else ln)
    lbases = np.array([p.data_ptr() for p in lpools], np.int64)
    rel = torch.as_tensor(lbases - lbases[0])
    loff_t, lidx_t = torch.as_tensor(loff.copy()), torch.as_tensor(lslot.copy())
    multi = lk > 1
    lbits = gpu_direct.local_bits(int(np.bitwise_or.reduce(loff)), int(np.bitwise_or.reduce(lbases)))
    ptrs, consts = gpu_direct.kernel_args(dev.data_ptr(), half.at_lens, half.bits, v, int(lbases[0]),
                                          loff_t.data_ptr(), lidx_t.data_ptr() if multi else None,
                                          rel.data_ptr() if multi else None, lbits, write)
    wide = consts[1] == 8
    flat = lpools[0]
    args = [dev if wide else dev.view(torch.uint8), dev, dev[half.at_lens:] if half.at_lens is not None else dev,
            flat[: flat.numel() // 8 * 8].view(torch.int64) if wide else flat,
            loff_t, lidx_t if multi else loff_t, rel if multi else loff_t]
    if [a.data_ptr() for a in args] != list(ptrs):
        print("argument addresses differ from kernel_args'")
        return False
    check = _Expected((rpools, rslot, roff), (lpools, lslot, loff), ln, write)
    gpu_direct._kernel()[(v.per, n)](*args, PIECE=consts[0], WORD=consts[1], EVEN=consts[2], ALIGN=consts[3],
                                     ULEN=consts[4], MULTI=consts[5], TO_LOCAL=consts[6], num_warps=v.warps)
    ok = check.holds()
    print(f"n={n} remote={rk} local={lk} uniform={uniform} write={write} block={bb} misalign={misalign} "
          f"consts={consts}: {'OK' if ok else 'WRONG'}")
    return ok


def run_paired_case(n: int, rk: int, lk: int, uniform: bool, write: bool, bb: int, seed: int = 0) -> bool:
    """gpu_runs' kernel over two filled halves (the read's own half in its own buffer, as the
    pinned slot is), launched in two parts when split_point says so, as gpu_runs.launch does."""
    rng = np.random.default_rng(seed)
    blocks = max(64, n // min(rk, lk) + 8)
    rpools = [torch.randint(0, 255, (blocks * bb,), dtype=torch.uint8) for _ in range(rk)]
    lpools = [torch.randint(0, 255, (blocks * bb,), dtype=torch.uint8) for _ in range(lk)]
    rb, lb = rng.permutation(blocks * rk)[:n], rng.permutation(blocks * lk)[:n]
    rslot, roff = rb // blocks, ((rb % blocks) * bb).astype(np.int64)
    lslot, loff = lb // blocks, ((lb % blocks) * bb).astype(np.int64)
    ln = np.full(n, bb, np.int64) if uniform else (rng.integers(1, bb // 16 + 1, n) * 16).astype(np.int64)
    remote = RunSide(np.array([p.data_ptr() for p in rpools], np.int64), rslot.astype(np.int64) if rk > 1 else None,
                     roff)
    local = RunSide(np.array([p.data_ptr() for p in lpools], np.int64), lslot.astype(np.int32) if lk > 1 else None,
                    loff)
    v = variant_of(ln)
    dev = torch.empty(half_words(remote, lens=not v.ulen), dtype=torch.int64)
    rh = fill_half(remote, dev.numpy(), dev.data_ptr(), None if v.ulen else ln)
    slot = torch.empty(half_words(local), dtype=torch.int64)
    lh = fill_half(local, slot.numpy(), dev.data_ptr())
    ptrs, consts = kernel_args(dev.data_ptr(), rh, lh, slot.data_ptr(), v, write)
    check = _Expected((rpools, rslot, roff), (lpools, lslot, loff), ln, write)
    _, kernel = gpu_runs._kernel()
    first = split_point(n)
    for lo, part in ((0, ptrs), (first, part_args(ptrs, first, rh.at_lens is not None))) if first else ((0, ptrs),):
        rows = (first if lo == 0 else n - first) if first else n
        args = gpu_runs.tensor_args(part, (dev, slot))
        if consts[1] == 1:
            args[0] = args[0].view(torch.uint8)
        kernel[(v.per, rows)](*args, PIECE=consts[0], WORD=consts[1], EVEN=consts[2], ALIGN=consts[3],
                              ULEN=consts[4], num_warps=v.warps)
    ok = check.holds()
    print(f"paired n={n} remote={rk} local={lk} uniform={uniform} write={write} block={bb} "
          f"parts={2 if first else 1} consts={consts}: {'OK' if ok else 'WRONG'}")
    return ok


def main() -> int:
    results = []
    for write in (False, True):
        for rk, lk in ((1, 1), (3, 4)):
            for uniform in (True, False):
                results.append(run_paired_case(40, rk, lk, uniform, write, 1024, seed=rk + lk + write))
        results.append(run_paired_case(gpu_runs.SPLIT_MIN_RUNS + 37, 2, 3, True, write, 64, seed=3 + write))
    for write in (False, True):
        for rk, lk in ((1, 1), (3, 1), (1, 4), (2, 3)):
            for uniform in (True, False):
                results.append(run_case(40, rk, lk, uniform, write, 1024, seed=rk * 7 + lk + write))
        results.append(run_case(12, 2, 3, True, write, 16384, seed=5 + write))      # whole pieces (EVEN)
    results.append(run_case(30, 1, 2, True, False, 1024, misalign=8, seed=9))      # 8-byte words, no 16-byte hint
    results.append(run_case(30, 2, 2, True, True, 1024, misalign=1, seed=10))      # a byte-aligned region: byte kernel
    print("ALL OK" if all(results) else "FAILURES")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
