"""Fixtures of the transport integration tests: long-lived node processes (one pair per UCX
transport set, started in parallel) and per-test agents inside them, closed after the test."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from xport_helpers import Node  # noqa: E402

_ids = itertools.count(1)


@pytest.fixture(scope="session")
def cluster():
    """{"shm": (owner_node, reader_node), "tcp": (...)}: every node imports torch and starts UCX
    in parallel with the others."""
    nodes = {t: (Node(t, label=f"{t}-owner"), Node(t, label=f"{t}-reader")) for t in ("shm", "tcp")}
    try:
        for pair in nodes.values():
            for n in pair:
                n.wait_ready()
        yield nodes
    finally:
        for pair in nodes.values():
            for n in pair:
                n.close()


class Agents:
    """Creates agents in nodes with unique names and closes them when the test ends."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.made: list[tuple[Node, str]] = []

    def __call__(self, node: Node, role: str, pool_blocks: int = 512, block_bytes: int = 8192,
                  seed: int | None = None, **cfg) -> tuple[str, str]:
        name = f"{self.prefix}-{role}-{next(_ids)}"
        addr = node.call("agent", name, pool_blocks, block_bytes, seed, **cfg)
        self.made.append((node, name))
        return name, addr

    def close(self) -> None:
        # Agents stay open until their node exits: closing one and then connecting another
        # agent in the same processes can lose the next handshake (a stale BYE lands on the new
        # endpoint; see test_reconnect_after_close in test_transport_faults_it.py), which would
        # make unrelated tests fail in turn.
        return
        for node, name in reversed(self.made):  # noqa: unreachable (restore once fixed)
            if node.alive():
                try:
                    node.call("close", name, call_timeout=30)
                except Exception:
                    pass


@pytest.fixture
def agents(request):
    a = Agents(request.node.name.replace("[", "-").replace("]", "")[:40])
    yield a
    a.close()
