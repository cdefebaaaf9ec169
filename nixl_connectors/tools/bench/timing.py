"""Summaries of timed reps and the ratios the bench prints (pure)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

GB = 1e9  # GB/s are 1e9 bytes per second throughout


@dataclass(frozen=True)
class Timings:
    """Seconds of the timed reps of one implementation on one workload (warm-up excluded)."""

    seconds: tuple[float, ...]
    nbytes: int  # bytes moved by one rep

    def __post_init__(self) -> None:
        if not self.seconds or min(self.seconds) <= 0:
            raise ValueError("timings need at least one positive duration")

    @classmethod
    def of(cls, seconds: list[float], nbytes: int) -> "Timings":
        return cls(tuple(float(s) for s in seconds), int(nbytes))

    @property
    def best_s(self) -> float:
        return min(self.seconds)

    @property
    def median_s(self) -> float:
        return float(np.median(self.seconds))

    @property
    def p90_s(self) -> float:
        return float(np.percentile(self.seconds, 90))

    @property
    def gbps(self) -> float:
        """Best rep, GB/s."""
        return self.nbytes / self.best_s / GB

    @property
    def gbps_median(self) -> float:
        return self.nbytes / self.median_s / GB

    def to_json(self) -> dict[str, Any]:
        return {"gbps": self.gbps, "gbps_median": self.gbps_median, "best_s": self.best_s,
                "median_s": self.median_s, "p90_s": self.p90_s, "median_ms": self.median_s * 1e3,
                "p90_ms": self.p90_s * 1e3, "reps": len(self.seconds), "nbytes": self.nbytes,
                "all_s": list(self.seconds)}


def speed(entry: Mapping[str, Any] | None, latency: bool) -> float | None:
    """The number ratios are taken of: GB/s of the best rep (throughput) or of the median rep
    (latency: the median time is what is compared)."""
    if not entry:
        return None
    v = entry.get("gbps_median" if latency else "gbps")
    return float(v) if v else None


def ratios(ours: Mapping[str, Any] | None, others: Mapping[str, Mapping[str, Any] | None],
           latency: bool) -> dict[str, float]:
    """``{"ours/<name>": speed ratio}`` for every other entry that has a speed. Above 1: ours is
    faster (for a reference limit, the fraction of the limit ours reaches)."""
    mine = speed(ours, latency)
    out: dict[str, float] = {}
    if mine is None:
        return out
    for name, entry in others.items():
        theirs = speed(entry, latency)
        if theirs:
            out[f"ours/{name}"] = mine / theirs
    return out


def fmt_entry(label: str, entry: Mapping[str, Any] | None, ours: Mapping[str, Any] | None, latency: bool) -> str:
    """One printed line: ``label  12.34 GB/s (0.52x)`` or, for latency, ``label  0.310 ms median,
    0.402 ms p90, 6.77 GB/s  ours/this 1.20x``."""
    if not entry or not entry.get("gbps"):
        why = (entry or {}).get("reason") or (entry or {}).get("error") or "not run"
        lines = [x.strip() for x in str(why).splitlines() if x.strip()]
        return f"   {label:44s} -- ({(lines[-1] if lines else '?')[:160]})"  # a traceback's last line
    mine, theirs = speed(ours, latency), speed(entry, latency)
    ratio = f"  ours/this {mine / theirs:.2f}x" if mine and theirs and entry is not ours else ""
    if latency:
        return (f"   {label:44s} {entry['median_ms']:8.3f} ms median {entry['p90_ms']:8.3f} ms p90 "
                f"{entry['gbps_median']:8.2f} GB/s{ratio}")
    return f"   {label:44s} {entry['gbps']:8.2f} GB/s best  {entry['median_ms']:9.2f} ms median{ratio}"
