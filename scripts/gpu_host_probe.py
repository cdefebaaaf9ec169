"""Host cost of the fused copy's launch paths in one process (transport/gpu_runs.launch with its
table in device or mapped memory; transport/gpu_direct.launch reading the runs from a Descs' own
pinned tables, "direct"), warm (back to back) against cold (each call after an idle sleep, as a
reader that waited for its lease), next to the driver calls it is made of: how much of a read's host time is the code and
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
from transport import Descs, gpu_direct, gpu_remote, gpu_runs
from transport.region import make_region

SHAPES = {   # name: (runs per layer, run bytes, pool blocks per layer, layers)
    "64 x 32 KiB": (64, 32 << 10, 1024, 1), "16,384 x 32 KiB": (16384, 32 << 10, 65536, 1),
    "1,024 x 1 MiB": (1024, 1 << 20, 1024, 1), "vLLM 32 x 256 x 64 KiB": (256, 64 << 10, 1024, 32)}


def _median_us(fn, reps: int, before=None) -> float:
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6)


def _launch_rows(label: str, launch, reps: int, modes) -> dict:
    """Median host time of `launch()` (returns (event, held or None)) and launch to synchronized,
    per (mode, what runs before each call); `held.synced()` after each synchronize."""
    rows = {}
    for mode, before in modes:
        host, total = [], []
        for _ in range(reps):
            if before is not None:
                before()
            t0 = time.perf_counter()
            e, held = launch()
            t1 = time.perf_counter()
            e.synchronize()
            t2 = time.perf_counter()
            if hasattr(held, "synced"):
                held.synced()
            host.append(t1 - t0)
            total.append(t2 - t0)
        rows[f"{label}/{mode}"] = {"launch_host_us": float(np.median(host) * 1e6),
                                   "launch_to_synced_us": float(np.median(total) * 1e6)}
    return rows


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
    for name, (n, rb, pool, layers) in SHAPES.items():
        srcs = [torch.randint(0, 255, (pool, rb), dtype=torch.uint8, device=dev) for _ in range(layers)]
        dsts = [torch.zeros((pool, rb), dtype=torch.uint8, device=dev) for _ in range(layers)]
        rng = np.random.default_rng(0)
        sid = rng.permutation(pool)[:n] if pool > n else np.arange(n)
        did = rng.permutation(pool)[:n] if pool > n else np.arange(n)
        slot = np.repeat(np.arange(layers, dtype=np.int64), n) if layers > 1 else None
        remote = gpu_remote.RemoteTable(gpu_runs.RunSide(np.array([t.data_ptr() for t in srcs], np.int64), slot,
                                                       np.tile(sid.astype(np.int64) * rb, layers)),
                                      np.full(n * layers, rb, np.int64))
        local = gpu_runs.RunSide(np.array([t.data_ptr() for t in dsts], np.int64), slot,
                                 np.tile(did.astype(np.int64) * rb, layers))
        flat = torch.empty(n * layers * rb, dtype=torch.uint8, device=dev)
        flat2 = torch.empty_like(flat)
        row = {}
        reps = max(10, args.reps // 4)
        modes = (("warm", None), ("after_sleep", idle), ("after_spin", busy))
        for home in gpu_runs.TableHome:
            gpu_runs.LOCAL_TABLE = home
            e, held = gpu_runs.launch(remote, local, dev, stream)   # (compiles the variant)
            e.synchronize()
            held.synced()
            row.update(_launch_rows(home.value, lambda: gpu_runs.launch(remote, local, dev, stream), reps, modes))
        gpu_runs.LOCAL_TABLE = gpu_runs.TableHome.MAPPED
        # the direct kernel over the Descs' own tables (the default path); the bytes checked below
        # are then its own (the destination is zeroed first)
        ldesc = Descs.from_parts(tuple(make_region(t) for t in dsts),
                                 [np.full(n, i, np.int32) for i in range(layers)],
                                 [did.astype(np.int64) * rb] * layers, [np.full(n, rb, np.int64)] * layers)
        if gpu_direct.usable(ldesc, dev.index):
            for d in dsts:
                d.zero_()
            e, _ = gpu_direct.launch(remote, ldesc, dev, stream)   # (compiles the variant)
            e.synchronize()
            row.update(_launch_rows("direct", lambda: gpu_direct.launch(remote, ldesc, dev, stream), reps, modes))
        else:
            print(f"{name}: the direct kernel is not usable here (tables {ldesc.device_tables}, "
                  f"off: {gpu_direct.disabled})")
        copy = []
        for _ in range(max(10, args.reps // 4)):
            t0 = time.perf_counter()
            flat2.copy_(flat)
            torch.cuda.synchronize()
            copy.append(time.perf_counter() - t0)
        row["contiguous copy_ + synchronize us"] = float(np.median(copy) * 1e6)
        ok = all(bool(torch.equal(d[torch.as_tensor(did, device=dev)], s_[torch.as_tensor(sid, device=dev)]))
                 for s_, d in zip(srcs, dsts))
        row["bytes_ok"] = ok
        out["launch_us"][name] = row
        print(f"{name}: bytes {'ok' if ok else 'WRONG'}; contiguous copy {row['contiguous copy_ + synchronize us']:.1f} us")
        for k, r in row.items():
            if isinstance(r, dict):
                print(f"   {k:20s} host {r['launch_host_us']:7.1f} us   launch->synced {r['launch_to_synced_us']:7.1f} us")
        del srcs, dsts, flat, flat2
        torch.cuda.empty_cache()
    for label, la in (("launcher", gpu_runs._LAUNCHER), ("direct_launcher", gpu_direct._LAUNCHER)):
        out[label] = {k: getattr(la, k, None) for k in ("raw_launches", "fast_launches", "disabled", "raw_disabled")}
        print(f"{label}:", out[label])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
