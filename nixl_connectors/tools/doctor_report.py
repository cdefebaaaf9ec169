"""What ``nixl-connectors doctor`` found, why a slower path would be chosen, and how to print it.

Pure: dataclasses, classification, diagnosis and formatting only; collecting the facts
(child processes, /sys, torch) lives in ``nixl_connectors.tools.doctor``.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .doctor_paths import DataPaths


class TransportClass(str, enum.Enum):
    """Families of UCX transports, by what they mean for KV block transfers."""

    SELF = "self"  # loopback inside one process
    TCP = "tcp"  # any host, any network; slowest
    SHARED_MEMORY = "shared memory"  # sysv, posix, knem, xpmem: host memory inside a node
    CMA = "cma"  # cross-memory attach: zero-copy host reads inside a node
    CUDA_COPY = "cuda_copy"  # UCX can read/write CUDA memory (staging inside a process)
    CUDA_IPC = "cuda_ipc"  # GPU to GPU inside a node (NVLink/PCIe peer copies)
    GDR_COPY = "gdr_copy"  # GPUDirect RDMA copy
    RDMA_VERBS = "rdma (verbs)"  # rc/ud/dc over InfiniBand or RoCE
    OTHER = "other"


_PREFIXES: tuple[tuple[str, TransportClass], ...] = (
    ("self", TransportClass.SELF),
    ("tcp", TransportClass.TCP),
    ("sysv", TransportClass.SHARED_MEMORY),
    ("posix", TransportClass.SHARED_MEMORY),
    ("knem", TransportClass.SHARED_MEMORY),
    ("xpmem", TransportClass.SHARED_MEMORY),
    ("cma", TransportClass.CMA),
    ("cuda_copy", TransportClass.CUDA_COPY),
    ("cuda_ipc", TransportClass.CUDA_IPC),
    ("gdr_copy", TransportClass.GDR_COPY),
    ("rc", TransportClass.RDMA_VERBS),
    ("ud", TransportClass.RDMA_VERBS),
    ("dc", TransportClass.RDMA_VERBS),
)


def classify_transport(name: str) -> TransportClass:
    """Map a UCX transport name (``rc_mlx5``, ``posix``, ``cuda_ipc``...) to its family."""
    for prefix, cls in _PREFIXES:
        if name == prefix or name.startswith(prefix + "_"):
            return cls
    return TransportClass.OTHER


class Severity(str, enum.Enum):
    OK = "ok"
    INFO = "info"
    WARN = "warn"
    ERROR = "error"


@dataclass(frozen=True)
class Finding:
    severity: Severity
    topic: str
    message: str


@dataclass
class UcxProbe:
    """One UCX context, started in a child process with a given UCX_TLS (None: UCX's default)."""

    ok: bool
    error: str | None = None
    ucx_version: str | None = None
    ucxx_version: str | None = None
    active_transports: list[str] = field(default_factory=list)
    resources: list[list[str]] = field(default_factory=list)  # [transport, device]
    ucx_libraries: list[str] = field(default_factory=list)
    uct_modules: list[str] = field(default_factory=list)
    ucx_tls: str | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "UcxProbe":
        return cls(
            ok=bool(d.get("ok", False)),
            error=d.get("error"),
            ucx_version=d.get("ucx_version"),
            ucxx_version=d.get("ucxx_version"),
            active_transports=[str(t) for t in d.get("active_transports", [])],
            resources=[[str(x) for x in r] for r in d.get("resources", [])],
            ucx_libraries=[str(p) for p in d.get("ucx_libraries", [])],
            uct_modules=[str(m) for m in d.get("uct_modules", [])],
            ucx_tls=d.get("ucx_tls"),
        )

    def classes(self) -> set[TransportClass]:
        return {classify_transport(t) for t in self.active_transports}


@dataclass
class CudaInfo:
    torch_version: str | None = None
    torch_cuda_version: str | None = None
    devices: list[str] = field(default_factory=list)
    peer_access: list[list[bool]] = field(default_factory=list)  # [i][j]: device i can access j
    error: str | None = None


@dataclass
class RdmaDevice:
    name: str
    ports: dict[str, str] = field(default_factory=dict)  # port -> "ACTIVE (InfiniBand)"


@dataclass
class NixlInfo:
    available: bool
    module: str | None = None
    version: str | None = None
    reason: str | None = None


@dataclass
class DoctorReport:
    ucx: UcxProbe  # UCX's own default transports (UCX_TLS unset)
    ucx_user: UcxProbe | None  # with the user's UCX_TLS, when it is set
    env: dict[str, str]  # RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY and UCX_* as set by the user
    cuda: CudaInfo
    rdma_devices: list[RdmaDevice]
    nixl: NixlInfo
    findings: list[Finding] = field(default_factory=list)
    paths: "DataPaths | None" = None  # which data paths this machine can use (doctor_paths.py)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DoctorReport":
        """Inverse of ``to_dict`` (extra keys such as ``capabilities`` are ignored)."""
        user = d.get("ucx_user")
        cuda = dict(d.get("cuda") or {})
        return cls(
            ucx=UcxProbe.from_json(d.get("ucx") or {}),
            ucx_user=None if user is None else UcxProbe.from_json(user),
            env={str(k): str(v) for k, v in (d.get("env") or {}).items()},
            cuda=CudaInfo(
                torch_version=cuda.get("torch_version"),
                torch_cuda_version=cuda.get("torch_cuda_version"),
                devices=[str(x) for x in cuda.get("devices", [])],
                peer_access=[[bool(x) for x in row] for row in cuda.get("peer_access", [])],
                error=cuda.get("error"),
            ),
            rdma_devices=[RdmaDevice(name=str(r["name"]), ports=dict(r.get("ports", {}))) for r in d.get("rdma_devices", [])],
            nixl=NixlInfo(**{k: (d.get("nixl") or {}).get(k) for k in ("available", "module", "version", "reason")}),
            findings=[Finding(Severity(f["severity"]), str(f["topic"]), str(f["message"])) for f in d.get("findings", [])],
            paths=_paths_from(d.get("paths")),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f in d["findings"]:
            f["severity"] = Severity(f["severity"]).value
        d["capabilities"] = {c.value: (c in self.ucx.classes()) for c in TransportClass if c is not TransportClass.OTHER}
        return d


def _paths_from(d: dict[str, Any] | None) -> "DataPaths | None":
    if d is None:
        return None
    from .doctor_paths import DataPaths

    return DataPaths.from_json(d)


PREFER_SYSTEM_UCX = "RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY"
_TRUTHY = {"1", "true", "yes", "on"}

ERROR_HANDLING_NOTE = (
    "UCX peer error handling (UCP_ERR_HANDLING_MODE_PEER) is what lets UCX report a dead peer, "
    "but it costs throughput (measured on 2-core CPU machines: ~1.5 GB/s vs ~14 GB/s for a 256 MiB "
    "message) and shared memory has no peer failure handler at all (NIXL 1.5 cannot even start with "
    "UCX_TLS=sm and its default error handling). The transport therefore keeps error handling on "
    "its control endpoint only (plus its own keepalive pings) and turns it off on data endpoints, "
    "so bulk data may use shared memory / cma at full speed while a dead peer is still detected."
)


def _peer_findings(cuda: CudaInfo, has_ipc: bool) -> list[Finding]:
    out: list[Finding] = []
    n = len(cuda.devices)
    missing = [
        (i, j)
        for i in range(n)
        for j in range(n)
        if i != j and i < len(cuda.peer_access) and j < len(cuda.peer_access[i]) and not cuda.peer_access[i][j]
    ]
    if missing:
        pairs = ", ".join(f"{i}->{j}" for i, j in missing)
        out.append(Finding(Severity.WARN, "cuda",
                           f"no CUDA peer access for GPU pairs {pairs}: transfers between them cannot use "
                           "direct peer copies and go through host memory (slower)"))
    elif n >= 2 and has_ipc:
        out.append(Finding(Severity.OK, "cuda", f"all {n} GPUs can access each other; cuda_ipc is live"))
    return out


def diagnose(report: DoctorReport) -> list[Finding]:
    """Human-readable reasons why a slower path would be chosen on this machine."""
    f: list[Finding] = []
    ucx = report.ucx
    if not ucx.ok:
        f.append(Finding(Severity.ERROR, "ucx", f"could not start UCX: {ucx.error}"))
        if report.paths is not None:  # the same-host paths do not need UCX
            from .doctor_paths import path_findings

            f.extend(path_findings(report.paths))
        return f
    classes = ucx.classes()
    f.append(Finding(Severity.OK, "ucx", f"UCX {ucx.ucx_version} live transports: {', '.join(ucx.active_transports)}"))

    # Host memory inside a node.
    if TransportClass.CMA in classes or TransportClass.SHARED_MEMORY in classes:
        f.append(Finding(Severity.OK, "host", "shared memory/cma are live: host blocks between local processes avoid tcp"))
    else:
        f.append(Finding(Severity.WARN, "host",
                         "no shared memory or cma transport: host blocks between local processes go over tcp (slow)"))

    # RDMA across nodes.
    prefer_system = report.env.get(PREFER_SYSTEM_UCX, "").strip().lower() in _TRUTHY
    has_verbs = TransportClass.RDMA_VERBS in classes
    if has_verbs:
        f.append(Finding(Severity.OK, "rdma", "UCX verbs transports are live: cross-node transfers can use RDMA"))
    elif report.rdma_devices:
        names = ", ".join(d.name for d in report.rdma_devices)
        if "ib" not in ucx.uct_modules:
            why = ("the UCX in use was built without verbs (no libuct_ib module; the PyPI libucx wheels are)"
                   + ("" if prefer_system else f"; set {PREFER_SYSTEM_UCX}=true to load a system UCX built with verbs"))
        else:
            why = "UCX has its verbs module but no port is usable (check port state, permissions, UCX_TLS/UCX_NET_DEVICES)"
        f.append(Finding(Severity.WARN, "rdma", f"RDMA devices present ({names}) but no verbs transport: {why}; "
                                                "cross-node transfers fall back to tcp"))
    else:
        f.append(Finding(Severity.INFO, "rdma", "no RDMA devices (/sys/class/infiniband): cross-node transfers use tcp"))
    if prefer_system and ucx.ucx_libraries and all("site-packages" in p for p in ucx.ucx_libraries):
        f.append(Finding(Severity.WARN, "ucx",
                         f"{PREFER_SYSTEM_UCX} is set but UCX was loaded from the wheel: no system UCX was found"))

    # GPUs.
    cuda = report.cuda
    if cuda.error:
        f.append(Finding(Severity.INFO, "cuda", f"CUDA not examined: {cuda.error}"))
    elif not cuda.devices:
        f.append(Finding(Severity.INFO, "cuda", "no CUDA devices: host-memory KV caches only"))
    else:
        if TransportClass.CUDA_COPY not in classes:
            f.append(Finding(Severity.WARN, "cuda",
                             "GPUs present but UCX has no cuda_copy: UCX cannot touch CUDA memory, so GPU blocks "
                             "are staged through host memory"))
        if len(cuda.devices) >= 2 and TransportClass.CUDA_IPC not in classes:
            f.append(Finding(Severity.WARN, "cuda",
                             "no cuda_ipc: GPU-to-GPU transfers inside a node are staged through host memory "
                             "instead of NVLink/PCIe peer copies"))
        f.extend(_peer_findings(cuda, TransportClass.CUDA_IPC in classes))

    # The user's UCX_TLS narrows what UCX may use.
    if report.ucx_user is not None and report.ucx_user.ok:
        lost = sorted(set(ucx.active_transports) - set(report.ucx_user.active_transports))
        if lost:
            f.append(Finding(Severity.WARN, "ucx",
                             f"UCX_TLS={report.ucx_user.ucx_tls} disables live transports: {', '.join(lost)}"))
    elif report.ucx_user is not None:
        f.append(Finding(Severity.ERROR, "ucx", f"UCX does not start with UCX_TLS={report.ucx_user.ucx_tls}: {report.ucx_user.error}"))

    if report.paths is not None:
        from .doctor_paths import path_findings

        f.extend(path_findings(report.paths))
    f.append(Finding(Severity.INFO, "errors", ERROR_HANDLING_NOTE))
    if report.nixl.available:
        f.append(Finding(Severity.OK, "nixl", f"NIXL {report.nixl.version or ''} importable as {report.nixl.module}: "
                                              "`nixl-connectors bench` compares with it"))
    else:
        f.append(Finding(Severity.INFO, "nixl", f"NIXL comparison unavailable: {report.nixl.reason}"))
    return f


_MARK = {Severity.OK: "[ok]  ", Severity.INFO: "[info]", Severity.WARN: "[warn]", Severity.ERROR: "[FAIL]"}


def format_peer_matrix(peer_access: list[list[bool]]) -> list[str]:
    """Rows like ``GPU0  -  Y  N`` (``-`` on the diagonal)."""
    n = len(peer_access)
    lines = ["      " + " ".join(f"{j:>3d}" for j in range(n))]
    for i, row in enumerate(peer_access):
        cells = " ".join("  -" if i == j else ("  Y" if ok else "  N") for j, ok in enumerate(row))
        lines.append(f"GPU{i:<3d}" + cells)
    return lines


def format_report(report: DoctorReport | dict[str, Any]) -> str:
    """The doctor's text output (from a ``DoctorReport`` or its ``to_dict()`` form)."""
    if isinstance(report, dict):
        report = DoctorReport.from_dict(report)
    u = report.ucx
    lines = ["nixl-connectors doctor", ""]
    lines.append(f"UCX            {u.ucx_version or '?'} (ucxx {u.ucxx_version or '?'})")
    lines.append(f"UCX library    {next((p for p in u.ucx_libraries if 'libucp' in p), '?')}")
    lines.append(f"UCT modules    {', '.join(u.uct_modules) or '-'}")
    lines.append(f"transports     {', '.join(u.active_transports) or '-'}  (UCX_TLS unset)")
    if report.ucx_user is not None:
        lines.append(f"               {', '.join(report.ucx_user.active_transports) or '-'}  (UCX_TLS={report.ucx_user.ucx_tls})")
    caps = report.to_dict()["capabilities"]
    lines.append("capabilities   " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in caps.items()))
    lines.append(f"{PREFER_SYSTEM_UCX}={report.env.get(PREFER_SYSTEM_UCX, '(unset)')}")
    others = {k: v for k, v in report.env.items() if k != PREFER_SYSTEM_UCX}
    if others:
        lines.append("UCX env        " + " ".join(f"{k}={v}" for k, v in sorted(others.items())))
    c = report.cuda
    lines.append(f"torch          {c.torch_version or '-'} (CUDA {c.torch_cuda_version or '-'})")
    lines.append(f"CUDA devices   {len(c.devices)}" + "".join(f"\n  GPU{i}: {name}" for i, name in enumerate(c.devices)))
    if len(c.devices) >= 2:
        lines.append("peer access (row can access column):")
        lines.extend("  " + line for line in format_peer_matrix(c.peer_access))
    if report.rdma_devices:
        lines.append("RDMA devices   " + "; ".join(
            f"{d.name} ({', '.join(f'port {p}: {s}' for p, s in sorted(d.ports.items())) or 'no ports'})"
            for d in report.rdma_devices))
    else:
        lines.append("RDMA devices   none")
    n = report.nixl
    lines.append(f"NIXL           {'yes: ' + str(n.module) + ' ' + str(n.version or '') if n.available else 'no'}")
    if report.paths is not None:
        from .doctor_paths import format_paths

        lines.extend(format_paths(report.paths))
    lines.append("")
    for finding in report.findings:
        lines.append(f"{_MARK[finding.severity]} {finding.topic}: {finding.message}")
    return "\n".join(lines)
