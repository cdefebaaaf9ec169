"""End to end: real vLLM CPU servers (vllm-cpu 0.32) exchanging KV through UcxConnector.

A prefill server and two decode servers (policy `recompute` and `fail`) run the tiny local
Llama; requests follow the proxy flow (examples/vllm/proxy.py). Checks: the decode outputs
equal a single engine's greedy tokens exactly, for prompts of several lengths; the decode
server counts external prefix-cache hits for every prompt token (the KV really arrived);
and a prefill killed before decode pulls makes decode recompute or fail cleanly, staying
healthy.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch


def _load_vllm_proxy():
    """examples/vllm/proxy.py under a unique module name (examples/trtllm has a proxy.py too)."""
    path = Path(__file__).resolve().parents[3] / "examples" / "vllm" / "proxy.py"
    spec = importlib.util.spec_from_file_location("vllm_example_proxy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vllm_example_proxy"] = module
    spec.loader.exec_module(module)
    return module


_proxy = _load_vllm_proxy()
disagg_completion, post_json, prefill_request = _proxy.disagg_completion, _proxy.post_json, _proxy.prefill_request

pytestmark = [pytest.mark.vllm, pytest.mark.e2e, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[3]
LENGTHS = [7, 32, 33, 75, 130]
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, model: str, core: int, policy: str, log_dir: Path,
                 extra: dict | None = None):
        self.name, self.port = name, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ktc = {"kv_connector": "UcxConnector", "kv_role": "kv_both",
               "kv_load_failure_policy": policy,
               "kv_connector_extra_config": extra or {}}
        from importlib.metadata import entry_points
        if not any(ep.name == "ucx_connector" for ep in entry_points(group="vllm.general_plugins")):
            ktc["kv_connector_module_path"] = "nixl_connectors.vllm.connector"  # not pip-installed
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(core),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--port", str(self.port), "--block-size", "32", "--kv-cache-memory-bytes",
             "67108864", "--max-model-len", "1024", "--enforce-eager", "--dtype", "bfloat16",
             "--max-num-seqs", "8", "--kv-transfer-config", json.dumps(ktc)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.model = model

    def wait_ready(self, timeout: float = 400) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"{self.name} not ready:\n{self.log_path.read_text()[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in
                   re.finditer(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-logs")
    made = {
        "prefill": Server("prefill", tiny_model, 0, "recompute", logs),
        "decode": Server("decode", tiny_model, 1, "recompute", logs, {"timeout_s": 5.0}),
        "decode_fail": Server("decode_fail", tiny_model, 1, "fail", logs, {"timeout_s": 5.0}),
    }
    try:
        for s in made.values():
            s.wait_ready()
        yield made
    finally:
        for s in made.values():
            s.stop()


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, 900, (n,), generator=g).tolist()


def body(model: str, prompt: list[int]) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}


def tokens(resp: dict) -> list[int]:
    return list(resp["choices"][0]["token_ids"])


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
