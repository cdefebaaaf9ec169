"""`nixl-connectors bench`: run workloads through our transport, NIXL (when installed) and the
one-process copy limit in one run; print ratios; write JSON (and a PNG plot with matplotlib)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time

from .ours import run_ours
from .workloads import HEADLINE, HOST_SWEEP, QUICK, Memory, Workload

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=["headline", "host", "quick", "cuda"], default="headline")
    p.add_argument("--json", default="bench-out/bench.json", help="where to write results")
    p.add_argument("--plot", default=None, help="PNG path for a bar chart (needs matplotlib)")
    p.add_argument("--no-nixl", action="store_true", help="skip the NIXL comparison")
    p.add_argument("--reps", type=int, default=None)


def _suite(name: str) -> list[Workload]:
    if name == "headline":
        return [HEADLINE]
    if name == "quick":
        return QUICK
    if name == "cuda":
        from .gpu_workloads import CUDA_SWEEP

        return CUDA_SWEEP
    return HOST_SWEEP


def _nixl(w: Workload) -> dict | None:
    if w.memory is Memory.CUDA:  # NIXL with VRAM registered on both GPUs (gpu_baselines.py)
        from .gpu_baselines import nixl_vram

        r = nixl_vram(w)
        if not r.get("available", True) or "error" in r:
            return {**r, "configs": []}
        return {"available": True, "version": r.get("version"),
                "configs": [{"name": "vram-ucx", **r}]}
    try:
        from . import nixl_baseline
    except ImportError as e:
        return {"available": False, "reason": str(e)}
    return nixl_baseline.compare_entry(w) if hasattr(nixl_baseline, "compare_entry") else None


def _limit(w: Workload) -> float | None:
    if w.memory is Memory.CUDA:  # torch in one process: gather + peer copy + scatter, serial
        try:
            import torch

            from .gpu_baselines import torch_peer

            gbps = torch_peer(w)["gather_copy_scatter_gbps"]
            torch.cuda.empty_cache()
            return gbps
        except Exception as e:  # a baseline must not stop the sweep
            log.warning("no CUDA copy limit for %s: %s", w.name, e)
            return None
    if w.memory is not Memory.HOST:
        return None
    from .copy_limit import local_copy_limit

    # contiguous workloads are compared with the scattered copy over a pool of exactly their blocks
    return local_copy_limit(w.block_bytes, w.num_blocks,
                            pool_blocks=w.num_blocks * (w.pool_factor if w.scattered else 1))


def run_suite(workloads: list[Workload], with_nixl: bool, out=print) -> list[dict]:
    rows = []
    for w in workloads:
        out(f"== {w.name}: {w.num_blocks} x {w.block_bytes // 1024} KiB "
            f"({'scattered' if w.scattered else 'contiguous'}, {w.memory.value})")
        row = {"workload": w.to_json(), "ours": run_ours(w)}
        row["limit_gbps"] = _limit(w)
        row["nixl"] = _nixl(w) if with_nixl else None
        ours = row["ours"]["gbps"]
        line = f"   ours {ours:7.2f} GB/s"
        if row["limit_gbps"]:
            line += f" | local copy limit {row['limit_gbps']:7.2f} GB/s ({ours / row['limit_gbps']:.2f}x)"
        for cfg in (row["nixl"] or {}).get("configs", []):
            if cfg.get("gbps"):
                line += f" | NIXL[{cfg['name']}] {cfg['gbps']:6.2f} GB/s ({ours / cfg['gbps']:.2f}x)"
        if row["ours"]["bad_blocks"]:
            line += f"  !! {row['ours']['bad_blocks']} bad blocks"
        out(line)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["workload"]["name"] for r in rows]
    series = {"ours": [r["ours"]["gbps"] for r in rows],
              "local copy": [r["limit_gbps"] or 0 for r in rows]}
    best_nixl = []
    for r in rows:
        vals = [c.get("gbps") or 0 for c in (r["nixl"] or {}).get("configs", [])]
        best_nixl.append(max(vals) if vals else 0)
    series["NIXL (best cfg)"] = best_nixl
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], names, rotation=20, ha="right")
    ax.set_ylabel("GB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> int:
    import os

    workloads = _suite(args.suite)
    if args.reps:
        workloads = [dataclasses.replace(w, reps=args.reps) for w in workloads]  # keeps subclasses
    t0 = time.time()
    rows = run_suite(workloads, not args.no_nixl)
    doc = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "started": t0, "results": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(f"results written to {args.json}")
    if args.plot:
        try:
            plot(rows, args.plot)
            print(f"plot written to {args.plot}")
        except ImportError:
            print("matplotlib not installed: no plot (pip install 'nixl-connectors[plot]')")
    return 0 if all(r["ours"]["bad_blocks"] == 0 for r in rows) else 1
