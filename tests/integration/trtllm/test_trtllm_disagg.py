"""TensorRT-LLM connector, context and generation instances in two OS processes.

Each instance is the TensorRT-LLM 1.2 stand-in executor (tests/trtllm_standin) driving our
UcxKvConnectorScheduler/Worker; KV moves through the real transport (UCX over loopback).
With TensorRT-LLM installed, the connector subclasses its real base classes instead.
"""
from __future__ import annotations

import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
REPO = TESTS.parent

from trtllm_standin import fake_model  # noqa: E402

import torch  # noqa: E402

TPB = 4
SHAPE = dict(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, tokens_per_block=TPB,
             dtype=torch.float16)
DEADLINE_S = 90.0   # per awaited event; only a hang or a very busy machine gets near it


class Instance:
    """A child process running trtllm_instance.py; events arrive on a queue."""

    def __init__(self, config: dict, tp: int = 1, context_chunk: int | None = None,
                 device: str = "cpu", env: dict | None = None):
        cmd = [sys.executable, str(HERE / "trtllm_instance.py"), "--config", json.dumps(config),
               "--tp", str(tp), "--tokens-per-block", str(TPB), "--device", device]
        if context_chunk:
            cmd += ["--context-chunk", str(context_chunk)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]),
                   **(env or {}))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.stderr: list[str] = []
        self.backlog: list[dict] = []
        self._ready: dict | None = None
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    @property
    def ready(self) -> dict:
        if self._ready is None:
            self._ready = self.wait("ready", timeout=120.0)   # imports + UCX start, on a busy machine
        return self._ready

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put({"ev": "exited"})

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self, ev: str, timeout: float = DEADLINE_S, **match) -> dict:
        """Next event named ``ev`` (with ``match``ing fields); other events stay queued."""
        def hit(e: dict) -> bool:
            return e["ev"] == ev and all(e.get(k) == v for k, v in match.items())

        for i, e in enumerate(self.backlog):
            if hit(e):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {ev} {match} within {timeout}s; stderr:\n{''.join(self.stderr[-40:])}")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if hit(e):
                return e
            if e["ev"] == "exited":
                self.events.put(e)
                raise AssertionError(f"instance exited waiting for {ev}; stderr:\n{''.join(self.stderr[-40:])}")
            self.backlog.append(e)

    def collect(self, ev: str, n: int, timeout: float = DEADLINE_S) -> dict:
        out = {}
        for _ in range(n):
            e = self.wait(ev, timeout)
            out[e["rid"]] = e
        return out

    def stats(self) -> dict:
        self.send(op="stats")
        return self.wait("stats")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(5)
            except Exception:  # noqa: BLE001 - slow shutdown: not what these tests check
                self.proc.kill()
                self.proc.wait(10)


def free_port_base(n: int) -> int:
    """A base port with ``n`` consecutive ports free right now."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def pair(make, tp: int = 1, ctx_kw: dict | None = None, gen_kw: dict | None = None,
         context_chunk: int | None = None, device: str = "cpu", ctx_env: dict | None = None,
         gen_env: dict | None = None) -> tuple[Instance, Instance]:
    """Start a context and a generation instance at once (fixed context ports)."""
    base = free_port_base(tp)
    ctx = make(dict({"role": "context", "lease_ttl_s": 120.0, "listen_port_base": base},
                    **(ctx_kw or {})), tp=tp, context_chunk=context_chunk, device=device, env=ctx_env)
    gen = make(dict({"role": "generation",
                     "context_agents": [f"127.0.0.1:{base + r}" for r in range(tp)],
                     "lookup_timeout_s": 30.0, "unknown_grace_s": 1.0, "transfer_timeout_s": 30.0,
                     "connect_timeout_s": 5.0}, **(gen_kw or {})), tp=tp, device=device, env=gen_env)
    assert ctx.ready["addresses"] == [f"127.0.0.1:{base + r}" for r in range(tp)]
    gen.ready
    return ctx, gen


def salt(leg: str, key: str) -> str:
    return f"nixl-rt:{leg}:{key}"


def _factory():
    made: list[Instance] = []

    def make(*a, **kw) -> Instance:
        inst = Instance(*a, **kw)
        made.append(inst)
        return inst

    return made, make


@pytest.fixture
def instances():
    made, make = _factory()
    yield make
    for inst in made:
        inst.close()


@pytest.fixture(scope="module")
def shared():
    """One context/generation pair for the tests that leave both healthy (distinct routing ids).

    The context instance computes prompts in chunks of one block, so a prompt's blocks reach
    the connector over several iterations.
    """
    made, make = _factory()
    try:
        yield pair(make, context_chunk=TPB)
    finally:
        for inst in made:
            inst.close()


def prompt_of(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 30000 + 1 for i in range(n)]


def run_handoff(ctx: Instance, gen: Instance, prompts: dict[int, list[int]], max_new: int,
                tp: int, rid_base: int, reference: bool = True) -> None:
    """Hand each prompt from ``ctx`` to ``gen``; check bytes, tokens and that blocks come back.

    ``reference``: compare tokens with a CPU single-instance run (GPU sums may round apart, so
    GPU runs compare the generation instance's first token with the context instance's).
    """
    prompts = {rid_base + rid: p for rid, p in prompts.items()}
    keys = {rid: uuid.uuid4().hex for rid in prompts}
    for rid, p in prompts.items():
        ctx.send(op="add", rid=rid, prompt=p, max_new=1, salt=salt("ctx", keys[rid]))
    ctx_done = ctx.collect("finished", len(prompts))
    for rid, p in prompts.items():
        gen.send(op="add", rid=1000 + rid, prompt=p, max_new=max_new, salt=salt("gen", keys[rid]))
    moving = [rid for rid, p in prompts.items() if (len(p) - 1) // TPB > 0]
    loaded = gen.collect("loaded", len(moving))
    gen_done = gen.collect("finished", len(prompts))
    freed = ctx.collect("freed", len(moving))
    for rid, p in prompts.items():
        if reference:
            ref = fake_model.reference_generate(p, max_new, tp_size=tp, **SHAPE)
            assert ctx_done[rid]["tokens"] == ref[:1]
            assert gen_done[1000 + rid]["tokens"] == ref, f"request {rid}: generation differs from reference"
        else:
            assert gen_done[1000 + rid]["tokens"][:1] == ctx_done[rid]["tokens"]
        n = (len(p) - 1) // TPB * TPB
        assert gen_done[1000 + rid]["loaded"] == n
        if n:
            assert ctx_done[rid]["held"] is True
            assert loaded[1000 + rid]["bytes_equal"] is True
            assert loaded[1000 + rid]["tokens"] == n
            assert rid in freed
    assert ctx.stats()["free_blocks"] == ctx.ready["free_blocks"]
    assert gen.stats()["free_blocks"] == gen.ready["free_blocks"]


def test_handoff_moves_prompt_kv_bytes_exactly(shared):
    ctx, gen = shared
    # 1 token (nothing moves), exactly one block + 1, several blocks, a multiple of the block size
    prompts = {1: prompt_of(1, 1), 2: prompt_of(TPB + 1, 2), 3: prompt_of(23, 3), 4: prompt_of(4 * TPB, 4)}
    run_handoff(ctx, gen, prompts, max_new=5, tp=1, rid_base=0)


def test_handoff_tensor_parallel_two_ranks(instances):
    ctx, gen = pair(instances, tp=2)
    assert len(ctx.ready["addresses"]) == 2
    run_handoff(ctx, gen, {1: prompt_of(17, 5), 2: prompt_of(30, 6)}, max_new=3, tp=2, rid_base=0)


def test_request_without_routing_id_is_computed_locally(shared):
    ctx, gen = shared
    p = prompt_of(20, 9)
    gen.send(op="add", rid=101, prompt=p, max_new=3, salt=None)
    done = gen.wait("finished", rid=101)
    assert done["loaded"] == 0
    assert done["tokens"] == fake_model.reference_generate(p, 3, tp_size=1, **SHAPE)
    ctx.send(op="add", rid=102, prompt=p, max_new=1, salt="user-salt")
    assert ctx.wait("finished", rid=102)["held"] is False


def test_unread_lease_expires_and_blocks_return(instances):
    ctx = instances({"role": "context", "lease_ttl_s": 1.0})
    ctx.send(op="add", rid=1, prompt=prompt_of(20, 1), max_new=1, salt=salt("ctx", "orphan"))
    assert ctx.wait("finished", rid=1)["held"] is True
    t0 = time.monotonic()
    ctx.wait("freed", rid=1, timeout=60.0)
    assert time.monotonic() - t0 < 45.0
    assert ctx.stats()["free_blocks"] == ctx.ready["free_blocks"]


def test_unknown_routing_id_fails_the_load_without_hanging(shared):
    ctx, gen = shared
    gen.send(op="add", rid=201, prompt=prompt_of(20, 1), max_new=2, salt=salt("gen", "never-sent"))
    t0 = time.monotonic()
    err = gen.wait("load_error", rid=201, timeout=60.0)
    assert "does not know" in err["reason"]
    assert time.monotonic() - t0 < 45.0
    assert gen.stats()["free_blocks"] == gen.ready["free_blocks"]


def test_context_aborted_mid_prompt_holds_nothing(shared):
    ctx, gen = shared
    ctx.send(op="add", rid=301, prompt=prompt_of(60, 1), max_new=1, salt=salt("ctx", "aborted"))
    ctx.send(op="abort_after", rid=301, steps=3)
    done = ctx.wait("finished", rid=301)
    assert done["held"] is False and done["tokens"] == []
    assert ctx.stats()["free_blocks"] == ctx.ready["free_blocks"]
    gen.send(op="add", rid=302, prompt=prompt_of(60, 1), max_new=1, salt=salt("gen", "aborted"))
    gen.wait("load_error", rid=302, timeout=60.0)
    assert gen.stats()["free_blocks"] == gen.ready["free_blocks"]


def test_generation_aborted_while_loading_keeps_blocks_until_the_pull_settles(shared):
    ctx, gen = shared
    # The context side never heard of this id, so the lookup keeps retrying (unknown_grace_s=1)
    # while the request is cancelled.
    gen.send(op="add", rid=401, prompt=prompt_of(30, 4), max_new=2, salt=salt("gen", "cancel-me"))
    gen.send(op="abort_after", rid=401, steps=2)
    done = gen.wait("finished", rid=401)
    assert done["held"] is True and done["tokens"] == []
    gen.wait("freed", rid=401)
    assert gen.stats()["free_blocks"] == gen.ready["free_blocks"]


def test_context_killed_before_pull_fails_the_load_without_hanging(instances):
    ctx, gen = pair(instances)
    p = prompt_of(20, 1)
    ctx.send(op="add", rid=1, prompt=p, max_new=1, salt=salt("ctx", "killed"))
    assert ctx.wait("finished", rid=1)["held"] is True
    ctx.kill()
    t0 = time.monotonic()
    gen.send(op="add", rid=2, prompt=p, max_new=2, salt=salt("gen", "killed"))
    gen.wait("load_error", rid=2, timeout=60.0)
    assert time.monotonic() - t0 < 45.0
    assert gen.stats()["free_blocks"] == gen.ready["free_blocks"]


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_handoff_between_two_gpus(instances):
    ctx, gen = pair(instances, device="cuda", ctx_env={"CUDA_VISIBLE_DEVICES": "0"},
                    gen_env={"CUDA_VISIBLE_DEVICES": "1"})
    prompts = {1: prompt_of(TPB + 1, 2), 2: prompt_of(23, 3), 3: prompt_of(64 * TPB // 4, 4)}
    run_handoff(ctx, gen, prompts, max_new=4, tp=1, rid_base=0, reference=False)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_handoff_tensor_parallel_two_ranks(instances):
    ctx, gen = pair(instances, tp=2, device="cuda:{rank}")
    run_handoff(ctx, gen, {1: prompt_of(17, 5), 2: prompt_of(30, 6)}, max_new=3, tp=2, rid_base=0,
                reference=False)
