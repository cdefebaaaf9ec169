"""A transport peer in its own process, pinned to one GPU, driven over a multiprocessing pipe.

Used by tests/gpu only. The test process itself never touches CUDA or UCX: every agent lives
in a child started with the spawn context, so each test controls exactly which process owns
which GPU, and a child can be killed (or kill itself mid-transfer) without taking the test
process down.

Buffers are filled with a deterministic byte pattern computed on the device from a seed, so
any process can regenerate what a block must contain and verify received bytes exactly
(integer comparison of the raw bytes, whatever the dtype; NaN bit patterns included).

Buffer spec (plain tuples, picklable):
    ("bufs", [(name, num_blocks, block_shape, dtype, seed, view_dtype_or_None), ...])
        one region per entry; a block is one row [block_shape] of the tensor; view_dtype
        registers `t.view(view_dtype)` instead of `t` (e.g. a bf16 pool seen as int8)
    ("vllm", prefix, num_layers, num_blocks, seed)
        vLLM-shaped KV: per layer [num_blocks, 8, 16, 256] bf16 (8 KV heads, block 16,
        K and V of head_size 128 packed), descriptors through nixl_connectors.vllm.layout
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from typing import Any

import numpy as np

DTYPES = ("bfloat16", "float16", "float32", "int8", "uint8")
VLLM_BLOCK = (8, 16, 256)

_K1 = 0x9E3779B97F4A7C15 - (1 << 64)  # as signed int64
_K2 = 0xBF58476D1CE4E5B9 - (1 << 64)


# Devices of the two processes (see conftest.py): cuda:0 and cuda:1, or cuda:0 twice when
# NIXL_CONNECTORS_GPU_TESTS_ONE_GPU=1 (a one-GPU machine).
ONE_GPU = os.environ.get("NIXL_CONNECTORS_GPU_TESTS_ONE_GPU") == "1"
OWNER_DEVICE = "cuda:0"
READER_DEVICE = "cuda:0" if ONE_GPU else "cuda:1"


def pattern_bytes(seed: int, nbytes: int, device) -> "Any":
    """uint8 tensor of `nbytes` deterministic pseudo-random bytes (nbytes % 8 == 0)."""
    import torch

    assert nbytes % 8 == 0
    x = torch.arange(nbytes // 8, dtype=torch.int64, device=device)
    x = x * _K1 + int(seed)
    x = x ^ (x >> 29)
    x = x * _K2
    x = x ^ (x >> 31)
    return x.view(torch.uint8)


def make_tensor(num_blocks: int, block_shape, dtype: str, seed: int, device):
    import torch

    dt = getattr(torch, dtype)
    elems = num_blocks * int(np.prod(block_shape))
    nbytes = elems * torch.empty(0, dtype=dt).element_size()
    return pattern_bytes(seed, nbytes, device).view(dt).view(num_blocks, *block_shape)


def make_buffers(spec, device) -> dict[str, Any]:
    """name -> tensor to register (already in the registered dtype/view)."""
    import torch

    out: dict[str, Any] = {}
    if spec[0] == "bufs":
        for name, nb, shape, dtype, seed, view in spec[1]:
            t = make_tensor(nb, shape, dtype, seed, device)
            out[name] = t.view(getattr(torch, view)) if view else t
    elif spec[0] == "vllm":
        _, prefix, layers, nb, seed = spec
        for i in range(layers):
            out[f"{prefix}.layers.{i}.self_attn.attn"] = make_tensor(nb, VLLM_BLOCK, "bfloat16",
                                                                     seed + 1000 * i, device)
    else:
        raise ValueError(f"bad spec {spec[0]!r}")
    return out


class Bufs:
    """Buffers of one spec in one process, with their regions and descriptor builder."""

    def __init__(self, spec, device, register):
        from nixl_connectors.vllm import layout

        self.spec = spec
        self.tensors = make_buffers(spec, device)
        if spec[0] == "vllm":
            nb = spec[3]
            self.segments = layout.segments_for(self.tensors, nb)
            self.regions = {k: register(t, whole_storage=True)
                            for k, t in layout.distinct_storages(self.tensors).items()}
        else:
            self.regions = {n: register(t) for n, t in self.tensors.items()}

    def descs(self, ids):
        from nixl_connectors.vllm import layout
        from transport import Descs

        ids = np.asarray(ids, dtype=np.int64)
        if self.spec[0] == "vllm":
            return layout.build_descs(self.segments, self.regions, ids)
        parts = []
        for name, t in self.tensors.items():
            bb = t[0].numel() * t.element_size()
            parts.append(Descs.from_blocks(self.regions[name], ids, bb))
        return Descs.concat(parts)

    def block_rows(self):
        """name -> [num_blocks, block_bytes] uint8 view (for verification)."""
        import torch

        return {n: t.reshape(t.shape[0], -1).view(torch.uint8) for n, t in self.tensors.items()}


def verify(dst: Bufs, dst_ids, src_spec, src_ids, dst_init_spec, device) -> dict:
    """Blocks dst_ids of `dst` must equal blocks src_ids of a fresh copy of `src_spec` (layer by
    layer, same order); all other blocks of `dst` must still hold their initial pattern."""
    import torch

    src = make_buffers(src_spec, device)
    init = make_buffers(dst_init_spec, device)
    d_ids = torch.as_tensor(np.asarray(dst_ids, dtype=np.int64), device=device)
    s_ids = torch.as_tensor(np.asarray(src_ids, dtype=np.int64), device=device)
    rows = dst.block_rows()
    bad, clobbered = 0, 0
    for (name, got), s, i in zip(rows.items(), src.values(), init.values()):
        s_rows = s.reshape(s.shape[0], -1).view(torch.uint8)
        i_rows = i.reshape(i.shape[0], -1).view(torch.uint8)
        moved = got.index_select(0, d_ids)
        want = s_rows.index_select(0, s_ids)
        bad += int((moved != want).any(dim=1).sum())
        mask = torch.ones(got.shape[0], dtype=torch.bool, device=device)
        mask[d_ids] = False
        clobbered += int((got[mask] != i_rows[mask]).any(dim=1).sum())
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
    return {"bad": bad, "clobbered": clobbered, "blocks": len(d_ids)}


def _child(device: str, name: str, cfg: dict, conn) -> None:
    import torch

    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(device)
        torch.zeros(1, device=device)  # CUDA context first, then UCX

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)
    from transport import Agent, AgentConfig, TransferError
    from transport import gpu_copy, gpu_direct, gpu_memcpy, gpu_runs, packing, trace

    agent = Agent(name, AgentConfig(**cfg))
    bufs: dict[str, Bufs] = {}
    peers: dict[str, Any] = {}

    def arm_die(where: str, after: int) -> None:
        """Die (SIGKILL) in the middle of the data path: in the UCX path's pack/unpack of chunk
        `after`+1, or ("kernel") right after launching the `after`+1-th fused copy kernel, while
        it still reads or writes the peer's memory."""
        # (the driver's copy of one contiguous range counts as a kernel: it reads the peer's memory too;
        # so does the direct kernel, which reads its runs from the Descs' own tables)
        targets = ([(gpu_copy, "launch"), (gpu_runs, "launch"), (gpu_direct, "launch"), (gpu_memcpy, "copy")]
                   if where == "kernel"
                   else [(packing, where)])
        count = [0]
        for mod, name in targets:
            orig = getattr(mod, name)

            def dying(*a, _orig=orig, **kw):
                count[0] += 1
                out = _orig(*a, **kw)
                if count[0] > after:
                    os.kill(os.getpid(), signal.SIGKILL)
                return out

            setattr(mod, name, dying)

    def mapped_regions(peer_name: str) -> int:
        """CUDA IPC mappings this agent holds of `peer_name`'s regions; test introspection."""
        return sum(len(s.ipc_maps) for s in agent._core.sessions.all() if s.name == peer_name)

    def expose_runs(key, offsets, lengths, writable=False, ttl=60.0):
        from transport import Descs

        b = bufs[key]
        region = next(iter(b.regions.values()))
        return agent.expose(Descs.from_ranges(region, offsets, lengths), ttl_s=ttl, writable=writable).id

    def read_runs(address, key, offsets, lengths, scratch, lease, timeout=30.0):
        import torch

        from nixl_connectors.handoff.layout_transform import ReaderRuns, reader_descs

        peer = peers.get(address) or agent.connect(address)
        peers[address] = peer
        b = bufs[key]
        region = next(iter(b.regions.values()))
        runs = ReaderRuns(np.asarray(offsets), np.asarray(lengths), np.asarray(scratch))
        scratch_t = torch.zeros(max(1, runs.scratch_bytes), dtype=torch.uint8, device=device)
        local = reader_descs(runs, region, agent.register(scratch_t))
        agent.read(peer, local, lease, timeout=timeout).wait(timeout + 10)
        return True

    def raw_block_bytes(key) -> bytes:
        t = next(iter(bufs[key].tensors.values()))
        return t.reshape(-1).view(__import__("torch").uint8).cpu().numpy().tobytes()

    def xfer(kind: str, address: str, key: str, ids, lease: str, timeout: float):
        import time

        peer = peers.get(address) or agent.connect(address)
        peers[address] = peer
        local = bufs[key].descs(ids)
        t0 = time.perf_counter()
        try:
            fn = agent.read if kind == "read" else agent.write
            fn(peer, local, lease, notify=f"{kind}-{key}".encode(), timeout=timeout).wait(timeout + 10)
        except TransferError as e:
            return {"error": type(e).__name__, "typed": True, "message": str(e),
                    "elapsed": time.perf_counter() - t0}
        except Exception as e:  # untyped failure: the test reports it
            return {"error": type(e).__name__, "typed": False, "message": str(e),
                    "elapsed": time.perf_counter() - t0}
        return {"error": None, "elapsed": time.perf_counter() - t0, "nbytes": local.nbytes}

    def traced(kind: str, address: str, key: str, ids, lease: str, timeout: float = 30.0):
        """One read or write with the transport's trace on: (its result, the points it marked)."""
        trace.enable()
        try:
            res = xfer(kind, address, key, ids, lease, timeout)
        finally:
            marks = trace.disable()
        return res, [point for _, point, _ in marks]

    handlers = {
        "alloc": lambda key, spec: (bufs.__setitem__(key, Bufs(spec, device, agent.register)), sync())[1],
        # The contract: the owner's writes are complete (synchronized above) before it exposes.
        "expose": lambda key, ids, writable=False, ttl=60.0:
            agent.expose(bufs[key].descs(ids), ttl_s=ttl, writable=writable).id,
        "read": lambda address, key, ids, lease, timeout=30.0: xfer("read", address, key, ids, lease, timeout),
        "write": lambda address, key, ids, lease, timeout=30.0: xfer("write", address, key, ids, lease, timeout),
        "verify": lambda key, ids, src_spec, src_ids: verify(bufs[key], ids, src_spec, src_ids,
                                                            bufs[key].spec, device),
        "notifications": lambda: [(p, bytes(b)) for p, b in agent.notifications()],
        "arm_die": arm_die,
        "die": lambda: os.kill(os.getpid(), signal.SIGKILL),
        "stats": lambda: agent.snapshot(),
        "freed": lambda: agent.freed_leases(),
        "release": lambda lease: agent.release(lease),
        "mapped_regions": mapped_regions,
        "device_free_bytes": lambda: int(__import__("torch").cuda.mem_get_info(device)[0]),
        "drop": lambda key: (bufs.pop(key, None), __import__("torch").cuda.empty_cache())[1],
        "expose_runs": expose_runs,
        "read_runs": read_runs,
        "raw_bytes": raw_block_bytes,
        "forget_peer": lambda address: peers.pop(address, None) and None,
        "traced": traced,
    }
    conn.send(("ready", agent.address))
    try:
        while True:
            if not conn.poll(600):
                break
            cmd, args, kw = conn.recv()
            if cmd == "stop":
                break
            try:
                conn.send(("ok", handlers[cmd](*args, **kw)))
            except Exception as e:
                conn.send(("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        agent.close()


class PeerProc:
    def __init__(self, device: str, name: str, start_timeout: float = 120.0, **cfg: Any):
        # the GPU tests run the kernel over the Descs' own pinned tables, as agents do by default;
        # test_reads_with_direct_tables_off_fill_a_slot runs the other way
        cfg.setdefault("gpu_direct_tables", True)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(device, name, cfg, child), daemon=True)
        self.proc.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self.proc.kill()
            raise TimeoutError(f"{name} on {device} did not start")
        tag, self.address = self._conn.recv()
        self.name = name

    def call(self, cmd: str, *args: Any, timeout: float = 120.0, **kw: Any) -> Any:
        self._conn.send((cmd, args, kw))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer to {cmd!r} within {timeout}s")
        tag, val = self._conn.recv()
        if tag == "err":
            raise RuntimeError(f"{self.name}.{cmd} failed: {val}")
        return val

    def send_nowait(self, cmd: str, *args: Any, **kw: Any) -> None:
        self._conn.send((cmd, args, kw))

    def result(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"{self.name}: no answer within {timeout}s")
        tag, val = self._conn.recv()
        if tag == "err":
            raise RuntimeError(f"{self.name} failed: {val}")
        return val

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self._conn.send(("stop", (), {}))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(20)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
