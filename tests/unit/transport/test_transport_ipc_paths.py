"""Which copy a checked CUDA IPC plan runs (DataPlane.ipc_launch), and with what addresses: the
driver's copy when the lease is one contiguous range of one mapping and the reader's blocks one
contiguous range of one region, the paired kernel when the runs pair one to one, else the general
kernel. No GPU: the three launches are stand-ins that record what they were given (the kernels
themselves are checked in tests/gpu, the table math in test_transport_gpu_runs.py)."""
from __future__ import annotations

import types

import numpy as np
import pytest

from transport import AgentConfig, Descs, copy_plan, gpu_copy, gpu_memcpy, gpu_runs
from transport.cuda_ipc import Mapping
from transport.dataplane import DataPlane
from transport.grant_words import WordReader
from transport.grants import GrantCache
from transport.region import make_region
from transport.session import MapTable
from transport.stats import AgentStats

MAPPED = 0x7F00_0000_0000
SIZE = 1 << 20


@pytest.fixture
def calls(monkeypatch):
    seen: list = []
    monkeypatch.setattr(gpu_memcpy, "copy", lambda dst, src, n, device, stream, record=True:
                        seen.append(("memcpy", dst, src, n, record)) or (None, None))
    monkeypatch.setattr(gpu_runs, "launch", lambda remote, local, device, stream, write=False, record=True:
                        seen.append(("paired", local, write, record)) or (None, None))
    monkeypatch.setattr(gpu_copy, "launch", lambda s_, d_, n_, device, stream:
                        seen.append(("general", s_, d_, n_)) or (None, None))
    return seen


def _session():
    maps = MapTable()
    maps[7] = Mapping(MAPPED, SIZE)
    return types.SimpleNamespace(secret=None, ipc_maps=maps, grants=GrantCache(), words=WordReader(),
                                 peer=types.SimpleNamespace(pid=1))


def _plan(dp, s, off, ln):
    table = copy_plan.encode_runs(np.zeros(len(off), np.int64), np.asarray(off), np.asarray(ln))
    return dp.ipc_prepare(s, None, [[7, None, SIZE]], table, int(np.sum(ln)))


@pytest.mark.parametrize("write", [False, True])
def test_one_range_each_side_is_the_drivers_copy(calls, write):
    dp = DataPlane("reader", AgentConfig(), None, AgentStats())
    s = _session()
    plan = _plan(dp, s, [4096, 4096 + 512, 4096 + 1024], [512, 512, 512])   # contiguous in the mapping
    assert plan.span == MAPPED + 4096
    buf = np.zeros(8192, np.uint8)
    region = make_region(buf)
    local = Descs.from_blocks(region, [3, 4, 5], 512)
    waitable, keep = dp.ipc_launch(plan, local, write, plan.live(s), record=False)
    mine = region.ptr + 3 * 512
    want = (mine, MAPPED + 4096) if not write else (MAPPED + 4096, mine)
    assert calls == [("memcpy", *want, 1536, False)]
    assert waitable is None   # (no CUDA stream on a host region: the stand-in's device has none)
    assert keep[1] == (s.ipc_maps[7],), "the mappings are held until the caller synchronized"


@pytest.mark.parametrize("remote_gap,local_gap", [(True, False), (False, True), (True, True)])
def test_any_gap_keeps_the_kernel(calls, remote_gap, local_gap):
    """A gap on either side, or runs out of order, is never one driver copy."""
    dp = DataPlane("reader", AgentConfig(), None, AgentStats())
    s = _session()
    plan = _plan(dp, s, [0, 1024 if remote_gap else 512], [512, 512])
    assert (plan.span is None) == remote_gap
    region = make_region(np.zeros(8192, np.uint8))
    local = Descs.from_blocks(region, [0, 2] if local_gap else [0, 1], 512)
    dp.ipc_launch(plan, local, False, plan.live(s))
    assert [c[0] for c in calls] == ["paired"]
    side = calls[0][1]
    assert side.bases.tolist() == [region.ptr] and side.slot is None
    assert side.offset.tolist() == local.offset.tolist() and calls[0][3] is True


def test_runs_that_do_not_pair_take_the_general_kernel(calls):
    dp = DataPlane("reader", AgentConfig(), None, AgentStats())
    s = _session()
    plan = _plan(dp, s, [0, 2048], [1024, 512])
    region = make_region(np.zeros(8192, np.uint8))
    local = Descs.from_ranges(region, [0, 4096], [512, 1024])
    dp.ipc_launch(plan, local, False, plan.live(s))
    assert [c[0] for c in calls] == ["general"]
    _, s_, d_, n_ = calls[0]
    assert int(np.sum(n_)) == 1536


def test_a_dropped_mapping_launches_nothing(calls):
    from transport.errors import PeerLost

    dp = DataPlane("reader", AgentConfig(), None, AgentStats())
    s = _session()
    plan = _plan(dp, s, [0], [512])
    local = Descs.from_blocks(make_region(np.zeros(8192, np.uint8)), [0], 512)
    dp.drop_mappings(s, 7)
    with pytest.raises(PeerLost):
        dp.ipc_launch(plan, local, False, plan.live(s))
    assert calls == []


def test_a_failing_driver_copy_turns_itself_off_and_the_kernel_copies(calls, monkeypatch):
    """If the driver's copy fails (an interface or driver problem), the same transfer is copied by
    the kernel, the reason is counted once as a fallback, and later one-range transfers go
    straight to the kernel."""
    dp = DataPlane("reader", AgentConfig(), None, AgentStats())
    monkeypatch.setattr(gpu_memcpy, "disabled", None)
    tries = []

    def broken(dst, src, n, device, stream, record=True):
        tries.append(n)
        raise RuntimeError("cuMemcpyDtoDAsync failed (CUresult 1)")
    monkeypatch.setattr(gpu_memcpy, "copy", broken)
    s = _session()
    plan = _plan(dp, s, [0, 512], [512, 512])
    region = make_region(np.zeros(8192, np.uint8))
    local = Descs.from_blocks(region, [0, 1], 512)
    for _ in range(3):
        dp.ipc_launch(plan, local, False, plan.live(s), record=False)
    assert tries == [1024], "the driver's copy was tried again after it failed"
    assert [c[0] for c in calls] == ["paired"] * 3
    assert gpu_memcpy.disabled and "CUresult 1" in gpu_memcpy.disabled
    assert sum(v for k, v in dp.stats.fallbacks.items() if k.startswith("ipc-memcpy")) == 1


def _with_tables(local, mapped=True, monkeypatch=None):
    """`local` as a CUDA Descs whose run tables lie in the pinned arena (set as its constructors set it)."""
    local.__dict__["device_tables"] = (local.offset.ctypes.data, None)
    monkeypatch.setattr(local.regions[0], "device", types.SimpleNamespace(index=0, type="cuda"), raising=False)
    from transport import pinned_tables

    monkeypatch.setattr(pinned_tables.TABLES, "mapped", {0: mapped})
    return local


@pytest.mark.parametrize("write", [False, True])
def test_a_descs_with_its_own_tables_takes_the_direct_kernel(calls, monkeypatch, write):
    from transport import gpu_direct

    direct = []
    monkeypatch.setattr(gpu_direct, "disabled", None)
    monkeypatch.setattr(gpu_direct, "launch", lambda remote, local, device, stream, write=False, record=True:
                        direct.append((local, write, record)) or (None, ("kept",)))
    dp = DataPlane("reader", AgentConfig(gpu_direct_tables=True), None, AgentStats())
    monkeypatch.setattr(dp, "stream", lambda device: None)
    s = _session()
    plan = _plan(dp, s, [0, 2048], [512, 512])
    local = _with_tables(Descs.from_blocks(make_region(np.zeros(8192, np.uint8)), [3, 1], 512), True, monkeypatch)
    _, keep = dp.ipc_launch(plan, local, write, plan.live(s), record=False)
    assert direct == [(local, write, False)] and calls == [] and keep[0] == ("kept",)
    monkeypatch.setattr(gpu_direct.pinned_tables.TABLES, "mapped", {0: False})   # not mapped here: the slot
    dp.ipc_launch(plan, local, write, plan.live(s))
    assert len(direct) == 1 and [c[0] for c in calls] == ["paired"]
    monkeypatch.setattr(gpu_direct.pinned_tables.TABLES, "mapped", {0: True})
    assert AgentConfig().gpu_direct_tables is True   # on by default (it ran on an H100)
    off = DataPlane("reader", AgentConfig(gpu_direct_tables=False), None, AgentStats())   # switched off
    monkeypatch.setattr(off, "stream", lambda device: None)
    off.ipc_launch(plan, local, write, plan.live(s))
    assert len(direct) == 1 and [c[0] for c in calls] == ["paired", "paired"]


def test_a_failing_direct_kernel_turns_itself_off_and_the_table_is_filled(calls, monkeypatch):
    """The direct launch raises before anything is enqueued (a Triton or driver problem): the same
    transfer goes the filled-table way, the reason is counted once, later ones go there at once."""
    from transport import gpu_direct

    monkeypatch.setattr(gpu_direct, "disabled", None)
    tries = []

    def broken(remote, local, device, stream, write=False, record=True):
        tries.append(1)
        raise RuntimeError("CUDA error: invalid argument")
    monkeypatch.setattr(gpu_direct, "launch", broken)
    dp = DataPlane("reader", AgentConfig(gpu_direct_tables=True), None, AgentStats())
    monkeypatch.setattr(dp, "stream", lambda device: None)
    s = _session()
    plan = _plan(dp, s, [0, 2048], [512, 512])
    local = _with_tables(Descs.from_blocks(make_region(np.zeros(8192, np.uint8)), [3, 1], 512), True, monkeypatch)
    for _ in range(3):
        dp.ipc_launch(plan, local, False, plan.live(s))
    assert tries == [1] and [c[0] for c in calls] == ["paired"] * 3
    assert "invalid argument" in gpu_direct.disabled
    assert [k for k in dp.stats.fallbacks if k.startswith("gpu-direct")] == ["gpu-direct: RuntimeError: CUDA error: "
                                                                              "invalid argument"]


def test_the_gpu_fault_tests_can_die_in_every_copy_the_ipc_path_launches():
    """tests/gpu's "kernel" death point (gpu_peer.arm_die) must wrap every function through which
    DataPlane's CUDA IPC path enqueues a copy over the peer's memory; when one is missing, the
    reader-killed-mid-kernel test reads to the end and fails on the GPU machine only (as it did when
    the direct kernel arrived)."""
    import ast
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[3]
    launched = set()
    for node in ast.walk(ast.parse((root / "transport" / "dataplane.py").read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id.startswith("gpu_")
                and node.func.attr in ("launch", "copy")):
            launched.add((node.func.value.id, node.func.attr))
    wrapped = set()
    for node in ast.walk(ast.parse((root / "tests" / "gpu" / "gpu_peer.py").read_text())):
        if (isinstance(node, ast.Tuple) and len(node.elts) == 2 and isinstance(node.elts[0], ast.Name)
                and isinstance(node.elts[1], ast.Constant) and node.elts[0].id.startswith("gpu_")):
            wrapped.add((node.elts[0].id, node.elts[1].value))
    assert len(launched) >= 4, launched   # (the parse found the launches: gpu_memcpy, gpu_direct, gpu_runs, gpu_copy)
    assert launched <= wrapped, f"not wrapped by arm_die('kernel'): {sorted(launched - wrapped)}"
