"""Where the time of one small read goes: owner and reader in two processes on this host, the
same small lease read repeatedly through the public API, every hop timestamped
(transport.trace; perf_counter is CLOCK_MONOTONIC, comparable across the two processes).

    python3 scripts/latency_breakdown.py [--blocks 64] [--block-bytes 32768] [--reps 400] [--json F]
                                         [--device cuda:0] [--no-grants]

Prints the median time of each hop and the median end to end (read() called -> wait() returned).
Re-reads of one lease copy under its lease grant (no round trip) unless --no-grants, which
measures the round-trip path every first read of a lease takes when no grant was sent ahead.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time

import numpy as np

from nixl_connectors.tools.bench.hops import median_hops, rep_hops
from nixl_connectors.tools.bench.settle import SettleMode, settle


def _pool(bb, device):
    if device == "cpu":
        return np.random.default_rng(1).integers(0, 255, (POOL, bb), dtype=np.uint8)
    import torch

    t = torch.randint(0, 255, (POOL, bb), dtype=torch.uint8, device=device)
    torch.cuda.synchronize()
    return t


POOL = 16384


def _zero(dsts, ids, device):
    """Zero blocks `ids` of every pool (and wait for it), outside the timing."""
    if device == "cpu":
        for d in dsts:
            d[ids] = 0
        return
    import torch

    idx = torch.as_tensor(ids, dtype=torch.int64, device=dsts[0].device)
    for d in dsts:
        d.index_fill_(0, idx, 0)
    torch.cuda.synchronize()


def _descs(regions, ids, bb):
    """Blocks `ids` of every region (one per layer), layer after layer."""
    from transport import Descs

    return Descs.concat([Descs.from_blocks(r, ids, bb) for r in regions])


def _owner(n, bb, device, q_in, q_out, pool_blocks=POOL, layers=1):
    global POOL
    POOL = pool_blocks
    from transport import Agent, AgentConfig, trace
    a = Agent("lat-owner", AgentConfig())
    regions = [a.register(_pool(bb, device)) for _ in range(layers)]
    lease = a.expose(_descs(regions, np.random.default_rng(2).permutation(POOL)[:n], bb), ttl_s=3600)
    trace.enable()
    q_out.put((a.address, lease.id))
    while True:
        msg = q_in.get()
        if msg == "done":
            break
        ids = np.random.default_rng(msg).permutation(POOL)[:n]   # ("--new-lease") a new lease per read
        q_out.put(a.expose(_descs(regions, ids, bb), ttl_s=3600).id)
    q_out.put([(str(t), p, ts) for t, p, ts in trace.disable()])
    a.close()


def main() -> None:
    global POOL
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-bytes", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=400)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda:0 (both processes on it)")
    ap.add_argument("--no-grants", action="store_true", help="reader without lease grants (every read asks)")
    ap.add_argument("--new-lease", action="store_true",
                    help="every read a new lease of new random blocks (into new random blocks), exposed 2 ms "
                         "before it is read, as a serving engine's requests are: first reads, grants sent ahead")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile the reads (cProfile) and print the N functions with the most own time")
    ap.add_argument("--pool", type=int, default=POOL, help="blocks per pool (each side)")
    ap.add_argument("--layers", type=int, default=1,
                    help="pools (regions) per side, one per layer; a read covers the blocks in every one "
                         "(the vLLM 8B shape: --layers 32 --blocks 256 --block-bytes 65536 --pool 1024)")
    ap.add_argument("--settle-ms", type=float, default=2.0,
                    help="--new-lease: how long after expose() returned the read starts")
    ap.add_argument("--settle-spin", action="store_true",
                    help="--new-lease: spin through the settle time instead of sleeping (a busy worker thread)")
    ap.add_argument("--zero", action="store_true",
                    help="zero the destination blocks (and synchronize) before each read, as the bench does")
    ap.add_argument("--local-table", choices=["device", "mapped"], default=None,
                    help="CUDA: where the kernel reads a read's own half of its table (gpu_runs.TableHome)")
    ap.add_argument("--cuda-profile", type=int, default=0, metavar="N",
                    help="CUDA: also run N reads under torch.profiler and print the GPU time per kernel / copy")
    args = ap.parse_args()
    POOL = args.pool
    if args.local_table:
        from transport import gpu_runs
        gpu_runs.LOCAL_TABLE = gpu_runs.TableHome(args.local_table)
    ctx = mp.get_context("spawn")
    qi, qo = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_owner, args=(args.blocks, args.block_bytes, args.device, qi, qo, POOL, args.layers),
                    daemon=True)
    p.start()
    addr, lid = qo.get(timeout=120)
    from transport import Agent, AgentConfig, trace
    b = Agent("lat-reader", AgentConfig(lease_grants=not args.no_grants))
    dsts = [_pool(args.block_bytes, args.device) for _ in range(args.layers)]
    rdsts = [b.register(d) for d in dsts]
    local = _descs(rdsts, np.arange(args.blocks), args.block_bytes)
    peer = b.connect(addr)
    for _ in range(50):  # warm-up
        b.read(peer, local, lid).wait(10)
    state = {"lid": lid, "local": local, "ids": np.arange(args.blocks)}

    def one(rep: int, prof=None):
        """One read (of a new lease with --new-lease); profiled when `prof` is given."""
        if args.new_lease:
            qi.put(rep)
            state["lid"] = qo.get(timeout=60)
            state["ids"] = np.random.default_rng(10**6 + rep).permutation(POOL)[:args.blocks]
            state["local"] = _descs(rdsts, state["ids"], args.block_bytes)
            settle(args.settle_ms / 1e3, SettleMode.SPIN if args.settle_spin else SettleMode.SLEEP)
        if args.zero:
            _zero(dsts, state["ids"], args.device)
        if prof is not None:
            prof.enable()
        t = b.read(peer, state["local"], state["lid"])
        t.wait(10)
        if prof is not None:
            prof.disable()
        return t, time.perf_counter()

    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        for rep in range(args.reps):
            one(10**7 + rep, prof)
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    if args.cuda_profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as cprof:
            for rep in range(args.cuda_profile):
                one(2 * 10**7 + rep)
        print(cprof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    trace.enable()
    woke = [one(rep) for rep in range(args.reps)]
    mine = trace.disable()
    ipc = [(p, ts) for tag, p, ts in mine if tag == "ipc"]
    qi.put("done")
    theirs = qo.get(timeout=60)
    p.join(30)
    b.close()
    by_x: dict[int, dict[str, float]] = {}
    for tag, point, ts in mine:
        by_x.setdefault(id(tag), {})[point] = ts
    own = sorted((ts, point) for _, point, ts in theirs)
    lane = not any(p == "loop_start" for _, p, _ in mine)
    asked = ["called"] + ([] if lane else ["loop_start"]) + ["request_sent", "owner_data_received",
             "owner_request_handled", "owner_reply_sent", "reply_handled", "copied", "settled", "woken"]
    plain = ["called", "copied", "woken"]   # under a grant: no message on the critical path
    by_kind: dict[str, list] = {"granted": [], "asked": []}
    for t, w in woke:
        m = dict(by_x.get(id(t), {}))
        m["woken"] = w
        if "request_sent" not in m:
            if all(k in m for k in plain):
                by_kind["granted"].append([m[k] for k in plain])
            continue
        if not all(k in m for k in ("called", "request_sent", "reply_handled", "settled")):
            continue
        win = [(ts, pt) for ts, pt in own if m["request_sent"] <= ts <= m["reply_handled"]]
        for ts, pt in win:
            key = "owner_" + pt
            if key in asked and key not in m:
                m[key] = ts
        if all(k in m for k in asked):
            by_kind["asked"].append([m[k] for k in asked])
    granted = len(by_kind["granted"]) >= len(by_kind["asked"])
    steps, rows = (plain, by_kind["granted"]) if granted else (asked, by_kind["asked"])
    print(f"{len(by_kind['granted'])} reads under a lease grant, {len(by_kind['asked'])} asked the owner; "
          f"showing the {'granted' if granted else 'asked'} ones")
    ipc_hops: dict[str, float] = {}
    if ipc:  # the CUDA IPC path's own steps, read by read (each starts at "start"): the bench's hop math
        groups: list[list] = []
        for p_, ts in ipc:
            if p_ == "start" or not groups:
                groups.append([])
            groups[-1].append(("ipc", p_, ts))
        ipc_hops = median_hops([rep_hops(g) for g in groups])
        for k, v in ipc_hops.items():
            print(f"{v:9.1f} us    ipc {k}")
    a = np.array(rows)
    hops = {f"{steps[i]} -> {steps[i + 1]}": float(np.median(a[:, i + 1] - a[:, i]) * 1e6) for i in range(len(steps) - 1)}
    total = a[:, -1] - a[:, 0]
    out = {"blocks": args.blocks, "block_bytes": args.block_bytes, "layers": args.layers, "reps": len(rows), "granted": granted,
           "new_lease": args.new_lease, "settle": "spin" if args.settle_spin else "sleep",
           "hops_us_median": hops, "ipc_hops_us_median": ipc_hops, "end_to_end_ms": {"median": float(np.median(total) * 1e3),
                                                     "p90": float(np.percentile(total, 90) * 1e3)}}
    for k, v in hops.items():
        print(f"{v:9.1f} us  {k}")
    print(f"end to end: median {out['end_to_end_ms']['median']:.3f} ms, p90 {out['end_to_end_ms']['p90']:.3f} ms "
          f"({len(rows)} reads of {args.blocks} x {args.block_bytes} B)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
