"""Host cost of the fused copy's launch path (transport/gpu_runs.launch) in one process, warm
(back to back) against cold (each call after an idle sleep, as a reader that waited for its
lease), next to the driver calls it is made of: how much of a read's host time is the code and
how much is a CPU that idled. Median microseconds of host time per call.

    python3 scripts/gpu_host_probe.py [--reps 200] [--idle-ms 2] [--json F]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from nixl_connectors.tools.bench.settle import SettleMode, settle
from transport import gpu_runs

SHAPES = {"64 x 32 KiB": (64, 32 << 10, 1024), "16,384 x 32 KiB": (16384, 32 << 10, 65536),
          "1,024 x 1 MiB": (1024, 1 << 20, 1024)}


def _median_us(fn, reps: int, before=None) -> float:
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--idle-ms", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    stream = torch.cuda.Stream(dev)
    out: dict = {"idle_ms": args.idle_ms, "reps": args.reps}

    def idle():
        settle(args.idle_ms / 1e3, SettleMode.SLEEP)

    def busy():
        settle(args.idle_ms / 1e3, SettleMode.SPIN)

    ev = torch.cuda.Event()
    tiny = torch.zeros(1, device=dev)
    ev.record(stream)
    ev.synchronize()
    prims = {"event.record": lambda: ev.record(stream), "event.query": ev.query,
             "torch add_ (launch)": lambda: tiny.add_(1), "synchronize (idle)": torch.cuda.synchronize,
             "perf_counter": time.perf_counter}
    out["primitives_us"] = {}
    for name, fn in prims.items():
        row = {m: _median_us(fn, args.reps, b) for m, b in (("warm", None), ("after_sleep", idle),
                                                             ("after_spin", busy))}
        torch.cuda.synchronize()
        out["primitives_us"][name] = row
        print(f"{name:28s} " + "  ".join(f"{k} {v:7.1f}" for k, v in row.items()))

    out["launch_us"] = {}
    for name, (n, rb, pool) in SHAPES.items():
        src = torch.randint(0, 255, (pool, rb), dtype=torch.uint8, device=dev)
        dst = torch.zeros((pool, rb), dtype=torch.uint8, device=dev)
        rng = np.random.default_rng(0)
        sid = rng.permutation(pool)[:n] if pool > n else np.arange(n)
        did = rng.permutation(pool)[:n] if pool > n else np.arange(n)
        remote = gpu_runs.RemoteTable(gpu_runs.RunSide(np.array([src.data_ptr()], np.int64), None,
                                                       sid.astype(np.int64) * rb), np.full(n, rb, np.int64))
        local = gpu_runs.RunSide(np.array([dst.data_ptr()], np.int64), None, did.astype(np.int64) * rb)

        def launch_only():
            e, held = gpu_runs.launch(remote, local, dev, stream)
            e.synchronize()   # (outside the host time measured by `launch` below)
            held.synced()

        launch_only()
        row = {}
        for mode, before in (("warm", None), ("after_sleep", idle), ("after_spin", busy)):
            host, total = [], []
            for _ in range(args.reps // 4):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                e, held = gpu_runs.launch(remote, local, dev, stream)
                t1 = time.perf_counter()
                e.synchronize()
                t2 = time.perf_counter()
                held.synced()
                host.append(t1 - t0)
                total.append(t2 - t0)
            row[mode] = {"launch_host_us": float(np.median(host) * 1e6),
                         "launch_to_synced_us": float(np.median(total) * 1e6)}
        ok = bool(torch.equal(dst[torch.as_tensor(did, device=dev)], src[torch.as_tensor(sid, device=dev)]))
        row["bytes_ok"] = ok
        out["launch_us"][name] = row
        print(f"{name:16s} bytes {'ok' if ok else 'WRONG'}  " + "  ".join(
            f"{m}: host {r['launch_host_us']:6.1f} total {r['launch_to_synced_us']:7.1f}"
            for m, r in row.items() if isinstance(r, dict)))
        del src, dst
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
