"""Connector configuration, routing ids and deployment limits."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest


from nixl_connectors.trtllm.config import (CONFIG_ENV, ConfigError, ConnectorRole,  # noqa: E402
                                           RoutingSource, TrtllmConnectorConfig)
from nixl_connectors.trtllm.engine_args import UnsupportedDeployment, engine_shape  # noqa: E402
from nixl_connectors.trtllm.routing import Leg, make_salt, routing_of  # noqa: E402


def req(**kw):
    return SimpleNamespace(**kw)


def test_config_from_env_path_and_inline(tmp_path):
    doc = {"role": "generation", "context_agents": ["10.0.0.1:7000", "10.0.0.1:7001"],
           "listen_port_base": 7100}
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    for value in (str(p), json.dumps(doc)):
        cfg = TrtllmConnectorConfig.from_env({CONFIG_ENV: value})
        assert cfg.role is ConnectorRole.GENERATION and cfg.pulls and not cfg.holds
        assert cfg.context_agent(1) == "10.0.0.1:7001"
        assert cfg.listen_address(1) == "127.0.0.1:7101"
    assert TrtllmConnectorConfig.from_env({}).role is ConnectorRole.BOTH


@pytest.mark.parametrize("doc", [{"role": "prefill"}, {"lease_ttl_s": 0}, {"bogus": 1},
                                 {"listen_port_base": 70000}, {"tokens_per_block": 0}])
def test_bad_config(doc):
    with pytest.raises(ConfigError):
        TrtllmConnectorConfig.from_mapping(doc)


def test_missing_context_agent_for_rank():
    with pytest.raises(ConfigError):
        TrtllmConnectorConfig(context_agents=("a:1",)).context_agent(1)


def test_auth_key_from_named_env(monkeypatch):
    monkeypatch.setenv("MY_KEY", "s3cret")
    assert TrtllmConnectorConfig(auth_key_env="MY_KEY").auth_key() == b"s3cret"
    monkeypatch.setenv("MY_KEY", "")
    assert TrtllmConnectorConfig(auth_key_env="MY_KEY").auth_key() is None


P = "nixl-rt:"


@pytest.mark.parametrize("salt,role,expect", [
    (make_salt(P, Leg.CONTEXT, "abc"), ConnectorRole.CONTEXT, (Leg.CONTEXT, "abc")),
    (make_salt(P, Leg.GENERATION, "abc"), ConnectorRole.GENERATION, (Leg.GENERATION, "abc")),
    (make_salt(P, Leg.GENERATION, "abc"), ConnectorRole.BOTH, (Leg.GENERATION, "abc")),
    (make_salt(P, Leg.GENERATION, "abc"), ConnectorRole.CONTEXT, None),   # leg this role does not play
    (make_salt(P, Leg.CONTEXT, "abc"), ConnectorRole.GENERATION, None),
    ("nixl-rt:ctx:", ConnectorRole.BOTH, None),
    ("nixl-rt:xyz:abc", ConnectorRole.BOTH, None),
    ("user-salt", ConnectorRole.BOTH, None),
    (None, ConnectorRole.BOTH, None),
])
def test_routing_from_cache_salt(salt, role, expect):
    r = routing_of(req(cache_salt=salt), role, RoutingSource.CACHE_SALT, P)
    assert (None if r is None else (r.leg, r.key)) == expect


def test_routing_from_cache_salt_id():
    r = routing_of(req(cache_salt_id=42), ConnectorRole.GENERATION, RoutingSource.CACHE_SALT_ID, P)
    assert r.leg is Leg.GENERATION and r.key == "salt-id:42"
    assert routing_of(req(cache_salt_id=None), ConnectorRole.CONTEXT, RoutingSource.CACHE_SALT_ID, P) is None
    assert routing_of(req(cache_salt_id=42), ConnectorRole.BOTH, RoutingSource.CACHE_SALT_ID, P) is None


def args(**kw):
    base = dict(tensor_parallel_size=2, pipeline_parallel_size=1, max_beam_width=1, model="m",
                kv_cache_config=SimpleNamespace(tokens_per_block=16, max_attention_window=None),
                scheduler_config=SimpleNamespace(capacity_scheduler_policy="GUARANTEED_NO_EVICT"))
    base.update(kw)
    return SimpleNamespace(**base)


def test_engine_shape_reads_llm_args():
    s = engine_shape(args())
    assert (s.tp_size, s.tokens_per_block, s.beam_width) == (2, 16, 1)
    assert engine_shape(args(), tokens_per_block_override=64).tokens_per_block == 64


@pytest.mark.parametrize("kw", [
    dict(pipeline_parallel_size=2),
    dict(max_beam_width=4),
    dict(kv_cache_config=SimpleNamespace(tokens_per_block=16, max_attention_window=[512, 4096])),
    dict(scheduler_config=SimpleNamespace(capacity_scheduler_policy="MAX_UTILIZATION")),
])
def test_deployment_limits(kw):
    with pytest.raises(UnsupportedDeployment):
        engine_shape(args(**kw))
