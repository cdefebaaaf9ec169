"""The owner half of a two-process transfer: a child process that holds a pool of blocks,
exposes requested block lists under leases and reports back over a multiprocessing pipe.

Commands on the pipe (tuples, local IPC only): ("expose", block_ids ndarray) -> lease id;
("release", lease id) -> bool; ("freed",) -> list of freed lease ids; ("notifs",) ->
notifications; ("snapshot",) -> ``Agent.snapshot()`` (data paths served, fallbacks); ("pids",) ->
(pid, parent pid); ("stop",).
CUDA pools are allocated and filled on their device (``blockfill.fill_pool_torch``).
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
from dataclasses import dataclass

import numpy as np

from ..blockfill import fill_pool, fill_pool_torch
from .host_memory import host_pool, huge_fraction


@dataclass(frozen=True)
class OwnerSpec:
    num_blocks: int
    block_bytes: int
    seed: int = 1
    num_layers: int = 1          # one pool (region) per layer; block b of a lease covers every layer
    kv_shape: tuple[int, ...] | None = None  # per-block shape of a bf16 KV layer, e.g. (8, 16, 256)
    device: str = "cpu"
    auth_key: bytes | None = None
    transports: str = "auto"
    chunk_bytes: int = 8 << 20
    ttl_s: float = 600.0
    timeout_s: float = 60.0
    ucx_options: dict | None = None  # extra UCX settings (bench sweeps)


def layer_seed(seed: int, layer: int) -> int:
    return seed + 7919 * layer


def _owner_main(spec: OwnerSpec, conn) -> None:
    try:
        _serve(spec, conn)
    except BaseException as e:  # tell the parent instead of leaving it waiting
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except (BrokenPipeError, OSError):
            pass
        raise


def _serve(spec: OwnerSpec, conn) -> None:
    import torch

    from transport import Agent, AgentConfig, Descs, TransportSet

    cfg = AgentConfig(auth_key=spec.auth_key, transports=TransportSet(spec.transports),
                      chunk_bytes=spec.chunk_bytes, staging_bytes=max(64 << 20, 4 * spec.chunk_bytes),
                      timeout_s=spec.timeout_s, ucx_options=dict(spec.ucx_options or {}))
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(spec.device)  # as a prefill worker pinned to its GPU
    tensors = []
    shape = (spec.num_blocks, *spec.kv_shape) if spec.kv_shape is not None else (spec.num_blocks, spec.block_bytes)
    dtype = torch.bfloat16 if spec.kv_shape is not None else torch.uint8  # model-shaped bf16 layers
    if math.prod(shape[1:]) * dtype.itemsize != spec.block_bytes:
        raise ValueError("kv_shape does not match block_bytes")
    for layer in range(spec.num_layers):
        if spec.device.startswith("cuda"):
            t = torch.empty(shape, dtype=dtype, device=spec.device)
        else:   # the run's page policy, the same as NIXL's pools (host_memory.py)
            t = torch.from_numpy(host_pool((spec.num_blocks, spec.block_bytes), fill=None)).view(dtype).reshape(shape)
        raw = t.view(torch.uint8).reshape(spec.num_blocks, -1)
        if t.is_cuda:
            fill_pool_torch(raw, spec.block_bytes, layer_seed(spec.seed, layer))
        else:
            fill_pool(raw.numpy(), spec.block_bytes, layer_seed(spec.seed, layer))
        tensors.append(t)
    if spec.device.startswith("cuda"):
        torch.cuda.synchronize(spec.device)  # the engine's writes are complete before expose()
    with Agent("owner", cfg) as agent:
        regions = [agent.register(t) for t in tensors]
        conn.send(("ready", agent.address))
        while True:
            if not conn.poll(600):
                break
            cmd = conn.recv()
            if cmd[0] == "expose":
                descs = Descs.concat([Descs.from_blocks(r, cmd[1], spec.block_bytes) for r in regions])
                lease = agent.expose(descs, ttl_s=spec.ttl_s)
                conn.send(lease.id)
            elif cmd[0] == "freed":
                conn.send(agent.freed_leases())
            elif cmd[0] == "notifs":
                conn.send(agent.notifications())
            elif cmd[0] == "release":
                conn.send(agent.release(cmd[1]))
            elif cmd[0] == "snapshot":
                conn.send(agent.snapshot())
            elif cmd[0] == "huge_fraction":
                conn.send([0.0 if t.is_cuda else huge_fraction(t.numpy()) for t in tensors])
            elif cmd[0] == "pids":
                conn.send((os.getpid(), os.getppid()))
            elif cmd[0] == "stop":
                break
    conn.send(("stopped",))


class OwnerClient:
    """Commands to an owner process over its pipe; picklable, so a reader process started as the
    owner's sibling can drive it (``OwnerProcess.client``)."""

    def __init__(self, conn, address: str):
        self.conn = conn
        self.address = address

    def call(self, *cmd, timeout_s: float = 60.0):
        self.conn.send(cmd)
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"owner did not answer {cmd[0]!r}")
        reply = self.conn.recv()
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            raise RuntimeError(f"owner failed: {reply[1]}")
        return reply

    def expose(self, block_ids: np.ndarray) -> str:
        return self.call("expose", np.asarray(block_ids, dtype=np.int64))


class OwnerProcess:
    """Context manager around the owner child process."""

    def __init__(self, spec: OwnerSpec, start_timeout_s: float = 120.0):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_owner_main, args=(spec, child), daemon=True)
        self.proc.start()
        if not self._conn.poll(start_timeout_s):
            self.proc.kill()
            raise TimeoutError("owner process did not start in time")
        msg = self._conn.recv()
        if msg[0] != "ready":
            self.close()
            raise RuntimeError(f"owner process failed to start: {msg[1]}")
        self.address: str = msg[1]
        self.client = OwnerClient(self._conn, self.address)

    def call(self, *cmd, timeout_s: float = 60.0):
        return self.client.call(*cmd, timeout_s=timeout_s)

    def expose(self, block_ids: np.ndarray) -> str:
        return self.client.expose(block_ids)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self._conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def __enter__(self) -> "OwnerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
