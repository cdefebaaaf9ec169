"""Small helpers of the end-to-end tests (deadline-bounded metric waits)."""
from __future__ import annotations

import time


def wait_metric(server, name: str, want: float, timeout: float = 60.0) -> float:
    """The metric once it reached `want`, or its value at the deadline (the caller asserts)."""
    deadline = time.monotonic() + timeout
    while True:
        v = server.metric(name)
        if v >= want or time.monotonic() > deadline:
            return v
        time.sleep(0.5)
