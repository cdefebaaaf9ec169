"""Our transport on a Workload, through the public API only: an owner process exposes leases, a
reader process (its sibling) times ``read()`` to ``wait()``.

Per rep, outside the timing: expose (NEW_EACH_REP policy) and let 2 ms pass (``EXPOSE_SETTLE_S``;
idle or busy: settle.py),
zero the destination blocks; after
it: check every byte of the rep. The timing ends when ``wait()`` returns: by its contract the blocks
are then usable on any stream, so a CUDA rep is checked on the device's current stream with no
synchronize in between (a ``wait()`` that returned early would show as bad blocks). Until
2026-12-07 a device synchronize was inside the timing (20-70 us on the H100 machine).

``NIXL_CONNECTORS_BENCH_TRACE=1`` also records each timed read's hops (``transport.trace``, a few
perf_counter calls per read) and reports their medians as ``hops_us_median`` (hops.py).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

from .gpu_workloads import Devices
from .host_memory import host_pool, huge_fraction, pages_from_env
from .owner_proc import OwnerClient, OwnerProcess, OwnerSpec, layer_seed
from .settle import mode_from_env, settle
from .timing import Timings
from .workloads import BlockPolicy, Workload

log = logging.getLogger(__name__)

CHUNK_ENV = "NIXL_CONNECTORS_BENCH_CHUNK"
# A new lease is read this long after expose() returned, outside the timing: in serving, decode
# reads milliseconds after prefill exposed (router, decode scheduler), by when the lease grant the
# owner sent at expose has arrived; back to back, the reader's loop would still be taking that grant
# in (a GIL shared with the timed read) and the read would often ask the owner instead.
EXPOSE_SETTLE_S = 0.002
UCX_ENV = "NIXL_CONNECTORS_BENCH_UCX"
TRACE_ENV = "NIXL_CONNECTORS_BENCH_TRACE"
GPU_DIRECT_ENV = "NIXL_CONNECTORS_BENCH_GPU_DIRECT"   # "1"/"0": the reader's AgentConfig.gpu_direct_tables


def gpu_direct_from_env() -> bool:
    """The reader's `gpu_direct_tables`: NIXL_CONNECTORS_BENCH_GPU_DIRECT ("1" or "0"), else the
    AgentConfig default; anything else is a ValueError naming the choices."""
    from transport import AgentConfig

    v = os.environ.get(GPU_DIRECT_ENV)
    if v is None or v == "":
        return AgentConfig.__dataclass_fields__["gpu_direct_tables"].default
    if v not in ("0", "1"):
        raise ValueError(f"{GPU_DIRECT_ENV}={v!r}: use 1 (on) or 0 (off)")
    return v == "1"


def block_ids(w: Workload, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(owner block ids, reader block ids) of one request: random and distinct on each side."""
    if not w.scattered:
        return np.arange(w.num_blocks), np.arange(w.num_blocks)
    return rng.permutation(w.pool_blocks)[:w.num_blocks], rng.permutation(w.pool_blocks)[:w.num_blocks]


def ucx_chunk_bytes(override: int | None = None) -> int:
    """Chunk size of the UCX data path (pack, send, unpack): other hosts and every fallback. The
    same-host paths (process_vm_readv, CUDA IPC) do not chunk. ``NIXL_CONNECTORS_BENCH_CHUNK``
    (bytes) overrides, for sweeps of the UCX path."""
    if override:
        return int(override)
    env = os.environ.get(CHUNK_ENV)
    return int(env) if env else 8 << 20


def bench_ucx_options() -> dict[str, str]:
    """Extra UCX settings for both bench processes, from NIXL_CONNECTORS_BENCH_UCX
    ("RNDV_SCHEME=auto,MAX_RNDV_RAILS=2"), for sweeps of UCX settings."""
    env = os.environ.get(UCX_ENV, "")
    return dict(kv.split("=", 1) for kv in env.split(",") if "=" in kv)


class _Dest:
    """The reader's pools (one per layer), zeroed and checked per rep: with numpy on the host
    (single-threaded, as the NIXL reader does it: no torch worker threads left spinning next to a
    timed transfer on a 2-core machine), with torch on the device for CUDA pools."""

    def __init__(self, w: Workload, device: str, owner_seed: int):
        import torch

        self.w, self.device, self.cuda = w, device, device.startswith("cuda")
        self.seeds = [layer_seed(owner_seed, layer) for layer in range(w.num_layers)]
        if self.cuda:
            self.pools = [torch.zeros((w.pool_blocks, w.block_bytes), dtype=torch.uint8, device=device)
                          for _ in range(w.num_layers)]
        else:   # the run's page policy, the same as NIXL's pools (host_memory.py)
            self.pools = [torch.from_numpy(host_pool((w.pool_blocks, w.block_bytes))) for _ in range(w.num_layers)]
        self._host = [] if self.cuda else [p.numpy() for p in self.pools]
        self._expected: list | None = None

    def zero(self, d_ids: np.ndarray) -> None:
        if not self.cuda:
            for h in self._host:
                h[d_ids] = 0
            return
        import torch

        idx = torch.as_tensor(d_ids, dtype=torch.int64, device=self.device)
        for p in self.pools:
            p.index_fill_(0, idx, 0)
        self.sync()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def bad_blocks(self, s_ids: np.ndarray, d_ids: np.ndarray) -> int:
        """Blocks of this rep (all layers) whose bytes differ from the owner's pattern."""
        same = self.w.policy is BlockPolicy.SAME_EVERY_REP  # one block set read again and again
        if not self.cuda:
            from ..blockfill import block_pattern, mismatched_blocks

            if not same:
                return sum(mismatched_blocks(h[d_ids], s_ids, self.w.block_bytes, s)
                           for h, s in zip(self._host, self.seeds))
            if self._expected is None:
                self._expected = [block_pattern(s_ids, self.w.block_bytes, s) for s in self.seeds]
            return sum(int(np.count_nonzero((h[d_ids] != e).any(axis=1))) for h, e in zip(self._host, self._expected))
        import torch

        from ..blockfill import block_pattern_torch, mismatched_blocks_torch

        src = torch.as_tensor(s_ids, dtype=torch.int64, device=self.device)
        idx = torch.as_tensor(d_ids, dtype=torch.int64, device=self.device)
        if not same:  # chunked: bounded temporaries
            return sum(mismatched_blocks_torch(p.index_select(0, idx), src, self.w.block_bytes, s)
                       for p, s in zip(self.pools, self.seeds))
        if self._expected is None:
            self._expected = [block_pattern_torch(src, self.w.block_bytes, s) for s in self.seeds]
        return sum(int((p.index_select(0, idx) != e).any(dim=1).sum().item())
                   for p, e in zip(self.pools, self._expected))


def _reader_main(w: Workload, devices: Devices, seed: int, timeout_s: float, chunk: int, owner: OwnerClient,
                 conn) -> None:
    try:
        conn.send(("ok", _read_reps(w, devices, seed, timeout_s, chunk, owner)))
    except BaseException as e:  # report, never hang the parent
        conn.send(("err", f"{type(e).__name__}: {e}"))


def run_ours(w: Workload, devices: Devices | None = None, seed: int = 0, timeout_s: float = 120.0,
             chunk_bytes: int | None = None) -> dict:
    """Read ``w`` from an owner process, ``w.warmup + w.reps`` times; returns the timings
    (``Timings.to_json``) plus verification, the data paths taken and every fallback.

    Owner and reader are two processes started by this one (siblings, as prefill and decode
    workers started by a launcher are: under Yama ptrace_scope 1 a parent could read its child's
    memory where a deployment cannot), each workload with fresh ones, so every workload starts
    from a fresh UCX context and CUDA state, and one workload's failure cannot poison the next.
    """
    import multiprocessing as mp

    devices = devices or Devices()
    chunk = ucx_chunk_bytes(chunk_bytes)
    spec = OwnerSpec(w.pool_blocks, w.block_bytes, seed=seed + 1, num_layers=w.num_layers, kv_shape=w.kv_shape,
                     device=devices.owner, timeout_s=timeout_s, chunk_bytes=chunk, ucx_options=bench_ucx_options())
    ctx = mp.get_context("spawn")
    with OwnerProcess(spec) as owner:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_reader_main, args=(w, devices, seed, timeout_s, chunk, owner.client, child))
        proc.start()
        child.close()
        try:
            if not parent.poll(120 + timeout_s * (w.reps + w.warmup + 2)):
                raise TimeoutError(f"bench reader for {w.name} did not finish")
            tag, val = parent.recv()
        except EOFError:
            raise RuntimeError(f"bench reader for {w.name} died (exit code {proc.exitcode})") from None
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    if tag != "ok":
        raise RuntimeError(val)
    return val


def _read_reps(w: Workload, devices: Devices, seed: int, timeout_s: float, chunk: int, owner: OwnerClient) -> dict:
    from transport import Agent, AgentConfig, Descs, trace

    import torch

    from .hops import median_hops, rep_hops

    if devices.reader.startswith("cuda"):
        torch.cuda.set_device(devices.reader)  # as a decode worker pinned to its GPU
    else:
        torch.set_num_threads(1)  # no torch worker threads spinning beside the timed reads
    rng = np.random.default_rng(seed)
    dest = _Dest(w, devices.reader, seed + 1)
    direct = gpu_direct_from_env()
    cfg = AgentConfig(timeout_s=timeout_s, chunk_bytes=chunk, staging_bytes=max(64 << 20, 4 * chunk),
                      ucx_options=bench_ucx_options(), gpu_direct_tables=direct)
    times: list[float] = []
    traced: list[list[tuple[str, float]]] = []
    tracing = os.environ.get(TRACE_ENV) == "1"
    settle_mode = mode_from_env()
    bad = 0
    with Agent("reader", cfg) as agent:
        regions = [agent.register(p) for p in dest.pools]
        peer = agent.connect(owner.address)
        lease = None
        for rep in range(w.warmup + w.reps):
            if lease is None or w.policy is BlockPolicy.NEW_EACH_REP:
                s_ids, d_ids = block_ids(w, rng)
                lease = owner.expose(s_ids)
                local = Descs.concat([Descs.from_blocks(r, d_ids, w.block_bytes) for r in regions])
                settle(EXPOSE_SETTLE_S, settle_mode)
            dest.zero(d_ids)
            if tracing:
                trace.enable()
            t0 = time.perf_counter()
            agent.read(peer, local, lease).wait(timeout_s)
            dt = time.perf_counter() - t0
            trace.mark("bench", "returned")
            if tracing:
                marks = trace.disable()
                if rep >= w.warmup:
                    traced.append(rep_hops(marks))
            if rep >= w.warmup:
                times.append(dt)
            bad += dest.bad_blocks(s_ids, d_ids)
            if w.policy is BlockPolicy.NEW_EACH_REP:
                owner.call("release", lease)
        if w.policy is BlockPolicy.SAME_EVERY_REP:
            owner.call("release", lease)
        mine = agent.snapshot()
        if mine.get("granted_reads"):   # reads under a grant reach the owner's counters with our sweep
            time.sleep(2 * cfg.sweep_interval_s)
        theirs = owner.call("snapshot")
        huge = {"reader": [0.0 if dest.cuda else round(huge_fraction(h), 3) for h in dest._host],
                "owner": [round(f, 3) for f in owner.call("huge_fraction")]}
        owner_pids = owner.call("pids")
    return {"impl": "nixl_connectors", **Timings.of(times, w.nbytes).to_json(),
            "bad_blocks": bad, "verified_reps": w.warmup + w.reps, "devices": devices.to_json(),
            "paths": dict(mine.get("paths", {})), "fallbacks": dict(mine.get("fallbacks", {})),
            "granted_reads": int(mine.get("granted_reads", 0)),
            "owner_paths": dict(theirs.get("paths", {})), "owner_fallbacks": dict(theirs.get("fallbacks", {})),
            "timing": "read() to wait()" + (" (no synchronize: the rep is verified on the device's current "
                                            "stream right after, as the engine would use it)" if dest.cuda else ""),
            "settle_after_expose_ms": EXPOSE_SETTLE_S * 1e3, "settle_mode": settle_mode.value,
            "host_pages": None if dest.cuda else pages_from_env().value, "huge_page_fraction": huge,
            "ucx_chunk_bytes": chunk, "ucx_options": bench_ucx_options(), "gpu_direct_tables": direct,
            "gpu_run_tables": mine.get("gpu_run_tables"),
            "hops_us_median": median_hops(traced) if tracing else None,
            "processes": {"reader": [os.getpid(), os.getppid()], "owner": list(owner_pids)}}
