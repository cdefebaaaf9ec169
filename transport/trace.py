"""Optional per-transfer timestamps for latency breakdowns (off unless `enable()` is called).

Marks are (tag, point, time.perf_counter()); perf_counter is CLOCK_MONOTONIC on Linux, so
marks of two processes on one host can be compared directly. Used by
scripts/latency_breakdown.py; costs one attribute check per mark when disabled."""
from __future__ import annotations

import time

_events: list[tuple[object, str, float]] | None = None


def enable() -> None:
    global _events
    _events = []


def disable() -> list[tuple[object, str, float]]:
    global _events
    out, _events = _events or [], None
    return out


def mark(tag: object, point: str) -> None:
    if _events is not None:
        _events.append((tag, point, time.perf_counter()))


def on() -> bool:
    return _events is not None
