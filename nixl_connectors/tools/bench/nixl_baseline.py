"""NIXL 1.5 baseline: the transport's benchmark workloads run through NIXL's Python API.

Two OS processes, as in disaggregated serving: an *owner* registers a host (numpy) pool of
blocks with a NIXL agent; a *reader* registers its own pool, loads the owner's agent
metadata and READs ``num_blocks`` blocks of ``block_bytes`` (random block ids on both sides:
new ones every rep, or the same ones every rep for the latency workloads) with
``prep_xfer_dlist`` / ``make_prepped_xfer`` / ``transfer`` / ``check_xfer_state``, and checks
every byte of every rep. Each transfer carries a notification that the owner collects. Warm-up
transfers are run first and discarded.

UCX reads its configuration from the environment when NIXL starts, so per-run settings
(``UCX_TLS``...) go into the children's environment only; this process's environment is
never changed. The UCX backend's error handling is a NIXL backend parameter
(``ucx_error_handling_mode``: ``peer``, the default, or ``none``).

Command line: ``python -m nixl_connectors.tools.bench --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from nixl_connectors.tools.bench.limits import host_contiguous_copy, host_scattered_copy
from nixl_connectors.tools.bench.nixl_child import EXIT_GRACE_S, NixlBenchError, NixlChild, child_env
from nixl_connectors.tools.bench.nixl_import import find_nixl
from nixl_connectors.tools.bench.nixl_profiles import (
    COMPARE_PROFILES,
    DEFAULT_PROFILES,
    LATENCY_PROFILES,
    NixlProfile,
    profile_config,
)
from nixl_connectors.tools.bench.nixl_types import MsgType, NixlReadConfig, NixlReadResult, Role, UcxErrorHandling
from nixl_connectors.tools.bench.timing import Timings

logger = logging.getLogger(__name__)

__all__ = [
    "COMPARE_PROFILES",
    "DEFAULT_PROFILES",
    "LATENCY_PROFILES",
    "NixlBenchError",
    "NixlProfile",
    "child_env",
    "compare_entry",
    "measure_nixl_read",
    "profile_config",
    "run_nixl_read",
]

TIMING = "make_prepped_xfer() + transfer() until check_xfer_state() is DONE"


def measure_nixl_read(cfg: NixlReadConfig) -> NixlReadResult:
    """Run one configuration in two fresh processes. Never raises for a failed run:
    the result's ``gbps`` is None and ``reason`` says why."""
    cfg.validate()
    avail = find_nixl()
    result = NixlReadResult(
        label=cfg.label, config=cfg.to_json(), nixl_module=avail.module, nixl_version=avail.version
    )
    if not avail.available:
        result.reason = avail.reason
        return result
    t_start = time.monotonic()
    deadline = t_start + cfg.timeout_s + 60.0  # children's own deadline + start-up
    env = child_env(cfg.env)
    children: list[NixlChild] = []
    try:
        owner = NixlChild(Role.OWNER, env)
        children.append(owner)
        reader = NixlChild(Role.READER, env)
        children.append(reader)
        init = {"type": MsgType.CONFIG.value, "config": cfg.to_json()}
        owner.send(init)
        reader.send(init)
        ready = owner.expect(MsgType.READY, deadline)
        reader.send({**ready, "type": MsgType.PEER.value})
        res = reader.expect(MsgType.RESULT, deadline)
        owner.send({"type": MsgType.STOP.value, "grace_s": 2.0})
        done = owner.expect(MsgType.DONE, deadline)
    except NixlBenchError as exc:
        logger.warning("NIXL run %s failed: %s", cfg.label, exc)
        result.reason = str(exc)
        return result
    finally:
        for child in children:
            child.close(max(1.0, min(EXIT_GRACE_S, deadline - time.monotonic())))
        result.wall_s = time.monotonic() - t_start

    nbytes = int(res["bytes_per_rep"])
    result.bytes_per_rep = nbytes
    result.transfer_s_per_rep = [float(s) for s in res["transfer_s"]]
    result.prep_s_per_rep = [float(s) for s in res["prep_s"]]
    result.post_to_done_s_per_rep = [a + b for a, b in zip(result.prep_s_per_rep, result.transfer_s_per_rep)]
    result.gbps_per_rep = [nbytes / s / 1e9 for s in result.post_to_done_s_per_rep]
    result.mismatched_blocks = int(res["mismatched_blocks"])
    result.backend_params = {str(k): str(v) for k, v in dict(res.get("backend_params", {})).items()}
    result.notifications_received = len(done.get("notifications", []))
    result.verified = result.mismatched_blocks == 0
    if not result.verified:
        result.reason = f"{result.mismatched_blocks} blocks arrived with wrong bytes"
    elif result.gbps_per_rep:
        result.gbps = max(result.gbps_per_rep)
    if result.notifications_received < cfg.transfers:
        logger.warning(
            "owner saw %d of %d transfer notifications", result.notifications_received, cfg.transfers
        )
    return result


def run_nixl_read(
    block_bytes: int,
    num_blocks: int,
    pool_blocks: int,
    reps: int,
    env: Mapping[str, str | None] | None = None,
    ucx_error_handling: UcxErrorHandling | None = None,
    timeout_s: float = 180.0,
    seed: int = 1234,
    label: str = "nixl",
) -> dict[str, Any]:
    """Dict form of :func:`measure_nixl_read` (``gbps`` None plus ``reason`` when not run)."""
    cfg = NixlReadConfig(
        block_bytes=block_bytes,
        num_blocks=num_blocks,
        pool_blocks=pool_blocks,
        reps=reps,
        env=dict(env or {}),
        ucx_error_handling=ucx_error_handling,
        seed=seed,
        timeout_s=timeout_s,
        label=label,
    )
    return measure_nixl_read(cfg).to_dict()


def config_entry(name: str, r: NixlReadResult) -> dict[str, Any]:
    """One NIXL configuration as the bench reports it: the same timing fields as ours
    (``Timings.to_json`` over post-to-DONE times), or ``gbps`` None and a ``reason``."""
    entry: dict[str, Any] = {"name": name, "gbps": None, "verified": r.verified, "reason": r.reason,
                             "timing": TIMING, "result": r.to_dict()}
    if r.ok and r.post_to_done_s_per_rep:
        entry.update(Timings.of(r.post_to_done_s_per_rep, r.bytes_per_rep).to_json())
        entry["gbps_transfer_only"] = max(r.bytes_per_rep / s / 1e9 for s in r.transfer_s_per_rep)
    return entry


def compare_entry(workload: Any, profiles: tuple[NixlProfile, ...] | None = None) -> dict[str, Any]:
    """NIXL results for a ``nixl_connectors.tools.bench.workloads.Workload`` (used by
    ``nixl-connectors bench``): the workload's reps, warm-up and block policy, in each profile
    (default: ``COMPARE_PROFILES`` for throughput, ``LATENCY_PROFILES`` for latency workloads).

    Returns ``{"available", "reason", "configs": [config_entry(...)]}``. Host memory only.
    """
    from nixl_connectors.tools.bench.workloads import Measure, Memory

    avail = find_nixl()
    if not avail.available:
        return {"available": False, "reason": avail.reason, "configs": []}
    if workload.memory is not Memory.HOST or workload.num_layers != 1:
        return {"available": False, "reason": "the host NIXL baseline moves one host-memory pool only "
                f"(memory {workload.memory.value}, {workload.num_layers} layers)", "configs": []}
    latency = workload.measure is Measure.LATENCY
    if profiles is None:
        profiles = LATENCY_PROFILES if latency else COMPARE_PROFILES
    base = NixlReadConfig(
        block_bytes=workload.block_bytes, num_blocks=workload.num_blocks, pool_blocks=workload.pool_blocks,
        reps=workload.reps, warmup=workload.warmup, same_blocks=latency, scattered=workload.scattered,
    )
    configs = [config_entry(p.value, measure_nixl_read(profile_config(p, base))) for p in profiles]
    return {"available": True, "reason": None, "nixl_version": avail.version, "configs": configs}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nixl_connectors.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--block-bytes", type=int, default=16 * 1024)
    p.add_argument("--num-blocks", type=int, default=16_384)
    p.add_argument("--pool-blocks", type=int, default=None, help="default: 2 x num-blocks")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="transfers run first and discarded")
    p.add_argument("--same-blocks", action="store_true", help="the same block ids every rep (latency policy)")
    p.add_argument(
        "--profiles",
        default=",".join(p.value for p in DEFAULT_PROFILES),
        help="comma-separated: " + ", ".join(p.value for p in NixlProfile),
    )
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    pool = args.pool_blocks or 2 * args.num_blocks
    base = NixlReadConfig(
        block_bytes=args.block_bytes, num_blocks=args.num_blocks, pool_blocks=pool,
        reps=args.reps, warmup=args.warmup, same_blocks=args.same_blocks, timeout_s=args.timeout,
    )
    profiles = [NixlProfile(p.strip()) for p in args.profiles.split(",") if p.strip()]
    nbytes = args.num_blocks * args.block_bytes
    limit = host_contiguous_copy(nbytes, reps=args.reps).timings.gbps
    scattered = host_scattered_copy(args.block_bytes, args.num_blocks, pool, reps=args.reps).timings.gbps
    mib = nbytes / 2**20
    load_before = os.getloadavg()
    print(f"workload: {args.num_blocks} x {args.block_bytes} B random blocks ({mib:.0f} MiB), pools {pool} blocks, best of {args.reps}")
    print(f"{'contiguous copy (limit)':32s} {limit:8.2f} GB/s")
    print(f"{'scattered copy in one process':32s} {scattered:8.2f} GB/s")
    results = []
    for prof in profiles:
        r = measure_nixl_read(profile_config(prof, base))
        results.append(r)
        if r.ok and r.gbps is not None:
            t = Timings.of(r.post_to_done_s_per_rep, r.bytes_per_rep)
            print(f"{'nixl ' + prof.value:32s} {r.gbps:8.2f} GB/s  ({r.gbps / limit:.2f}x limit; median "
                  f"{t.median_s * 1e3:.3f} ms, p90 {t.p90_s * 1e3:.3f} ms; verified, "
                  f"{r.notifications_received}/{base.transfers} notifs, params {r.backend_params})")
        else:
            print(f"{'nixl ' + prof.value:32s}   failed: {r.reason}")
    load_after = os.getloadavg()
    cpus = len(os.sched_getaffinity(0))
    print(f"machine: {cpus} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
          "(numbers from a busy machine understate every path)")
    if args.json is not None:
        doc = {
            "contiguous_copy_gbps": limit,
            "scattered_copy_one_process_gbps": scattered,
            "nixl": [r.to_dict() for r in results],
            "machine": {"cpus": cpus, "loadavg_before": load_before, "loadavg_after": load_after},
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0 if all(r.ok for r in results) else 1

