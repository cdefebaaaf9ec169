"""Which bytes a decode rank pulls from which prefill rank, and where they land (pure).

Prefill rank p exposes one lease per request: for each KV-cache group in order, for each
segment of the group (layer, K/V part) in order, the group's exposed blocks back to back, whole
(every head the rank holds). Decode rank r reads from every prefill rank that holds some of its
heads (`tp_head_ranges`), and names only the byte ranges it lacks (`pull_runs`): tokens past its
own prefix-cache hit, its heads, and only where it keeps a block (sliding-window groups drop
blocks out of the window). Block sizes may differ when one divides the other.

`plan_reads` returns descriptors and ranges, never touches memory, and raises `PlanError`
(one request fails into the load-failure policy) for anything it cannot map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..handoff.layout_transform import HeadRange, PagedLayout, coalesce_ranges, pull_runs, tp_head_ranges
from .layout import BlockKind, Segment


class PlanError(ValueError):
    """The hand-off cannot be mapped onto this rank (unsupported mismatch, bad metadata)."""


@dataclass(frozen=True)
class LocalTarget:
    """Decode side of one request: per KV-cache group its whole block table (index k covers
    tokens [k*block_size, ...); -1 where no block is kept), and the tokens to load."""

    tables: tuple[tuple[int, ...], ...]
    token_start: int          # tokens before it are in the local prefix cache
    token_end: int            # tokens from it on are computed locally
    num_prompt_tokens: int


@dataclass(frozen=True)
class RemoteSide:
    """Prefill side of one request, from kv_transfer_params."""

    tp_size: int
    block_size: int
    group_counts: tuple[int, ...]    # exposed blocks per group (a tail of the prompt's blocks)


@dataclass(frozen=True)
class PlannedRead:
    prefill_rank: int
    ranges: np.ndarray | None   # [n, 2] (offset, length) into the lease stream; None: all of it
    # (storage_key, offsets, lengths, scratch mask) per segment, in stream order; scratch rows are
    # offsets into this read's scratch area
    dst: tuple[tuple[int, np.ndarray, np.ndarray, np.ndarray], ...]
    nbytes: int
    lease_bytes: int
    scratch_bytes: int = 0


def head_sources(kind_split: bool, total_heads: int, remote_tp: int, local_tp: int,
                 rank: int, local_heads: int) -> list[tuple[int, HeadRange]]:
    """[(prefill rank, heads)] for decode rank `rank`."""
    if remote_tp == local_tp:
        return [(rank, HeadRange(0, 0, local_heads))]
    if not kind_split:
        raise PlanError(f"prefill TP {remote_tp} != decode TP {local_tp} needs heads outermost in a "
                        "block (this KV layout keeps tokens outermost)")
    if local_heads * local_tp != total_heads or total_heads % remote_tp:
        raise PlanError(f"{total_heads} KV heads do not split evenly over prefill TP {remote_tp} and "
                        f"decode TP {local_tp} (replicated KV heads are not supported)")
    try:
        return tp_head_ranges(total_heads, remote_tp, local_tp, rank)
    except ValueError as e:
        raise PlanError(str(e)) from None


def readers_of(total_heads: int, remote_tp: int, local_tp: int) -> dict[int, list[int]]:
    """The decode ranks that read from each prefill rank (its owner releases the lease once all
    of them reported), in rank order."""
    if remote_tp == local_tp:
        return {p: [p] for p in range(remote_tp)}
    out: dict[int, list[int]] = {p: [] for p in range(remote_tp)}
    for r in range(local_tp):
        for p, _ in tp_head_ranges(total_heads, remote_tp, local_tp, r):
            out[p].append(r)
    return out


def owned_prefill_ranks(remote_tp: int, local_tp: int, rank: int) -> list[int]:
    """The prefill ranks this decode rank renews and dismisses (each prefill rank by exactly one
    decode rank)."""
    return [p for p in range(remote_tp) if p % local_tp == rank]


def _remote_layout(seg: Segment, remote: RemoteSide, total_heads: int, local_tp: int) -> PagedLayout:
    p = seg.paged
    heads = p.heads if seg.kind is not BlockKind.HEADS_OUTER or remote.tp_size == local_tp \
        else total_heads // remote.tp_size
    return PagedLayout(heads, remote.block_size, p.head_bytes, p.parts, p.part_rows)


def plan_reads(segments: Sequence[Segment], target: LocalTarget, remote: RemoteSide, *,
               total_heads: int, local_tp: int, rank: int) -> list[PlannedRead]:
    """One `PlannedRead` per prefill rank holding heads of decode rank `rank`."""
    groups = sorted({s.group for s in segments})
    if groups != list(range(len(groups))):
        raise PlanError(f"local KV-cache groups {groups} are not 0..n-1")
    if len(remote.group_counts) != len(groups) or len(target.tables) != len(groups):
        raise PlanError(f"prefill sent block ids for {len(remote.group_counts)} KV-cache groups, "
                        f"this engine has {len(groups)}")
    if any(s.paged is None for s in segments):
        raise PlanError("the KV layout has no per-token structure; cannot map blocks")
    local_bs = segments[0].paged.block_size
    if remote.block_size != local_bs:
        if any(s.kind is BlockKind.OPAQUE for s in segments):
            raise PlanError(f"block sizes differ ({remote.block_size} vs {local_bs}) but the KV layout "
                            "is opaque")
        big, small = max(remote.block_size, local_bs), min(remote.block_size, local_bs)
        if big % small:
            raise PlanError(f"block sizes {remote.block_size} and {local_bs}: one must divide the other")
    piece = min(remote.block_size, local_bs)
    if target.token_start % piece:
        raise PlanError(f"local prefix hit of {target.token_start} tokens is not a multiple of {piece}")
    split = all(s.kind is BlockKind.HEADS_OUTER for s in segments)
    local_heads = segments[0].paged.heads
    n_prompt_blocks = -(-target.num_prompt_tokens // remote.block_size)
    firsts = []
    for g, count in enumerate(remote.group_counts):
        if count > n_prompt_blocks:
            raise PlanError(f"group {g}: {count} remote blocks for a {target.num_prompt_tokens}-token "
                            f"prompt of {remote.block_size}-token blocks")
        firsts.append(n_prompt_blocks - count)
    tables = [np.asarray(t, dtype=np.int64) for t in target.tables]
    if (remote.tp_size == local_tp and remote.block_size == local_bs
            and all(s.paged.heads == local_heads for s in segments)):
        return [_plan_same_layout(segments, target, remote, firsts, tables, rank)]
    return _plan_general(segments, target, remote, firsts, tables, split=split, total_heads=total_heads,
                         local_tp=local_tp, rank=rank, local_heads=local_heads)


def _plan_same_layout(segments: Sequence[Segment], target: LocalTarget, remote: RemoteSide,
                      firsts: Sequence[int], tables: Sequence[np.ndarray], rank: int) -> PlannedRead:
    """`plan_reads` when both sides cut blocks alike and hold the same heads (same TP, same block
    size: the common hand-off), with the same result: every owner block read lands whole in the
    reader's block, so which blocks are read, and where they land relative to a segment, is
    worked out once per KV-cache group (and block geometry), not per segment (a synchronous load
    plans on the engine thread, right before the forward pass; models have tens of layers)."""
    bs = remote.block_size
    taken: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for g, count in enumerate(remote.group_counts):
        k = firsts[g] + np.arange(count, dtype=np.int64)
        t = k * bs
        placed = (t >= target.token_start) & (t < target.token_end) & (k < len(tables[g]))
        placed[placed] = tables[g][k[placed]] >= 0
        taken[g] = (np.flatnonzero(placed).astype(np.int64), tables[g][k[placed]])
    src_rel: dict[tuple[int, int], np.ndarray] = {}          # (group, block bytes) -> lease ranges
    dst_rel: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
    src_parts, dst = [], []
    base = 0
    for s in segments:
        bb, (blocks, ids) = s.paged.block_bytes, taken[s.group]
        n = remote.group_counts[s.group]
        if len(blocks):
            sk = (s.group, bb)
            if sk not in src_rel:
                src_rel[sk] = coalesce_ranges(blocks * bb, np.full(len(blocks), bb, dtype=np.int64))
            src_parts.append(src_rel[sk] + np.array([base, 0], dtype=np.int64))
            dk = (s.group, bb, s.stride)
            if dk not in dst_rel:
                offs, lens = ids * s.stride, np.full(len(ids), bb, dtype=np.int64)
                if len(offs) > 1:   # reader blocks back to back: one run
                    starts = np.flatnonzero(np.concatenate(([True], offs[1:] != offs[:-1] + lens[:-1])))
                    offs, lens = offs[starts], np.add.reduceat(lens, starts)
                dst_rel[dk] = (offs, lens)
            offs, lens = dst_rel[dk]
            dst.append((s.storage_key, s.base_offset + offs, lens, np.zeros(len(offs), dtype=bool)))
        base += n * bb
    ranges = (coalesce_ranges(*np.concatenate(src_parts).T) if src_parts
              else np.zeros((0, 2), dtype=np.int64))
    nbytes = int(ranges[:, 1].sum())
    if len(ranges) == 1 and ranges[0, 0] == 0 and nbytes == base:
        ranges = None   # the whole lease: no ranges on the wire
    return PlannedRead(rank, ranges, tuple(dst), nbytes, base, 0)


def _plan_general(segments: Sequence[Segment], target: LocalTarget, remote: RemoteSide,
                  firsts: Sequence[int], tables: Sequence[np.ndarray], *, split: bool, total_heads: int,
                  local_tp: int, rank: int, local_heads: int) -> list[PlannedRead]:
    """`plan_reads` for any supported pair (head split/merge, block sizes, transposed parts)."""
    reads = []
    for p, heads in head_sources(split, total_heads, remote.tp_size, local_tp, rank, local_heads):
        base = scratch = 0
        src_parts, dst = [], []
        for s in segments:
            src = _remote_layout(s, remote, total_heads, local_tp)
            n = remote.group_counts[s.group]
            try:
                runs = pull_runs(src, firsts[s.group], n, s.paged, tables[s.group], heads,
                                 target.token_start, target.token_end, dst_stride=s.stride)
            except ValueError as e:
                raise PlanError(str(e)) from None
            if len(runs.src):
                src_parts.append(runs.src + np.array([base, 0], dtype=np.int64))
                offs = np.where(runs.scratch, scratch + runs.dst_offsets, s.base_offset + runs.dst_offsets)
                dst.append((s.storage_key, offs, runs.dst_lengths, runs.scratch))
                scratch += runs.scratch_bytes
            base += n * src.block_bytes
        ranges = (coalesce_ranges(*np.concatenate(src_parts).T) if src_parts
                  else np.zeros((0, 2), dtype=np.int64))
        nbytes = int(ranges[:, 1].sum())
        if len(ranges) == 1 and ranges[0, 0] == 0 and nbytes == base:
            ranges = None   # the whole lease: no ranges on the wire
        reads.append(PlannedRead(p, ranges, tuple(dst), nbytes, base, scratch))
    return reads


def local_descs(read: PlannedRead, regions: Mapping[int, Any], scratch: Any = None):
    """`transport.Descs` of a planned read over the registered regions (storage key -> Region) and
    a scratch region of at least `read.scratch_bytes`."""
    from transport import Descs

    if read.scratch_bytes and (scratch is None or scratch.nbytes < read.scratch_bytes):
        raise PlanError(f"this read needs a scratch region of {read.scratch_bytes} bytes")
    if not read.dst:
        return Descs.concat([])
    # one Descs over every segment's region (not one per segment, then concatenated: tens of
    # layers, planned on the engine thread for a synchronous load)
    used: list[Any] = []
    index: dict[int, int] = {}

    def slot(region: Any) -> int:
        if region.uid not in index:
            index[region.uid] = len(used)
            used.append(region)
        return index[region.uid]

    idx = []
    for key, offs, _lens, sc in read.dst:
        r = slot(regions[key])
        idx.append(np.where(sc, slot(scratch), r).astype(np.int32) if sc.any()
                   else np.full(len(offs), r, dtype=np.int32))
    # (over CUDA regions the joined offsets land in pinned memory the copy kernel reads directly)
    return Descs.from_parts(tuple(used), idx, [d[1] for d in read.dst], [d[2] for d in read.dst])
