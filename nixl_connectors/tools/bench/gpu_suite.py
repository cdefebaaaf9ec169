"""`nixl-connectors bench --suite cuda`: on each CUDA workload, in ONE run, ours (two processes,
public API), NIXL 1.5 (two processes), and the one-process references (the contiguous device
copy of the same bytes: the limit; index_select + index_copy_). One GPU: both processes on
cuda:0; two or more: owner cuda:0, reader cuda:1 (``--one-gpu`` forces one). Each side runs on
its own and reports its own failure; every wait has a deadline.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from .gpu_workloads import TTFT_WORKLOADS, Devices, detect_gpu_devices
from .report import make_row, print_row
from .workloads import Workload

log = logging.getLogger(__name__)


def gpu_info() -> dict[str, Any]:
    """What the JSON records about the GPUs and the software on them."""
    info: dict[str, Any] = {}
    try:
        import torch

        info["torch"] = str(torch.__version__)
        info["torch_cuda"] = torch.version.cuda
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(n)]
    except Exception as e:
        info["error"] = f"{type(e).__name__}: {e}"
    try:
        import triton

        info["triton"] = str(triton.__version__)
    except Exception as e:
        info["triton"] = f"not importable ({type(e).__name__})"
    from .nixl_import import find_nixl

    info["nixl"] = find_nixl().version
    return info


def reference_entries(w: Workload, devices: Devices) -> dict[str, Any]:
    try:
        from .cuda_limits import cuda_references

        return cuda_references(w, devices)
    except Exception as e:  # torch missing or broken: the other sides still run
        return {"contiguous_copy": {"error": f"{type(e).__name__}: {e}"}}


def nixl_entry(w: Workload, devices: Devices) -> dict[str, Any]:
    try:
        from .gpu_nixl import nixl_vram

        return nixl_vram(w, devices)
    except Exception as e:
        return {"available": False, "reason": f"{type(e).__name__}: {e}", "configs": []}


def run_cuda_suite(workloads: list[Workload], with_nixl: bool, force_one_gpu: bool = False,
                   chunk: int | None = None, out: Callable[[str], Any] = print,
                   devices: Devices | None = None) -> tuple[list[dict], dict]:
    """``devices`` overrides the detected GPUs (the tests run the suite's code on CPU devices)."""
    from .sweep import run_ours_safely

    info: dict[str, Any] = {"gpu": gpu_info()}
    try:
        devices = devices or detect_gpu_devices(force_one_gpu)
    except Exception as e:
        out(f"no CUDA run: {type(e).__name__}: {e}")
        info["error"] = f"{type(e).__name__}: {e}"
        return [], info
    info["devices"] = devices.to_json()
    out(f"GPUs: {info['gpu'].get('devices')}; owner process on {devices.owner}, reader process on "
        f"{devices.reader}{' (one-GPU mode)' if devices.one_gpu else ''}")
    rows = []
    for w in workloads:
        ours = run_ours_safely(w, chunk, devices)
        refs = reference_entries(w, devices)
        nixl = nixl_entry(w, devices) if with_nixl else None
        extra = {}
        if w.name in TTFT_WORKLOADS and "error" not in ours:
            extra["ttft_added_ms"] = ours["median_ms"]
        row = make_row(w, ours, refs, nixl, extra)
        print_row(row, out)
        rows.append(row)
    return rows, info
