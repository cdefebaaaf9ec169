"""NIXL_CONNECTORS_BENCH_TRACE=1: the bench's reader reports where each timed read's time went."""
from nixl_connectors.tools.bench.ours import TRACE_ENV, run_ours
from nixl_connectors.tools.bench.report import format_row
from nixl_connectors.tools.bench.workloads import Workload


def test_traced_reads_report_their_hops(monkeypatch):
    monkeypatch.setenv(TRACE_ENV, "1")
    r = run_ours(Workload("t", 16 * 1024, 32, reps=4, warmup=1), timeout_s=60.0)
    assert r["bad_blocks"] == 0
    hops = r["hops_us_median"]
    names = list(hops)
    # from the transport's own mark at read() to the bench's mark when wait() returned
    assert names[0].startswith("called -> ") and names[-1].endswith(" -> returned"), names
    assert all(v >= 0 for v in hops.values())
    # the hops of a read add up to no more than its median time (they run inside it), give or take
    # the spread between reps
    assert sum(hops.values()) <= 3 * r["median_ms"] * 1e3


def test_untraced_reads_report_none(monkeypatch):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    r = run_ours(Workload("u", 16 * 1024, 8, reps=2, warmup=1), timeout_s=60.0)
    assert r["bad_blocks"] == 0 and r["hops_us_median"] is None


def test_report_prints_the_hops():
    row = {"workload": {"name": "w", "scattered": True, "num_layers": 1, "num_blocks": 2, "block_bytes": 4096,
                        "memory": "cpu", "nbytes": 8192, "measure": "throughput", "reps": 1, "warmup": 0},
           "measure": "throughput", "references": {}, "nixl": None,
           "ours": {"gbps": 1.0, "median_ms": 1.0, "p90_ms": 1.0, "paths": {"cma": 1},
                    "hops_us_median": {"called -> copied": 12.5, "copied -> returned": 3.0}}}
    text = "\n".join(format_row(row))
    assert "hops (median us): called -> copied 12.5, copied -> returned 3.0" in text
