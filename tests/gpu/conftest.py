"""GPU tests: two processes, owner on cuda:0 and reader on cuda:1 (UCX picks cuda_ipc).

Skipped cleanly (not failed) on machines with fewer than two GPUs or without ucxx; the
project's default `addopts` deselects them anyway (`-m 'not gpu'`): run with `pytest -m gpu tests/gpu`.
"""
from __future__ import annotations

import importlib.util
import itertools

import pytest


def _why_skip() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return f"needs 2 CUDA GPUs (found {torch.cuda.device_count() if torch.cuda.is_available() else 0})"
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

    p = PeerProc("cuda:0", f"owner-{next(_names)}", timeout_s=30.0)
    yield p
    p.close()


@pytest.fixture(scope="module")
def reader():
    from gpu_peer import PeerProc

    p = PeerProc("cuda:1", f"reader-{next(_names)}", timeout_s=30.0)
    yield p
    p.close()
