"""UcxConnector lifecycles with vLLM's real Scheduler/Request objects and real UCX agents.

Each engine (prefill P, decode D) runs in its own process: vLLM Scheduler + scheduler-side
UcxConnector + worker-side UcxConnector over CPU KV tensors, driven step by step from the
test. The forward pass writes deterministic bytes per (token, position, layer), so the test
can check every byte the decode side pulled.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from harness import BLOCK_SIZE, HEAD_SIZE, KV_HEADS, LAYERS, EngineProc, pattern

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.fixture
def engines(tiny_model):
    made: list[EngineProc] = []

    def make(name, **kw):
        e = EngineProc(name, tiny_model, **kw)
        made.append(e)
        return e
    yield make
    for e in made:
        e.close()


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 900, (n,), generator=g).tolist()


def prefill(P, prompt, **kw):
    rid = P.add(prompt, max_tokens=1, params={"do_remote_decode": True}, **kw)
    for _ in range(10):
        out = P.step()
        if rid in out and out[rid]["finish"] is not None:
            return out[rid]["params"]
    raise AssertionError("prefill did not finish")


def steps(P, D, pred, limit_s=60.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > limit_s:
            raise AssertionError("condition not reached")
        if D is not None:
            D.step()
        if P is not None:
            P.step()
        time.sleep(0.005)


@pytest.mark.parametrize("n_tokens", [5, 32, 75, 130])
def test_remote_prefill_then_decode(engines, n_tokens):
    P, D = engines("P"), engines("D")
    p_free = P.free_blocks()
    prompt = prompt_of(n_tokens, n_tokens)
    params = prefill(P, prompt)
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert len(params["remote_block_ids"]) == -(-n_tokens // BLOCK_SIZE)
    assert len(params["remote_lease_ids"]) == 1 and len(params["remote_agents"]) == 1
    assert params["remote_host"] and params["remote_port"]
    assert P.free_blocks() < p_free, "prefill must hold the blocks until they are read"

    rid = D.add(prompt, max_tokens=3, params=params)
    checked = False
    t0 = time.monotonic()
    while rid in D.requests():
        assert time.monotonic() - t0 < 60
        D.step()
        P.step()
        if not checked and D.requests().get(rid) == "RUNNING":
            for layer in range(LAYERS):
                got = D.read_tokens(rid, n_tokens - 1, layer)
                want = pattern(prompt, layer)[: n_tokens - 1].float().numpy()
                np.testing.assert_array_equal(got, want, err_msg=f"layer {layer}")
            checked = True
    assert checked
    outs = D.outputs_of(rid)
    assert outs[0]["external"] == n_tokens and outs[0]["local"] == 0
    assert sum(len(o["tokens"]) for o in outs) == 3 and outs[-1]["finish"] == "LENGTH"
    steps(P, None, lambda: P.free_blocks() == p_free)
    assert not P.requests()


def test_local_prefix_hit_pulls_only_the_uncached_suffix(engines):
    P, D = engines("P"), engines("D")
    prompt = prompt_of(100, 1)
    local = D.add(prompt[:70], max_tokens=1)  # D caches the first 64 tokens (2 blocks)
    steps(None, D, lambda: local not in D.requests())
    params = prefill(P, prompt)
    rid = D.add(prompt, max_tokens=2, params=params)
    checked = False
    while rid in D.requests():
        D.step()
        P.step()
        if not checked and D.requests().get(rid) == "RUNNING":
            for layer in range(LAYERS):
                got = D.read_tokens(rid, 99, layer)
                np.testing.assert_array_equal(got, pattern(prompt, layer)[:99].float().numpy())
            checked = True
    assert checked
    first = D.outputs_of(rid)[0]
    assert first["local"] == 64 and first["external"] == 36
    steps(P, None, lambda: not P.requests())
    per_block = LAYERS * 2 * BLOCK_SIZE * KV_HEADS * HEAD_SIZE * 2  # bf16
    assert sum(s["bytes_read"] for s in D.stats) == 2 * per_block, "only blocks 2 and 3 of 4 move"
    assert sum(s["leases_read"] for s in P.stats) == 1, "the whole lease is freed as read"


def test_decode_abort_before_alloc_frees_prefill_early(engines):
    P = engines("P", extra={"lease_ttl_s": 60.0, "renew_interval_s": 5.0})
    D = engines("D")
    p_free = P.free_blocks()
    prompt = prompt_of(64, 2)
    params = prefill(P, prompt)
    rid = D.add(prompt, max_tokens=1, params=params)
    D.finish(rid)  # client went away before decode scheduled it
    t0 = time.monotonic()
    steps(P, D, lambda: P.free_blocks() == p_free, limit_s=20)
    assert time.monotonic() - t0 < 20, "a dismissed lease must be freed long before its TTL"
    assert not D.requests()


def test_decode_abort_during_pull_keeps_blocks_until_settled(engines):
    P, D = engines("P"), engines("D")
    d_free = D.free_blocks()
    prompt = prompt_of(300, 3)
    params = prefill(P, prompt)
    rid = D.add(prompt, max_tokens=4, params=params)
    D.step()  # allocates and starts the pull
    assert D.requests()[rid] == "WAITING_FOR_REMOTE_KVS"
    D.finish(rid)
    assert D.free_blocks() < d_free, "blocks of an in-flight pull must not be freed at abort"
    steps(P, D, lambda: D.free_blocks() == d_free and not P.requests())
    assert not D.requests()


def test_prefill_abort_before_schedule(engines):
    P = engines("P")
    p_free = P.free_blocks()
    rid = P.add(prompt_of(64, 4), max_tokens=1, params={"do_remote_decode": True})
    P.finish(rid)
    P.step()
    assert P.free_blocks() == p_free and not P.requests() and not P.held()


def test_prefill_abort_mid_step_releases_lease(engines):
    """The engine aborts a request while the step that exposed its blocks runs."""
    P = engines("P")
    p_free = P.free_blocks()
    rid = P.add(prompt_of(64, 5), max_tokens=1, params={"do_remote_decode": True})
    P.step_abort([rid])  # the forward ran and exposed the blocks; the abort lands before its outputs
    assert P.held() == [rid]
    assert P.free_blocks() < p_free, "exposed blocks must not be freed before the lease ends"
    steps(P, None, lambda: P.free_blocks() == p_free and not P.requests())
    assert not P.held()
    assert sum(s["leases_aborted"] for s in P.stats) == 1


def test_lease_expires_without_decode(engines):
    P = engines("P", extra={"lease_ttl_s": 1.0, "renew_interval_s": 0.3})
    p_free = P.free_blocks()
    prefill(P, prompt_of(64, 6))
    t0 = time.monotonic()
    steps(P, None, lambda: P.free_blocks() == p_free, limit_s=15)
    assert time.monotonic() - t0 >= 0.5
    assert sum(s["leases_expired"] for s in P.stats) == 1


def test_waiting_decode_renews_lease(engines):
    extra = {"lease_ttl_s": 1.0, "renew_interval_s": 0.2}
    P = engines("P", extra=extra)
    D = engines("D", extra=extra, max_num_seqs=1)
    prompt = prompt_of(64, 7)
    params = prefill(P, prompt)
    busy = D.add(prompt_of(40, 8), max_tokens=10**6)  # occupies D's only slot
    D.step()
    rid = D.add(prompt, max_tokens=1, params=params)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:  # three TTLs
        D.step()
        P.step()
        time.sleep(0.02)
    assert P.requests(), "the lease must stay alive while decode renews it"
    assert sum(s["leases_expired"] for s in P.stats) == 0
    D.finish(busy)
    steps(P, D, lambda: rid not in D.requests() and not P.requests())
    assert D.outputs_of(rid)[0]["external"] == 64


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_prefill_killed_before_pull(engines, policy):
    P = engines("P")
    D = engines("D", policy=policy, extra={"timeout_s": 3.0})
    prompt = prompt_of(96, 9)
    params = prefill(P, prompt)
    P.kill()  # the prefill process dies with its agent and blocks
    d_free = D.free_blocks()
    rid = D.add(prompt, max_tokens=2, params=params)
    steps(None, D, lambda: rid not in D.requests(), limit_s=60)
    outs = D.outputs_of(rid)
    if policy == "recompute":
        assert outs[-1]["finish"] == "LENGTH"
        assert outs[0]["external"] == 0, "nothing arrived: no external hit may be counted"
        assert sum(len(o["tokens"]) for o in outs) == 2
    else:
        assert outs[-1]["finish"] == "ERROR"
    assert D.free_blocks() == d_free
    assert sum(s["read_failures"] for s in D.stats) == 1
    ok = D.add(prompt_of(20, 10), max_tokens=2)  # decode stays healthy
    steps(None, D, lambda: ok not in D.requests())
    assert D.outputs_of(ok)[-1]["finish"] == "LENGTH"


def test_stats_count_bytes_and_reads(engines):
    P, D = engines("P"), engines("D")
    prompt = prompt_of(64, 11)
    params = prefill(P, prompt)
    rid = D.add(prompt, max_tokens=1, params=params)
    steps(P, D, lambda: rid not in D.requests() and not P.requests())
    per_block = LAYERS * 2 * BLOCK_SIZE * KV_HEADS * HEAD_SIZE * 2  # bf16
    assert sum(s["reads"] for s in D.stats) == 1
    assert sum(s["bytes_read"] for s in D.stats) == 2 * per_block
    assert sum(s["transfer_seconds"] for s in D.stats) > 0
    assert sum(s["read_failures"] for s in D.stats) == 0
    assert sum(s["leases_exposed"] for s in P.stats) == 1
    assert sum(s["leases_read"] for s in P.stats) == 1


# ----------------------------------------------------------------------------- synchronous loads
SYNC = {"sync_load_max_tokens": 512}


@pytest.mark.parametrize("n_tokens", [5, 75])
def test_sync_load_decodes_in_the_step_it_is_scheduled(engines, n_tokens):
    """sync_load_max_tokens: the pull runs inside the forward of the step that schedules the
    request (vLLM load_kv_async=False), so its first token comes out of that same step; the last
    prompt token is computed locally, every other token's KV is the prefill's."""
    P, D = engines("P"), engines("D", extra=SYNC)
    p_free = P.free_blocks()
    prompt = prompt_of(n_tokens, 100 + n_tokens)
    params = prefill(P, prompt)
    rid = D.add(prompt, max_tokens=3, params=params)
    D.step()
    assert D.requests().get(rid) == "RUNNING"
    for layer in range(LAYERS):
        got = D.read_tokens(rid, n_tokens - 1, layer)
        np.testing.assert_array_equal(got, pattern(prompt, layer)[: n_tokens - 1].float().numpy(),
                                      err_msg=f"layer {layer}")
    first = D.outputs_of(rid)[0]
    assert len(first["tokens"]) == 1, "the first token comes out of the step that scheduled the request"
    assert first["external"] == n_tokens - 1 and first["local"] == 0
    steps(P, D, lambda: rid not in D.requests())
    outs = D.outputs_of(rid)
    assert sum(len(o["tokens"]) for o in outs) == 3 and outs[-1]["finish"] == "LENGTH"
    steps(P, None, lambda: P.free_blocks() == p_free)
    assert sum(s["reads"] for s in D.stats) == 1 and sum(s["read_failures"] for s in D.stats) == 0


def test_sync_and_async_loads_give_the_same_tokens(engines):
    P, Da, Ds = engines("P"), engines("Da"), engines("Ds", extra=SYNC)
    prompt = prompt_of(90, 77)
    toks = []
    for D in (Da, Ds):
        params = prefill(P, prompt)
        rid = D.add(prompt, max_tokens=4, params=params)
        steps(P, D, lambda: rid not in D.requests())
        toks.append([t for o in D.outputs_of(rid) for t in o["tokens"]])
    assert toks[0] == toks[1] and len(toks[0]) == 4


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_sync_load_of_a_dead_prefill_goes_to_the_failure_policy(engines, policy):
    P = engines("P")
    D = engines("D", policy=policy, extra={"timeout_s": 3.0, **SYNC})
    prompt = prompt_of(96, 19)
    params = prefill(P, prompt)
    P.kill()
    d_free = D.free_blocks()
    rid = D.add(prompt, max_tokens=2, params=params)
    steps(None, D, lambda: rid not in D.requests(), limit_s=60)
    outs = D.outputs_of(rid)
    if policy == "recompute":
        assert outs[-1]["finish"] == "LENGTH" and sum(len(o["tokens"]) for o in outs) == 2
    else:
        assert outs[-1]["finish"] == "ERROR"
    assert D.free_blocks() == d_free
    assert sum(s["read_failures"] for s in D.stats) == 1
    ok = D.add(prompt_of(20, 10), max_tokens=2)
    steps(None, D, lambda: ok not in D.requests())
    assert D.outputs_of(ok)[-1]["finish"] == "LENGTH"


def test_sync_load_pulls_only_the_uncached_suffix(engines):
    P, D = engines("P"), engines("D", extra=SYNC)
    prompt = prompt_of(100, 3)
    local = D.add(prompt[:70], max_tokens=1)
    steps(None, D, lambda: local not in D.requests())
    params = prefill(P, prompt)
    rid = D.add(prompt, max_tokens=2, params=params)
    steps(P, D, lambda: rid not in D.requests() and not P.requests())
    first = D.outputs_of(rid)[0]
    assert first["local"] == 64 and first["external"] == 35
    per_block = LAYERS * 2 * BLOCK_SIZE * KV_HEADS * HEAD_SIZE * 2  # bf16
    assert sum(s["bytes_read"] for s in D.stats) == 2 * per_block, "only blocks 2 and 3 of 4 move"
