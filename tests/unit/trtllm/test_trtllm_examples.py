"""The TensorRT-LLM example files name classes and settings that exist."""
from __future__ import annotations

import importlib
import json
from types import SimpleNamespace
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[2]
REPO = TESTS.parent
EX = REPO / "examples" / "trtllm"

from trtllm_standin import install  # noqa: E402

install.ensure()

from nixl_connectors.trtllm.config import ConnectorRole, ConnectorSettings  # noqa: E402
from nixl_connectors.trtllm.engine_args import check_deployment  # noqa: E402

yaml = pytest.importorskip("yaml")


@pytest.mark.parametrize("leg", ["ctx", "gen"])
def test_extra_options_yaml(leg):
    doc = yaml.safe_load((EX / f"{leg}_extra_llm_api_options.yaml").read_text())
    assert doc["scheduler_config"]["capacity_scheduler_policy"] == "GUARANTEED_NO_EVICT"
    as_args = SimpleNamespace(model="m", scheduler_config=SimpleNamespace(**doc["scheduler_config"]),
                              kv_cache_config=SimpleNamespace(**doc["kv_cache_config"]))
    assert check_deployment(as_args) == []          # block reuse on, the required policy
    kc = doc["kv_connector_config"]
    mod = importlib.import_module(kc["connector_module"])
    assert hasattr(mod, kc["connector_scheduler_class"]) and hasattr(mod, kc["connector_worker_class"])


def test_connector_json():
    ctx = ConnectorSettings.from_mapping(json.loads((EX / "ctx_connector.json").read_text()))
    gen = ConnectorSettings.from_mapping(json.loads((EX / "gen_connector.json").read_text()))
    assert ctx.trtllm.role is ConnectorRole.CONTEXT and gen.trtllm.role is ConnectorRole.GENERATION
    assert gen.trtllm.context_agents[0].endswith(f":{ctx.agent.listen_port_base}")
    assert ctx.trtllm.model_key == gen.trtllm.model_key
    assert ctx.agent.auth_key_env == gen.agent.auth_key_env
