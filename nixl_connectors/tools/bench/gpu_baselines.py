"""Baselines for the CUDA workloads (gpu_workloads.py), to put next to `bench --suite cuda`:

- torch peer copy, one process: the same bytes as one contiguous cuda:0 -> cuda:1 copy (the
  link's practical limit), and as gather (index_select) + peer copy + scatter (index_copy_),
  which is what a perfectly overlapped pack/unpack transport could reach at best;
- NIXL (1.5, UCX backend), two processes, VRAM registered on cuda:0 (owner) and cuda:1
  (reader), READ of the workload's blocks through prepped descriptor lists, one descriptor
  per block, every byte verified;
- our transport at several chunk sizes (to choose the CUDA default).

    python3 -m nixl_connectors.tools.bench.gpu_baselines --json out.json [--no-nixl] [--chunks 8,32,128]

Needs two GPUs. NIXL is optional (skipped with a reason when it does not import).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import platform
import time
import traceback

import numpy as np

from .gpu_workloads import CUDA_SWEEP
from .workloads import Workload


def _layers(w: Workload) -> int:
    return int(getattr(w, "num_layers", 1))


def _ids(w: Workload, rng: np.random.Generator, pool: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    if not w.scattered:
        return np.arange(n), np.arange(n)
    return rng.permutation(pool)[:n], rng.permutation(pool)[:n]


def torch_peer(w: Workload, reps: int = 10) -> dict:
    """One process: contiguous peer copy of w.nbytes, and gather + peer copy + scatter."""
    import torch

    n = w.num_blocks * _layers(w)          # blocks of all layers, as one pool
    pool = n * w.pool_factor
    bb = w.block_bytes
    src = torch.randint(0, 255, (pool, bb), dtype=torch.uint8, device="cuda:0")
    dst = torch.zeros((pool, bb), dtype=torch.uint8, device="cuda:1")
    st0 = torch.empty((n, bb), dtype=torch.uint8, device="cuda:0")
    st1 = torch.empty((n, bb), dtype=torch.uint8, device="cuda:1")
    rng = np.random.default_rng(0)

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(reps + 1):
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize("cuda:0")
            torch.cuda.synchronize("cuda:1")
            best = min(best, time.perf_counter() - t0)
        return best

    contig = timed(lambda: st1.copy_(st0, non_blocking=True))
    s_np, d_np = _ids(w, rng, pool, n)
    s_ids = torch.as_tensor(s_np, device="cuda:0")
    d_ids = torch.as_tensor(d_np, device="cuda:1")

    def gcs() -> None:
        torch.index_select(src, 0, s_ids, out=st0)
        st1.copy_(st0, non_blocking=True)
        dst.index_copy_(0, d_ids, st1)

    gather = timed(gcs)
    ok = bool(torch.equal(dst[d_ids].cpu(), src[s_ids].cpu()))
    nbytes = n * bb
    return {"contiguous_gbps": nbytes / contig / 1e9, "contiguous_s": contig,
            "gather_copy_scatter_gbps": nbytes / gather / 1e9, "gather_copy_scatter_s": gather,
            "verified": ok}


# ---------------------------------------------------------------------------------- NIXL (VRAM)

def _nixl_agent(name: str):
    from .nixl_import import import_nixl

    nixl = import_nixl()
    agent = nixl.nixl_agent(name, nixl.nixl_agent_config(backends=["UCX"]))
    return nixl, agent


def _vram_descs(base: int, num_blocks: int, block_bytes: int, dev: int) -> np.ndarray:
    d = np.zeros((num_blocks, 3), dtype=np.uint64)
    d[:, 0] = np.uint64(base) + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    d[:, 1] = block_bytes
    d[:, 2] = dev
    return d


def _nixl_owner(pool: int, bb: int, conn) -> None:
    try:
        import torch

        torch.cuda.set_device(0)
        t = torch.randint(0, 255, (pool, bb), dtype=torch.uint8, device="cuda:0")
        torch.cuda.synchronize()
        nixl, agent = _nixl_agent("nixl-owner")
        agent.register_memory([(t.data_ptr(), t.numel(), 0, "")], "VRAM")
        conn.send(("ready", agent.get_agent_metadata(), t.data_ptr()))
        sums = conn.recv()  # ("check", ids) or ("stop",)
        while sums[0] == "check":
            ids = torch.as_tensor(sums[1], device="cuda:0")
            conn.send(hashlib.sha1(t.index_select(0, ids).cpu().numpy().tobytes()).hexdigest())
            sums = conn.recv()
    except Exception:
        conn.send(("error", traceback.format_exc()))


def nixl_vram(w: Workload, reps: int | None = None, timeout_s: float = 120.0) -> dict:
    """Two processes: NIXL owner on cuda:0, NIXL reader (here, in a child) on cuda:1."""
    from .nixl_import import find_nixl

    avail = find_nixl()
    if not avail.available:
        return {"available": False, "reason": avail.reason}
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    r1, r2 = ctx.Pipe()
    n = w.num_blocks * _layers(w)
    pool = n * w.pool_factor
    owner = ctx.Process(target=_nixl_owner, args=(pool, w.block_bytes, b), daemon=True)
    reader = ctx.Process(target=_nixl_reader, args=(w.to_json(), n, pool, reps or w.reps, r2), daemon=True)
    owner.start()
    reader.start()
    try:
        if not a.poll(timeout_s):
            raise TimeoutError("NIXL owner did not start")
        msg = a.recv()
        if msg[0] != "ready":
            raise RuntimeError(msg[1])
        r1.send(msg)
        if not r1.poll(timeout_s):
            raise TimeoutError("NIXL reader did not finish")
        res = r1.recv()
        if res[0] != "ok":
            raise RuntimeError(res[1])
        out = res[1]
        # verify the last transfer against the owner's bytes
        a.send(("check", out.pop("last_src_ids")))
        if a.poll(60):
            out["verified"] = a.recv() == out.pop("last_hash")
        a.send(("stop",))
        return {"available": True, "version": avail.version, **out}
    except Exception as e:
        return {"available": True, "error": f"{type(e).__name__}: {e}"}
    finally:
        for p in (owner, reader):
            p.join(5)
            if p.is_alive():
                p.kill()


def _nixl_reader(wj: dict, n: int, pool: int, reps: int, conn) -> None:
    try:
        import torch

        torch.cuda.set_device(1)
        bb = wj["block_bytes"]
        t = torch.zeros((pool, bb), dtype=torch.uint8, device="cuda:1")
        torch.cuda.synchronize()
        nixl, agent = _nixl_agent("nixl-reader")
        agent.register_memory([(t.data_ptr(), t.numel(), 1, "")], "VRAM")
        _, meta, rbase = conn.recv()
        remote = agent.add_remote_agent(meta)
        local_prep = agent.prep_xfer_dlist("NIXL_INIT_AGENT", _vram_descs(t.data_ptr(), pool, bb, 1), "VRAM")
        remote_prep = agent.prep_xfer_dlist(remote, _vram_descs(rbase, pool, bb, 0), "VRAM")
        try:
            agent.make_connection(remote)
        except Exception:
            pass
        rng = np.random.default_rng(3)
        times, preps = [], []
        for rep in range(reps + 1):
            if wj["scattered"]:
                l_ids = rng.permutation(pool)[:n].astype(np.int32)
                r_ids = rng.permutation(pool)[:n].astype(np.int32)
            else:
                l_ids = r_ids = np.arange(n, dtype=np.int32)
            t0 = time.perf_counter()
            h = agent.make_prepped_xfer("READ", local_prep, l_ids, remote_prep, r_ids, notif_msg=b"x")
            t1 = time.perf_counter()
            state = agent.transfer(h)
            while state == "PROC":
                state = agent.check_xfer_state(h)
            t2 = time.perf_counter()
            if state != "DONE":
                raise RuntimeError(f"NIXL transfer ended in state {state}")
            agent.release_xfer_handle(h)
            times.append(t2 - t1)
            preps.append(t1 - t0)
        best = min(times[1:])
        got = t.index_select(0, torch.as_tensor(l_ids.astype(np.int64), device="cuda:1")).cpu().numpy()
        nbytes = n * bb
        conn.send(("ok", {"gbps": nbytes / best / 1e9, "best_s": best, "median_s": float(np.median(times[1:])),
                          "prep_s_median": float(np.median(preps[1:])),
                          "gbps_incl_prep": nbytes / min(a + b for a, b in zip(times[1:], preps[1:])) / 1e9,
                          "last_src_ids": r_ids.astype(np.int64), "last_hash": hashlib.sha1(got.tobytes()).hexdigest()}))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def main(argv: list[str] | None = None) -> int:
    from .ours import run_ours

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="bench-out/gpu-baselines.json")
    p.add_argument("--no-nixl", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--chunks", default="", help="comma list of MiB: also run ours at these chunk sizes")
    p.add_argument("--chunk-workloads", default="", help="comma list of workload name substrings for --chunks")
    p.add_argument("--only", default="", help="comma list of workload names (substring match)")
    a = p.parse_args(argv)
    wl = [w for w in CUDA_SWEEP if not a.only or any(s in w.name for s in a.only.split(","))]
    rows = []
    for w in wl:
        row: dict = {"workload": w.name, "nbytes": w.nbytes}
        if not a.no_torch:
            try:
                row["torch_peer"] = torch_peer(w)
            except Exception as e:
                row["torch_peer"] = {"error": f"{type(e).__name__}: {e}"}
            print(w.name, "torch", row["torch_peer"], flush=True)
        if not a.no_nixl:
            row["nixl_vram"] = nixl_vram(w)
            print(w.name, "nixl", row["nixl_vram"], flush=True)
        sweep = not a.chunk_workloads or any(s in w.name for s in a.chunk_workloads.split(","))
        for c in [int(x) for x in a.chunks.split(",") if x and sweep]:
            try:
                r = run_ours(w, chunk_bytes=c << 20)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"}
            row.setdefault("ours_by_chunk", {})[f"{c}MiB"] = r
            print(w.name, f"ours chunk {c} MiB", r, flush=True)
        rows.append(row)
    with open(a.json, "w") as f:
        json.dump({"machine": platform.platform(), "results": rows}, f, indent=2, default=str)
    print("written", a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
