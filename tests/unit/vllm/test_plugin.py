"""Plugin entry point and connector loading by name or by module path."""
from importlib.metadata import entry_points

import pytest
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

from nixl_connectors.vllm import plugin


def test_register_is_idempotent_and_resolves_by_name():
    plugin.register()
    assert plugin.register() is False  # a second call (plugins load more than once) is a no-op
    cls = KVConnectorFactory.get_connector_class(
        KVTransferConfig(kv_connector="UcxConnector", kv_role="kv_both"))
    from nixl_connectors.vllm.connector import UcxConnector
    assert cls is UcxConnector


def test_module_path_works_too():
    cls = KVConnectorFactory.get_connector_class(KVTransferConfig(
        kv_connector="UcxConnector", kv_role="kv_both",
        kv_connector_module_path="nixl_connectors.vllm.connector"))
    assert cls.__name__ == "UcxConnector"


def test_entry_point_declared():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "ucx_connector"]
    if not eps:
        pytest.skip("package not pip-installed: entry points are not visible")
    assert eps[0].value == "nixl_connectors.vllm.plugin:register"
    assert eps[0].load() is plugin.register


def test_vllm_loads_general_plugins_with_ours():
    from vllm.plugins import load_general_plugins
    if not any(ep.name == "ucx_connector" for ep in entry_points(group="vllm.general_plugins")):
        pytest.skip("package not pip-installed")
    load_general_plugins()
    load_general_plugins()
    assert "UcxConnector" in KVConnectorFactory._registry
