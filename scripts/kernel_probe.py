"""Development probe: variants of the fused copy kernel on one GPU, in one process (no IPC):
1 GiB contiguous and 16,384 random 32 KiB blocks, next to torch's contiguous copy."""
from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def k_ptrcast(src_ptr, dst_ptr, len_ptr, PIECE: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    n = tl.load(len_ptr + i)
    start = j * PIECE
    if start < n:
        sp = (tl.load(src_ptr + i) + start).to(tl.pointer_type(tl.int64))
        dp = (tl.load(dst_ptr + i) + start).to(tl.pointer_type(tl.int64))
        offs = tl.arange(0, PIECE // 8)
        m = offs < (n - start) // 8
        tl.store(dp + offs, tl.load(sp + offs, mask=m), mask=m)


@triton.jit
def k_base(base, src_off, dst_off, lens, PIECE: tl.constexpr, EVEN: tl.constexpr, ALIGN: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    n = tl.load(lens + i)
    start = j * PIECE
    if start < n:
        s = tl.load(src_off + i) + start
        d = tl.load(dst_off + i) + start
        if ALIGN > 1:
            s = tl.multiple_of(s, ALIGN)
            d = tl.multiple_of(d, ALIGN)
        offs = tl.arange(0, PIECE)
        if EVEN:
            tl.store(base + d + offs, tl.load(base + s + offs))
        else:
            m = offs < n - start
            tl.store(base + d + offs, tl.load(base + s + offs, mask=m), mask=m)


def timeit(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    out = {}
    GiB = 1 << 30
    x = torch.empty(GiB, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.random_(0, 255)
    out["torch_copy_1g_gbps"] = GiB / timeit(lambda: y.copy_(x)) / 1e9
    pool = 65536
    bb = 32768
    src = torch.randint(0, 255, (pool, bb), dtype=torch.uint8, device="cuda")
    dst = torch.zeros_like(src)
    rng = np.random.default_rng(0)
    si, di = rng.permutation(pool)[:16384], rng.permutation(pool)[:16384]
    cases = {"contig-1g": (np.array([x.data_ptr()], np.int64), np.array([y.data_ptr()], np.int64), np.array([GiB], np.int64)),
             "scat-16k-32k": (src.data_ptr() + si.astype(np.int64) * bb, dst.data_ptr() + di.astype(np.int64) * bb,
                              np.full(16384, bb, np.int64))}
    sit, dit = torch.as_tensor(si, device="cuda"), torch.as_tensor(di, device="cuda")
    out["torch_index_scat_gbps"] = 16384 * bb / timeit(lambda: dst.index_copy_(0, dit, src.index_select(0, sit))) / 1e9
    for name, (s, d, n) in cases.items():
        nbytes = int(n.sum())
        for piece in (8192, 16384, 32768):
            per = int(-(-int(n.max()) // piece))
            t = torch.as_tensor(np.stack([s, d, n]), device="cuda")
            for nw in (4, 8):
                try:
                    dt = timeit(lambda: k_ptrcast[(per, len(n))](t[0], t[1], t[2], PIECE=piece, num_warps=nw))
                    out[f"{name}/ptrcast/p{piece}/w{nw}"] = nbytes / dt / 1e9
                except Exception as e:
                    out[f"{name}/ptrcast/p{piece}/w{nw}"] = f"{type(e).__name__}: {str(e)[:200]}"
            tb = torch.empty((3, len(n)), dtype=torch.int64, device="cuda")
            ba = tb.data_ptr()
            tb.copy_(torch.as_tensor(np.stack([(s - ba) // 8, (d - ba) // 8, n // 8])))
            for nw in (4, 8):
                for even, align in ((True, 2), (False, 2), (True, 1)):
                    key = f"{name}/base/p{piece}/w{nw}/even{int(even)}/al{align}"
                    try:
                        dt = timeit(lambda: k_base[(per, len(n))](tb, tb[0], tb[1], tb[2], PIECE=piece // 8, EVEN=even,
                                                                  ALIGN=align, num_warps=nw))
                        out[key] = nbytes / dt / 1e9
                    except Exception as e:
                        out[key] = f"{type(e).__name__}: {str(e)[:200]}"
    ok = bool(torch.equal(dst[dit], src[sit])) and bool(torch.equal(x, y))
    out["verified"] = ok
    # host-side cost of one small launch (64 pairs), launch + sync
    s, d, n = cases["scat-16k-32k"][0][:64], cases["scat-16k-32k"][1][:64], cases["scat-16k-32k"][2][:64]
    tb = torch.empty((3, 64), dtype=torch.int64, device="cuda")
    ba = tb.data_ptr()

    def small():
        tb.copy_(torch.from_numpy(np.stack([(s - ba) // 8, (d - ba) // 8, n // 8])))
        k_base[(4, 64)](tb, tb[0], tb[1], tb[2], PIECE=1024, EVEN=True, ALIGN=2)
    out["small64_launch_sync_us"] = timeit(small, 200) * 1e6
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        json.dump(out, open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
