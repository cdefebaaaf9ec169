"""Fixtures of the transport integration tests: long-lived node processes (one pair per UCX
transport set, started in parallel) and per-test agents inside them, closed after the test."""
from __future__ import annotations

import itertools
import pytest

from procinfo import busy_cores
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
        # Every test of the session is done: the nodes hold dozens of agents that owned, read,
        # lost peers and had transfers killed under them. None may be left burning a core (a
        # stranded UCX request once kept a node's UCX progress thread spinning for good).
        gone = {n.label: n.proc.exitcode for pair in nodes.values() for n in pair if not n.alive()}
        assert not gone, f"session nodes exited during the tests (label: exit code): {gone}"
        pids = {n.pid: n.label for pair in nodes.values() for n in pair}
        busy = busy_cores(pids, 3.0)
        spinning = {pids[p]: round(c, 2) for p, c in busy.items() if c > 0.5}
        assert not spinning, f"idle nodes kept cores busy after the tests: {spinning}"
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
        # Agents stay open until their node exits: that keeps teardown cheap on a loaded 2-core
        # machine. Closing agents and connecting new ones between the same processes is
        # covered by test_reconnect_after_close.
        return


@pytest.fixture
def agents(request):
    a = Agents(request.node.name.replace("[", "-").replace("]", "")[:40])
    yield a
    a.close()
