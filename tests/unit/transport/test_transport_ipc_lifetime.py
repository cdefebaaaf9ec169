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

from transport import AgentConfig, Descs, copy_plan, gpu_runs
from transport.cuda_ipc import Mapping
from transport.dataplane import DataPlane
from transport.errors import PeerLost
from transport.grant_words import WordReader
from transport.grants import GrantCache
from transport.region import make_region
from transport.stats import AgentStats

SIZE = 1 << 20


@pytest.fixture
def dp(monkeypatch):
    monkeypatch.setattr(gpu_runs, "launch", lambda remote, local, device, stream, write=False: (None, None))
    return DataPlane("reader", AgentConfig(), None, AgentStats())


def _session(m):
    return types.SimpleNamespace(secret=None, ipc_maps={7: m}, grants=GrantCache(), words=WordReader(),
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
    assert keep[1] == [m], "the kernel in flight holds the mapping it reads"
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


def test_a_replaced_mapping_is_not_the_plans(dp):
    """The owner restarted at the same address and shared the region again: same region id, a
    new mapping; the old plan (and its grant) must not be launched over it."""
    s = _session(Mapping(0x7F0000000000, SIZE))
    _, _, plan = _read(dp, s)
    assert plan.live(s) == [s.ipc_maps[7]]
    s.ipc_maps[7] = Mapping(0x7F0000000000, SIZE)
    assert plan.live(s) is None
    dp.drop_mappings(s, 7)           # one region gone: the others' grants stay
    assert plan.live(s) is None and 7 not in s.ipc_maps
