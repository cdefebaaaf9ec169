"""The benchmark tools between real processes: the NIXL 1.5 baseline (nixl-cu12 runs on
CPU-only machines), our side of the bench, the CUDA suite's code run on CPU devices, the demo and
the `bench` command.

Timings are not asserted here (benchmarks report them); correctness, verification, the block
policy, notifications, configuration plumbing and deadlines are.
"""

from __future__ import annotations

import os
import time

import pytest

from nixl_connectors.tools.bench import (
    LATENCY_PROFILES,
    NixlProfile,
    NixlReadConfig,
    find_nixl,
    measure_nixl_read,
    profile_config,
    run_nixl_read,
)
from nixl_connectors.tools.bench.gpu_workloads import Devices
from nixl_connectors.tools.bench.workloads import Measure, Memory, Workload

needs_nixl = pytest.mark.skipif(not find_nixl().available, reason=find_nixl().reason or "NIXL not installed")

SMALL = NixlReadConfig(block_bytes=16 * 1024, num_blocks=256, pool_blocks=1024, reps=2, timeout_s=60.0)


@needs_nixl
@pytest.mark.parametrize("profile", [NixlProfile.DEFAULT, NixlProfile.TUNED])
def test_read_verifies_and_notifies(profile):
    env_before = dict(os.environ)
    r = measure_nixl_read(profile_config(profile, SMALL))
    assert r.ok, r.reason
    assert r.verified and r.mismatched_blocks == 0
    assert r.bytes_per_rep == 256 * 16 * 1024
    assert len(r.gbps_per_rep) == SMALL.reps and r.gbps == max(r.gbps_per_rep) > 0
    assert len(r.post_to_done_s_per_rep) == SMALL.reps
    assert all(p >= t for p, t in zip(r.post_to_done_s_per_rep, r.transfer_s_per_rep))
    assert r.notifications_received == SMALL.reps
    expected_eh = "none" if profile is NixlProfile.TUNED else "peer"
    assert r.backend_params.get("ucx_error_handling_mode") == expected_eh
    assert dict(os.environ) == env_before


@needs_nixl
def test_contiguous_read():
    r = measure_nixl_read(NixlReadConfig(block_bytes=4096, num_blocks=64, pool_blocks=64, reps=1, scattered=False))
    assert r.ok and r.verified, r.reason


@needs_nixl
def test_run_nixl_read_dict_form():
    d = run_nixl_read(block_bytes=8192, num_blocks=128, pool_blocks=256, reps=1,
                      env={"UCX_TLS": "sm,self"}, ucx_error_handling=None, timeout_s=60.0)
    # NIXL 1.5: shared memory has no peer failure handler, so UCX_TLS=sm with NIXL's default
    # error handling may fail to create the backend; either way the call returns, with a reason.
    assert isinstance(d, dict)
    assert (d["gbps"] is not None and d["verified"]) or d["reason"]


@needs_nixl
def test_deadline_is_enforced():
    t0 = time.monotonic()
    r = measure_nixl_read(NixlReadConfig(block_bytes=16 * 1024, num_blocks=4096, pool_blocks=8192, reps=50, timeout_s=0.05))
    assert not r.ok and r.reason
    assert time.monotonic() - t0 < 90


@needs_nixl
def test_compare_entry_for_the_sweep():
    from nixl_connectors.tools.bench.nixl_baseline import compare_entry

    w = Workload("tiny", 8192, 128, reps=1)
    e = compare_entry(w, profiles=(NixlProfile.TUNED,))
    assert e["available"] and [c["name"] for c in e["configs"]] == ["tuned"]
    assert e["configs"][0]["gbps"] and e["configs"][0]["verified"]
    cuda = compare_entry(Workload("g", 8192, 128, memory=Memory.CUDA, reps=1))
    assert not cuda["available"] and "host-memory pool only" in cuda["reason"]


@needs_nixl
def test_latency_policy_same_blocks_with_warmup():
    cfg = NixlReadConfig(block_bytes=32 * 1024, num_blocks=8, pool_blocks=64, reps=6, warmup=3, same_blocks=True,
                         timeout_s=60.0)
    r = measure_nixl_read(profile_config(NixlProfile.TUNED, cfg))
    assert r.ok and r.verified, r.reason
    assert len(r.post_to_done_s_per_rep) == 6          # warm-up excluded
    assert r.notifications_received == 9               # ... but run, with a notification each


@needs_nixl
def test_compare_entry_latency_workload():
    from nixl_connectors.tools.bench.nixl_baseline import compare_entry

    w = Workload("lat", 16 * 1024, 1, pool_factor=8, reps=5, warmup=2, measure=Measure.LATENCY)
    e = compare_entry(w)
    assert [c["name"] for c in e["configs"]] == [p.value for p in LATENCY_PROFILES]
    for c in e["configs"]:
        assert c["verified"] and c["reps"] == 5 and c["median_ms"] > 0 and c["p90_ms"] >= c["median_ms"]


# ---------------------------------------------------------------------------------- ours
def test_ours_throughput_and_latency_policies():
    from nixl_connectors.tools.bench.ours import run_ours

    t = run_ours(Workload("t", 16 * 1024, 64, reps=3, warmup=1), timeout_s=60.0)
    assert t["bad_blocks"] == 0 and t["verified_reps"] == 4 and t["reps"] == 3 and t["nbytes"] == 64 * 16 * 1024
    assert sum(t["paths"].values()) == 4 and sum(t["owner_paths"].values()) == 4
    lat = run_ours(Workload("l", 16 * 1024, 4, num_layers=2, reps=5, warmup=2, measure=Measure.LATENCY),
                   timeout_s=60.0)
    assert lat["bad_blocks"] == 0 and lat["reps"] == 5 and lat["verified_reps"] == 7
    assert lat["p90_ms"] >= lat["median_ms"] > 0 and lat["timing"] == "read() to wait()"


def test_ours_reports_owner_failure():
    from nixl_connectors.tools.bench.ours import run_ours

    bad = Workload("bad", 4096, 4, num_layers=1, kv_shape=(3, 3), reps=1)  # kv_shape does not match the block
    with pytest.raises(RuntimeError, match="kv_shape"):
        run_ours(bad, timeout_s=30.0)


def test_ours_reader_is_the_owners_sibling():
    """Owner and reader are both children of the bench process: the reader is not the owner's
    ancestor (under Yama ptrace_scope 1 that alone would allow process_vm_readv where a
    deployment's separately started processes cannot)."""
    import os

    from nixl_connectors.tools.bench.ours import run_ours

    r = run_ours(Workload("s", 4096, 4, reps=1), timeout_s=30.0)
    (reader, reader_parent), (owner, owner_parent) = r["processes"]["reader"], r["processes"]["owner"]
    assert reader_parent == owner_parent == os.getpid() and len({reader, owner, os.getpid()}) == 3


def test_cuda_suite_code_on_cpu_devices():
    """The CUDA suite's orchestration, references and NIXL runner, with both processes on the CPU."""
    from nixl_connectors.tools.bench.gpu_suite import run_cuda_suite

    ws = [Workload("c-layers", 4096, 8, memory=Memory.CUDA, num_layers=2, reps=2),
          Workload("c-latency", 4096, 2, memory=Memory.CUDA, reps=4, warmup=1, measure=Measure.LATENCY)]
    lines: list[str] = []
    rows, info = run_cuda_suite(ws, find_nixl().available, out=lines.append, devices=Devices())
    assert info["devices"] == Devices().to_json() and len(rows) == 2
    for row in rows:
        assert row["ours"]["bad_blocks"] == 0, row["ours"]
        assert row["references"]["contiguous_copy"]["gbps"] > 0
        assert row["references"]["index_select_index_copy"]["gbps"] > 0
        assert "ours/contiguous_copy" in row["ratios"]
        if find_nixl().available:
            configs = row["nixl"]["configs"]
            assert [c["name"] for c in configs] == ["read", "write"]   # READ first: configs[0] as before
            for nixl in configs:
                assert nixl["verified"] and nixl["bad_blocks"] == 0 and nixl["gbps"] > 0, nixl
                assert nixl["verified_reps"] == row["workload"]["reps"] + row["workload"]["warmup"]
                assert nixl["descriptors_per_request"] == row["workload"]["num_blocks"] * row["workload"]["num_layers"]
            assert {"ours/nixl[read]", "ours/nixl[write]"} <= set(row["ratios"])
    assert any("data path:" in line for line in lines)
    if find_nixl().available:
        assert any("nixl[write]" in line for line in lines)


def _corrupting_write_initiator(*args):
    """WRITE's initiator (owner process) with one byte of every block of its pool flipped after
    the fill: the reader must count every block it receives as wrong."""
    from nixl_connectors.tools import blockfill
    from nixl_connectors.tools.bench import gpu_nixl_write

    fill = blockfill.fill_pool_torch

    def flipped(t, block_bytes, seed):
        fill(t, block_bytes, seed)
        t.view(-1, block_bytes)[:, 7] ^= 0x5A

    blockfill.fill_pool_torch = flipped
    gpu_nixl_write.initiator(*args)


def _crashing_write_initiator(*args):
    os._exit(3)  # the owner process dies without a word


@needs_nixl
def test_nixl_vram_write_detects_wrong_bytes_and_read_still_runs(monkeypatch):
    """Both ops on CPU (DRAM): a WRITE that delivers wrong bytes is counted block by block, every
    rep; READ in its own processes is not affected."""
    from nixl_connectors.tools.bench import gpu_nixl_write
    from nixl_connectors.tools.bench.gpu_nixl import nixl_vram

    monkeypatch.setattr(gpu_nixl_write, "initiator", _corrupting_write_initiator)
    w = Workload("c", 4096, 4, memory=Memory.CUDA, num_layers=2, reps=2, warmup=1)
    read, write = nixl_vram(w, Devices(), timeout_s=60.0)["configs"]
    assert read["name"] == "read" and read["verified"] and read["bad_blocks"] == 0 and read["gbps"] > 0
    assert write["name"] == "write" and write["op"] == "WRITE" and write["initiator"] == "owner"
    assert not write["verified"] and write["bad_blocks"] == 3 * 4 * 2, write   # every block of every rep
    assert "wrong bytes" in write["reason"]


@needs_nixl
def test_nixl_vram_write_initiator_crash_is_reported_at_once(monkeypatch):
    """The owner process dies mid-run: the entry says so as soon as its pipes close, not at the
    deadline (the reader process, waiting for its next command, sees the pipe close too)."""
    from nixl_connectors.tools.bench import gpu_nixl_write
    from nixl_connectors.tools.bench.gpu_nixl import Op, nixl_vram

    monkeypatch.setattr(gpu_nixl_write, "initiator", _crashing_write_initiator)
    t0 = time.monotonic()
    (write,) = nixl_vram(Workload("c", 4096, 4, memory=Memory.CUDA, reps=1), Devices(), timeout_s=120.0,
                         ops=(Op.WRITE,))["configs"]
    assert write["gbps"] is None and "initiator went away" in write["reason"], write
    assert time.monotonic() - t0 < 30


def test_bench_command_writes_json_and_plot(tmp_path):
    import json

    from nixl_connectors.tools.cli import main

    out, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--suite", "quick", "--only", "small-request", "--no-nixl", "--reps", "3",
               "--json", str(out), "--plot", str(png)])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["suite"] == "quick" and "verification" in doc["policy"]
    (row,) = doc["results"]
    assert row["measure"] == "latency" and row["ours"]["reps"] == 3 and row["nixl"] is None
    assert set(row["references"]) == {"contiguous_copy", "scattered_copy_one_process"}
    assert "ours/contiguous_copy" in row["ratios"]
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_cuda_suite_without_a_gpu_fails_cleanly(tmp_path):
    import json

    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the suite would run")
    from nixl_connectors.tools.cli import main

    out = tmp_path / "g.json"
    assert main(["bench", "--suite", "cuda", "--json", str(out), "--plot", str(tmp_path / "g.png")]) == 1
    doc = json.loads(out.read_text())
    assert doc["results"] == [] and "no CUDA device" in doc["error"] and not (tmp_path / "g.png").exists()


def test_demo_small_verifies_and_reports_the_limit():
    from nixl_connectors.tools.demo import DemoConfig, run_demo

    lines: list[str] = []
    res = run_demo(DemoConfig(num_layers=2, num_blocks=64, num_requests=3, min_prompt_tokens=64,
                              max_prompt_tokens=256, rounds=1), out=lines.append)
    assert res.bad_blocks == 0 and res.contiguous_copy_gbps > 0 and res.scattered_copy_gbps > 0
    assert sum(res.paths.values()) == res.requests
    text = "\n".join(lines)
    assert "contiguous copy of the same" in text and "scattered copy of the same blocks" in text
