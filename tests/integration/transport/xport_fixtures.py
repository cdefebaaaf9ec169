"""Fixture building blocks shared by tests/security and tests/faults (and usable here): start
several `Node`s in parallel, create uniquely named agents in them."""
from __future__ import annotations

import itertools
import os

from xport_helpers import Node

_ids = itertools.count(1)

LONG = os.environ.get("NIXL_FUZZ_LONG") == "1" or os.environ.get("NIXL_LONG") == "1"


def start_nodes(specs: dict[str, dict]) -> dict[str, Node]:
    """{label: Node kwargs} -> started nodes (they import torch in parallel)."""
    nodes = {}
    try:
        for label, kw in specs.items():
            kw = dict(kw)
            nodes[label] = Node(kw.pop("transports", "shm"), label=label, **kw)
        for n in nodes.values():
            n.wait_ready()
    except BaseException:
        for n in nodes.values():
            n.close()
        raise
    return nodes


def close_nodes(nodes) -> None:
    for n in (nodes.values() if isinstance(nodes, dict) else nodes):
        n.close()


def agent(node: Node, role: str, pool_blocks: int = 256, block_bytes: int = 4096, seed: int | None = None,
          **cfg) -> tuple[str, str]:
    """A new agent in `node` with a unique name: (name, address)."""
    name = f"{role}-{next(_ids)}"
    return name, node.call("agent", name, pool_blocks, block_bytes, seed, **cfg)
