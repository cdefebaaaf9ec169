"""Connector settings (kit vocabulary, deprecated names), routing on the C++ request, and the
start-up checks of the deployment."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from nixl_connectors.kit import ConfigError
from nixl_connectors.trtllm.config import CONFIG_ENV, ConnectorRole, ConnectorSettings
from nixl_connectors.trtllm.engine_args import UnsupportedDeployment, check_deployment, engine_shape
from nixl_connectors.trtllm.routing import Leg, routing_of, salt_key
from transport import TransportSet
from trtllm_standin.llm_request import CppLlmRequest, PyLlmRequest, cache_salt_id

GEN = {"role": "generation", "context_agents": ["10.0.0.1:7000", "10.0.0.1:7001"]}


def test_settings_from_env_path_and_inline(tmp_path):
    doc = dict(GEN, listen_port_base=7100, timeout_s=9, transports="tcp", model_key="llama")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    for value in (str(p), json.dumps(doc)):
        s = ConnectorSettings.from_env({CONFIG_ENV: value})
        assert s.trtllm.role is ConnectorRole.GENERATION and s.trtllm.pulls and not s.trtllm.holds
        assert s.trtllm.context_agent(1) == "10.0.0.1:7001" and s.trtllm.model_key == "llama"
        assert s.agent.listen_address(1) == "127.0.0.1:7101"
        assert (s.agent.timeout_s, s.agent.transports) == (9.0, TransportSet.TCP)
    assert ConnectorSettings.from_env({}).trtllm.role is ConnectorRole.CONTEXT


def test_old_names_still_work_for_one_release(caplog):
    with caplog.at_level(logging.WARNING):
        s = ConnectorSettings.from_mapping(dict(GEN, transfer_timeout_s=12, unknown_grace_s=1,
                                                routing_prefix="nixl-rt:", lookup_timeout_s=3))
    assert s.agent.timeout_s == 12.0
    text = " ".join(caplog.messages)
    for old in ("transfer_timeout_s", "unknown_grace_s", "routing_prefix", "lookup_timeout_s"):
        assert old in text


@pytest.mark.parametrize("doc,needle", [
    ({"role": "both"}, "both"),
    ({"role": "prefill"}, "role"),
    ({"routing_source": "cache_salt"}, "cache_salt_id"),
    ({"lease_ttl_s": 0}, "lease_ttl_s"),
    ({"bogus": 1}, "bogus"),
    ({"listen_port_base": 70000}, "listen_port_base"),
    ({"tokens_per_block": 0}, "tokens_per_block"),
    ({"role": "generation"}, "context_agents"),
    ({"role": "generation", "context_agents": ["nohost"]}, "host:port"),
    ({"timeout_s": "fast"}, "timeout_s"),
    ({"transfer_timeout_s": 3, "timeout_s": 4}, "both"),
])
def test_bad_settings_are_clear_errors(doc, needle):
    with pytest.raises(ConfigError, match=needle):
        ConnectorSettings.from_mapping(doc)


def test_unreadable_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        ConnectorSettings.from_env({CONFIG_ENV: str(tmp_path / "missing.json")})
    with pytest.raises(ConfigError, match="JSON"):
        ConnectorSettings.from_env({CONFIG_ENV: "{not json"})


def test_auth_key_by_name_from_env_or_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_KEY", "s3cret")
    assert ConnectorSettings.from_mapping({"auth_key_env": "MY_KEY"}).agent.auth_key() == b"s3cret"
    key = tmp_path / "key"
    key.write_text("filekey")
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        ConnectorSettings.from_mapping({"auth_key_file": str(key)}).agent.auth_key()
    key.chmod(0o600)
    assert ConnectorSettings.from_mapping({"auth_key_file": str(key)}).agent.auth_key() == b"filekey"


# -- routing: what the C++ request handed to get_num_new_matched_tokens carries -------------------
def test_routing_reads_cache_salt_id_of_the_cpp_request():
    req = CppLlmRequest(PyLlmRequest(7, list(range(20)), 3, cache_salt="nixl-rt:abc"))
    with pytest.raises(AttributeError):
        req.cache_salt   # noqa: B018 - not bound on the C++ LlmRequest
    with pytest.raises(AttributeError):
        req.py_request_id   # noqa: B018
    key = salt_key(cache_salt_id("nixl-rt:abc"))
    assert routing_of(req, ConnectorRole.CONTEXT).key == key
    assert routing_of(req, ConnectorRole.CONTEXT).leg is Leg.CONTEXT
    assert routing_of(req, ConnectorRole.GENERATION).leg is Leg.GENERATION


def test_same_salt_same_key_and_no_salt_no_routing():
    a = CppLlmRequest(PyLlmRequest(1, [1, 2], 1, cache_salt="s"))
    b = CppLlmRequest(PyLlmRequest(2, [3], 1, cache_salt="s"))
    c = CppLlmRequest(PyLlmRequest(3, [3], 1, cache_salt="t"))
    assert routing_of(a, ConnectorRole.GENERATION).key == routing_of(b, ConnectorRole.GENERATION).key
    assert routing_of(a, ConnectorRole.GENERATION).key != routing_of(c, ConnectorRole.GENERATION).key
    assert routing_of(CppLlmRequest(PyLlmRequest(4, [1], 1)), ConnectorRole.CONTEXT) is None
    for bad in (True, -1, 1 << 64, "x"):
        assert routing_of(SimpleNamespace(cache_salt_id=bad), ConnectorRole.CONTEXT) is None


# -- start-up checks ------------------------------------------------------------------------------
def args(**kw):
    base = dict(tensor_parallel_size=2, pipeline_parallel_size=1, context_parallel_size=1,
                max_beam_width=1, model="m", enable_attention_dp=False, speculative_config=None,
                kv_cache_config=SimpleNamespace(tokens_per_block=16, max_attention_window=None,
                                                enable_block_reuse=True, host_cache_size=None),
                scheduler_config=SimpleNamespace(capacity_scheduler_policy="GUARANTEED_NO_EVICT"))
    base.update(kw)
    return SimpleNamespace(**base)


def kv(**kw):
    base = dict(tokens_per_block=16, max_attention_window=None, enable_block_reuse=True, host_cache_size=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_engine_shape_reads_llm_args():
    s = engine_shape(args())
    assert (s.tp_size, s.configured_tokens_per_block) == (2, 16)


@pytest.mark.parametrize("kw,needle", [
    (dict(kv_cache_config=kv(enable_block_reuse=False)), "enable_block_reuse"),
    (dict(pipeline_parallel_size=2), "pipeline or context"),
    (dict(context_parallel_size=2), "pipeline or context"),
    (dict(max_beam_width=4), "beam"),
    (dict(enable_attention_dp=True), "attention data parallelism"),
    (dict(kv_cache_config=kv(host_cache_size=1 << 30)), "host KV offload"),
    (dict(kv_cache_config=kv(max_attention_window=[512, 4096])), "sliding-window"),
    (dict(speculative_config=object()), "speculative"),
    (dict(scheduler_config=SimpleNamespace(capacity_scheduler_policy="MAX_UTILIZATION")), "GUARANTEED_NO_EVICT"),
])
def test_unsupported_deployments_fail_at_start_up(kw, needle):
    with pytest.raises(UnsupportedDeployment, match=needle):
        engine_shape(args(**kw))


def test_all_problems_are_named_at_once():
    problems = check_deployment(args(max_beam_width=2, kv_cache_config=kv(enable_block_reuse=False)))
    assert len(problems) == 2


def test_mamba_checkpoint_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nemotron_h",
                                                      "hybrid_override_pattern": "M-M*"}))
    with pytest.raises(UnsupportedDeployment, match="Mamba"):
        engine_shape(args(model=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    engine_shape(args(model=str(tmp_path)))


def test_generation_needs_one_context_agent_per_tp_rank():
    s = ConnectorSettings.from_mapping(GEN)           # two addresses
    s.trtllm.check_tp(2)
    with pytest.raises(ConfigError, match="every TP rank"):
        s.trtllm.check_tp(1)
    ConnectorSettings.from_mapping({"role": "context"}).trtllm.check_tp(4)   # context side: nothing to list
