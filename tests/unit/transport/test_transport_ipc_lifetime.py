"""CUDA IPC mappings live exactly as long as the session's map (or a kernel in flight) holds
them: a checked plan kept elsewhere (a lease grant, a session not collected yet) names its
mappings by serial and holds none, so a dead owner's memory is unmapped, and the driver frees
it, as soon as the session drops it. A plan whose mapping was dropped or replaced is never
launched. No GPU: the kernel launch is a stand-in that records what it was given."""
from __future__ import annotations

import gc
import time
import types
import weakref

import numpy as np
import pytest

from transport import AgentConfig, Descs, copy_plan, gpu_memcpy, gpu_runs
from transport.cuda_ipc import Mapping
from transport.dataplane import DataPlane
from transport.session import MapTable
from transport.errors import PeerLost
from transport.grant_words import WordReader
from transport.grants import GrantCache
from transport.region import make_region
from transport.stats import AgentStats

SIZE = 1 << 20


@pytest.fixture
def dp(monkeypatch):
    monkeypatch.setattr(gpu_runs, "launch", lambda remote, local, device, stream, write=False, record=True: (None, None))
    monkeypatch.setattr(gpu_memcpy, "copy", lambda dst, src, n, device, stream, record=True: (None, None))
    return DataPlane("reader", AgentConfig(), None, AgentStats())


def _session(m, table=dict):
    maps = table()
    maps[7] = m
    return types.SimpleNamespace(secret=None, ipc_maps=maps, grants=GrantCache(), words=WordReader(),
                                 peer=types.SimpleNamespace(pid=1))


def _read(dp, s):
    local = Descs.from_ranges(make_region(np.zeros(8192, np.uint8)), [0], [8192])
    table = copy_plan.encode_runs(np.zeros(1, np.int64), np.array([4096]), np.array([8192]))
    ev, keep, plan = dp.ipc_copy(s, local, [[7, None, SIZE]], table, 8192, write=False)
    return local, keep, plan


def test_a_kept_plan_does_not_keep_a_dropped_mapping_open(dp):
    m = Mapping(0x7F0000000000, SIZE)
    s = _session(m)
    local, keep, plan = _read(dp, s)
    assert keep[1] == (m,), "the kernel in flight holds the mapping it reads"
    s.grants.add_ipc("lease", 8192, plan, [4096, 1, 60000], time.monotonic())
    gone = weakref.ref(m)
    del m, keep
    dp.drop_mappings(s)              # the session ended
    gc.disable()                     # no collector run may hide a reference
    try:
        assert gone() is None, "a kept plan or grant held the dead owner's mapping open"
    finally:
        gc.enable()
    assert len(s.grants) == 0
    assert plan.live(s) is None
    with pytest.raises(PeerLost):
        dp.ipc_launch(plan, local, False, plan.live(s))


@pytest.mark.parametrize("table", [dict, MapTable])
def test_a_replaced_mapping_is_not_the_plans(dp, table):
    """The owner restarted at the same address and shared the region again: same region id, a
    new mapping; the old plan (and its grant) must not be launched over it (a session's
    MapTable lets a plan skip the serial checks while nothing changed: every change is seen)."""
    s = _session(Mapping(0x7F0000000000, SIZE), table)
    _, _, plan = _read(dp, s)
    assert plan.live(s) == (s.ipc_maps[7],)
    assert plan.live(s) == (s.ipc_maps[7],)   # (again: with a MapTable, from the epoch alone)
    s.ipc_maps[7] = Mapping(0x7F0000000000, SIZE)
    assert plan.live(s) is None
    dp.drop_mappings(s, 7)           # one region gone: the others' grants stay
    assert plan.live(s) is None and 7 not in s.ipc_maps


def test_map_table_epoch_moves_on_every_change():
    t = MapTable()
    seen = {t.epoch}

    def changed():
        assert t.epoch not in seen, "a change of the mappings left the epoch where it was"
        seen.add(t.epoch)

    t[1] = "a"; changed()
    t[1] = "b"; changed()
    t.setdefault(2, "c"); changed()
    t.update({3: "d"}); changed()
    t |= {4: "e"}; changed()
    del t[4]; changed()
    t.pop(3); changed()
    t.popitem(); changed()
    t.clear(); changed()
    assert isinstance(t, dict) and not t


def test_a_plan_over_several_regions_sees_each_one_replaced(dp):
    """Two regions: replacing either mapping (or dropping one) ends the plan, after any number of
    fast checks."""
    m7, m8 = Mapping(0x7F0000000000, SIZE), Mapping(0x7E0000000000, SIZE)
    for victim in (7, 8):
        s = _session(m7, MapTable)
        s.ipc_maps[8] = m8
        local = Descs.from_ranges(make_region(np.zeros(16384, np.uint8)), [0, 8192], [8192, 8192])
        table = copy_plan.encode_runs(np.array([0, 1]), np.array([4096, 0]), np.array([8192, 8192]))
        _, _, plan = dp.ipc_copy(s, local, [[7, None, SIZE], [8, None, SIZE]], table, 16384, write=False)
        assert plan.live(s) == (m7, m8) and plan.live(s) == (m7, m8)
        s.ipc_maps[victim] = Mapping(0x7D0000000000, SIZE)
        assert plan.live(s) is None
        s.ipc_maps[victim] = m7 if victim == 7 else m8   # the very object back: the plan's again
        assert plan.live(s) == (m7, m8)
        dp.drop_mappings(s, victim)
        assert plan.live(s) is None
