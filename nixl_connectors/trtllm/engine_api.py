"""The TensorRT-LLM connector base classes, from wherever the installed version keeps them.

TensorRT-LLM 1.2 defines them in ``tensorrt_llm._torch.pyexecutor.kv_cache_connector``;
1.3 moved them to ``tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector``. This module
tries both, in that order, and fails with one clear ImportError otherwise. (The test-suite
installs a stand-in under the 1.2 name when TensorRT-LLM is not installed.)
"""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

MODULE_PATHS = (
    "tensorrt_llm._torch.pyexecutor.kv_cache_connector",             # 1.2
    "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",  # 1.3+
)
UTILS_MODULE = "tensorrt_llm._utils"


def _load() -> ModuleType:
    errors = []
    for path in MODULE_PATHS:
        try:
            return importlib.import_module(path)
        except ImportError as e:
            errors.append(f"{path}: {e}")
    raise ImportError(
        "nixl_connectors.trtllm needs TensorRT-LLM's KV cache connector API (TensorRT-LLM >= 1.2, "
        "PyTorch backend); tried " + "; ".join(errors))


_api = _load()
KvCacheConnectorScheduler: Any = _api.KvCacheConnectorScheduler
KvCacheConnectorWorker: Any = _api.KvCacheConnectorWorker
SchedulerOutput: Any = _api.SchedulerOutput
API_MODULE: str = _api.__name__


def engine_rank() -> int:
    """This process's global MPI rank as TensorRT-LLM sees it (0 without MPI)."""
    try:
        utils = importlib.import_module(UTILS_MODULE)
    except ImportError:
        return 0
    fn = getattr(utils, "mpi_rank", None)
    return int(fn()) if callable(fn) else 0
