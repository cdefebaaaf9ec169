"""Time the fused run-copy kernel (transport/gpu_runs.py) alone, in one process, for several
piece sizes and warp counts, next to torch's contiguous copy of the same bytes: which launch
configuration reaches device speed for KV-shaped workloads. CUDA events, median of reps.

    python3 scripts/gpu_kernel_sweep.py [--reps 20] [--json F]
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from transport import gpu_runs

WORKLOADS = {   # name: (runs, run bytes, pool runs)
    "scattered-32k-x16384": (16384, 32 << 10, 65536),
    "contiguous-1g": (1024, 1 << 20, 1024),
    "vllm-8b-4k (64k x 8192)": (8192, 64 << 10, 16384),
    "small-32k-x64": (64, 32 << 10, 1024),
}


def _time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return float(np.median(ts[2:]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    _, kernel = gpu_runs._kernel()
    out = {}
    for name, (n, rb, pool) in WORKLOADS.items():
        src = torch.randint(0, 255, (pool, rb), dtype=torch.uint8, device=dev)
        dst = torch.zeros((pool, rb), dtype=torch.uint8, device=dev)
        rng = np.random.default_rng(0)
        scattered = pool > n
        sid = rng.permutation(pool)[:n] if scattered else np.arange(n)
        did = rng.permutation(pool)[:n] if scattered else np.arange(n)
        s = gpu_runs.RunSide(np.array([src.data_ptr()], np.int64), None, sid.astype(np.int64) * rb)
        d = gpu_runs.RunSide(np.array([dst.data_ptr()], np.int64), None, did.astype(np.int64) * rb)
        length = np.full(n, rb, np.int64)
        rbuf = torch.empty(gpu_runs.half_words(s), dtype=torch.int64, device=dev)
        lbuf = torch.empty(gpu_runs.half_words(d), dtype=torch.int64, device=dev)
        rh, lh = np.empty(len(rbuf), np.int64), np.empty(len(lbuf), np.int64)
        rhalf = gpu_runs.fill_half(s, rh, rbuf.data_ptr())
        lhalf = gpu_runs.fill_half(d, lh, rbuf.data_ptr())
        rbuf.copy_(torch.from_numpy(rh))
        lbuf.copy_(torch.from_numpy(lh))
        ptrs, _ = gpu_runs.kernel_args(rbuf.data_ptr(), rhalf, lhalf, lbuf.data_ptr(), gpu_runs.variant_of(length),
                                       False)
        targs = gpu_runs.tensor_args(ptrs, (rbuf, lbuf))
        nbytes = n * rb
        a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        row = {"contiguous_copy_s": _time(lambda: b.copy_(a), args.reps)}
        for piece in (8192, 16384, 32768, 65536):
            if rb % piece and piece > rb:
                continue
            for warps in (4, 8, 16):
                per = -(-rb // piece)

                def run(piece=piece, warps=warps, per=per):
                    kernel[(per, n)](*targs, PIECE=piece, WORD=8,
                                     EVEN=rb % piece == 0, ALIGN=2, ULEN=rb,
                                     num_warps=warps)
                dst.zero_()
                run()
                torch.cuda.synchronize()
                ok = bool(torch.equal(dst[torch.as_tensor(did, device=dev)], src[torch.as_tensor(sid, device=dev)]))
                sec = _time(run, args.reps)
                row[f"piece{piece // 1024}k_w{warps}"] = {"s": sec, "GBps": nbytes / sec / 1e9,
                                                          "vs_contiguous": row["contiguous_copy_s"] / sec, "ok": ok}
        out[name] = row
        best = max((k for k in row if k.startswith("piece")), key=lambda k: row[k]["GBps"])
        print(f"{name:26s} contiguous {nbytes / row['contiguous_copy_s'] / 1e9:7.0f} GB/s | "
              + " ".join(f"{k}={v['GBps']:.0f}{'' if v['ok'] else '!BAD'}" for k, v in row.items() if k.startswith("piece"))
              + f" | best {best}", flush=True)
        del src, dst, a, b
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "results": out}, f, indent=2)


if __name__ == "__main__":
    main()
