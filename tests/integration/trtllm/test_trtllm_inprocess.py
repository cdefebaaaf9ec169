"""Context and generation stand-in engines in one process (real transport, real UCX).

Targets paths that are awkward to time across processes: a load failure raised from
``get_finished`` must not swallow another request's completed load in the same call.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]

from trtllm_standin import fake_model, install  # noqa: E402

API = install.ensure()

from nixl_connectors.trtllm.config import CONFIG_ENV  # noqa: E402
from nixl_connectors.trtllm.worker import KvLoadError  # noqa: E402
from trtllm_standin.executor import (KvCacheConfig, KvCacheConnectorConfig, LlmArgs,  # noqa: E402
                                     ModelShape, StandinExecutor)
from trtllm_standin.llm_request import LlmRequest  # noqa: E402

TPB = 4
CC = KvCacheConnectorConfig("nixl_connectors.trtllm.connector", "UcxKvConnectorScheduler",
                            "UcxKvConnectorWorker")


def engine(monkeypatch, cfg: dict) -> StandinExecutor:
    monkeypatch.setenv(CONFIG_ENV, json.dumps(cfg))
    return StandinExecutor(LlmArgs("m", CC, kv_cache_config=KvCacheConfig(tokens_per_block=TPB)),
                           ModelShape(), API)


@pytest.fixture
def pair(monkeypatch):
    ctx = engine(monkeypatch, {"role": "context", "lease_ttl_s": 120})
    gen = engine(monkeypatch, {"role": "generation", "context_agents": [ctx.workers[0].address],
                               "unknown_grace_s": 0.5, "lookup_timeout_s": 30, "connect_timeout_s": 15})
    yield ctx, gen
    gen.close()
    ctx.close()


def test_failed_load_does_not_swallow_a_completed_one(pair):
    ctx, gen = pair
    good = [(i * 31) % 1000 + 3 for i in range(21)]
    ctx.add_request(LlmRequest(1, good, 1, cache_salt="nixl-rt:ctx:good"))
    ctx.run(until=lambda: 1 in ctx.finished)
    gen.add_request(LlmRequest(10, good, 3, cache_salt="nixl-rt:gen:good"))
    gen.add_request(LlmRequest(11, list(range(30)), 3, cache_salt="nixl-rt:gen:missing"))
    errors: list[KvLoadError] = []
    deadline = time.monotonic() + 90
    while (gen.busy() or ctx.busy()) and time.monotonic() < deadline:
        ctx.step()
        try:
            gen.step()
        except KvLoadError as e:
            errors.append(e)
            for rid in e.request_ids:        # the engine gives up on the failed request
                gen.loading.pop(rid, None)
                gen._free(rid)
        time.sleep(0.001)
    assert not gen.busy() and not ctx.busy(), "hand-off did not settle"
    assert [e.request_ids for e in errors] == [[11]]
    assert "does not know" in errors[0].reasons[11]
    assert gen.finished[10] == fake_model.reference_generate(
        good, 3, num_layers=2, kv_factor=2, num_kv_heads=2, head_dim=8, tokens_per_block=TPB,
        tp_size=1, dtype=ModelShape().dtype)
    assert gen.loaded_tokens[10] == 20
    assert len(gen.free_blocks) == ModelShape().num_blocks
    assert len(ctx.free_blocks) == ModelShape().num_blocks


def _run(ctx: StandinExecutor, gen: StandinExecutor, errors: list, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while (gen.busy() or ctx.busy()) and time.monotonic() < deadline:
        ctx.step()
        try:
            gen.step()
        except KvLoadError as e:
            errors.append(e)
            for rid in e.request_ids:
                gen.loading.pop(rid, None)
                gen._free(rid)
        time.sleep(0.001)
    assert not gen.busy(), "generation side did not settle"


@pytest.mark.parametrize("gen_key,ok", [("s3cret", True), ("wrong", False)])
def test_authenticated_agents(monkeypatch, gen_key, ok):
    monkeypatch.setenv("CTX_KEY", "s3cret")
    monkeypatch.setenv("GEN_KEY", gen_key)
    # An unread lease (wrong key) should expire quickly; a readable one must outlive a busy machine.
    ctx = engine(monkeypatch, {"role": "context", "auth_key_env": "CTX_KEY", "lease_ttl_s": 120 if ok else 2})
    gen = engine(monkeypatch, {"role": "generation", "auth_key_env": "GEN_KEY",
                               "context_agents": [ctx.workers[0].address], "lookup_timeout_s": 20,
                               "connect_timeout_s": 8})   # generous: a loaded CI machine is slow
    try:
        p = [(i * 17) % 500 + 1 for i in range(13)]
        ctx.add_request(LlmRequest(1, p, 1, cache_salt="nixl-rt:ctx:auth"))
        ctx.run(until=lambda: 1 in ctx.finished)
        gen.add_request(LlmRequest(2, p, 2, cache_salt="nixl-rt:gen:auth"))
        errors: list = []
        _run(ctx, gen, errors)
        if ok:
            assert not errors and gen.loaded_tokens[2] == 12 and gen.finished[2]
        else:
            assert [e.request_ids for e in errors] == [[2]]
            # The transport should reject the handshake (Unauthorized); on a busy machine it was
            # seen to let the client's handshake time out instead. Either way: a load error, no hang.
            reason = errors[0].reasons[2]
            assert "Unauthorized" in reason or "TransferTimeout" in reason, reason
            # nobody read the lease: it expires and the context side gets its blocks back
            deadline = time.monotonic() + 60
            while ctx.saving and time.monotonic() < deadline:
                ctx.step()
                time.sleep(0.005)
            assert not ctx.saving
        assert len(ctx.free_blocks) == ModelShape().num_blocks
        assert len(gen.free_blocks) == ModelShape().num_blocks
    finally:
        gen.close()
        ctx.close()


def test_incompatible_layout_fails_the_load(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"role": "context", "lease_ttl_s": 1}))
    ctx = StandinExecutor(LlmArgs("m", CC, kv_cache_config=KvCacheConfig(tokens_per_block=4)),
                          ModelShape(), API)
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"role": "generation",
                                               "context_agents": [ctx.workers[0].address],
                                               "lookup_timeout_s": 20, "connect_timeout_s": 8}))
    gen = StandinExecutor(LlmArgs("m", CC, kv_cache_config=KvCacheConfig(tokens_per_block=8)),
                          ModelShape(), API)
    try:
        p = list(range(1, 40))
        ctx.add_request(LlmRequest(1, p, 1, cache_salt="nixl-rt:ctx:layout"))
        ctx.run(until=lambda: 1 in ctx.finished)
        gen.add_request(LlmRequest(2, p, 2, cache_salt="nixl-rt:gen:layout"))
        errors: list = []
        _run(ctx, gen, errors)
        assert [e.request_ids for e in errors] == [[2]]
        assert "CompatMismatch" in errors[0].reasons[2], errors[0].reasons[2]
        assert len(gen.free_blocks) == ModelShape().num_blocks
    finally:
        gen.close()
        ctx.close()
