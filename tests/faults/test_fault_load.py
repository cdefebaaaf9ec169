"""Load (issue 8): 4 reader processes x 32 concurrent transfers against one owner, every byte
verified, on the same-host copy path and on UCX over shared memory. Bounded: the owner's memory
(RSS and its peak) and file descriptors; every lease comes back through `freed_leases()`; and
afterwards no process keeps a core busy (CPU time of every process over 5 s).

Default: a few rounds per path. NIXL_LOAD_LONG=1 (or NIXL_FUZZ_LONG=1): many more rounds.
"""
from __future__ import annotations

import os
import numpy as np
import pytest
from procinfo import busy_cores, fd_count, rss_mib, status_kb
from xport_fixtures import agent, close_nodes, start_nodes
from xport_helpers import wait_until

pytestmark = pytest.mark.timeout(1800)

LONG = os.environ.get("NIXL_LOAD_LONG") == "1" or os.environ.get("NIXL_FUZZ_LONG") == "1"
READERS, CONCURRENT, BLOCKS_PER_READ, BB = 4, 32, 64, 16384
OWNER_BLOCKS = 4096                                   # 64 MiB
ROUNDS = {"cma": 12 if LONG else 3, "ucx-shm": 6 if LONG else 1}


@pytest.fixture(scope="module")
def cluster():
    n = start_nodes({"load-owner": {"transports": "shm"},
                     **{f"load-reader-{i}": {"transports": "shm"} for i in range(READERS)}})
    yield n
    close_nodes(n)


@pytest.mark.parametrize("path", ["cma", "ucx-shm"])
def test_load_4_readers_x_32_concurrent(cluster, path):
    o = cluster["load-owner"]
    readers = [cluster[f"load-reader-{i}"] for i in range(READERS)]
    owner, oaddr = agent(o, f"load-owner-{path}", OWNER_BLOCKS, BB, seed=101, timeout_s=60.0)
    cfg = {} if path == "cma" else {"same_host_copy": False}
    names = []
    for r in readers:
        rd, _ = agent(r, f"load-{path}", CONCURRENT * BLOCKS_PER_READ, BB, timeout_s=60.0, **cfg)
        r.connect(rd, oaddr)
        names.append(rd)
    rng = np.random.default_rng(7)

    def one_round(k):
        jobs = []
        for i, r in enumerate(readers):
            srcs = [rng.choice(OWNER_BLOCKS, BLOCKS_PER_READ, replace=False) for _ in range(CONCURRENT)]
            lids = o.expose_many(owner, [s.tolist() for s in srcs], peer=names[i])
            local = rng.permutation(CONCURRENT * BLOCKS_PER_READ).reshape(CONCURRENT, BLOCKS_PER_READ)
            jobs.append((lids, [(local[j].tolist(), lids[j], srcs[j].tolist()) for j in range(CONCURRENT)]))
        for r, name in zip(readers, names):
            r.fill(name)
        for r, name, (_, js) in zip(readers, names, jobs):
            r.send_call("read_many", name, oaddr, js, timeout=60.0, verify_seed=101)
        results = [r.result(call_timeout=300) for r in readers]
        wall = max(dt for dt, _, _ in results)        # transfers only (verification is after)
        bad = sum(b for _, _, b in results)
        nbytes = sum(n for _, n, _ in results)
        assert bad == 0, f"round {k}: {bad} blocks wrong"
        lids = [lid for ls, _ in jobs for lid in ls]
        assert o.release_many(owner, lids) == len(lids)
        return nbytes, wall, lids

    one_round(-1)                                     # warm-up (UCX links, staging, threads)
    one_round(-2)                                     # (and each reader thread's direct lane, made once the
                                                      # first round checked the owner's pid)
    freed = set()
    wait_until(lambda: freed.update(o.freed(owner)) or len(freed) >= READERS * CONCURRENT, 30,
               what="warm-up leases back")
    rss0, hwm0, fds0 = rss_mib(o.pid), status_kb(o.pid, "VmHWM") / 1024, fd_count(o.pid)
    rfds0 = [fd_count(r.pid) for r in readers]
    total, busy_time, all_lids = 0, 0.0, []
    for k in range(ROUNDS[path]):
        nbytes, wall, lids = one_round(k)
        total += nbytes
        busy_time += wall
        all_lids += lids
    freed = set()
    wait_until(lambda: freed.update(o.freed(owner)) or freed >= set(all_lids), 60, what="every lease back")
    rss1, hwm1, fds1 = rss_mib(o.pid), status_kb(o.pid, "VmHWM") / 1024, fd_count(o.pid)
    busy = busy_cores([o.pid] + [r.pid for r in readers], 5.0)
    transfers = ROUNDS[path] * READERS * CONCURRENT
    print(f"\nload {path}: {transfers} transfers of {BLOCKS_PER_READ} x {BB >> 10} KiB scattered blocks "
          f"({READERS} readers x {CONCURRENT} concurrent), {total / 2**20:.0f} MiB verified in {busy_time:.2f}s "
          f"= {total / busy_time / 1e9:.2f} GB/s; owner RSS {rss0:.0f} -> {rss1:.0f} MiB (peak +{hwm1 - hwm0:.0f}), "
          f"fds {fds0} -> {fds1}; readers' fds {rfds0} -> {[fd_count(r.pid) for r in readers]}; "
          f"idle CPU (cores) owner {busy[o.pid]:.3f}, readers {[round(busy[r.pid], 3) for r in readers]}")
    assert fds1 <= fds0 + 2, f"owner fds {fds0} -> {fds1}"
    assert all(fd_count(r.pid) <= f + 2 for r, f in zip(readers, rfds0))
    assert rss1 - rss0 < 128 and hwm1 - hwm0 < 256, (rss0, rss1, hwm0, hwm1)
    loud = {p: round(c, 3) for p, c in busy.items() if c >= 0.2}
    assert not loud, f"processes busy after the load: {loud}"
    assert o.stats(owner)["transfers_failed"] == 0
