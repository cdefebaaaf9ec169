"""Fixtures of the TensorRT-LLM adapter's unit tests: in-memory agents (see fake_agent)."""
from __future__ import annotations

import pytest

from fake_agent import FakeAgent, FakeNetwork
import trtllm_unit_helpers  # noqa: F401 - installs the stand-in API first
from nixl_connectors.trtllm import worker as worker_mod  # noqa: E402


@pytest.fixture
def net(monkeypatch):
    """Workers built in this test get in-memory agents on one network."""
    network = FakeNetwork()
    network.hold_reads = False
    network.made = []

    def fake_make_agent(name, agent_settings, rank, compat):
        a = FakeAgent(name, network, hold_reads=network.hold_reads)
        a.compat = compat
        network.made.append(a)
        return a

    monkeypatch.setattr(worker_mod, "make_agent", fake_make_agent)
    return network
