"""pullplan: every byte a decode rank pulls lands where a single engine would have computed it,
for vLLM CPU's [B, H, N, 2*D] layer tensors, different TP (1->2, 2->1, 2->4), block sizes
(32<->64), a local prefix hit, hybrid groups with null blocks; unsupported mismatches raise
PlanError. Bytes move as the transport moves them: the owner's lease is its whole blocks, the
read takes `ranges` of it in order into the reader's descriptors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from nixl_connectors.handoff.lifecycle import parse_read_done, read_done_payload
from nixl_connectors.vllm import layout
from nixl_connectors.vllm.pullplan import (LocalTarget, PlanError, RemoteSide, owned_prefill_ranks, plan_reads,
                                           readers_of)

HEADS, D, LAYERS = 4, 8, 3   # total KV heads, head size (bf16 -> 2*D*2 bytes per token and head)


def make_engine(tp, rank, bs, nblocks, groups=1, seed=0):
    """Per-layer caches of one rank, filled with bytes that name (global head, token, layer)."""
    h = HEADS // tp
    caches = {f"l{i}": torch.zeros(nblocks, h, bs, 2 * D, dtype=torch.bfloat16) for i in range(LAYERS)}
    group_of = {f"l{i}": (i % groups) for i in range(LAYERS)}
    segs = layout.segments_for(caches, nblocks, local_heads=h, block_size=bs, group_of=group_of, head_parts=2,
                               part_rows=(D, 1))
    return caches, segs


def value(layer, head, token, part=0):
    return float((layer * 31 + head * 7 + token + 101 * part) % 250)


def kv_view(t, b, h):
    """Where vLLM's CPU attention keeps one head of one block ([B, H, N, 2D] viewed as
    [B, H, 2N, D], chunked): keys transposed ([D, N]), then values token-major ([N, D])."""
    n = t.shape[2]
    flat = t[b, h].reshape(-1)
    return flat[:n * D].view(D, n), flat[n * D:].view(n, D)


def fill(caches, tp, rank, bs, table, ntok):
    h = HEADS // tp
    for name, t in caches.items():
        layer = int(name[1:])
        for tok in range(ntok):
            b = table[tok // bs]
            if b < 0:
                continue
            for hl in range(h):
                k, v = kv_view(t, b, hl)
                k[:, tok % bs] = value(layer, rank * h + hl, tok, 0)
                v[tok % bs] = value(layer, rank * h + hl, tok, 1)


def lease_stream(caches, segs, group_ids):
    """The owner's lease stream: per group, per segment, its exposed blocks whole."""
    parts = []
    for g, ids in enumerate(group_ids):
        for s in segs:
            if s.group == g:
                t = caches[s.layer]
                parts.append(t.view(torch.uint8).reshape(t.shape[0], -1)[list(ids)].reshape(-1).numpy())
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def run(ptp, dtp, pbs, dbs, ntok, cached_blocks=0, groups=1, null_first=0):
    rng = np.random.default_rng(ptp * 100 + dtp * 10 + pbs + dbs + ntok)
    np_blocks, nd_blocks = -(-ntok // pbs), -(-ntok // dbs)
    pool_p, pool_d = np_blocks + 4, nd_blocks + 4
    # prefill: per rank caches; group tables (the same ids for every group here)
    ptable = rng.permutation(pool_p)[:np_blocks].tolist()
    prefill = {}
    for p in range(ptp):
        caches, segs = make_engine(ptp, p, pbs, pool_p, groups)
        fill(caches, ptp, p, pbs, ptable, ntok)
        prefill[p] = (caches, segs)
    exposed = [ptable] + [ptable[null_first * dbs // pbs:] for _ in range(groups - 1)]
    counts = tuple(len(e) for e in exposed)
    total = 0
    for r in range(dtp):
        caches, segs = make_engine(dtp, r, dbs, pool_d, groups)
        dtable = rng.permutation(pool_d)[:nd_blocks].astype(np.int64)
        tables = [tuple(dtable.tolist())] + [tuple([-1] * null_first + dtable[null_first:].tolist())
                                             for _ in range(groups - 1)]
        target = LocalTarget(tuple(tables), cached_blocks * dbs, ntok, ntok)
        reads = plan_reads(segs, target, RemoteSide(ptp, pbs, counts), total_heads=HEADS, local_tp=dtp, rank=r)
        flat = {s.storage_key: caches[s.layer].view(torch.uint8).reshape(-1).numpy() for s in segs}
        for rd in reads:
            stream = lease_stream(*prefill[rd.prefill_rank], exposed)
            assert len(stream) == rd.lease_bytes
            got = stream if rd.ranges is None else np.concatenate([stream[o:o + n] for o, n in rd.ranges])
            assert len(got) == rd.nbytes
            pos = 0
            scratch = np.zeros(rd.scratch_bytes, np.uint8)
            for key, offs, lens, sc in rd.dst:
                for o, n, x in zip(offs, lens, sc):
                    (scratch if x else flat[key])[o:o + n] = got[pos:pos + n]
                    pos += n
            total += rd.nbytes
        h = HEADS // dtp
        for name, t in caches.items():
            layer, g = int(name[1:]), int(name[1:]) % groups
            for tok in range(ntok):
                b = tables[g][tok // dbs]
                if b < 0:
                    continue
                for hl in range(h):
                    kk, vv = kv_view(t, b, hl)
                    k, v = kk[:, tok % dbs].float(), vv[tok % dbs].float()
                    if tok < cached_blocks * dbs:
                        assert not k.any() and not v.any(), "locally cached blocks are never written"
                    else:
                        assert torch.all(k == value(layer, r * h + hl, tok, 0)), (name, tok, hl)
                        assert torch.all(v == value(layer, r * h + hl, tok, 1)), (name, tok, hl)
    return total


@pytest.mark.parametrize("ptp,dtp", [(1, 1), (1, 2), (2, 1), (2, 4), (4, 2)])
@pytest.mark.parametrize("pbs,dbs", [(32, 32), (32, 64), (64, 32)])
def test_tp_and_block_size_pairs(ptp, dtp, pbs, dbs):
    run(ptp, dtp, pbs, dbs, ntok=75)


@pytest.mark.parametrize("pbs,dbs", [(32, 32), (64, 32), (32, 64)])
def test_suffix_only_moves_the_new_blocks(pbs, dbs):
    full = run(1, 1, pbs, dbs, ntok=200)
    part = run(1, 1, pbs, dbs, ntok=200, cached_blocks=2)
    bytes_per_token = LAYERS * HEADS * 2 * D * 2
    blocks = -(-200 // pbs)
    assert full == blocks * pbs * bytes_per_token, "whole owner blocks"
    assert part == (blocks - 2 * dbs // pbs) * pbs * bytes_per_token, "only owner blocks holding new tokens"


def test_hybrid_groups_with_null_blocks():
    run(1, 1, 32, 32, ntok=150, groups=2, null_first=2)
    run(2, 1, 32, 32, ntok=150, groups=2, null_first=2, cached_blocks=1)


def test_same_layout_plan_equals_the_general_plan():
    """Same TP and block size: plan_reads takes a per-group shortcut; its plan is the general
    per-segment mapping's, field by field (suffixes, sync loads' last token, null blocks, two
    groups, and a tokens-outermost layout whose K and V of a block are far apart)."""
    from nixl_connectors.vllm.pullplan import _plan_general

    def same(segs, target, counts, bs):
        remote = RemoteSide(1, bs, counts)
        (fast,) = plan_reads(segs, target, remote, total_heads=HEADS, local_tp=1, rank=0)
        n_blocks = -(-target.num_prompt_tokens // bs)
        (slow,) = _plan_general(segs, target, remote, [n_blocks - c for c in counts],
                                [np.asarray(t, dtype=np.int64) for t in target.tables],
                                split=segs[0].kind is layout.BlockKind.HEADS_OUTER,
                                total_heads=HEADS, local_tp=1, rank=0,
                                local_heads=segs[0].paged.heads)
        assert (fast.prefill_rank, fast.nbytes, fast.lease_bytes, fast.scratch_bytes) == \
            (slow.prefill_rank, slow.nbytes, slow.lease_bytes, slow.scratch_bytes)
        assert (fast.ranges is None) == (slow.ranges is None)
        if fast.ranges is not None:
            assert fast.ranges.tolist() == slow.ranges.tolist()
        assert len(fast.dst) == len(slow.dst)
        for a, b in zip(fast.dst, slow.dst):
            assert a[0] == b[0] and [x.tolist() for x in a[1:]] == [x.tolist() for x in b[1:]]

    rng = np.random.default_rng(5)
    kv_apart = layout.segments_for({"l0": torch.zeros(2, 16, 32, HEADS, D, dtype=torch.bfloat16)}, 16,
                                   local_heads=HEADS, block_size=32)
    for groups in (1, 2):
        _, segs = make_engine(1, 0, 32, 16, groups)
        for _ in range(30):
            ntok = int(rng.integers(1, 8 * 32))
            nb = -(-ntok // 32)
            table = rng.permutation(16)[:nb].astype(np.int64)
            if rng.random() < 0.5:
                table = np.arange(nb, dtype=np.int64) + int(rng.integers(0, 16 - nb + 1))
            tables = [table.copy() for _ in range(groups)]
            nulls = int(rng.integers(0, nb))
            if groups == 2:
                tables[1][:nulls] = -1
            counts = (nb,) + ((nb - nulls,) if groups == 2 else ())
            start = int(rng.integers(0, nb)) * 32
            end = ntok - int(rng.integers(0, 2)) if ntok > start + 1 else ntok
            target = LocalTarget(tuple(tuple(t.tolist()) for t in tables), start, end, ntok)
            same(segs, target, counts, 32)
            if groups == 1:
                same(kv_apart, target, counts, 32)


def test_local_descs_are_the_per_segment_descriptors_concatenated():
    """local_descs builds one Descs over every segment's region (and the scratch region); its
    stream is the per-segment descriptors' concatenated, row for row."""
    from transport import Descs
    from transport.region import make_region

    from nixl_connectors.vllm.pullplan import local_descs

    caches, segs = make_engine(2, 0, 32, 12)
    regions = {s.storage_key: make_region(caches[s.layer], whole_storage=True) for s in segs}
    scratch = make_region(np.zeros(1 << 20, np.uint8))
    cases = [(LocalTarget(((0, 1, 2, 3),), 32, 120, 120), RemoteSide(2, 32, (4,))),   # same layout
             (LocalTarget(((5, 6, 7),), 0, 70, 70), RemoteSide(1, 64, (2,))),         # block size, TP
             (LocalTarget(((5, 6, 7),), 0, 70, 70), RemoteSide(2, 64, (2,)))]         # scratch tail
    for target, remote in cases:
        for rd in plan_reads(segs, target, remote, total_heads=HEADS, local_tp=2, rank=0):
            got = local_descs(rd, regions, scratch)
            want = Descs.concat([Descs((regions[k], scratch), sc.astype(np.int32), o, n) if sc.any()
                                 else Descs.from_ranges(regions[k], o, n) for k, o, n, sc in rd.dst])
            assert [r.uid for r in got.regions] == [r.uid for r in want.regions]
            assert got.region_idx.tolist() == want.region_idx.tolist()
            assert got.offset.tolist() == want.offset.tolist() and got.length.tolist() == want.length.tolist()
            assert got.nbytes == rd.nbytes
    assert any(rd.scratch_bytes for rd in plan_reads(segs, cases[2][0], cases[2][1], total_heads=HEADS,
                                                      local_tp=2, rank=0)), "a case with scratch"


def test_whole_lease_needs_no_ranges():
    caches, segs = make_engine(1, 0, 32, 8)
    (rd,) = plan_reads(segs, LocalTarget(((0, 1, 2),), 0, 70, 70), RemoteSide(1, 32, (3,)),
                       total_heads=HEADS, local_tp=1, rank=0)
    assert rd.ranges is None and rd.nbytes == rd.lease_bytes


def test_unsupported_mismatches_raise_plan_error():
    caches, segs = make_engine(1, 0, 32, 8)
    tgt = LocalTarget(((0, 1, 2),), 0, 70, 70)
    with pytest.raises(PlanError, match="groups"):
        plan_reads(segs, tgt, RemoteSide(1, 32, (3, 3)), total_heads=HEADS, local_tp=1, rank=0)
    with pytest.raises(PlanError, match="divide"):
        plan_reads(segs, tgt, RemoteSide(1, 48, (2,)), total_heads=HEADS, local_tp=1, rank=0)
    with pytest.raises(PlanError, match="remote blocks"):
        plan_reads(segs, tgt, RemoteSide(1, 32, (9,)), total_heads=HEADS, local_tp=1, rank=0)
    with pytest.raises(PlanError, match="split"):
        plan_reads(segs, tgt, RemoteSide(3, 32, (3,)), total_heads=HEADS, local_tp=1, rank=0)
    # tokens-outermost layout ([2, B, N, H, D]): block sizes map, TP does not
    t = {"l0": torch.zeros(2, 8, 32, HEADS, D, dtype=torch.bfloat16)}
    segs = layout.segments_for(t, 8, local_heads=HEADS, block_size=32)
    plan_reads(segs, tgt, RemoteSide(1, 64, (2,)), total_heads=HEADS, local_tp=1, rank=0)
    with pytest.raises(PlanError, match="heads outermost"):
        plan_reads(segs, tgt, RemoteSide(2, 32, (3,)), total_heads=HEADS, local_tp=1, rank=0)


def test_readers_and_owned_ranks_cover_every_prefill_rank_once():
    for ptp, dtp in itertools.product([1, 2, 4], repeat=2):
        readers = readers_of(HEADS, ptp, dtp)
        assert sorted(readers) == list(range(ptp)) and all(readers.values())
        owned = [p for r in range(dtp) for p in owned_prefill_ranks(ptp, dtp, r)]
        assert sorted(owned) == list(range(ptp))
    assert readers_of(HEADS, 1, 2) == {0: [0, 1]}
    assert readers_of(HEADS, 2, 1) == {0: [0], 1: [0]}


def test_read_done_payloads():
    assert read_done_payload("req-1") == b"req-1"
    assert parse_read_done("req-1") == ("req-1", 0, 1)
    assert parse_read_done(read_done_payload("a\x1fb", 1, 2).decode()) == ("a\x1fb", 1, 2)
    assert parse_read_done("x\x1f3/2") == ("x\x1f3/2", 0, 1), "a bad count is a plain id"
    with pytest.raises(ValueError):
        read_done_payload("r", 2, 2)


class _FakeOwnerAgent:
    """In-memory stand-in of the owner Agent's public API (expose/release/notifications/freed)."""

    def __init__(self):
        self.notes, self.released, self.freed = [], [], []

    def expose(self, descs, peer=None, ttl_s=30.0):
        from types import SimpleNamespace
        return SimpleNamespace(id="L1", nbytes=10)

    def release(self, lease_id):
        self.released.append(lease_id)
        self.freed.append(lease_id)

    def notifications(self):
        out, self.notes = self.notes, []
        return out

    def freed_leases(self):
        out, self.freed = self.freed, []
        return out


def test_owner_releases_a_lease_only_after_every_reader_reported():
    from nixl_connectors.handoff.lifecycle import LeaseEnd, ProducerBook

    agent = _FakeOwnerAgent()
    book = ProducerBook(agent, ttl_s=30)
    book.hold("r", descs=None)
    agent.notes = [("d1", read_done_payload("r", 1, 2))]
    assert book.poll() == [] and agent.released == []
    agent.notes = [("d1", read_done_payload("r", 1, 2))]     # a repeat counts once
    assert book.poll() == [] and agent.released == []
    agent.notes = [("d0", read_done_payload("r", 0, 2))]
    (fr,) = book.poll()
    assert fr.request_id == "r" and fr.reason is LeaseEnd.READ and agent.released == ["L1"]
