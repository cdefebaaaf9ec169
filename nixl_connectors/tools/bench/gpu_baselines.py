"""The baselines of the CUDA suite alone (no run of ours): the one-process references
(``cuda_limits.py``) and NIXL 1.5 in two processes (``gpu_nixl.py``) on each CUDA workload.
``nixl-connectors bench --suite cuda`` runs the same next to ours; this is for looking at the
baselines by themselves (and for ``scripts/gpu-ci.sh``).

    python3 -m nixl_connectors.tools.bench.gpu_baselines --json out.json [--no-nixl] [--no-torch] [--one-gpu]

The UCX chunk-size sweep of ours that used to live here is gone: the same-host CUDA path (CUDA
IPC, one kernel per transfer) does not chunk; the chunk size of the UCX fallback is
``bench --ucx-chunk-mib``.
"""
from __future__ import annotations

import argparse
import json
import platform

from .gpu_workloads import CUDA_SWEEP, detect_gpu_devices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="bench-out/gpu-baselines.json")
    p.add_argument("--no-nixl", action="store_true")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--one-gpu", action="store_true", help="both processes on cuda:0")
    p.add_argument("--only", default="", help="comma list of workload names (substring match)")
    a = p.parse_args(argv)
    from .gpu_suite import gpu_info, nixl_entry, reference_entries

    devices = detect_gpu_devices(a.one_gpu)
    rows = []
    for w in CUDA_SWEEP:
        if a.only and not any(s and s in w.name for s in a.only.split(",")):
            continue
        row: dict = {"workload": w.to_json(), "devices": devices.to_json()}
        if not a.no_torch:
            row["references"] = reference_entries(w, devices)
            print(w.name, "references", json.dumps(row["references"], default=str)[:400], flush=True)
        if not a.no_nixl:
            row["nixl"] = nixl_entry(w, devices)
            print(w.name, "nixl", json.dumps(row["nixl"], default=str)[:400], flush=True)
        rows.append(row)
    with open(a.json, "w") as f:
        json.dump({"machine": platform.platform(), "gpu": gpu_info(), "results": rows}, f, indent=2, default=str)
    print("written", a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
