"""Pure parts of the benchmarks: block pattern (numpy and torch), JSON-lines channel, NIXL
configs and profiles, workloads and devices, timings and ratios, rows, plots, references."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nixl_connectors.tools.bench.pipe_messages import (
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
    LineReader,
    b64decode,
    b64encode,
    write_message,
)
from nixl_connectors.tools.bench.nixl_baseline import NixlProfile, child_env, profile_config
from nixl_connectors.tools.bench.nixl_types import NixlReadConfig, UcxErrorHandling
from nixl_connectors.tools.blockfill import block_pattern, fill_pool, mismatched_blocks


def test_pattern_is_per_block_and_deterministic():
    ids = np.array([5, 0, 5, 1023])
    a = block_pattern(ids, 64, seed=7)
    assert a.shape == (4, 64) and a.dtype == np.uint8
    assert np.array_equal(a[0], a[2])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, block_pattern(ids, 64, seed=8))
    assert np.array_equal(a, block_pattern(ids, 64, seed=7))


def test_fill_pool_and_mismatch():
    pool = np.zeros(10 * 32, dtype=np.uint8)
    fill_pool(pool, 32, seed=1, chunk_blocks=3)
    blocks = pool.reshape(10, 32)
    ids = np.array([9, 2, 4])
    assert mismatched_blocks(blocks[ids], ids, 32, 1) == 0
    got = blocks[ids].copy()
    got[1, 0] ^= 1
    assert mismatched_blocks(got, ids, 32, 1) == 1
    assert mismatched_blocks(blocks[ids], ids[::-1], 32, 1) == 2


@pytest.mark.parametrize("bad", [0, 7, -8])
def test_pattern_rejects_bad_block_size(bad):
    with pytest.raises(ValueError):
        block_pattern(np.arange(2), bad, 0)


def test_channel_roundtrip_and_errors():
    r, w = os.pipe()
    try:
        reader = LineReader(r, max_line_bytes=1024)
        assert reader.poll() is None
        write_message(w, {"type": "a", "blob": b64encode(b"\x00\xff")})
        write_message(w, {"type": "b"})
        m = reader.read(1.0)
        assert m["type"] == "a" and b64decode(m["blob"]) == b"\x00\xff"
        assert reader.read(1.0) == {"type": "b"}
        with pytest.raises(ChannelTimeout):
            reader.read(0.05)
        os.write(w, b"[1,2]\n")
        with pytest.raises(ChannelError):
            reader.read(1.0)
        os.write(w, b"not json\n")
        with pytest.raises(ChannelError):
            reader.read(1.0)
        os.write(w, b"x" * 2048)
        with pytest.raises(ChannelError):
            reader.read(1.0)
    finally:
        os.close(w)
        os.close(r)


def test_channel_closed():
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(ChannelClosed):
            LineReader(r).read(1.0)
    finally:
        os.close(r)


def test_config_json_roundtrip_and_validation():
    cfg = NixlReadConfig(block_bytes=4096, num_blocks=8, pool_blocks=16, reps=2, env={"UCX_TLS": "sm,self", "X": None},
                         ucx_error_handling=UcxErrorHandling.NONE, progress_thread=False, scattered=False,
                         warmup=3, same_blocks=True)
    assert NixlReadConfig.from_json(cfg.to_json()) == cfg
    assert cfg.transfers == 5
    assert cfg.backend_params() == {"ucx_error_handling_mode": "none"}
    assert NixlReadConfig().backend_params() == {}
    for bad in (dict(pool_blocks=4, num_blocks=8), dict(block_bytes=12), dict(reps=0), dict(timeout_s=0), dict(warmup=-1)):
        with pytest.raises(ValueError):
            NixlReadConfig(**bad).validate()


def test_profiles():
    base = NixlReadConfig(num_blocks=8, pool_blocks=16, env={"A": "1"})
    d = profile_config(NixlProfile.DEFAULT, base)
    assert d.env == {"A": "1"} and d.ucx_error_handling is None and d.progress_thread and d.label == "default"
    t = profile_config(NixlProfile.TUNED, base)
    assert t.env == {"A": "1", "UCX_TLS": "sm,self"}
    assert t.ucx_error_handling is UcxErrorHandling.NONE and not t.progress_thread
    assert (t.num_blocks, t.pool_blocks) == (8, 16)
    s = profile_config(NixlProfile.SHM, base)
    assert s.env["UCX_TLS"] == "sm,self" and s.ucx_error_handling is None


def test_child_env_does_not_touch_ours(monkeypatch):
    monkeypatch.setenv("NIXL_BENCH_TEST_VAR", "keep")
    before = dict(os.environ)
    env = child_env({"UCX_TLS": "sm,self", "NIXL_BENCH_TEST_VAR": None})
    assert dict(os.environ) == before
    assert env["UCX_TLS"] == "sm,self" and "NIXL_BENCH_TEST_VAR" not in env
    assert env["PYTHONPATH"]


# ---------------------------------------------------------------------------------- torch pattern
def test_torch_pattern_matches_numpy():
    torch = pytest.importorskip("torch")
    from nixl_connectors.tools.blockfill import block_pattern_torch, fill_pool_torch, mismatched_blocks_torch

    ids = np.array([0, 3, 1023, 1 << 40, 77])
    for seed in (0, 1, 7919, (1 << 64) - 1):
        assert np.array_equal(block_pattern_torch(torch.as_tensor(ids), 48, seed).numpy(), block_pattern(ids, 48, seed))
    pool = torch.zeros((10, 32), dtype=torch.uint8)
    fill_pool_torch(pool, 32, seed=5, chunk_blocks=3)
    ref = np.zeros(10 * 32, dtype=np.uint8)
    fill_pool(ref, 32, seed=5)
    assert np.array_equal(pool.numpy().reshape(-1), ref)
    sel = torch.tensor([9, 2, 4])
    got = pool.index_select(0, sel)
    assert mismatched_blocks_torch(got, sel, 32, 5, chunk_blocks=2) == 0
    got[1, 3] ^= 1
    assert mismatched_blocks_torch(got, sel, 32, 5, chunk_blocks=2) == 1
    with pytest.raises(ValueError):
        mismatched_blocks_torch(got[:2], sel, 32, 5)
    with pytest.raises(ValueError):
        fill_pool_torch(torch.zeros(5, dtype=torch.uint8), 32, 0)


# ---------------------------------------------------------------------------------- workloads, devices
from nixl_connectors.tools.bench.gpu_workloads import (  # noqa: E402
    CONTIGUOUS_1G,
    CUDA_SWEEP,
    SCATTERED_32K,
    SMALL_64,
    TTFT_WORKLOADS,
    VLLM_8B_4K,
    Devices,
    gpu_devices,
    one_gpu_forced,
)
from nixl_connectors.tools.bench.workloads import (  # noqa: E402
    HEADLINE,
    HEADLINE_SUITE,
    HOST_SWEEP,
    BlockPolicy,
    Measure,
    Memory,
    Workload,
)


def test_workload_bytes_policy_and_validation():
    w = Workload("x", 64, 10, num_layers=3, pool_factor=4, measure=Measure.LATENCY)
    assert w.nbytes == 64 * 10 * 3 and w.pool_blocks == 40
    assert w.policy is BlockPolicy.SAME_EVERY_REP and HEADLINE.policy is BlockPolicy.NEW_EACH_REP
    j = w.to_json()
    assert j["measure"] == "latency" and j["nbytes"] == 1920 and j["block_policy"] == BlockPolicy.SAME_EVERY_REP.value
    for bad in (dict(block_bytes=12), dict(num_blocks=0), dict(reps=0), dict(warmup=-1), dict(num_layers=0)):
        with pytest.raises(ValueError):
            Workload("y", **{"block_bytes": 64, "num_blocks": 1, **bad})


def test_headline_has_small_request_latencies():
    lat = {w.name: w for w in HEADLINE_SUITE if w.measure is Measure.LATENCY}
    assert HEADLINE_SUITE[0] is HEADLINE
    assert {(w.num_blocks, w.block_bytes) for w in lat.values()} == {(64, 32 << 10), (1, 16 << 10)}
    assert all(w.warmup > 0 and w.reps >= 100 for w in lat.values())
    assert set(lat) <= {w.name for w in HOST_SWEEP}


def test_cuda_workloads_are_the_issue_shapes():
    assert [w.memory for w in CUDA_SWEEP] == [Memory.CUDA] * 4
    assert (SCATTERED_32K.num_blocks, SCATTERED_32K.block_bytes, SCATTERED_32K.pool_blocks) == (16384, 32 << 10, 65536)
    assert CONTIGUOUS_1G.nbytes == 1 << 30 and not CONTIGUOUS_1G.scattered
    assert SMALL_64.measure is Measure.LATENCY and SMALL_64.nbytes == 64 * (32 << 10)
    assert (VLLM_8B_4K.num_layers, VLLM_8B_4K.num_blocks, VLLM_8B_4K.block_bytes) == (32, 256, 64 << 10)
    assert VLLM_8B_4K.nbytes == 512 << 20 and VLLM_8B_4K.name in TTFT_WORKLOADS


def test_gpu_devices():
    assert gpu_devices(1) == Devices("cuda:0", "cuda:0") and gpu_devices(1).one_gpu
    assert gpu_devices(2) == Devices("cuda:0", "cuda:1") and not gpu_devices(8).one_gpu
    assert gpu_devices(4, force_one_gpu=True).one_gpu
    assert gpu_devices(2).reader_index == 1 and gpu_devices(2).owner_index == 0
    with pytest.raises(ValueError):
        gpu_devices(0)
    assert one_gpu_forced(env={"NIXL_CONNECTORS_BENCH_ONE_GPU": "1"})
    assert not one_gpu_forced(env={"NIXL_CONNECTORS_BENCH_ONE_GPU": "0"}) and one_gpu_forced(True, env={})
    assert not Devices().one_gpu and Devices().to_json() == {"owner": "cpu", "reader": "cpu", "one_gpu": False}


def test_ucx_chunk_knob(monkeypatch):
    from nixl_connectors.tools.bench.ours import CHUNK_ENV, ucx_chunk_bytes

    monkeypatch.delenv(CHUNK_ENV, raising=False)
    assert ucx_chunk_bytes() == 8 << 20 and ucx_chunk_bytes(1 << 22) == 1 << 22
    monkeypatch.setenv(CHUNK_ENV, str(32 << 20))
    assert ucx_chunk_bytes() == 32 << 20


def test_suite_selection():
    from nixl_connectors.tools.bench.sweep import suite_workloads

    assert suite_workloads("headline") == HEADLINE_SUITE
    picked = suite_workloads("host", reps=2, only="one-block,scattered-4k")
    assert [w.name for w in picked] == ["scattered-4k-x16384", "one-block-16k"] and all(w.reps == 2 for w in picked)
    assert [w.name for w in suite_workloads("cuda", only="vllm")] == [VLLM_8B_4K.name]


# ---------------------------------------------------------------------------------- timings, ratios, rows
from nixl_connectors.tools.bench.report import bad_blocks, format_row, make_row  # noqa: E402
from nixl_connectors.tools.bench.timing import Timings, fmt_entry, ratios  # noqa: E402


def test_timings():
    t = Timings.of([0.004, 0.001, 0.002, 0.003, 0.010], 1_000_000)
    assert t.best_s == 0.001 and t.median_s == 0.003 and t.gbps == pytest.approx(1.0)
    assert t.p90_s == pytest.approx(0.0076) and t.gbps_median == pytest.approx(1 / 3)
    j = t.to_json()
    assert j["median_ms"] == pytest.approx(3.0) and j["reps"] == 5 and j["all_s"][0] == 0.004
    for bad in ([], [0.0, 1.0]):
        with pytest.raises(ValueError):
            Timings.of(bad, 10)


def _entry(seconds, nbytes=1_000_000, **kw):
    return {**Timings.of(seconds, nbytes).to_json(), **kw}


def test_ratios_throughput_and_latency():
    ours = _entry([0.001, 0.004, 0.004])   # best 1 ms, median 4 ms
    other = _entry([0.002, 0.002, 0.002])
    assert ratios(ours, {"x": other}, latency=False) == {"ours/x": pytest.approx(2.0)}
    assert ratios(ours, {"x": other}, latency=True) == {"ours/x": pytest.approx(0.5)}
    assert ratios(ours, {"failed": {"gbps": None, "reason": "no"}, "missing": None}, latency=False) == {}
    assert ratios(None, {"x": other}, latency=False) == {}


def test_fmt_entry():
    ours = _entry([0.001, 0.002])
    assert "ours/this" not in fmt_entry("ours", ours, ours, latency=True)
    line = fmt_entry("nixl[tuned]", _entry([0.002, 0.004]), ours, latency=True)
    assert "ms median" in line and "ours/this 2.00x" in line
    assert "GB/s best" in fmt_entry("x", _entry([0.002]), ours, latency=False)
    err = fmt_entry("nixl", {"gbps": None, "reason": "Traceback (most recent call last):\n  File x\nKeyError: 'k'"}, ours, False)
    assert "KeyError: 'k'" in err


def test_make_row_and_format():
    w = Workload("small", 32 << 10, 64, reps=3, warmup=1, measure=Measure.LATENCY)
    ours = _entry([0.001, 0.001, 0.002], w.nbytes, bad_blocks=0, paths={"cma": 4}, fallbacks={})
    refs = {"contiguous_copy": _entry([0.0001] * 3, w.nbytes, name="contiguous copy of the same bytes (limit)"),
            "scattered_copy_one_process": {"name": "scattered copy in one process", "error": "MemoryError"}}
    nixl = {"available": True, "configs": [{"name": "tuned", **_entry([0.0005] * 3, w.nbytes)},
                                           {"name": "default", "gbps": None, "reason": "backend failed"}]}
    row = make_row(w, ours, refs, nixl)
    assert row["block_policy"] == BlockPolicy.SAME_EVERY_REP.value
    assert set(row["ratios"]) == {"ours/contiguous_copy", "ours/nixl[tuned]"}
    assert row["ratios"]["ours/nixl[tuned]"] == pytest.approx(0.5) and bad_blocks(row) == 0
    text = "\n".join(format_row(row))
    for needle in ("contiguous copy of the same bytes (limit)", "scattered copy in one process", "cma x4",
                   "nixl[tuned]", "backend failed", "ms median"):
        assert needle in text, needle
    failed = make_row(w, {"error": "RuntimeError: boom"}, refs, None)
    assert failed["ratios"] == {} and bad_blocks(failed) == 1 and "boom" in "\n".join(format_row(failed))
    assert bad_blocks(make_row(w, {**ours, "bad_blocks": 3}, refs, None)) == 3
    assert "BAD BLOCKS" in "\n".join(format_row(make_row(w, {**ours, "bad_blocks": 3}, refs, None)))
    assert "run tables" not in text   # (host memory: nothing to say)
    cw = Workload("small", 32 << 10, 64, reps=3, warmup=1, measure=Measure.LATENCY, memory=Memory.CUDA)
    on = {**ours, "gpu_direct_tables": True, "gpu_run_tables": {"direct_launches": 4, "direct_off": None}}
    assert "read in place (gpu_direct_tables): on; direct launches 4" in "\n".join(format_row(make_row(cw, on, refs, None)))
    off = {**ours, "gpu_direct_tables": True, "gpu_run_tables": {"direct_launches": 1, "direct_off": "RuntimeError: x"}}
    assert "off because RuntimeError: x" in "\n".join(format_row(make_row(cw, off, refs, None)))


def test_plot_series_and_png(tmp_path):
    from nixl_connectors.tools.bench.plot import plot, series

    tw = Workload("big", 4096, 8)
    lw = Workload("small", 4096, 1, measure=Measure.LATENCY)
    rows = [make_row(tw, _entry([0.001]), {"contiguous_copy": _entry([0.0005], name="limit")},
                     {"configs": [{"name": "tuned", **_entry([0.004])}]}),
            make_row(lw, _entry([0.001, 0.003]), {}, None)]
    names, cols = series(rows, latency=False)
    assert names == ["big"] and cols["ours"] == [(1.0, 0.0)] and cols["limit"] == [(2.0, 0.0)]
    assert cols["nixl[tuned]"] == [(0.25, 0.0)]
    names, cols = series(rows, latency=True)
    assert names == ["small"] and cols["ours"][0][0] == pytest.approx(2.0)
    pytest.importorskip("matplotlib")
    out = tmp_path / "b.png"
    plot(rows, str(out), "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot([], str(tmp_path / "empty.png"))


# ---------------------------------------------------------------------------------- references
def test_host_references():
    from nixl_connectors.tools.bench.limits import (
        CONTIGUOUS,
        SCATTERED,
        host_contiguous_copy,
        host_references,
        host_scattered_copy,
    )

    c = host_contiguous_copy(1 << 16, reps=3, warmup=1)
    assert c.key == CONTIGUOUS and c.timings.nbytes == 1 << 16 and len(c.timings.seconds) == 3
    s = host_scattered_copy(4096, 8, 32, reps=2, warmup=0, same_blocks=True)
    assert s.key == SCATTERED and s.timings.nbytes == 8 * 4096 and "same blocks" in s.how
    with pytest.raises(ValueError):
        host_scattered_copy(4096, 8, 4)
    with pytest.raises(ValueError):
        host_contiguous_copy(0)
    refs = host_references(Workload("x", 4096, 8, num_layers=2, reps=2))
    assert refs[CONTIGUOUS]["nbytes"] == 2 * 8 * 4096 == refs[SCATTERED]["nbytes"]
    assert refs[CONTIGUOUS]["name"].startswith("contiguous copy of the same bytes")


def test_cuda_references_run_on_cpu_devices():
    pytest.importorskip("torch")
    from nixl_connectors.tools.bench.cuda_limits import INDEX_COPY, cuda_index_copy, cuda_references

    w = Workload("x", 4096, 16, memory=Memory.CUDA, num_layers=3, reps=2)
    r = cuda_index_copy(w, Devices(), reps=2, warmup=1)
    assert r.key == INDEX_COPY and r.timings.nbytes == w.nbytes and "3 regions" in r.how
    refs = cuda_references(w, Devices())
    assert refs["contiguous_copy"]["nbytes"] == w.nbytes and refs[INDEX_COPY]["gbps"] > 0


def test_nixl_request_rows_and_descs():
    from nixl_connectors.tools.bench.gpu_nixl import request_rows, vram_descs

    w = Workload("x", 4096, 5, num_layers=3, pool_factor=4)
    s, d = request_rows(w, np.random.default_rng(0))
    assert s.dtype == np.int32 and len(s) == len(d) == 15
    assert all(((s[i * 5:(i + 1) * 5] // 20) == i).all() for i in range(3))   # layer i's rows
    assert len(set((s % 20).tolist())) == 5 and (s[:5] % 20 == s[5:10] % 20).all()  # same blocks per layer
    s, d = request_rows(Workload("c", 4096, 4, scattered=False, pool_factor=1), np.random.default_rng(0))
    assert s.tolist() == d.tolist() == [0, 1, 2, 3]
    descs = vram_descs(1000, 3, 64, 1)
    assert descs.tolist() == [[1000, 64, 1], [1064, 64, 1], [1128, 64, 1]]


def test_nixl_ops_name_their_configs_and_initiators():
    from nixl_connectors.tools.bench.gpu_nixl import TIMING, Op

    assert [(op.config, op.initiator) for op in Op] == [("read", "reader"), ("write", "owner")]
    assert 'make_prepped_xfer("WRITE")' in TIMING[Op.WRITE] and "in the owner process" in TIMING[Op.WRITE]
    assert "in the reader process" in TIMING[Op.READ] and "after the timing" in TIMING[Op.READ]


def test_nixl_config_entry():
    from nixl_connectors.tools.bench.nixl_baseline import TIMING, config_entry
    from nixl_connectors.tools.bench.nixl_types import NixlReadResult

    r = NixlReadResult(label="tuned", config={}, gbps=2.0, bytes_per_rep=1000, verified=True,
                       transfer_s_per_rep=[0.0004, 0.0008], prep_s_per_rep=[0.0001, 0.0002],
                       post_to_done_s_per_rep=[0.0005, 0.001])
    e = config_entry("tuned", r)
    assert e["timing"] == TIMING and e["best_s"] == 0.0005 and e["median_ms"] == pytest.approx(0.75)
    assert e["gbps_transfer_only"] == pytest.approx(1000 / 0.0004 / 1e9)
    failed = config_entry("default", NixlReadResult(label="default", config={}, reason="no backend"))
    assert failed["gbps"] is None and failed["reason"] == "no backend"


def test_host_pool_follows_its_page_policy():
    """Every pool of a run comes from host_memory.host_pool: aligned to 2 MiB, touched; a 4k pool
    never gets huge pages (MADV_NOHUGEPAGE), a huge one may (the kernel may lack free huge pages)."""
    from nixl_connectors.tools.bench.host_memory import HostPages, host_pool, huge_fraction

    # What the rest of a test process leaves behind: glibc raises its mmap threshold after a big
    # free, and later arrays come from a heap already faulted in as huge pages (numpy advises
    # them). A pool must not inherit those pages (it did, when it came from numpy's allocator).
    big = np.empty(30 << 20, np.uint8)
    big.fill(1)
    del big
    warm = np.empty(12 << 20, np.uint8)
    warm.fill(1)
    del warm
    small = host_pool((64, 1 << 16), HostPages.SMALL, fill=3)
    assert small.ctypes.data % (2 << 20) == 0 and small.shape == (64, 1 << 16) and (small == 3).all()
    assert huge_fraction(small) == 0.0
    huge = host_pool((64, 1 << 16), HostPages.HUGE)
    assert huge.ctypes.data % (2 << 20) == 0 and not huge.any() and 0.0 <= huge_fraction(huge) <= 1.0


def test_host_pages_from_env_rejects_unknown(monkeypatch):
    from nixl_connectors.tools.bench.host_memory import PAGES_ENV, HostPages, pages_from_env

    monkeypatch.delenv(PAGES_ENV, raising=False)
    assert pages_from_env() is HostPages.HUGE
    monkeypatch.setenv(PAGES_ENV, "4k")
    assert pages_from_env() is HostPages.SMALL
    monkeypatch.setenv(PAGES_ENV, "giant")
    with pytest.raises(ValueError, match="giant"):
        pages_from_env()


def test_over_rounds_collects_each_rounds_ratio():
    from nixl_connectors.tools.bench.sweep import over_rounds, over_rounds_lines

    def row(ratio, ms):
        return {"workload": {"name": "w"}, "ratios": {"ours/nixl[tuned]": ratio}, "ours": {"median_ms": ms}}
    per = over_rounds([[row(0.9, 0.5)], [row(1.3, 0.3)], [row(1.1, 0.4)]])
    assert per == {"w": {"ours/nixl[tuned]": [0.9, 1.3, 1.1], "ours_median_ms": [0.5, 0.3, 0.4]}}
    assert "ours/nixl[tuned] 1.10 (0.90-1.30)" in over_rounds_lines(per)[0]


def test_vllm_ttft_layout_and_summaries():
    """The TTFT bench's pure parts: where each server runs, and the per-rep summaries."""
    import argparse

    from nixl_connectors.tools.bench.vllm_ttft import cpu_layout, summary

    pinned = cpu_layout(argparse.Namespace(cpu_layout="pinned"))
    assert pinned["pin_process_tree"] and pinned["plain"] == pinned["decode"]   # same conditions
    if (os.cpu_count() or 1) > 1:
        assert pinned["prefill"] != pinned["decode"]
    assert not cpu_layout(argparse.Namespace(cpu_layout="shared"))["pin_process_tree"]
    assert summary([0.010, 0.030, 0.020]) == {"median": 20.0, "min": 10.0, "max": 30.0}
