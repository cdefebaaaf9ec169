"""TensorRT-LLM connector, context and generation instances in two OS processes.

Each instance is the stand-in TensorRT-LLM engine (tests/trtllm_standin: rank threads, the
overlap executor loop, the connector manager) driving our UcxKvConnectorScheduler/Worker; KV
moves through the real transport (UCX over loopback). Routing is what the real request allows:
one fresh cache_salt on both legs, seen by the connector as cache_salt_id.

Every wait below is on an event from an instance, with a deadline; aborts happen at points the
test names (in the iteration that schedules the request, or at a prompt position), never by
racing a timer.
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
                 device: str = "cpu", env: dict | None = None, extra: list | None = None):
        cmd = [sys.executable, str(HERE / "trtllm_instance.py"), "--config", json.dumps(config),
               "--tp", str(tp), "--tokens-per-block", str(TPB), "--device", device] + list(extra or [])
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
    gen = make(dict({"role": "generation", "context_agents": [f"127.0.0.1:{base + r}" for r in range(tp)],
                     "timeout_s": 30.0, "connect_timeout_s": 30.0, "lookup_wait_s": 1.0,
                     "probe_timeout_s": 30.0}, **(gen_kw or {})), tp=tp, device=device, env=gen_env)
    assert ctx.ready["addresses"] == [f"127.0.0.1:{base + r}" for r in range(tp)]
    gen.ready
    return ctx, gen


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
    """One context/generation pair for the tests that leave both healthy (distinct salts).

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


def reference(prompt: list[int], max_new: int, tp: int = 1) -> list[int]:
    return fake_model.reference_generate(prompt, max_new, tp_size=tp, **SHAPE)


def assert_all_blocks_back(*insts: Instance) -> None:
    for inst in insts:
        st = inst.stats()
        assert st["free_blocks"] == inst.ready["free_blocks"], st
        assert st["pending_transfers"] == [] and st["connector_errors"] == 0, st


def run_handoff(ctx: Instance, gen: Instance, prompts: dict[int, list[int]], max_new: int,
                tp: int, rid_base: int, reference_tokens: bool = True) -> None:
    """Hand each prompt from ``ctx`` to ``gen``; check bytes, tokens and that blocks come back.

    ``reference_tokens``: compare tokens with a CPU single-instance run (GPU sums may round
    apart, so GPU runs compare the generation instance's first token with the context's).
    """
    prompts = {rid_base + rid: p for rid, p in prompts.items()}
    salts = {rid: f"nixl-rt:{uuid.uuid4().hex}" for rid in prompts}
    for rid, p in prompts.items():
        ctx.send(op="add", rid=rid, prompt=p, max_new=1, salt=salts[rid])
    ctx_done = ctx.collect("finished", len(prompts))
    for rid, p in prompts.items():
        gen.send(op="add", rid=1000 + rid, prompt=p, max_new=max_new, salt=salts[rid])
    moving = [rid for rid, p in prompts.items() if (len(p) - 1) // TPB > 0]
    loaded = gen.collect("loaded", len(moving))
    gen_done = gen.collect("finished", len(prompts))
    freed = ctx.collect("freed", len(moving))
    for rid, p in prompts.items():
        if reference_tokens:
            ref = reference(p, max_new, tp)
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
    assert_all_blocks_back(ctx, gen)


def test_handoff_moves_prompt_kv_bytes_exactly(shared):
    ctx, gen = shared
    # 1 token (nothing moves), exactly one block + 1, several blocks, a multiple of the block size
    prompts = {1: prompt_of(1, 1), 2: prompt_of(TPB + 1, 2), 3: prompt_of(23, 3), 4: prompt_of(4 * TPB, 4)}
    run_handoff(ctx, gen, prompts, max_new=5, tp=1, rid_base=0)


def test_handoff_tensor_parallel_two_ranks(instances):
    ctx, gen = pair(instances, tp=2)
    assert len(ctx.ready["addresses"]) == 2
    run_handoff(ctx, gen, {1: prompt_of(17, 5), 2: prompt_of(30, 6)}, max_new=3, tp=2, rid_base=0)


def test_requests_without_a_salt_are_computed_locally(shared):
    ctx, gen = shared
    p = prompt_of(20, 9)
    gen.send(op="add", rid=101, prompt=p, max_new=3, salt=None)
    done = gen.wait("finished", rid=101)
    assert done["loaded"] == 0 and done["tokens"] == reference(p, 3)
    ctx.send(op="add", rid=102, prompt=p, max_new=1, salt=None)
    assert ctx.wait("finished", rid=102)["held"] is False
    assert_all_blocks_back(ctx, gen)


def test_a_salt_the_context_side_never_saw_is_computed_locally(shared):
    ctx, gen = shared
    p = prompt_of(20, 11)
    gen.send(op="add", rid=201, prompt=p, max_new=2, salt="nixl-rt:never-sent")
    done = gen.wait("finished", rid=201)
    assert done["loaded"] == 0 and done["tokens"] == reference(p, 2)
    assert_all_blocks_back(gen)


def test_unread_lease_expires_and_blocks_return(instances):
    ctx = instances({"role": "context", "lease_ttl_s": 1.0})
    ctx.send(op="add", rid=1, prompt=prompt_of(20, 1), max_new=1, salt="nixl-rt:orphan")
    assert ctx.wait("finished", rid=1)["held"] is True
    ctx.wait("freed", rid=1, timeout=60.0)
    assert_all_blocks_back(ctx)


def test_context_aborted_mid_prompt_holds_nothing(shared):
    ctx, gen = shared
    p = prompt_of(60, 1)   # 15 iterations of one block each: the abort lands mid-prompt
    ctx.send(op="add", rid=301, prompt=p, max_new=1, salt="nixl-rt:aborted", abort_at_position=TPB)
    done = ctx.wait("finished", rid=301)
    assert done["held"] is False and done["tokens"] == []
    gen.send(op="add", rid=302, prompt=p, max_new=1, salt="nixl-rt:aborted")
    g = gen.wait("finished", rid=302)
    assert g["loaded"] == 0 and g["tokens"] == reference(p, 1)   # computed locally, no error
    assert_all_blocks_back(ctx, gen)


@pytest.mark.parametrize("flavour", ["main", "1.2"])
def test_generation_aborted_mid_load_frees_blocks_on_both_sides(instances, flavour):
    base = free_port_base(1)
    ctx = instances({"role": "context", "lease_ttl_s": 120.0, "listen_port_base": base})
    gen = instances({"role": "generation", "context_agents": [f"127.0.0.1:{base}"], "timeout_s": 30.0,
                     "connect_timeout_s": 30.0, "probe_timeout_s": 30.0}, extra=["--flavour", flavour])
    run_handoff(ctx, gen, {0: prompt_of(9, 3)}, max_new=1, tp=1, rid_base=0)   # connection warm
    p = prompt_of(30, 4)
    ctx.send(op="add", rid=1, prompt=p, max_new=1, salt="nixl-rt:cancel-me")
    assert ctx.wait("finished", rid=1)["held"] is True
    gen.send(op="add", rid=50, prompt=prompt_of(9, 50), max_new=40)   # keeps batches running
    # Cancelled in the very iteration that starts its load: TensorRT-LLM applies cancellations
    # while processing the previous batch, after start_load_kv and before get_finished.
    gen.send(op="add", rid=2, prompt=p, max_new=2, salt="nixl-rt:cancel-me", abort=True, when_running=50)
    done = gen.wait("finished", rid=2)
    assert done["tokens"] == [] and done["held"] is True
    gen.wait("freed", rid=2)
    ctx.wait("freed", rid=1)
    gen.wait("finished", rid=50)
    assert_all_blocks_back(ctx, gen)


def test_context_killed_before_the_pull_computes_locally_and_keeps_serving(instances):
    ctx, gen = pair(instances)
    p = prompt_of(20, 1)
    ctx.send(op="add", rid=1, prompt=p, max_new=1, salt="nixl-rt:killed")
    assert ctx.wait("finished", rid=1)["held"] is True
    ctx.kill()
    gen.send(op="add", rid=2, prompt=p, max_new=2, salt="nixl-rt:killed")
    done = gen.wait("finished", rid=2)
    assert done["loaded"] == 0 and done["tokens"] == reference(p, 2)
    q = prompt_of(13, 2)
    gen.send(op="add", rid=3, prompt=q, max_new=2, salt="nixl-rt:after-the-kill")
    assert gen.wait("finished", rid=3)["tokens"] == reference(q, 2)
    assert_all_blocks_back(gen)


@pytest.mark.parametrize("role", ["context", "generation"])
def test_block_reuse_off_is_a_clear_start_up_error(instances, role):
    cfg = {"role": role} if role == "context" else {"role": role, "context_agents": ["127.0.0.1:9"]}
    inst = instances(cfg, extra=["--no-block-reuse"])
    err = inst.wait("startup_error", timeout=120.0)
    assert "enable_block_reuse" in err["error"] and "addSequence" in err["error"]


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_handoff_between_two_gpus(instances):
    ctx, gen = pair(instances, device="cuda", ctx_env={"CUDA_VISIBLE_DEVICES": "0"},
                    gen_env={"CUDA_VISIBLE_DEVICES": "1"})
    prompts = {1: prompt_of(TPB + 1, 2), 2: prompt_of(23, 3), 3: prompt_of(64 * TPB // 4, 4)}
    run_handoff(ctx, gen, prompts, max_new=4, tp=1, rid_base=0, reference_tokens=False)


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_handoff_tensor_parallel_two_ranks(instances):
    ctx, gen = pair(instances, tp=2, device="cuda:{rank}")
    run_handoff(ctx, gen, {1: prompt_of(17, 5), 2: prompt_of(30, 6)}, max_new=3, tp=2, rid_base=0,
                reference_tokens=False)
