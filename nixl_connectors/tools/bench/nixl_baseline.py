"""NIXL 1.5 baseline: the transport's benchmark workload run through NIXL's Python API.

Two OS processes, as in disaggregated serving: an *owner* registers a host (numpy) pool of
blocks with a NIXL agent; a *reader* registers its own pool, loads the owner's agent
metadata and READs ``num_blocks`` random blocks of ``block_bytes`` (random block ids on both
sides) with ``prep_xfer_dlist`` / ``make_prepped_xfer`` / ``transfer`` / ``check_xfer_state``,
then verifies every byte. Each transfer carries a notification that the owner collects.
The result is the best of ``reps`` transfers, in GB/s (1e9 bytes/s).

UCX reads its configuration from the environment when NIXL starts, so per-run settings
(``UCX_TLS``...) go into the children's environment only; this process's environment is
never changed. The UCX backend's error handling is a NIXL backend parameter
(``ucx_error_handling_mode``: ``peer``, the default, or ``none``).

Command line: ``python -m nixl_connectors.tools.bench --help``.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from nixl_connectors.tools.bench.pipe_messages import ChannelError, LineReader, write_message
from nixl_connectors.tools.bench.copy_limit import local_copy_limit
from nixl_connectors.tools.bench.nixl_import import find_nixl
from nixl_connectors.tools.bench.nixl_types import (
    MsgType,
    NixlReadConfig,
    NixlReadResult,
    Role,
    UcxErrorHandling,
)

logger = logging.getLogger(__name__)

__all__ = [
    "NixlBenchError",
    "DEFAULT_PROFILES",
    "COMPARE_PROFILES",
    "NixlProfile",
    "compare_entry",
    "local_copy_limit",
    "measure_nixl_read",
    "profile_config",
    "run_nixl_read",
]

WORKER_MODULE = "nixl_connectors.tools.bench._nixl_worker"
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_STDERR_TAIL = 4000
_EXIT_GRACE_S = 10.0


class NixlBenchError(RuntimeError):
    """A child process failed, broke the protocol or missed a deadline."""


class NixlProfile(str, enum.Enum):
    """The NIXL configurations compared by the benchmark.

    Found with nixl-cu12 1.5.1: ``UCX_TLS=sm,self`` alone (``SHM``) cannot even create the UCX
    backend, because NIXL's default ``ucx_error_handling_mode=peer`` needs a transport with a
    peer failure handler for active messages, which shared memory lacks ("no active messages
    transport ... no peer failure handler"); it works once error handling is ``none``.
    NIXL's progress thread (on by default) busy-polls, which on a 2-core machine competes with
    the reader and costs about 3x; ``TUNED`` turns it off too.
    """

    DEFAULT = "default"  # NIXL and UCX defaults
    NO_ERR_HANDLING = "no-err-handling"  # ucx_error_handling_mode=none
    NO_PROGRESS_THREAD = "no-progress-thread"  # nixl_agent_config(enable_prog_thread=False)
    SHM = "shm"  # UCX_TLS=sm,self (fails with NIXL's default error handling, see above)
    SHM_NO_ERR_HANDLING = "shm-no-err-handling"  # UCX_TLS=sm,self + ucx_error_handling_mode=none
    TUNED = "tuned"  # UCX_TLS=sm,self + ucx_error_handling_mode=none + no progress thread


DEFAULT_PROFILES: tuple[NixlProfile, ...] = (
    NixlProfile.DEFAULT,
    NixlProfile.NO_ERR_HANDLING,
    NixlProfile.NO_PROGRESS_THREAD,
    NixlProfile.SHM_NO_ERR_HANDLING,
    NixlProfile.TUNED,
)
SHM_ENV: dict[str, str | None] = {"UCX_TLS": "sm,self"}
_SHM = (NixlProfile.SHM, NixlProfile.SHM_NO_ERR_HANDLING, NixlProfile.TUNED)
_NO_EH = (NixlProfile.NO_ERR_HANDLING, NixlProfile.SHM_NO_ERR_HANDLING, NixlProfile.TUNED)
_NO_PTHREAD = (NixlProfile.NO_PROGRESS_THREAD, NixlProfile.TUNED)


def profile_config(profile: NixlProfile, base: NixlReadConfig | None = None) -> NixlReadConfig:
    """The config of ``profile`` with the workload (and timeout, seed) of ``base``."""
    base = base or NixlReadConfig()
    return replace(
        base,
        env={**base.env, **SHM_ENV} if profile in _SHM else dict(base.env),
        ucx_error_handling=UcxErrorHandling.NONE if profile in _NO_EH else base.ucx_error_handling,
        progress_thread=False if profile in _NO_PTHREAD else base.progress_thread,
        label=profile.value,
    )


def child_env(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """This process's environment plus ``overrides`` (None unsets), for a child process."""
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    # The children import this package even when it runs from a source checkout.
    paths = [str(_PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class _Child:
    """One worker process with a JSON-lines channel on its stdin/stdout."""

    def __init__(self, role: Role, env: dict[str, str]) -> None:
        self.role = role
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, role.value],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,
        )
        if self.proc.stdout is None or self.proc.stdin is None:
            raise NixlBenchError("could not open pipes to the worker")
        self._inbox = LineReader(self.proc.stdout.fileno())

    def send(self, msg: dict[str, Any]) -> None:
        if self.proc.stdin is None:
            raise NixlBenchError(f"{self.role.value}: stdin closed")
        try:
            write_message(self.proc.stdin.fileno(), msg)
        except (BrokenPipeError, ChannelError) as exc:
            raise self._failure(f"could not send {msg['type']}: {exc}") from exc

    def expect(self, kind: MsgType, deadline: float) -> dict[str, Any]:
        try:
            msg = self._inbox.read(max(0.0, deadline - time.monotonic()))
        except ChannelError as exc:
            raise self._failure(f"waiting for {kind.value}: {exc}") from exc
        if msg["type"] == MsgType.ERROR.value:
            raise self._failure(f"reported: {msg.get('error')}")
        if msg["type"] != kind.value:
            raise self._failure(f"expected {kind.value}, got {msg['type']!r}")
        return msg

    def stderr_tail(self) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - _STDERR_TAIL))
        return self._stderr.read().decode("utf-8", "replace")

    def _failure(self, what: str) -> NixlBenchError:
        rc = self.proc.poll()
        return NixlBenchError(f"{self.role.value} {what} (exit code {rc}); stderr tail:\n{self.stderr_tail()}")

    def close(self, timeout: float) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit in time; killing pid %d", self.role.value, self.proc.pid)
            self.proc.kill()
            self.proc.wait(timeout=_EXIT_GRACE_S)
        self._stderr.close()


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
    children: list[_Child] = []
    try:
        owner = _Child(Role.OWNER, env)
        children.append(owner)
        reader = _Child(Role.READER, env)
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
            child.close(max(1.0, min(_EXIT_GRACE_S, deadline - time.monotonic())))
        result.wall_s = time.monotonic() - t_start

    nbytes = int(res["bytes_per_rep"])
    result.bytes_per_rep = nbytes
    result.transfer_s_per_rep = [float(s) for s in res["transfer_s"]]
    result.prep_s_per_rep = [float(s) for s in res["prep_s"]]
    result.gbps_per_rep = [nbytes / s / 1e9 for s in result.transfer_s_per_rep]
    result.mismatched_blocks = int(res["mismatched_blocks"])
    result.backend_params = {str(k): str(v) for k, v in dict(res.get("backend_params", {})).items()}
    result.notifications_received = len(done.get("notifications", []))
    result.verified = result.mismatched_blocks == 0
    if not result.verified:
        result.reason = f"{result.mismatched_blocks} blocks arrived with wrong bytes"
    elif result.gbps_per_rep:
        result.gbps = max(result.gbps_per_rep)
    if result.notifications_received < cfg.reps:
        logger.warning(
            "owner saw %d of %d transfer notifications", result.notifications_received, cfg.reps
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


COMPARE_PROFILES: tuple[NixlProfile, ...] = (
    NixlProfile.DEFAULT,
    NixlProfile.SHM_NO_ERR_HANDLING,
    NixlProfile.TUNED,
)


def compare_entry(workload: Any, profiles: tuple[NixlProfile, ...] = COMPARE_PROFILES) -> dict[str, Any]:
    """NIXL results for a ``nixl_connectors.tools.bench.workloads.Workload`` (used by ``nixl-connectors bench``).

    Returns ``{"available", "reason", "configs": [{"name", "gbps", "verified", "reason", "result"}]}``;
    ``gbps`` is None for a configuration that failed. Host memory only.
    """
    avail = find_nixl()
    if not avail.available:
        return {"available": False, "reason": avail.reason, "configs": []}
    memory = getattr(getattr(workload, "memory", None), "value", "host")
    if memory != "host":
        return {"available": False, "reason": f"the NIXL baseline moves host memory only, not {memory}", "configs": []}
    base = NixlReadConfig(
        block_bytes=int(workload.block_bytes),
        num_blocks=int(workload.num_blocks),
        pool_blocks=int(workload.num_blocks) * int(getattr(workload, "pool_factor", 2)),
        reps=int(getattr(workload, "reps", 5)),
        scattered=bool(getattr(workload, "scattered", True)),
    )
    configs = []
    for prof in profiles:
        r = measure_nixl_read(profile_config(prof, base))
        configs.append({"name": prof.value, "gbps": r.gbps, "verified": r.verified, "reason": r.reason, "result": r.to_dict()})
    return {"available": True, "reason": None, "nixl_version": avail.version, "configs": configs}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nixl_connectors.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--block-bytes", type=int, default=16 * 1024)
    p.add_argument("--num-blocks", type=int, default=16_384)
    p.add_argument("--pool-blocks", type=int, default=None, help="default: 2 x num-blocks")
    p.add_argument("--reps", type=int, default=5)
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
        reps=args.reps, timeout_s=args.timeout,
    )
    profiles = [NixlProfile(p.strip()) for p in args.profiles.split(",") if p.strip()]
    limit = local_copy_limit(args.block_bytes, args.num_blocks, pool, reps=args.reps)
    mib = args.num_blocks * args.block_bytes / 2**20
    load_before = os.getloadavg()
    print(f"workload: {args.num_blocks} x {args.block_bytes} B random blocks ({mib:.0f} MiB), pools {pool} blocks, best of {args.reps}")
    print(f"{'numpy scattered copy (limit)':32s} {limit:8.2f} GB/s")
    results = []
    for prof in profiles:
        r = measure_nixl_read(profile_config(prof, base))
        results.append(r)
        if r.ok and r.gbps is not None:
            print(f"{'nixl ' + prof.value:32s} {r.gbps:8.2f} GB/s  ({r.gbps / limit:.2f}x limit, verified, "
                  f"{r.notifications_received}/{args.reps} notifs, params {r.backend_params})")
        else:
            print(f"{'nixl ' + prof.value:32s}   failed: {r.reason}")
    load_after = os.getloadavg()
    cpus = len(os.sched_getaffinity(0))
    print(f"machine: {cpus} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
          "(numbers from a busy machine understate every path)")
    if args.json is not None:
        doc = {
            "copy_limit_gbps": limit,
            "nixl": [r.to_dict() for r in results],
            "machine": {"cpus": cpus, "loadavg_before": load_before, "loadavg_after": load_after},
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0 if all(r.ok for r in results) else 1

