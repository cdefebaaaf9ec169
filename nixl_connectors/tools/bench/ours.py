"""Our transport on a Workload: owner in a child process, reader here; best-of-reps GB/s."""
from __future__ import annotations

import time

import numpy as np

from ..blockfill import mismatched_blocks
from .owner_proc import OwnerProcess, OwnerSpec
from .workloads import Memory, Workload


def block_ids(w: Workload, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    pool = w.num_blocks * w.pool_factor
    if not w.scattered:
        return np.arange(w.num_blocks), np.arange(w.num_blocks)
    return rng.permutation(pool)[:w.num_blocks], rng.permutation(pool)[:w.num_blocks]


def default_chunk_bytes(w: Workload) -> int:
    """Pipelined chunk size: 8 MiB for host memory; larger for CUDA, where each UCX message
    costs ~0.1 ms of Python/UCX overhead and NVLink moves 32 MiB in ~0.1 ms
    (NIXL_CONNECTORS_BENCH_CHUNK overrides, for sweeps)."""
    import os

    env = os.environ.get("NIXL_CONNECTORS_BENCH_CHUNK")
    if env:
        return int(env)
    if w.memory is Memory.CUDA:
        from .gpu_workloads import CUDA_CHUNK_BYTES

        return CUDA_CHUNK_BYTES
    return 8 << 20


def bench_ucx_options() -> dict[str, str]:
    """Extra UCX settings for both bench processes, from NIXL_CONNECTORS_BENCH_UCX
    ("RNDV_SCHEME=auto,MAX_RNDV_RAILS=2"), for sweeps of UCX settings."""
    import os

    env = os.environ.get("NIXL_CONNECTORS_BENCH_UCX", "")
    return dict(kv.split("=", 1) for kv in env.split(",") if "=" in kv)


def _isolated_child(w: Workload, seed: int, timeout_s: float, chunk_bytes: int | None, conn) -> None:
    try:
        conn.send(("ok", run_ours(w, seed, timeout_s, chunk_bytes, isolated=False)))
    except BaseException as e:  # report, never hang the parent
        conn.send(("err", f"{type(e).__name__}: {e}"))


def run_ours(w: Workload, seed: int = 0, timeout_s: float = 120.0, chunk_bytes: int | None = None,
             isolated: bool | None = None) -> dict:
    """Best-of-reps GB/s of reads of `w` from an owner child process.

    isolated (default: for CUDA workloads) runs the reader in a fresh spawned process too, so
    every workload starts from a fresh UCX context and CUDA state, as separate serving
    processes would (and one workload's failure cannot poison the next).
    """
    if isolated is None:
        isolated = w.memory is Memory.CUDA
    if isolated:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_isolated_child, args=(w, seed, timeout_s, chunk_bytes, child))
        proc.start()
        child.close()
        try:
            if not parent.poll(timeout_s * (w.reps + 3)):
                raise TimeoutError(f"bench reader for {w.name} did not finish")
            tag, val = parent.recv()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        if tag != "ok":
            raise RuntimeError(val)
        return val
    import torch

    from transport import Agent, AgentConfig, Descs

    from .owner_proc import layer_seed

    rng = np.random.default_rng(seed)
    pool_blocks = w.num_blocks * w.pool_factor
    layers = int(getattr(w, "num_layers", 1))
    kv_shape = getattr(w, "kv_shape", None)
    chunk = chunk_bytes or default_chunk_bytes(w)
    staging = max(64 << 20, 4 * chunk)
    dev = "cuda:1" if w.memory is Memory.CUDA else "cpu"
    spec = OwnerSpec(pool_blocks, w.block_bytes, seed=seed + 1, num_layers=layers,
                     kv_shape=tuple(kv_shape) if kv_shape else None,
                     device="cuda:0" if w.memory is Memory.CUDA else "cpu", timeout_s=timeout_s,
                     chunk_bytes=chunk, ucx_options=bench_ucx_options())
    dst = [torch.zeros((pool_blocks, w.block_bytes), dtype=torch.uint8, device=dev) for _ in range(layers)]
    times = []
    bad = 0
    cfg = AgentConfig(timeout_s=timeout_s, chunk_bytes=chunk, staging_bytes=staging,
                      ucx_options=bench_ucx_options())
    with OwnerProcess(spec) as owner, Agent("reader", cfg) as agent:
        regions = [agent.register(d) for d in dst]
        peer = agent.connect(owner.address)
        for _ in range(w.reps + 1):  # first round warms registration caches and page tables
            s_ids, d_ids = block_ids(w, rng)
            lease = owner.expose(s_ids)
            local = Descs.concat([Descs.from_blocks(r, d_ids, w.block_bytes) for r in regions])
            t0 = time.perf_counter()
            agent.read(peer, local, lease).wait(timeout_s)
            times.append(time.perf_counter() - t0)
            owner.call("release", lease)
        for layer, d in enumerate(dst):
            host = d.cpu().numpy() if dev != "cpu" else d.numpy()
            bad += mismatched_blocks(host[d_ids], s_ids, w.block_bytes, layer_seed(spec.seed, layer))
    best = min(times[1:])
    return {"impl": "nixl_connectors", "gbps": w.nbytes / best / 1e9, "best_s": best,
            "median_s": float(np.median(times[1:])), "bad_blocks": bad, "chunk_bytes": chunk,
            "ucx_options": bench_ucx_options(), "all_s": times[1:]}
