"""How a bench reader passes the settle time between expose() and its read (outside the timing).

`sleep` leaves the reader's thread idle, as a decode worker that waits in the kernel; a CPU core
that idles for milliseconds may enter a deep C-state, which on many servers flushes its private
caches, so the read that follows runs on cold caches. `spin` keeps the thread busy (a loop on the
clock), as vLLM's workers are between engine steps: they poll their shared-memory message queue.
Which one a run used is in the JSON (`settle_mode`). ``NIXL_CONNECTORS_BENCH_SETTLE`` picks it.
"""
from __future__ import annotations

import enum
import time

from .env_choice import choice_from_env

SETTLE_ENV = "NIXL_CONNECTORS_BENCH_SETTLE"


class SettleMode(enum.Enum):
    SLEEP = "sleep"
    SPIN = "spin"


def mode_from_env(default: SettleMode = SettleMode.SLEEP) -> SettleMode:
    """The mode ``NIXL_CONNECTORS_BENCH_SETTLE`` names; ValueError names the choices."""
    return choice_from_env(SETTLE_ENV, SettleMode, default)


def settle(seconds: float, mode: SettleMode) -> None:
    """Let `seconds` pass, idle (`sleep`) or busy (`spin`)."""
    if mode is SettleMode.SLEEP:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
