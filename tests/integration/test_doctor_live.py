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
