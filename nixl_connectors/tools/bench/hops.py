"""Where one read's time goes, from `transport.trace` marks (pure functions).

A traced rep records the transport's own marks (the read's `called` / `copied`, and on the CUDA
IPC path `start`, `sides`, ..., `synced`) plus the bench's `returned` (wait() returned; until
2026-12-07 also `done`, the reader's device synchronized). `rep_hops` turns one rep's marks into the time between
each mark and the next, in the order they came; `median_hops` keeps the hops seen in at least half
of the reps (a rep that asked the owner has hops a granted one has not) and gives each one's
median in microseconds, ordered by their median position in the reps.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

# marks that happen outside one read's critical path (a mapping opened or a plan checked when a
# lease grant arrives) are left out of the sequence
OFF_PATH = frozenset({"mapped", "checked"})


def rep_hops(marks: Iterable[tuple[object, str, float]]) -> list[tuple[str, float]]:
    """[("a -> b", seconds), ...] between consecutive marks of one rep, in time order."""
    seq = sorted((ts, point) for _, point, ts in marks if point not in OFF_PATH)
    return [(f"{a} -> {b}", tb - ta) for (ta, a), (tb, b) in zip(seq, seq[1:])]


def median_hops(reps: Sequence[Sequence[tuple[str, float]]]) -> dict[str, float]:
    """Median microseconds of every hop present in at least half of `reps`, in the order of their
    median position within a rep."""
    per: dict[str, list[float]] = {}
    pos: dict[str, list[int]] = {}
    for hops in reps:
        seen: dict[str, float] = {}
        for i, (name, dt) in enumerate(hops):   # a hop name seen twice in one rep: the two add up
            if name not in seen:
                pos.setdefault(name, []).append(i)
            seen[name] = seen.get(name, 0.0) + dt
        for name, dt in seen.items():
            per.setdefault(name, []).append(dt)
    need = max(1, (len(reps) + 1) // 2)
    kept = sorted((k for k, v in per.items() if len(v) >= need), key=lambda k: float(np.median(pos[k])))
    return {k: float(np.median(per[k]) * 1e6) for k in kept}
