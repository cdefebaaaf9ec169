"""Rows of the bench output (pure): one per workload, with ours, the one-process references,
NIXL's configurations and every ratio side by side; and how a row is printed."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from .timing import fmt_entry, ratios
from .workloads import Measure, Workload

POLICY_NOTE = {
    "warmup": "the first `warmup` reps of every implementation are run and discarded",
    "verification": "destination blocks zeroed before and every byte checked after every rep (warm-up "
                    "included), outside the timing; NIXL: the same, in its reader process",
    "ours_timing": "read() to wait() returning, one reader, public API",
    "nixl_timing": "make_prepped_xfer() + transfer() until check_xfer_state() is DONE (post to completion)",
    "references": "one process, no transfer: the contiguous copy of the same bytes is the memory-bandwidth "
                  "limit (host: np.copyto; CUDA: one device copy); the scattered copy is a reference",
    "ratios": "ours/<x> = speed of ours / speed of x; speed = bytes / best rep (throughput) or bytes / median "
              "rep (latency); for the contiguous copy it is the fraction of the limit ours reaches",
}


def nixl_entries(nixl: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {f"nixl[{c['name']}]": c for c in (nixl or {}).get("configs", [])}


def make_row(w: Workload, ours: Mapping[str, Any], references: Mapping[str, Mapping[str, Any]],
             nixl: Mapping[str, Any] | None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    latency = w.measure is Measure.LATENCY
    others: dict[str, Mapping[str, Any]] = {**references, **nixl_entries(nixl)}
    row: dict[str, Any] = {"workload": w.to_json(), "measure": w.measure.value, "block_policy": w.policy.value,
                           "ours": dict(ours), "references": dict(references), "nixl": nixl,
                           "ratios": ratios(ours if "error" not in ours else None, others, latency)}
    row.update(extra or {})
    return row


def bad_blocks(row: Mapping[str, Any]) -> int:
    """Wrong blocks ours delivered in this row (an error counts as one)."""
    ours = row.get("ours") or {}
    return 1 if "error" in ours else int(ours.get("bad_blocks", 0))


def format_row(row: Mapping[str, Any]) -> list[str]:
    w = row["workload"]
    latency = row["measure"] == Measure.LATENCY.value
    ours = row["ours"]
    kind = "scattered" if w["scattered"] else "contiguous"
    layers = f" x {w['num_layers']} layers" if w["num_layers"] > 1 else ""
    lines = [f"== {w['name']}: {w['num_blocks']} x {w['block_bytes'] // 1024} KiB{layers} ({kind}, {w['memory']}, "
             f"{w['nbytes'] / 2**20:.2f} MiB; {row['measure']}: {w['reps']} reps after {w['warmup']} warm-up)"]
    lines.append(fmt_entry("ours", ours, ours, latency))
    if "error" not in ours:
        paths = ", ".join(f"{k} x{v}" for k, v in sorted(ours.get("paths", {}).items())) or "-"
        fb = "; ".join(f"{k} x{v}" for k, v in sorted(ours.get("fallbacks", {}).items())) or "none"
        granted = ours.get("granted_reads", 0)
        lines.append(f"      data path: {paths}" + (f" ({granted} under a lease grant: no round trip)" if granted else "")
                     + f"; fallbacks: {fb}"
                     + (f"  !! {ours['bad_blocks']} BAD BLOCKS" if ours.get("bad_blocks") else ""))
        if ours.get("host_pages"):
            huge = ours.get("huge_page_fraction", {})
            lines.append(f"      host pools (every implementation, references too): {ours['host_pages']} pages; "
                         f"huge-page backed: owner {huge.get('owner')}, reader {huge.get('reader')}")
        tables = ours.get("gpu_run_tables") or {}
        if w["memory"] == "cuda" and "gpu_direct_tables" in ours:
            lines.append(f"      run tables read in place (gpu_direct_tables): {'on' if ours['gpu_direct_tables'] else 'off'}"
                         f"; direct launches {tables.get('direct_launches', 0)}"
                         + (f"; off because {tables['direct_off']}" if tables.get("direct_off") else ""))
        if ours.get("hops_us_median"):
            lines.append("      hops (median us): " + ", ".join(f"{k} {v:.1f}" for k, v in ours["hops_us_median"].items()))
    for key, ref in row["references"].items():
        lines.append(fmt_entry(ref.get("name", key), ref, ours, latency))
    nixl = row.get("nixl")
    if nixl is not None and not nixl.get("available", True):
        lines.append(f"   {'NIXL':44s} -- ({nixl.get('reason')})")
    for label, entry in nixl_entries(nixl).items():
        lines.append(fmt_entry(label, entry, ours, latency))
    if row.get("ttft_added_ms") is not None:
        lines.append(f"   adds {row['ttft_added_ms']:.3f} ms (median) to time-to-first-token")
    return lines


def print_row(row: Mapping[str, Any], out: Callable[[str], Any] = print) -> None:
    for line in format_row(row):
        out(line)
