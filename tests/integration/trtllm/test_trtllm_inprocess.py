"""Context and generation stand-in engines in one process (real transport, real UCX).

For paths that need a point the test controls inside an iteration (the context instance gone
between the claim and the pull), and for configuration mismatches.
"""
from __future__ import annotations

import json
import time

import pytest

from trtllm_standin import fake_model, install

API = install.ensure()

from nixl_connectors.trtllm import directory as d  # noqa: E402
from nixl_connectors.trtllm.config import CONFIG_ENV  # noqa: E402
from nixl_connectors.trtllm.routing import salt_key  # noqa: E402
from trtllm_standin.llm_request import cache_salt_id  # noqa: E402
from trtllm_standin.instance import (KvCacheConfig, KvCacheConnectorConfig, LlmArgs,  # noqa: E402
                                     ModelShape, StandinExecutor)
from trtllm_standin.manager import Flavour  # noqa: E402

TPB = 4
CC = KvCacheConnectorConfig("nixl_connectors.trtllm.connector", "UcxKvConnectorScheduler",
                            "UcxKvConnectorWorker")
DEADLINE_S = 90.0


def engine(monkeypatch, cfg: dict, tpb: int = TPB, flavour: Flavour = Flavour.MAIN, tp: int = 1,
           shape: ModelShape | None = None, **kw) -> StandinExecutor:
    monkeypatch.setenv(CONFIG_ENV, json.dumps(cfg))
    return StandinExecutor(LlmArgs("m", CC, tensor_parallel_size=tp,
                                   kv_cache_config=KvCacheConfig(tokens_per_block=tpb)),
                           shape or ModelShape(), API, flavour=flavour, **kw)


def gen_cfg(ctx: StandinExecutor, **kw) -> dict:
    return dict({"role": "generation", "context_agents": [w.address for w in ctx.workers],
                 "connect_timeout_s": 8, "probe_timeout_s": 20}, **kw)


def drive(*engines: StandinExecutor, until=None, seconds: float = DEADLINE_S) -> None:
    """Step every engine until ``until()`` (default: none busy), within a deadline."""
    deadline = time.monotonic() + seconds
    while not (until() if until is not None else not any(e.busy() for e in engines)):
        assert time.monotonic() < deadline, "engines did not settle"
        for e in engines:
            e.step()


def reference(prompt, n, tpb=TPB, tp=1):
    return fake_model.reference_generate(prompt, n, num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8,
                                         tokens_per_block=tpb, tp_size=tp, dtype=ModelShape().dtype)


P = [(i * 31) % 1000 + 3 for i in range(21)]


@pytest.mark.parametrize("gen_key,ok", [("s3cret", True), ("wrong", False)])
def test_authenticated_agents(monkeypatch, gen_key, ok):
    monkeypatch.setenv("CTX_KEY", "s3cret")
    monkeypatch.setenv("GEN_KEY", gen_key)
    ctx = engine(monkeypatch, {"role": "context", "auth_key_env": "CTX_KEY", "lease_ttl_s": 120 if ok else 2})
    gen = engine(monkeypatch, gen_cfg(ctx, auth_key_env="GEN_KEY"))
    try:
        ctx.add_request(1, P, 1, salt="auth")
        drive(ctx, until=lambda: 1 in ctx.finished)
        gen.add_request(2, P, 2, salt="auth")
        drive(ctx, gen)
        assert gen.finished[2] == reference(P, 2)
        assert gen.loaded_tokens[2] == (20 if ok else 0)   # wrong key: computed locally, no hang
        assert ctx.free_blocks() == gen.free_blocks() == ModelShape().num_blocks
    finally:
        gen.close()
        ctx.close()


def test_incompatible_layout_computes_locally(monkeypatch):
    ctx = engine(monkeypatch, {"role": "context", "lease_ttl_s": 1}, tpb=4)
    gen = engine(monkeypatch, gen_cfg(ctx), tpb=8)
    try:
        p = list(range(1, 40))
        ctx.add_request(1, p, 1, salt="layout")
        drive(ctx, until=lambda: 1 in ctx.finished)
        gen.add_request(2, p, 2, salt="layout")
        drive(ctx, gen)
        assert gen.loaded_tokens[2] == 0 and gen.finished[2] == reference(p, 2, tpb=8)
        assert gen.free_blocks() == ModelShape().num_blocks
    finally:
        gen.close()
        ctx.close()


@pytest.mark.parametrize("flavour", [Flavour.MAIN, Flavour.V1_2])
def test_lease_gone_after_the_claim_parks_the_request_and_the_engine_keeps_serving(monkeypatch, flavour):
    ctx = engine(monkeypatch, {"role": "context", "lease_ttl_s": 120})
    key = salt_key(cache_salt_id("doomed"))
    gone = {}

    def drop_lease(rex) -> None:   # after the claim (prepare_resources), before start_load_kv
        if 7 in rex.active and not gone:
            answer = d.decode(ctx.workers[0]._directory.on_call("test", d.encode(d.Lookup(key))))
            gone["lease"] = answer.lease_id
            assert ctx.workers[0].agent.release(answer.lease_id)   # the context side lost it

    gen = engine(monkeypatch, gen_cfg(ctx), flavour=flavour, hooks={"after_prepare_resources": drop_lease})
    try:
        ctx.add_request(1, P, 1, salt="doomed")
        drive(ctx, until=lambda: 1 in ctx.finished)
        gen.add_request(5, list(range(1, 9)), 200)             # an unrelated request keeps running
        gen.step()
        gen.add_request(7, P, 3, salt="doomed")
        drive(ctx, gen, until=lambda: gen.workers[0].failed_pulls == 1)
        assert gone and 7 not in gen.finished                  # parked: no garbage decoded, no crash
        q = list(range(100, 113))
        gen.add_request(8, q, 2)                               # the engine keeps serving
        drive(ctx, gen, until=lambda: 8 in gen.finished)
        assert gen.finished[8] == reference(q, 2) and 5 in gen.rank0.active
        gen.abort(7)                                           # the client gives up
        drive(ctx, gen, until=lambda: 7 in gen.finished and 7 not in gen.rank0.held
              and 7 not in gen.rank0.deferred)
        assert not gen.rank0.manager.has_pending_transfers(7) and 7 not in gen.rank0.kv.blocks
        gen.abort(5)
        drive(ctx, gen)
        assert gen.free_blocks() == ctx.free_blocks() == ModelShape().num_blocks
        assert gen.workers[0].connector_errors == 0
    finally:
        gen.close()
        ctx.close()


@pytest.mark.parametrize("flavour,setting", [(Flavour.MAIN, None), (Flavour.V1_2, 8)])
def test_tokens_per_block_of_the_real_pool(monkeypatch, flavour, setting):
    """The attention backend overrides tokens_per_block (8, llm_args say 4): current TensorRT-LLM
    writes it back to kv_cache_config; for 1.2 the connector setting names it."""
    extra = {} if setting is None else {"tokens_per_block": setting}
    shape = ModelShape(backend_tokens_per_block=8)
    ctx = engine(monkeypatch, dict({"role": "context", "lease_ttl_s": 120}, **extra), flavour=flavour,
                 shape=shape)
    gen = engine(monkeypatch, dict(gen_cfg(ctx), **extra), flavour=flavour, shape=shape)
    try:
        assert ctx.workers[0].tokens_per_block == gen.workers[0].tokens_per_block == 8
        ctx.add_request(1, P, 1, salt="tpb")
        drive(ctx, until=lambda: 1 in ctx.finished)
        gen.add_request(2, P, 3, salt="tpb")
        drive(ctx, gen)
        assert gen.loaded_tokens[2] == 16 and gen.finished[2] == reference(P, 3, tpb=8)
    finally:
        gen.close()
        ctx.close()


def test_a_connector_bug_on_one_rank_does_not_stop_the_engine_or_split_the_ranks(monkeypatch):
    ctx = engine(monkeypatch, {"role": "context", "lease_ttl_s": 120}, tp=2)
    gen = engine(monkeypatch, gen_cfg(ctx), tp=2, step_timeout_s=60)
    try:
        ctx.add_request(1, P, 1, salt="bug")
        drive(ctx, until=lambda: 1 in ctx.finished)
        broken = gen.workers[1]
        real = broken._gen.advance
        calls = {"n": 0}

        def flaky() -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("connector bug")
            real()

        monkeypatch.setattr(broken._gen, "advance", flaky)
        gen.add_request(2, P, 2, salt="bug")
        drive(ctx, gen)
        assert broken.connector_errors == 1
        assert gen.finished[2] == reference(P, 2, tp=2) and gen.loaded_tokens[2] == 20
        assert gen.free_blocks(0) == gen.free_blocks(1) == ModelShape().num_blocks
    finally:
        gen.close()
        ctx.close()
