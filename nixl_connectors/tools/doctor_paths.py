"""Which data paths the transport can use on this machine, and why a slower one would be chosen
(pure: dataclasses, diagnosis and formatting; the facts are collected in ``doctor.py``).

The transport moves bytes in one of three ways (``transport/paths.py``):
- same host, host memory: the reader copies the leased blocks itself with one
  ``process_vm_readv`` (needs ptrace permission over the owner process);
- same host, CUDA memory: the reader maps the owner's pool through CUDA IPC and runs one fused
  Triton kernel (needs torch with CUDA, Triton, and IPC between the two devices);
- otherwise UCX: the owner packs and sends chunks (other hosts, and every fallback).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .doctor_report import Finding, Severity

UCX_NET_DEVICES = "UCX_NET_DEVICES"

SCOPE_MEANING = {
    None: "no Yama LSM: classic ptrace rules (same user, no extra capability)",
    0: "0: classic ptrace rules (same user)",
    1: "1: restricted: a process may read only its descendants' memory (or with CAP_SYS_PTRACE)",
    2: "2: admin-only: reading another process's memory needs CAP_SYS_PTRACE",
    3: "3: no attach: no process may read another's memory until reboot",
}


@dataclass
class CmaProbe:
    """process_vm_readv from one child process into a sibling (neither is the other's
    ancestor, as prefill and decode processes started by a launcher are)."""

    ran: bool = False
    ok: bool = False
    errno: str | None = None      # "EPERM", "ENOSYS", ...
    error: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CmaProbe":
        return cls(bool(d.get("ran")), bool(d.get("ok")), d.get("errno"), d.get("error"))


@dataclass
class IpcInfo:
    cuda_available: bool = False
    device_count: int = 0
    triton: str | None = None     # version when importable
    triton_error: str | None = None
    mig: bool = False             # a MIG instance: CUDA IPC is not supported there
    unavailable: str | None = None  # transport.cuda_ipc.unavailable(): why this process cannot use the path
    # Pinned host memory mapped at its own address on the device (transport.gpu_upload): the kernel
    # reads each read's half of its table in place; False: copied to the device first (one more
    # copy enqueued per read); None: not probed.
    table_mapped: bool | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "IpcInfo":
        return cls(bool(d.get("cuda_available")), int(d.get("device_count") or 0), d.get("triton"),
                   d.get("triton_error"), bool(d.get("mig")), d.get("unavailable"), d.get("table_mapped"))


@dataclass
class DataPaths:
    ptrace_scope: int | None = None   # /proc/sys/kernel/yama/ptrace_scope; None: no Yama
    cma: CmaProbe = field(default_factory=CmaProbe)
    ipc: IpcInfo = field(default_factory=IpcInfo)
    net_devices: str | None = None    # UCX_NET_DEVICES as set by the user
    ucx_devices: list[str] = field(default_factory=list)  # "tcp/eth0", "rc_mlx5/mlx5_0:1" from the UCX probe

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "DataPaths":
        return cls(d.get("ptrace_scope"), CmaProbe.from_json(d.get("cma") or {}), IpcInfo.from_json(d.get("ipc") or {}),
                   d.get("net_devices"), [str(x) for x in d.get("ucx_devices", [])])

    @property
    def cma_possible(self) -> bool:
        return self.cma.ok

    @property
    def ipc_possible(self) -> bool:
        i = self.ipc
        return i.cuda_available and i.device_count > 0 and i.triton is not None and not i.mig and i.unavailable is None


def _cma_why(p: DataPaths) -> str:
    if p.cma.errno == "EPERM" or p.cma.errno == "EACCES":
        if p.ptrace_scope == 1:
            return ("kernel.yama.ptrace_scope is 1, so only an ancestor may read a process's memory; prefill and "
                    "decode processes started separately are not each other's ancestors (fix: sysctl -w "
                    "kernel.yama.ptrace_scope=0, or CAP_SYS_PTRACE for the reader)")
        if p.ptrace_scope in (2, 3):
            return f"kernel.yama.ptrace_scope is {p.ptrace_scope} ({SCOPE_MEANING[p.ptrace_scope]})"
        return ("permission denied although ptrace_scope allows it: different users, or a container without "
                "CAP_SYS_PTRACE")
    if p.cma.errno == "ENOSYS":
        return "the kernel or a seccomp profile does not allow process_vm_readv"
    return p.cma.error or f"the probe failed ({p.cma.errno})"


def _ipc_why(i: IpcInfo) -> str:
    if i.mig:
        return "the GPU is a MIG instance, where CUDA IPC is not supported"
    if i.triton is None:
        return f"Triton is not importable ({i.triton_error or 'not installed'}); it comes with CUDA builds of torch"
    return i.unavailable or "unknown"


def _table_home(i: IpcInfo) -> str:
    if i.table_mapped is None:
        return ""
    return ", read tables " + ("mapped (read in place)" if i.table_mapped else "copied to the device")


def path_findings(p: DataPaths) -> list[Finding]:
    out: list[Finding] = []
    if not p.cma.ran:
        out.append(Finding(Severity.INFO, "paths", f"same-host host-memory copy not probed: {p.cma.error or 'skipped'}"))
    elif p.cma.ok:
        note = "" if p.ptrace_scope in (None, 0) else f" (ptrace_scope {p.ptrace_scope}, yet allowed here)"
        out.append(Finding(Severity.OK, "paths", "same host, host memory: the reader copies leased blocks with one "
                                                 "process_vm_readv (probed between two unrelated processes)" + note))
    else:
        out.append(Finding(Severity.WARN, "paths", "same host, host memory: process_vm_readv between unrelated "
                                                   f"processes fails ({_cma_why(p)}); host KV blocks fall back to "
                                                   "UCX (owner packs, shared memory/tcp, reader unpacks), several "
                                                   "times slower for scattered blocks"))
    i = p.ipc
    if not i.cuda_available:
        out.append(Finding(Severity.INFO, "paths", "same host, CUDA memory: no CUDA device in this process (GPU path "
                                                   "not applicable)"))
    elif p.ipc_possible:
        layout = "two processes on one GPU" if i.device_count == 1 else f"processes on any of {i.device_count} GPUs"
        out.append(Finding(Severity.OK, "paths", f"same host, CUDA memory: CUDA IPC + one fused Triton kernel per "
                                                 f"transfer ({layout}; Triton {i.triton}); peers without peer access "
                                                 "fall back to UCX"))
        if i.table_mapped is False:
            out.append(Finding(Severity.INFO, "paths", "the driver does not map pinned host memory at its own "
                                                       "address here: the kernel cannot read a Descs' run table "
                                                       "where it lies, so each CUDA IPC read writes its table and "
                                                       "copies it to the device first (tens of microseconds more "
                                                       "per read; Agent.snapshot()['gpu_run_tables'])"))
    else:
        out.append(Finding(Severity.WARN, "paths", f"same host, CUDA memory: CUDA IPC path off: {_ipc_why(i)}; GPU "
                                                   "KV blocks go through UCX (owner packs, UCX moves chunks), far "
                                                   "slower for scattered blocks"))
    out.append(Finding(Severity.INFO, "paths", "a running agent counts the paths it took and every fallback with its "
                                               "reason in Agent.snapshot()['paths'] / ['fallbacks']; "
                                               "AgentConfig(same_host_copy=False, gpu_ipc=False) turns the same-host "
                                               "paths off"))
    if p.net_devices:
        out.append(Finding(Severity.INFO, "paths", f"{UCX_NET_DEVICES}={p.net_devices} restricts the network devices "
                                                   "UCX uses (other hosts and fallbacks)"))
    return out


def format_paths(p: DataPaths) -> list[str]:
    scope = "none (no Yama)" if p.ptrace_scope is None else str(p.ptrace_scope)
    cma = ("yes" if p.cma.ok else "not probed" if not p.cma.ran else f"no ({p.cma.errno or p.cma.error})")
    i = p.ipc
    ipc = "yes" if p.ipc_possible else ("n/a (no CUDA)" if not i.cuda_available else f"no ({_ipc_why(i)})")
    nets = ", ".join(d for d in p.ucx_devices if not d.startswith(("self/", "sysv/", "posix/", "cma/", "cuda")))
    return [
        "data paths",
        f"  same host, host memory   process_vm_readv: {cma}   (ptrace_scope {scope})",
        f"  same host, CUDA memory   CUDA IPC + fused kernel: {ipc}   (torch CUDA "
        f"{'yes' if i.cuda_available else 'no'}, {i.device_count} device(s), Triton {i.triton or 'no'}"
        f"{_table_home(i)})",
        f"  other hosts, fallbacks   UCX; network devices {nets or '-'}; "
        f"{UCX_NET_DEVICES}={p.net_devices or '(unset)'}",
    ]
