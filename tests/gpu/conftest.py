"""GPU tests: two processes, owner on cuda:0 and reader on cuda:1 (UCX picks cuda_ipc).

Skipped cleanly (not failed) on machines with fewer than two GPUs or without ucxx; the
project's default `addopts` deselects them anyway (`-m 'not gpu'`): run with `pytest -m gpu tests/gpu`.
With NIXL_CONNECTORS_GPU_TESTS_ONE_GPU=1 both processes use cuda:0 (still two processes and
cuda_ipc between them, but no NVLink): a check of the CUDA data path on a one-GPU machine.
"""
from __future__ import annotations

import importlib.util
import itertools

import pytest
from gpu_peer import ONE_GPU, OWNER_DEVICE, READER_DEVICE


def _why_skip() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    need = 1 if ONE_GPU else 2
    if not torch.cuda.is_available() or torch.cuda.device_count() < need:
        return f"needs {need} CUDA GPU(s) (found {torch.cuda.device_count() if torch.cuda.is_available() else 0})"
    if importlib.util.find_spec("ucxx") is None:
        return "ucxx is not installed"
    return None


def pytest_collection_modifyitems(config, items):
    why = _why_skip()
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


_names = itertools.count(1)


@pytest.fixture(scope="module")
def owner():
    """Owner agent on cuda:0 (module-wide: starting a CUDA+UCX process takes seconds)."""
    from gpu_peer import PeerProc

    p = PeerProc(OWNER_DEVICE, f"owner-{next(_names)}", timeout_s=30.0)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reader():
    from gpu_peer import PeerProc

    p = PeerProc(READER_DEVICE, f"reader-{next(_names)}", timeout_s=30.0)
    yield p
    p.close()
