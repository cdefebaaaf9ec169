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

import uuid

import pytest
import torch

from trtllm_procs import TPB, Instance, factory, free_port_base, pair
from trtllm_standin import fake_model

SHAPE = dict(num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, tokens_per_block=TPB,
             dtype=torch.float16)


@pytest.fixture
def instances():
    made, make = factory()
    yield make
    for inst in made:
        inst.close()


@pytest.fixture(scope="module")
def shared():
    """One context/generation pair for the tests that leave both healthy (distinct salts).

    The context instance computes prompts in chunks of one block, so a prompt's blocks reach
    the connector over several iterations.
    """
    made, make = factory()
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


def test_context_killed_mid_hand_off_parks_the_request_and_the_engine_keeps_serving(instances):
    base = free_port_base(1)
    ctx = instances({"role": "context", "lease_ttl_s": 120.0, "listen_port_base": base})
    gen = instances({"role": "generation", "context_agents": [f"127.0.0.1:{base}"], "timeout_s": 10.0,
                     "connect_timeout_s": 30.0, "probe_timeout_s": 30.0})
    run_handoff(ctx, gen, {0: prompt_of(9, 3)}, max_new=1, tp=1, rid_base=0)   # connection warm
    p = prompt_of(30, 7)
    ctx.send(op="add", rid=1, prompt=p, max_new=1, salt="nixl-rt:dies")
    assert ctx.wait("finished", rid=1)["held"] is True
    gen.send(op="kill_on_claim", rid=2, pid=ctx.proc.pid)   # dies after the claim, before the pull
    gen.send(op="add", rid=2, prompt=p, max_new=2, salt="nixl-rt:dies")
    gen.wait("load_failed")                                  # no hang, no crash, nothing decoded
    q = prompt_of(11, 8)
    gen.send(op="add", rid=3, prompt=q, max_new=2)
    assert gen.wait("finished", rid=3)["tokens"] == reference(q, 2)   # the engine keeps serving
    # The client gives up on request 2. TensorRT-LLM applies a cancellation with the next batch,
    # so another request comes along; the blocks come back once the connector let go.
    gen.send(op="abort", rid=2)
    gen.send(op="add", rid=6, prompt=prompt_of(5, 9), max_new=4)
    assert gen.wait("finished", rid=2)["tokens"] == []
    gen.wait("freed", rid=2)
    gen.wait("finished", rid=6)
    assert gen.stats()["failed_pulls"] == 1
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
