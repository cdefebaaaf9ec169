"""TensorRT-LLM (PyTorch backend) KV cache connector over the `transport` core.

Point TensorRT-LLM at it with::

    kv_connector_config:
      connector_module: nixl_connectors.trtllm.connector
      connector_scheduler_class: UcxKvConnectorScheduler
      connector_worker_class: UcxKvConnectorWorker

This package's ``__init__`` imports nothing from TensorRT-LLM: only
``nixl_connectors.trtllm.connector`` (and the modules it pulls in) needs the engine.
"""
