"""vLLM general plugin: registers `UcxConnector` with vLLM's KV connector factory.

Declared as entry point `ucx_connector` in group `vllm.general_plugins`; vLLM calls it in every
process, sometimes more than once, so it is idempotent.
"""
from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "UcxConnector"
MODULE_PATH = "nixl_connectors.vllm.connector"
CLASS_NAME = "UcxConnector"


def register() -> bool:
    """Register the connector name; returns True if this call registered it."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # vLLM absent: nothing to register into
        logger.debug("vllm not importable; UcxConnector not registered")
        return False
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return False
    KVConnectorFactory.register_connector(CONNECTOR_NAME, MODULE_PATH, CLASS_NAME)
    logger.debug("registered %s", CONNECTOR_NAME)
    return True
