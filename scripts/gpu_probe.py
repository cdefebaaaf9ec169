"""Quick two-process probe of the CUDA IPC path on one GPU (owner child + reader here), public
API only, bytes verified: scattered 16,384 x 32 KiB, 1 GiB contiguous, 64 x 32 KiB latency,
the 8B-model 4K-token vLLM shape; next to the in-process contiguous copy of the same bytes.
A development probe; `nixl-connectors bench --suite cuda` is the benchmark."""
from __future__ import annotations

import json
import multiprocessing as mp
import sys
import time

import numpy as np


def owner(q_in, q_out):
    import torch

    from transport import Agent, AgentConfig, Descs
    torch.cuda.set_device(0)
    a = Agent("probe-owner", AgentConfig(timeout_s=60))
    pools = {}
    q_out.put(a.address)
    while True:
        cmd = q_in.get()
        if cmd[0] == "pool":
            _, name, layers, nblocks, bbytes = cmd
            ts = [torch.randint(0, 255, (nblocks, bbytes), dtype=torch.uint8, device="cuda") for _ in range(layers)]
            torch.cuda.synchronize()
            pools[name] = (ts, [a.register(t) for t in ts], bbytes)
            q_out.put("ok")
        elif cmd[0] == "expose":
            _, name, ids = cmd
            ts, regs, bb = pools[name]
            d = Descs.concat([Descs.from_blocks(r, ids, bb) for r in regs])
            q_out.put(a.expose(d, ttl_s=600).id)
        elif cmd[0] == "checksum":
            _, name, ids = cmd
            ts, regs, bb = pools[name]
            it = torch.as_tensor(ids, device="cuda")
            q_out.put([int(t.index_select(0, it).to(torch.int64).sum()) for t in ts])
        elif cmd[0] == "quit":
            a.close()
            q_out.put("bye")
            return


def main():
    import torch

    from transport import Agent, AgentConfig, Descs
    mp.set_start_method("spawn")
    qi, qo = mp.Queue(), mp.Queue()
    p = mp.Process(target=owner, args=(qi, qo), daemon=True)
    p.start()
    addr = qo.get(timeout=120)
    b = Agent("probe-reader", AgentConfig(timeout_s=60))
    peer = b.connect(addr)
    rng = np.random.default_rng(0)
    out = {}

    def contiguous_copy_gbps(nbytes):
        x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        best = 1e9
        for _ in range(10):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            y.copy_(x)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        del x, y
        return nbytes / best / 1e9

    cases = [("scattered-32k-x16384", 1, 65536, 32768, 16384, True, 10),
             ("contiguous-1g", 1, 1024, 1 << 20, 1024, False, 10),
             ("small-64x32k", 1, 4096, 32768, 64, True, 200),
             ("vllm-8b-4k", 32, 1024, 65536, 256, True, 10)]
    for name, layers, pool, bb, n, scattered, reps in cases:
        qi.put(("pool", name, layers, pool, bb))
        qo.get(timeout=120)
        dst = [torch.zeros((pool, bb), dtype=torch.uint8, device="cuda") for _ in range(layers)]
        regs = [b.register(t) for t in dst]
        times = []
        for r in range(reps + 2):
            s_ids = rng.permutation(pool)[:n] if scattered else np.arange(n)
            d_ids = rng.permutation(pool)[:n] if scattered else np.arange(n)
            qi.put(("expose", name, s_ids))
            lid = qo.get(timeout=60)
            local = Descs.concat([Descs.from_blocks(rg, d_ids, bb) for rg in regs])
            t0 = time.perf_counter()
            b.read(peer, local, lid).wait(60)
            times.append(time.perf_counter() - t0)
        qi.put(("checksum", name, s_ids))
        want = qo.get(timeout=60)
        it = torch.as_tensor(d_ids, device="cuda")
        got = [int(t.index_select(0, it).to(torch.int64).sum()) for t in dst]
        nbytes = layers * n * bb
        t = np.array(times[2:])
        lim = contiguous_copy_gbps(nbytes)
        out[name] = {"nbytes": nbytes, "best_ms": t.min() * 1e3, "median_ms": float(np.median(t)) * 1e3,
                     "p90_ms": float(np.percentile(t, 90)) * 1e3, "gbps_best": nbytes / t.min() / 1e9,
                     "gbps_median": nbytes / np.median(t) / 1e9, "contiguous_copy_gbps": lim,
                     "ratio_median": nbytes / np.median(t) / 1e9 / lim, "verified": got == want}
        print(name, json.dumps(out[name]), flush=True)
        del dst
        torch.cuda.empty_cache()
    out["paths"] = dict(b.snapshot()["paths"])
    out["fallbacks"] = dict(b.snapshot()["fallbacks"])
    print(json.dumps(out, indent=1))
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(out, f, indent=1)
    qi.put(("quit",))
    qo.get(timeout=30)
    b.close()


if __name__ == "__main__":
    main()
