"""Does the way a thread waits for the GPU slow down what it runs next? In one process: a ~0.4 ms
kernel (a 512 MiB copy) is waited for by `event.synchronize()`, `torch.cuda.synchronize()`, or a
hot poll of the event (cuEventQuery through ctypes, the GIL released per call); right after, fixed host work is timed: pure
Python, a numpy pass over 16,384 int64, a tiny kernel launch, an event record, and the read's real
launch path (`gpu_runs.launch`, 16,384 runs of 32 KiB). "warm" runs the same with no wait before.
Modes are interleaved rep by rep. Medians in microseconds.

Measured on one H100 (2026-12-07, docs/gpu-results/2026-12-07-c/wait.log): no difference. The work
after each kind of wait took as long as with no wait before it, so the transport kept its blocking
waits (the poll was then `transport/event_wait.py` of commit 0c5bd1e, reverted; inlined here).

    python3 scripts/gpu_wait_probe.py [--reps 200] [--json F]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import time

import numpy as np
import torch

from transport import gpu_remote, gpu_runs


def _poller():
    q = ctypes.CDLL("libcuda.so.1").cuEventQuery
    q.argtypes, q.restype = [ctypes.c_void_p], ctypes.c_int

    def wait(ev, spin_s: float = 0.01) -> None:
        end = time.perf_counter() + spin_s
        while True:
            rc = q(ev.cuda_event)
            if rc == 0:
                return
            if rc != 600 or time.perf_counter() > end:   # 600: CUDA_ERROR_NOT_READY
                break
        ev.synchronize()   # (raises the driver's errors)
    return wait


def python_work(d: dict, n: int = 60) -> int:
    """A fixed amount of interpreter work (dict lookups, calls, attribute access), about a read's
    O(1) bookkeeping."""
    acc = 0
    for i in range(n):
        acc += d.get(i % 7, 0) + len(d)
    return acc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    poll_wait = _poller()
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    side = torch.cuda.Stream(dev)
    big_src = torch.ones(512 << 20, dtype=torch.uint8, device=dev)
    big_dst = torch.empty_like(big_src)
    tiny = torch.zeros(1, device=dev)
    rec = torch.cuda.Event()
    arr = np.arange(16384, dtype=np.int64) * 32768
    out_arr = np.empty_like(arr)
    d = {i: i for i in range(7)}

    n, rb, pool = 16384, 32 << 10, 65536
    srcp = torch.randint(0, 255, (pool, rb), dtype=torch.uint8, device=dev)
    dstp = torch.zeros((pool, rb), dtype=torch.uint8, device=dev)
    rng = np.random.default_rng(0)
    sid, did = rng.permutation(pool)[:n], rng.permutation(pool)[:n]
    remote = gpu_remote.RemoteTable(gpu_runs.RunSide(np.array([srcp.data_ptr()], np.int64), None,
                                                   sid.astype(np.int64) * rb), np.full(n, rb, np.int64))
    local = gpu_runs.RunSide(np.array([dstp.data_ptr()], np.int64), None, did.astype(np.int64) * rb)
    e, held = gpu_runs.launch(remote, local, dev, side)   # compile, upload the remote half
    e.synchronize()
    held.synced()

    def kernel() -> torch.cuda.Event:
        ev = torch.cuda.Event()
        with torch.cuda.stream(side):
            big_dst.copy_(big_src, non_blocking=True)
            ev.record(side)
        return ev

    waits = {
        "warm (no wait before)": None,
        "event.synchronize()": lambda ev: ev.synchronize(),
        "torch.cuda.synchronize()": lambda ev: torch.cuda.synchronize(),
        "poll cuEventQuery": lambda ev: poll_wait(ev),
    }
    cols = ("kernel -> wait returned", "python", "numpy 16K add", "tiny launch", "event.record",
            "gpu_runs.launch 16K runs", "its kernel, polled", "python after it")
    samples: dict[str, dict[str, list[float]]] = {m: {c: [] for c in cols} for m in waits}
    for rep in range(args.reps + 10):
        for mode, fn in waits.items():
            torch.cuda.synchronize()
            row = {}
            if fn is not None:
                t0 = time.perf_counter()
                ev = kernel()
                fn(ev)
                row["kernel -> wait returned"] = time.perf_counter() - t0
            t = time.perf_counter()
            python_work(d)
            t1 = time.perf_counter()
            np.add(arr, 5, out=out_arr)
            t2 = time.perf_counter()
            tiny.add_(1)
            t3 = time.perf_counter()
            rec.record()
            t4 = time.perf_counter()
            e, held = gpu_runs.launch(remote, local, dev, side)
            t5 = time.perf_counter()
            poll_wait(e)
            t6 = time.perf_counter()
            held.synced()
            python_work(d)
            t7 = time.perf_counter()
            row.update({"python": t1 - t, "numpy 16K add": t2 - t1, "tiny launch": t3 - t2, "event.record": t4 - t3,
                        "gpu_runs.launch 16K runs": t5 - t4, "its kernel, polled": t6 - t5,
                        "python after it": t7 - t6})
            if rep >= 10:
                for k, v in row.items():
                    samples[mode][k].append(v)
    ok = bool(torch.equal(dstp[torch.as_tensor(did, device=dev)], srcp[torch.as_tensor(sid, device=dev)]))
    res = {m: {c: (float(np.median(v) * 1e6) if v else None) for c, v in s.items()} for m, s in samples.items()}
    print(f"bytes ok: {ok}; medians in us over {args.reps} reps")
    print(f"{'':28s}" + "".join(f"{c[:14]:>16s}" for c in cols))
    for m, r in res.items():
        print(f"{m:28s}" + "".join(f"{(r[c] if r[c] is not None else float('nan')):16.1f}" for c in cols))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reps": args.reps, "bytes_ok": ok, "median_us": res}, f, indent=1)


if __name__ == "__main__":
    main()
