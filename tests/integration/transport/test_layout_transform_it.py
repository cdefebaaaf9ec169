"""Layout transforms over the real transport: a prefill owner with TP=1 and 16-token blocks,
decode readers with TP=2 and 32-token blocks (and the reverse), two OS processes, UCX and the
same-host copy; every token of every head is checked against a reference."""
from __future__ import annotations

import numpy as np
import pytest
from xport_helpers import pattern

from nixl_connectors.handoff.layout_transform import PagedLayout, lease_runs, reader_runs, tp_head_ranges

pytestmark = pytest.mark.timeout(180)

HEADS, HB = 8, 64  # total KV heads; bytes of one token of one head


def _as_cache(raw: bytes | np.ndarray, layout: PagedLayout) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, layout.heads, layout.block_size, layout.head_bytes)


@pytest.mark.parametrize("link", ["shm-ucx", "shm-same-host"])
@pytest.mark.parametrize("ptp,dtp,bs,bd", [(1, 2, 16, 32), (2, 1, 32, 16), (2, 4, 16, 16), (4, 2, 64, 16)])
def test_transformed_hand_off(cluster, agents, link, ptp, dtp, bs, bd):
    owner_node, reader_node = cluster["shm"]
    src, dst = PagedLayout(HEADS // ptp, bs, HB), PagedLayout(HEADS // dtp, bd, HB)
    tokens, pool_s, pool_d = 77, 16, 16
    rng = np.random.default_rng(ptp * 7 + dtp)
    owners = {}
    for p in range(ptp):   # one owner agent per prefill rank, each a cache of its heads
        name, addr = agents(owner_node, f"prefill{p}", pool_s, src.block_bytes, seed=100 + p)
        owners[p] = (name, addr, rng.permutation(pool_s)[:-(-tokens // bs)])
    for rank in range(dtp):
        reader, _ = agents(reader_node, f"decode{rank}", pool_d, dst.block_bytes,
                           same_host_copy=(link == "shm-same-host"))
        dblocks = rng.permutation(pool_d)[:-(-tokens // bd)]
        for p, heads in tp_head_ranges(HEADS, ptp, dtp, rank):
            oname, oaddr, sblocks = owners[p]
            offs, lens = lease_runs(src, sblocks, heads)
            lid = owner_node.expose_runs(oname, offs, lens)
            rr = reader_runs(src, len(sblocks), dst, dblocks, heads)
            reader_node.connect(reader, oaddr)
            reader_node.read_runs(reader, oaddr, rr.offsets, rr.lengths, rr.scratch, lid)
        got = _as_cache(reader_node.pool(reader), dst)
        caches = {p: _as_cache(pattern(np.arange(pool_s), src.block_bytes, 100 + p), src) for p in range(ptp)}
        hp, hd = HEADS // ptp, HEADS // dtp
        t = np.arange(tokens)
        for hl in range(hd):
            p, hs = divmod(rank * hd + hl, hp)
            want = caches[p][owners[p][2][t // bs], hs, t % bs]
            assert np.array_equal(got[dblocks[t // bd], hl, t % bd], want), f"rank {rank} head {hl}"
        assert not got[np.setdiff1d(np.arange(pool_d), dblocks)].any(), "other blocks untouched"
