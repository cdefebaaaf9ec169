"""Make ``tensorrt_llm._torch.pyexecutor.kv_cache_connector`` importable for the tests.

When TensorRT-LLM is installed, nothing is injected and the tests use its real base classes;
otherwise the stand-in modules are put into ``sys.modules`` under TensorRT-LLM's names.
"""
from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

from . import kv_cache_connector, mpi

API_PATH = "tensorrt_llm._torch.pyexecutor.kv_cache_connector"


def real_available() -> bool:
    mod = sys.modules.get("tensorrt_llm")
    if mod is not None:
        return not getattr(mod, "__nixl_standin__", False)
    try:
        importlib.import_module("tensorrt_llm")
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False
    return True


def ensure() -> ModuleType:
    """Return the connector API module: the real one if TensorRT-LLM imports, else the stand-in."""
    if real_available():
        for path in (API_PATH, "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector"):
            try:
                return importlib.import_module(path)
            except ImportError:
                continue
        raise ImportError("tensorrt_llm imports but has no KV cache connector API")
    if API_PATH in sys.modules:
        return sys.modules[API_PATH]
    names = ["tensorrt_llm", "tensorrt_llm._torch", "tensorrt_llm._torch.pyexecutor"]
    for name in names:
        m = types.ModuleType(name)
        m.__path__ = []  # a package, so submodule imports resolve through sys.modules
        m.__nixl_standin__ = True
        sys.modules[name] = m
    utils = types.ModuleType("tensorrt_llm._utils")
    utils.mpi_rank = mpi.mpi_rank
    utils.mpi_world_size = mpi.mpi_world_size
    utils.__nixl_standin__ = True
    sys.modules["tensorrt_llm._utils"] = utils
    sys.modules[API_PATH] = kv_cache_connector
    sys.modules["tensorrt_llm"]._utils = utils
    sys.modules["tensorrt_llm"]._torch = sys.modules["tensorrt_llm._torch"]
    sys.modules["tensorrt_llm._torch"].pyexecutor = sys.modules["tensorrt_llm._torch.pyexecutor"]
    sys.modules["tensorrt_llm._torch.pyexecutor"].kv_cache_connector = kv_cache_connector
    return kv_cache_connector


def using_standin() -> bool:
    return not real_available()
