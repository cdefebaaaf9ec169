"""Pure parts of `nixl-connectors doctor`: classification, diagnosis, formatting, sysfs parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nixl_connectors.tools.doctor import collect_rdma, format_report as doctor_format_report
from nixl_connectors.tools.doctor_probe import loaded_ucx_libraries, parse_resources, uct_modules
from nixl_connectors.tools.doctor_report import (
    PREFER_SYSTEM_UCX,
    CudaInfo,
    DoctorReport,
    NixlInfo,
    RdmaDevice,
    Severity,
    TransportClass,
    UcxProbe,
    classify_transport,
    diagnose,
    format_peer_matrix,
    format_report,
)

CPU_TRANSPORTS = ["cma", "posix", "self", "sysv", "tcp"]


def _report(
    transports=CPU_TRANSPORTS,
    modules=("cma", "cuda"),
    rdma=(),
    env=None,
    devices=(),
    peer=(),
    user=None,
    nixl=True,
    libs=("/x/site-packages/libucx/lib/libucp.so",),
) -> DoctorReport:
    r = DoctorReport(
        ucx=UcxProbe(ok=True, ucx_version="1.21.0", active_transports=list(transports),
                     uct_modules=list(modules), ucx_libraries=list(libs)),
        ucx_user=user,
        env=dict(env or {}),
        cuda=CudaInfo(torch_version="2.13.0", devices=list(devices), peer_access=[list(r) for r in peer]),
        rdma_devices=list(rdma),
        nixl=NixlInfo(available=nixl, module="nixl_cu12" if nixl else None, version="1.5.1" if nixl else None,
                      reason=None if nixl else "not installed"),
    )
    r.findings = diagnose(r)
    return r


def _messages(report: DoctorReport, topic: str, severity: Severity | None = None) -> list[str]:
    return [f.message for f in report.findings if f.topic == topic and (severity is None or f.severity is severity)]


@pytest.mark.parametrize(
    "name,cls",
    [
        ("tcp", TransportClass.TCP),
        ("sysv", TransportClass.SHARED_MEMORY),
        ("posix", TransportClass.SHARED_MEMORY),
        ("xpmem", TransportClass.SHARED_MEMORY),
        ("cma", TransportClass.CMA),
        ("cuda_copy", TransportClass.CUDA_COPY),
        ("cuda_ipc", TransportClass.CUDA_IPC),
        ("gdr_copy", TransportClass.GDR_COPY),
        ("rc_mlx5", TransportClass.RDMA_VERBS),
        ("rc_verbs", TransportClass.RDMA_VERBS),
        ("ud_verbs", TransportClass.RDMA_VERBS),
        ("dc_mlx5", TransportClass.RDMA_VERBS),
        ("self", TransportClass.SELF),
        ("rdmacm", TransportClass.OTHER),
        ("tcpx", TransportClass.OTHER),
    ],
)
def test_classify_transport(name, cls):
    assert classify_transport(name) is cls


def test_cpu_machine_findings():
    r = _report()
    assert not _messages(r, "host", Severity.WARN)
    assert any("no RDMA devices" in m for m in _messages(r, "rdma", Severity.INFO))
    assert any("no CUDA devices" in m for m in _messages(r, "cuda"))
    assert any("control endpoint" in m for m in _messages(r, "errors"))
    caps = r.to_dict()["capabilities"]
    assert caps["cma"] and caps["tcp"] and not caps["rdma (verbs)"] and not caps["cuda_ipc"]


def test_tcp_only_warns_about_host_path():
    r = _report(transports=["self", "tcp"])
    assert any("go over tcp" in m for m in _messages(r, "host", Severity.WARN))


def test_rdma_nic_without_verbs_points_at_system_ucx():
    r = _report(rdma=[RdmaDevice("mlx5_0", {"1": "ACTIVE (InfiniBand)"})])
    msgs = _messages(r, "rdma", Severity.WARN)
    assert msgs and "built without verbs" in msgs[0] and PREFER_SYSTEM_UCX in msgs[0]


def test_rdma_nic_with_verbs_module_but_no_port():
    r = _report(rdma=[RdmaDevice("mlx5_0", {"1": "DOWN (InfiniBand)"})], modules=("cma", "ib"),
                env={PREFER_SYSTEM_UCX: "true"}, libs=("/usr/lib/libucp.so",))
    msgs = _messages(r, "rdma", Severity.WARN)
    assert msgs and "port" in msgs[0]
    assert not _messages(r, "ucx", Severity.WARN)


def test_verbs_live():
    r = _report(transports=CPU_TRANSPORTS + ["rc_mlx5", "ud_mlx5"], rdma=[RdmaDevice("mlx5_0")])
    assert _messages(r, "rdma", Severity.OK)
    assert r.to_dict()["capabilities"]["rdma (verbs)"]


def test_prefer_system_set_but_wheel_loaded():
    r = _report(env={PREFER_SYSTEM_UCX: "1"})
    assert any("loaded from the wheel" in m for m in _messages(r, "ucx", Severity.WARN))


def test_gpus_without_cuda_transports():
    r = _report(devices=["H100", "H100"], peer=[[True, True], [True, True]])
    msgs = _messages(r, "cuda", Severity.WARN)
    assert any("no cuda_copy" in m for m in msgs)
    assert any("no cuda_ipc" in m and "host memory" in m for m in msgs)


def test_gpus_with_ipc_and_missing_peer_pair():
    r = _report(transports=CPU_TRANSPORTS + ["cuda_copy", "cuda_ipc"], devices=["A", "B", "C"],
                peer=[[True, True, False], [True, True, True], [False, True, True]])
    msgs = _messages(r, "cuda", Severity.WARN)
    assert len(msgs) == 1 and "0->2" in msgs[0] and "2->0" in msgs[0]


def test_gpus_full_peer_access_ok():
    r = _report(transports=CPU_TRANSPORTS + ["cuda_copy", "cuda_ipc"], devices=["A", "B"],
                peer=[[True, True], [True, True]])
    assert not _messages(r, "cuda", Severity.WARN)
    assert _messages(r, "cuda", Severity.OK)


def test_user_ucx_tls_narrows_transports():
    user = UcxProbe(ok=True, active_transports=["self", "tcp"], ucx_tls="tcp")
    r = _report(user=user)
    msgs = _messages(r, "ucx", Severity.WARN)
    assert msgs and "UCX_TLS=tcp" in msgs[0] and "cma" in msgs[0]


def test_user_ucx_tls_broken():
    r = _report(user=UcxProbe(ok=False, error="no transports", ucx_tls="bogus"))
    assert _messages(r, "ucx", Severity.ERROR)


def test_probe_failure_is_an_error():
    r = DoctorReport(ucx=UcxProbe(ok=False, error="boom"), ucx_user=None, env={}, cuda=CudaInfo(),
                     rdma_devices=[], nixl=NixlInfo(available=False))
    r.findings = diagnose(r)
    assert [f.severity for f in r.findings] == [Severity.ERROR]
    assert "boom" in format_report(r)


def test_nixl_missing_is_info():
    r = _report(nixl=False)
    assert _messages(r, "nixl", Severity.INFO)


def test_format_report_text_and_dict_roundtrip():
    r = _report(devices=["A", "B"], peer=[[True, False], [True, True]], rdma=[RdmaDevice("mlx5_0", {"1": "ACTIVE"})],
                user=UcxProbe(ok=True, active_transports=["tcp"], ucx_tls="tcp"), env={"UCX_TLS": "tcp"})
    text = format_report(r)
    for needle in ("UCX            1.21.0", "cma, posix, self, sysv, tcp", "UCX_TLS=tcp", "GPU1", "mlx5_0",
                   "NIXL           yes", "[warn]", f"{PREFER_SYSTEM_UCX}=(unset)"):
        assert needle in text, needle
    as_dict = json.loads(json.dumps(r.to_dict()))
    assert DoctorReport.from_dict(as_dict) == r
    assert doctor_format_report(as_dict) == text


def test_format_peer_matrix():
    lines = format_peer_matrix([[True, False], [True, True]])
    assert lines[1].split() == ["GPU0", "-", "N"]
    assert lines[2].split() == ["GPU1", "Y", "-"]


def test_parse_resources():
    info = """#      resource 0  :  md 0  dev 0  flags -- self/memory
#      resource 1  :  md 1  dev 1  flags -- tcp/eth0
#      resource 5  :  md 4  dev 0  flags -- cma/memory
#      resource 6  :  md 5  dev 2  flags -- rc_mlx5/mlx5_0:1
"""
    assert parse_resources(info) == [("self", "memory"), ("tcp", "eth0"), ("cma", "memory"), ("rc_mlx5", "mlx5_0:1")]


def test_loaded_ucx_libraries_and_modules(tmp_path: Path):
    lib = tmp_path / "lib"
    (lib / "ucx").mkdir(parents=True)
    for name in ("libuct_cma.so", "libuct_ib.so", "libuct_cma.so.0", "libucm_cuda.so"):
        (lib / "ucx" / name).write_bytes(b"")
    maps = (
        f"7f00-7f01 r-xp 00000000 08:01 1 {lib}/libucp.so.0\n"
        f"7f01-7f02 r-xp 00000000 08:01 1 {lib}/libucp.so.0\n"
        f"7f02-7f03 r-xp 00000000 08:01 2 /usr/lib/libc.so.6\n"
        "7f03-7f04 rw-p 00000000 00:00 0\n"
    )
    libs = loaded_ucx_libraries(maps)
    assert libs == [f"{lib}/libucp.so.0"]
    assert uct_modules(libs) == ["cma", "ib"]


def test_collect_rdma_from_fake_sysfs(tmp_path: Path):
    port = tmp_path / "mlx5_0" / "ports" / "1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "link_layer").write_text("InfiniBand\n")
    (tmp_path / "mlx5_1").mkdir()
    devs = collect_rdma(tmp_path)
    assert devs == [RdmaDevice("mlx5_0", {"1": "ACTIVE (InfiniBand)"}), RdmaDevice("mlx5_1", {})]
    assert collect_rdma(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------- data paths
from nixl_connectors.tools.doctor import read_ptrace_scope  # noqa: E402
from nixl_connectors.tools.doctor_cma_probe import expected_bytes, read_remote  # noqa: E402
from nixl_connectors.tools.doctor_paths import CmaProbe, DataPaths, IpcInfo, format_paths, path_findings  # noqa: E402

GPU_OK = IpcInfo(cuda_available=True, device_count=1, triton="3.6.0")


def _paths_report(paths: DataPaths) -> DoctorReport:
    r = _report()
    r.paths = paths
    r.findings = diagnose(r)
    return r


def test_paths_cpu_machine_cma_ok():
    p = DataPaths(ptrace_scope=None, cma=CmaProbe(ran=True, ok=True), ucx_devices=["tcp/eth0", "sysv/memory"])
    r = _paths_report(p)
    ok = _messages(r, "paths", Severity.OK)
    assert len(ok) == 1 and "process_vm_readv" in ok[0]
    assert any("no CUDA device" in m for m in _messages(r, "paths", Severity.INFO))
    assert not _messages(r, "paths", Severity.WARN)
    text = format_report(r)
    assert "process_vm_readv: yes" in text and "tcp/eth0" in text and "sysv/memory" not in text


@pytest.mark.parametrize("scope,needle", [(1, "ptrace_scope=0"), (2, "ptrace_scope is 2"), (0, "CAP_SYS_PTRACE"),
                                          (None, "different users")])
def test_paths_cma_denied_says_why(scope, needle):
    r = _paths_report(DataPaths(ptrace_scope=scope, cma=CmaProbe(ran=True, ok=False, errno="EPERM", error="x")))
    warn = _messages(r, "paths", Severity.WARN)
    assert len(warn) == 1 and needle in warn[0] and "fall back to UCX" in warn[0]


def test_paths_cma_not_probed_and_enosys():
    r = _paths_report(DataPaths(cma=CmaProbe(ran=False, error="probe holder did not start")))
    assert any("did not start" in m for m in _messages(r, "paths", Severity.INFO))
    r = _paths_report(DataPaths(cma=CmaProbe(ran=True, ok=False, errno="ENOSYS")))
    assert any("seccomp" in m for m in _messages(r, "paths", Severity.WARN))


def test_paths_cuda_ipc():
    r = _paths_report(DataPaths(cma=CmaProbe(ran=True, ok=True), ipc=GPU_OK))
    assert any("CUDA IPC + one fused Triton kernel" in m and "one GPU" in m for m in _messages(r, "paths", Severity.OK))
    assert "CUDA IPC + fused kernel: yes" in format_report(r)
    no_triton = IpcInfo(cuda_available=True, device_count=2, triton=None, triton_error="ImportError: x")
    r = _paths_report(DataPaths(cma=CmaProbe(ran=True, ok=True), ipc=no_triton))
    assert any("Triton is not importable" in m for m in _messages(r, "paths", Severity.WARN))
    mig = IpcInfo(cuda_available=True, device_count=1, triton="3.6.0", mig=True)
    assert any("MIG" in m for m in _messages(_paths_report(DataPaths(ipc=mig)), "paths", Severity.WARN))
    refused = IpcInfo(cuda_available=True, device_count=1, triton="3.6.0", unavailable="no CUDA device in this process")
    assert any("no CUDA device in this process" in m
               for m in _messages(_paths_report(DataPaths(ipc=refused)), "paths", Severity.WARN))


def test_paths_cuda_ipc_table_home():
    """Where the kernel reads a read's table from: shown in the text, and an INFO finding only when
    the driver does not map pinned memory (one more copy per read); unprobed says nothing."""
    from dataclasses import replace

    for mapped, shown in ((True, "read tables mapped (read in place)"), (False, "read tables copied to the device"),
                          (None, None)):
        r = _paths_report(DataPaths(cma=CmaProbe(ran=True, ok=True), ipc=replace(GPU_OK, table_mapped=mapped)))
        text = format_report(r)
        assert (shown in text) if shown else ("read tables" not in text)
        info = [m for m in _messages(r, "paths", Severity.INFO) if "pinned host memory" in m]
        assert len(info) == (1 if mapped is False else 0)
        d = json.loads(json.dumps(r.to_dict()))
        assert DoctorReport.from_dict(d) == r


def test_paths_net_devices_and_roundtrip():
    p = DataPaths(ptrace_scope=1, cma=CmaProbe(ran=True, ok=True), ipc=GPU_OK, net_devices="mlx5_0:1",
                  ucx_devices=["rc_mlx5/mlx5_0:1", "tcp/ib0"])
    r = _paths_report(p)
    assert any("UCX_NET_DEVICES=mlx5_0:1" in m for m in _messages(r, "paths", Severity.INFO))
    assert any("ptrace_scope 1, yet allowed" in m for m in _messages(r, "paths", Severity.OK))
    d = json.loads(json.dumps(r.to_dict()))
    assert DoctorReport.from_dict(d) == r
    assert format_report(d) == format_report(r)
    assert format_paths(p)[0] == "data paths"


def test_paths_without_ucx_still_reported():
    r = DoctorReport(ucx=UcxProbe(ok=False, error="boom"), ucx_user=None, env={}, cuda=CudaInfo(), rdma_devices=[],
                     nixl=NixlInfo(available=False), paths=DataPaths(cma=CmaProbe(ran=True, ok=True)))
    r.findings = diagnose(r)
    assert r.findings[0].severity is Severity.ERROR and _messages(r, "paths", Severity.OK)


def test_read_ptrace_scope(tmp_path: Path):
    f = tmp_path / "ptrace_scope"
    f.write_text("1\n")
    assert read_ptrace_scope(f) == 1
    f.write_text("garbage")
    assert read_ptrace_scope(f) is None
    assert read_ptrace_scope(tmp_path / "missing") is None


def test_cma_read_of_own_memory_and_bad_address():
    import ctypes
    import os

    buf = ctypes.create_string_buffer(expected_bytes(256), 256)
    assert read_remote(os.getpid(), ctypes.addressof(buf), 256) == {"ok": True, "errno": None, "error": None}
    buf[3] = b"\x00" if buf.raw[3:4] != b"\x00" else b"\x01"
    assert read_remote(os.getpid(), ctypes.addressof(buf), 256)["ok"] is False
    bad = read_remote(os.getpid(), 8, 256)  # unmapped page
    assert bad["ok"] is False and bad["errno"] == "EFAULT"
