"""`nixl-connectors doctor` against the real UCX of this machine (child-process probes)."""

from __future__ import annotations

import json
import os

from nixl_connectors.tools.doctor import format_report, probe_ucx, run_doctor


def test_run_doctor_reports_live_transports():
    env_before = dict(os.environ)
    d = run_doctor(timeout_s=60.0)
    assert dict(os.environ) == env_before
    json.dumps(d)
    assert d["ucx"]["ok"], d["ucx"]["error"]
    assert d["ucx"]["ucx_version"]
    assert "tcp" in d["ucx"]["active_transports"]
    assert d["capabilities"]["tcp"]
    assert d["findings"] and all(f["severity"] in ("ok", "info", "warn", "error") for f in d["findings"])
    assert "transports" in format_report(d)


def test_probe_honours_ucx_tls_in_child_only():
    p = probe_ucx({"UCX_TLS": "tcp,self"})
    assert p.ok, p.error
    assert set(p.active_transports) <= {"tcp", "self"}
    assert os.environ.get("UCX_TLS") != "tcp,self"


def test_run_doctor_reports_data_paths():
    from nixl_connectors.tools.doctor import probe_cma, read_ptrace_scope

    d = run_doctor(timeout_s=60.0)
    p = d["paths"]
    assert p["ptrace_scope"] == read_ptrace_scope()
    assert p["cma"]["ran"], p["cma"]
    assert p["cma"]["ok"] or p["cma"]["errno"]     # a failure names its errno
    assert any(dev.startswith("tcp/") for dev in p["ucx_devices"])
    assert "data paths" in format_report(d)
    assert any(f["topic"] == "paths" for f in d["findings"])
    again = probe_cma(30.0)                          # the probe is repeatable
    assert again.ran and again.ok == p["cma"]["ok"]
