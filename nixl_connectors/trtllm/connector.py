"""The module named in TensorRT-LLM's ``kv_connector_config.connector_module``."""
from .scheduler import UcxKvConnectorScheduler
from .worker import UcxKvConnectorWorker

__all__ = ["UcxKvConnectorScheduler", "UcxKvConnectorWorker"]
