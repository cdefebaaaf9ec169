"""UcxKvConnectorWorker.get_finished bookkeeping (no transport: nothing registered)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

TESTS = Path(__file__).resolve().parents[2]

from trtllm_standin import install  # noqa: E402

install.ensure()

from nixl_connectors.trtllm.config import ConnectorRole, TrtllmConnectorConfig  # noqa: E402
from nixl_connectors.trtllm.worker import KvLoadError, UcxKvConnectorWorker  # noqa: E402


def worker() -> UcxKvConnectorWorker:
    args = SimpleNamespace(tensor_parallel_size=1, kv_cache_config=SimpleNamespace(tokens_per_block=4))
    return UcxKvConnectorWorker(args, TrtllmConnectorConfig(role=ConnectorRole.BOTH))


def test_load_error_keeps_other_results_for_the_next_call():
    w = worker()
    w._loaded.add(10)
    w._failed[11] = "lease lookup: gone"
    w._saved.append(5)
    with pytest.raises(KvLoadError) as e:
        w.get_finished([], [10, 11])
    assert e.value.request_ids == [11] and "gone" in e.value.reasons[11]
    assert w.get_finished([], []) == ([5], [10])
    assert w.get_finished([], []) == ([], [])


def test_ids_are_returned_only_after_the_engine_announced_them():
    w = worker()
    w._loaded.add(10)
    assert w.get_finished([], []) == ([], [])        # not yet in started_loading_req_ids
    assert w.get_finished([], [10]) == ([], [10])


def test_finished_request_without_spec_waits_for_it():
    w = worker()
    assert w.get_finished([7], []) == ([], [])
    assert 7 in w._awaiting_spec


def test_worker_before_register_has_no_address():
    w = worker()
    assert w.address is None and w.agent is None
    with pytest.raises(RuntimeError):
        w._need_agent()
