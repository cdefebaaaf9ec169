"""A CUDA read under a lease grant (grant_read.try_read), in the order its steps must run: the
copy is enqueued, what the read reports is made while it runs, the side stream is synchronized,
and only then is the grant's word read; a read that fails after the copy was enqueued (the lease
ended, the wait failed) still waits for its copy, frees its table slot, takes its counters back,
drops the grant and reports nothing. No GPU: the launch, the stream and the word are stand-ins
that record when they are used (the copies themselves are checked in tests/gpu)."""
from __future__ import annotations

import collections
import os
import threading
import time
import types

import numpy as np
import pytest
import torch

from transport import AgentConfig, Descs, cma, gpu_upload, grant_read
from transport.grants import GrantCache
from transport.region import MemoryKind, Region
from transport.stats import AgentStats
from transport.transfer import Transfer
from transport.wire import DataPath

BLOCK = 4096
WORD_ADDR, GEN = 0x1000, 7


class _Stream:
    def __init__(self, log: list, fail: bool = False):
        self.log, self.fail = log, fail

    def synchronize(self) -> None:
        self.log.append("synchronize")
        if self.fail:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")


class _Held(gpu_upload.Held):
    def __init__(self, log: list):   # (no slot: records when the read frees it)
        self.log = log

    def synced(self) -> None:
        self.log.append("slot freed")


class _Plan:
    def __init__(self, log: list):
        self.log = log

    def live(self, s):
        return ("mapping",)


class _Data:
    def __init__(self, log: list, fail_wait: bool = False):
        self.log, self.fail_wait = log, fail_wait

    def ipc_launch(self, plan, local, write, live, record=True):
        assert live == ("mapping",) and not write and not record
        self.log.append("launch")
        return _Stream(self.log, self.fail_wait), _Held(self.log)


class _Words:
    def __init__(self, log: list, value: int, raises: BaseException | None = None):
        self.log, self.value, self.raises = log, value, raises

    def reader(self, pid, address, ref):
        assert address == WORD_ADDR
        self.log.append("word reader made")

        def read() -> int:
            self.log.append("word read")
            if self.raises is not None:
                raise self.raises
            return self.value
        return read


def _setup(word_value: int = GEN, fail_wait: bool = False, word_raises: BaseException | None = None):
    log: list = []
    stats = AgentStats()
    core = types.SimpleNamespace(config=AgentConfig(), lock=threading.Lock(), stats=stats,
                                 data=_Data(log, fail_wait), runtime=types.SimpleNamespace(call_soon=lambda *a: None),
                                 fallback=lambda path, why, name: log.append(("fallback", path.value, name)))
    grants = GrantCache()
    region = Region(torch.zeros(64 * BLOCK, dtype=torch.uint8), MemoryKind.CUDA, 0)
    local = Descs.from_blocks(region, np.array([5, 2, 9]), BLOCK)
    grants.add_ipc("lease-1", local.nbytes, _Plan(log), [WORD_ADDR, GEN, 60_000], time.monotonic())
    s = types.SimpleNamespace(lost=None, peer=types.SimpleNamespace(same_host=True, pid=os.getpid()),
                              pid_checked=True, off={}, grants=grants, words=_Words(log, word_value, word_raises),
                              grant_reports=collections.deque(), name="owner", conn=None)
    return core, s, local, log


def test_the_word_is_read_after_the_wait_and_the_rest_before_it():
    core, s, local, log = _setup()
    xfer = grant_read.try_read(core, s, local, "lease-1", None)
    assert isinstance(xfer, Transfer) and xfer.done() and xfer.error is None
    xfer.wait(0)
    assert log == ["launch", "word reader made", "synchronize", "slot freed", "word read"]
    st = core.stats
    assert (st.bytes_in, st.transfers_in, st.granted_reads, dict(st.paths)) == (3 * BLOCK, 1, 1, {"ipc": 1})
    assert st.transfer_seconds > 0
    assert list(s.grant_reports) == [("lease-1", 3 * BLOCK, "ipc")]
    assert s.grants.get("lease-1", local.nbytes) is not None   # (kept for the next read)


def test_a_traced_read_settles_the_transfer_it_was_given():
    core, s, local, log = _setup()
    given = Transfer(local.nbytes, lambda *a: None)
    assert grant_read.try_read(core, s, local, "lease-1", None, given) is given
    assert given.done() and given.error is None


@pytest.mark.parametrize("word_value,fail_wait,word_raises", [
    (GEN + 1, False, None), (GEN, True, None), (GEN, False, ProcessLookupError(3, "No such process"))],
    ids=["lease-ended-during-the-copy", "the-wait-failed", "the-owner-gone-before-the-word"])
def test_a_read_that_fails_after_its_launch_waits_frees_and_takes_back_its_counters(word_value, fail_wait,
                                                                                    word_raises):
    core, s, local, log = _setup(word_value, fail_wait, word_raises)
    before = core.stats.snapshot()
    assert grant_read.try_read(core, s, local, "lease-1", None) is None
    assert log[:4] == ["launch", "word reader made", "synchronize", "slot freed"], log
    assert ("word read" in log) == (not fail_wait)
    assert core.stats.snapshot() == before, "a read that goes the normal way counts nothing"
    assert "ipc" not in core.stats.paths
    assert not s.grant_reports
    assert s.grants.get("lease-1", local.nbytes) is None, "the grant is dropped: the owner answers next time"
    assert not s.off


def test_a_refused_word_check_turns_grants_off_for_the_peer():
    """The word read with process_vm_readv (its board not mapped) and the kernel refuses it: the
    read goes the normal way, and this peer's grants (whose checks need it) are off, visibly."""
    core, s, local, log = _setup(word_raises=cma.CmaUnavailable("process_vm_readv: Operation not permitted"))
    before = core.stats.snapshot()
    assert grant_read.try_read(core, s, local, "lease-1", None) is None
    assert log[:5] == ["launch", "word reader made", "synchronize", "slot freed", "word read"], log
    assert ("fallback", "cma", "owner") in log
    assert DataPath.CMA in s.off and "process_vm_readv" in s.off[DataPath.CMA]
    assert core.stats.snapshot() == before
    assert s.grants.get("lease-1", local.nbytes) is None
    assert grant_read.try_read(core, s, local, "lease-1", None) is None   # (and no launch: grants are off)
    assert log.count("launch") == 1


def test_counters_taken_back_keep_other_reads():
    st = AgentStats()
    st.count_granted_in(100, "ipc")
    st.count_granted_in(50, "ipc")
    st.uncount_granted_in(50, "ipc")
    assert (st.bytes_in, st.transfers_in, st.granted_reads, dict(st.paths)) == (100, 1, 1, {"ipc": 1})
