"""Long-lived processes of the attack suite: an owner and two reader processes on the shared
memory transport set (the attacker is the test process itself, speaking raw sockets)."""
from __future__ import annotations

import pytest
from xport_fixtures import close_nodes, start_nodes


@pytest.fixture(scope="session")
def sec():
    nodes = start_nodes({"owner": {"transports": "shm"}, "reader": {"transports": "shm"},
                         "reader2": {"transports": "shm"}})
    try:
        yield nodes
    finally:
        close_nodes(nodes)
