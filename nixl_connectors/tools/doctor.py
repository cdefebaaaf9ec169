"""``nixl-connectors doctor``: what this machine offers the transport, and why a slow path is chosen.

``run_doctor()`` collects the facts (UCX in child processes, /sys/class/infiniband, torch/CUDA,
NIXL, the data paths: ptrace scope and a process_vm_readv probe between two sibling processes,
CUDA IPC prerequisites) and returns a dict; ``main()`` prints it. Diagnosis and formatting are pure functions in
``nixl_connectors.tools.doctor_report``. Nothing here changes this process's environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

from nixl_connectors.tools.bench.nixl_import import find_nixl
from nixl_connectors.tools.doctor_paths import UCX_NET_DEVICES, CmaProbe, DataPaths, IpcInfo
from nixl_connectors.tools.doctor_report import (
    PREFER_SYSTEM_UCX,
    CudaInfo,
    DoctorReport,
    NixlInfo,
    RdmaDevice,
    UcxProbe,
    diagnose,
    format_report,
)

logger = logging.getLogger(__name__)

PROBE_MODULE = "nixl_connectors.tools.doctor_probe"
CMA_PROBE_MODULE = "nixl_connectors.tools.doctor_cma_probe"
INFINIBAND_SYSFS = Path("/sys/class/infiniband")
PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
def _probe_env(overrides: Mapping[str, str | None]) -> dict[str, str]:
    from .bench.nixl_child import child_env  # one way to give a child this package's environment

    return child_env(overrides)


def probe_ucx(overrides: Mapping[str, str | None], timeout_s: float = 60.0) -> UcxProbe:
    """Start a UCX context in a child process whose environment is ours plus ``overrides``."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", PROBE_MODULE],
            env=_probe_env(overrides),
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return UcxProbe(ok=False, error=f"UCX probe did not finish within {timeout_s:.0f}s")
    except OSError as exc:
        return UcxProbe(ok=False, error=f"could not run the UCX probe: {exc}")
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        tail = proc.stderr.decode("utf-8", "replace")[-2000:]
        return UcxProbe(ok=False, error=f"UCX probe exited with {proc.returncode} and no report: {tail}")
    return UcxProbe.from_json(data)


def collect_rdma(root: Path = INFINIBAND_SYSFS) -> list[RdmaDevice]:
    """RDMA devices and their port states from sysfs (empty when there are none)."""
    devices: list[RdmaDevice] = []
    try:
        names = sorted(p.name for p in root.iterdir())
    except OSError:
        return devices
    for name in names:
        ports: dict[str, str] = {}
        try:
            port_dirs = sorted((root / name / "ports").iterdir())
        except OSError:
            port_dirs = []
        for port in port_dirs:
            state = _read_text(port / "state")  # e.g. "4: ACTIVE"
            layer = _read_text(port / "link_layer")
            state = state.split(":", 1)[-1].strip() if state else "?"
            ports[port.name] = f"{state} ({layer})" if layer else state
        devices.append(RdmaDevice(name=name, ports=ports))
    return devices


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def collect_cuda() -> CudaInfo:
    """torch version, CUDA devices and the peer-access matrix."""
    try:
        import torch
    except ImportError as exc:
        return CudaInfo(error=f"torch not importable: {exc}")
    info = CudaInfo(torch_version=str(torch.__version__), torch_cuda_version=torch.version.cuda)
    try:
        if not torch.cuda.is_available():
            return info
        n = torch.cuda.device_count()
        info.devices = [torch.cuda.get_device_name(i) for i in range(n)]
        info.peer_access = [[i == j or bool(torch.cuda.can_device_access_peer(i, j)) for j in range(n)] for i in range(n)]
    except RuntimeError as exc:
        info.error = f"CUDA query failed: {exc}"
    return info


def read_ptrace_scope(path: Path = PTRACE_SCOPE) -> int | None:
    """Yama's ptrace scope (0-3), or None when there is no Yama (classic ptrace rules)."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def probe_cma(timeout_s: float = 30.0) -> CmaProbe:
    """process_vm_readv between two sibling child processes (see doctor_cma_probe.py)."""
    env = _probe_env({})
    cmd = [sys.executable, "-m", CMA_PROBE_MODULE]
    try:
        holder = subprocess.Popen(cmd + ["hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env)
    except OSError as exc:
        return CmaProbe(error=f"could not start the probe: {exc}")
    try:
        if not select.select([holder.stdout], [], [], timeout_s)[0]:
            return CmaProbe(error=f"probe holder did not start within {timeout_s:.0f}s")
        info = json.loads(holder.stdout.readline())
        proc = subprocess.run(cmd + ["read", str(info["pid"]), str(info["addr"]), str(info["len"])],
                              capture_output=True, timeout=timeout_s, env=env)
        res = json.loads(proc.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
        return CmaProbe(ran=True, ok=bool(res["ok"]), errno=res.get("errno"), error=res.get("error"))
    except (subprocess.TimeoutExpired, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        return CmaProbe(error=f"probe failed: {type(exc).__name__}: {exc}")
    finally:
        try:
            holder.stdin.close()
            holder.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            holder.kill()
            holder.wait(timeout=5)


def collect_ipc() -> IpcInfo:
    """Can this process run the CUDA IPC path (torch CUDA, Triton, no MIG)?"""
    info = IpcInfo()
    try:
        import torch

        info.cuda_available = bool(torch.cuda.is_available())
        info.device_count = torch.cuda.device_count() if info.cuda_available else 0
        info.mig = any("MIG" in torch.cuda.get_device_name(i) for i in range(info.device_count))
    except Exception as exc:  # torch missing or the driver refusing: no GPU path
        info.unavailable = f"torch/CUDA: {type(exc).__name__}: {exc}"
        return info
    try:
        import triton

        info.triton = str(getattr(triton, "__version__", "?"))
    except Exception as exc:
        info.triton_error = f"{type(exc).__name__}: {exc}"[:200]
    if info.cuda_available:
        from transport.cuda_ipc import unavailable

        info.unavailable = unavailable()
        if info.unavailable is None:
            info.table_mapped = probe_table_mapped()
    return info


def probe_table_mapped() -> bool | None:
    """Is pinned host memory mapped at its own address on cuda:0 (where the fused kernel reads
    a read's half of its table in place)? None when the probe itself fails."""
    try:
        import torch

        from transport.gpu_upload import device_address_of_host

        with torch.cuda.device(0):
            t = torch.empty(16, dtype=torch.int64, pin_memory=True)
            return device_address_of_host(t.data_ptr()) == t.data_ptr()
    except Exception as exc:  # a broken driver: say nothing rather than fail the report
        logger.debug("pinned-memory mapping probe failed: %s", exc)
        return None


def collect_paths(ucx: UcxProbe, timeout_s: float = 30.0) -> DataPaths:
    return DataPaths(ptrace_scope=read_ptrace_scope(), cma=probe_cma(timeout_s), ipc=collect_ipc(),
                     net_devices=os.environ.get(UCX_NET_DEVICES),
                     ucx_devices=[f"{t}/{d}" for t, d in ucx.resources])


def collect_env() -> dict[str, str]:
    """The user's settings that change which UCX is loaded and which transports it uses."""
    return {k: v for k, v in os.environ.items() if k == PREFER_SYSTEM_UCX or k.startswith("UCX_")}


def build_report(timeout_s: float = 60.0) -> DoctorReport:
    env = collect_env()
    ucx_default = probe_ucx({"UCX_TLS": None}, timeout_s)
    ucx_user = probe_ucx({}, timeout_s) if "UCX_TLS" in env else None
    nixl = find_nixl()
    report = DoctorReport(
        ucx=ucx_default,
        ucx_user=ucx_user,
        env=env,
        cuda=collect_cuda(),
        rdma_devices=collect_rdma(),
        nixl=NixlInfo(available=nixl.available, module=nixl.module, version=nixl.version, reason=nixl.reason),
        paths=collect_paths(ucx_default, min(timeout_s, 30.0)),
    )
    report.findings = diagnose(report)
    return report


def run_doctor(timeout_s: float = 60.0) -> dict[str, Any]:
    """Everything the doctor found, as a JSON-serialisable dict (see ``DoctorReport``)."""
    return build_report(timeout_s).to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nixl-connectors doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of each UCX probe (s)")
    args = parser.parse_args(argv)
    report = build_report(args.timeout)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0 if report.ucx.ok else 1


if __name__ == "__main__":
    sys.exit(main())
