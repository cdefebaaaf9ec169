"""`nixl-connectors demo`: two processes act as a prefill and a decode worker of a model-shaped
paged KV cache; decode pulls the blocks of a batch of requests (random block order on both
sides) through the transport, verifies every byte, and reports throughput against the limit of
this machine: a contiguous copy of the same bytes in one process (memory bandwidth), with a
one-process scattered copy of the same blocks as a second, named reference."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from .bench.limits import host_contiguous_copy, host_scattered_copy
from .bench.owner_proc import OwnerProcess, OwnerSpec, layer_seed
from .blockfill import mismatched_blocks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Defaults: a small Llama-like KV cache (8 layers of 8 KV heads x 128, block 16, bf16)."""

    num_layers: int = 8
    kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    num_blocks: int = 1024          # per layer, on each side (8 x 1024 x 64 KiB = 512 MiB a side)
    num_requests: int = 16
    min_prompt_tokens: int = 256
    max_prompt_tokens: int = 2048
    seed: int = 0
    rounds: int = 3

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        return (self.kv_heads, self.block_size, 2 * self.head_size)  # K and V packed per layer

    @property
    def block_bytes(self) -> int:
        return self.kv_heads * self.block_size * 2 * self.head_size * 2  # bf16


@dataclass(frozen=True)
class DemoResult:
    requests: int
    blocks: int
    bytes_moved: int
    seconds: float
    contiguous_copy_gbps: float   # the limit: np.copyto of the same number of bytes, one process
    scattered_copy_gbps: float    # reference: gather + scatter of as many blocks, one process
    bad_blocks: int
    paths: dict[str, int]         # data paths the transfers took (Agent.snapshot())
    fallbacks: dict[str, int]

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.seconds / 1e9


def _plan_requests(cfg: DemoConfig, rng: np.random.Generator) -> list[int]:
    tokens = rng.integers(cfg.min_prompt_tokens, cfg.max_prompt_tokens + 1, cfg.num_requests)
    blocks = [int(-(-t // cfg.block_size)) for t in tokens]
    while sum(blocks) > cfg.num_blocks:  # keep the batch inside the pool
        blocks.pop()
    return blocks


def run_demo(cfg: DemoConfig = DemoConfig(), out=print) -> DemoResult:
    from transport import Agent, AgentConfig, Descs

    rng = np.random.default_rng(cfg.seed)
    req_blocks = _plan_requests(cfg, rng)
    total_blocks = sum(req_blocks)
    out(f"KV cache: {cfg.num_layers} layers x [{cfg.num_blocks}, {cfg.kv_heads}, {cfg.block_size}, "
        f"{2 * cfg.head_size}] bf16 per side ({cfg.block_bytes // 1024} KiB per block per layer)")
    out(f"batch: {len(req_blocks)} requests, {total_blocks} blocks, "
        f"{total_blocks * cfg.block_bytes * cfg.num_layers / 2**20:.0f} MiB, random block order on both sides")
    spec = OwnerSpec(cfg.num_blocks, cfg.block_bytes, seed=cfg.seed + 1, num_layers=cfg.num_layers,
                     kv_shape=cfg.kv_shape)
    decode_kv = [torch.zeros((cfg.num_blocks, *cfg.kv_shape), dtype=torch.bfloat16) for _ in range(cfg.num_layers)]
    rows = [t.view(torch.uint8).reshape(cfg.num_blocks, -1) for t in decode_kv]
    best, bad, nbytes = float("inf"), 0, 0
    with OwnerProcess(spec) as prefill, Agent("decode-0", AgentConfig(timeout_s=60.0)) as agent:
        regions = [agent.register(t) for t in decode_kv]
        peer = agent.connect(prefill.address)
        for rnd in range(cfg.rounds):
            src_perm = rng.permutation(cfg.num_blocks)
            dst_perm = rng.permutation(cfg.num_blocks)
            jobs, pos = [], 0
            for nb in req_blocks:
                s_ids, d_ids = src_perm[pos:pos + nb], dst_perm[pos:pos + nb]
                pos += nb
                lease_id = prefill.expose(s_ids)  # prefill finished this request: keep + expose
                local = Descs.concat([Descs.from_blocks(r, d_ids, cfg.block_bytes) for r in regions])
                jobs.append((lease_id, local, s_ids, d_ids))
            t0 = time.perf_counter()
            transfers = [agent.read(peer, local, lid, notify=f"req-{i}".encode())
                         for i, (lid, local, _, _) in enumerate(jobs)]
            for t in transfers:
                t.wait(120.0)
            dt = time.perf_counter() - t0
            best = min(best, dt)
            nbytes = sum(local.nbytes for _, local, _, _ in jobs)
            bad = 0
            for _, _, s_ids, d_ids in jobs:
                for layer in range(cfg.num_layers):
                    bad += mismatched_blocks(rows[layer].numpy()[d_ids], s_ids, cfg.block_bytes, layer_seed(spec.seed, layer))
            out(f"  round {rnd + 1}: {nbytes / dt / 1e9:6.2f} GB/s  ({dt * 1e3:.1f} ms), "
                f"verified {len(jobs) * cfg.num_layers} request-layers, bad blocks: {bad}")
            if bad:
                break
            for lid, *_ in jobs:
                prefill.call("release", lid)
        notes = prefill.call("notifs")
        snap = agent.snapshot()
    del decode_kv, rows  # room for the references
    contiguous = host_contiguous_copy(nbytes, reps=3).timings.gbps
    scattered = host_scattered_copy(cfg.block_bytes, total_blocks * cfg.num_layers,
                                    cfg.num_blocks * cfg.num_layers, reps=3).timings.gbps
    res = DemoResult(len(req_blocks), total_blocks, nbytes, best, contiguous, scattered, bad,
                     dict(snap.get("paths", {})), dict(snap.get("fallbacks", {})))
    out(f"prefill received {len(notes)} completion notifications")
    paths = ", ".join(f"{k} x{v}" for k, v in sorted(res.paths.items())) or "-"
    out(f"data path: {paths}; fallbacks: " + ("; ".join(f"{k} x{v}" for k, v in res.fallbacks.items()) or "none"))
    out(f"best: {res.gbps:.2f} GB/s between the two processes")
    out(f"  limit, a contiguous copy of the same {nbytes / 2**20:.0f} MiB in one process: {contiguous:.2f} GB/s "
        f"-> ours reaches {res.gbps / contiguous:.2f}x of it")
    out(f"  reference, a scattered copy of the same blocks in one process: {scattered:.2f} GB/s "
        f"-> ours/that {res.gbps / scattered:.2f}x")
    out("all bytes verified" if bad == 0 else f"VERIFICATION FAILED: {bad} bad blocks")
    return res
