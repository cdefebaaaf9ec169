"""The adapter finds the connector base classes at the 1.2 path, else at the 1.3+ path."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

SETUP = textwrap.dedent("""
    import sys, types
    from trtllm_standin import kv_cache_connector as standin
    def pkg(name):
        m = types.ModuleType(name); m.__path__ = []; sys.modules[name] = m; return m
    for name in ("tensorrt_llm", "tensorrt_llm._torch", "tensorrt_llm._torch.pyexecutor",
                 "tensorrt_llm._torch.pyexecutor.connectors"):
        pkg(name)
""")


def run(body: str) -> subprocess.CompletedProcess:
    code = SETUP + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_falls_back_to_the_13_path():
    r = run("""
        sys.modules["tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector"] = standin
        from nixl_connectors.trtllm import engine_api
        print(engine_api.API_MODULE, engine_api.KvCacheConnectorWorker is standin.KvCacheConnectorWorker)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["trtllm_standin.kv_cache_connector", "True"]


def test_clear_error_without_tensorrt_llm():
    r = run("""
        try:
            from nixl_connectors.trtllm import engine_api
        except ImportError as e:
            print("IMPORT-ERROR", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "IMPORT-ERROR" in r.stdout and "TensorRT-LLM >= 1.2" in r.stdout
