"""Pure mapping for KV hand-offs between differently shaped paged caches (no I/O).

Both engines keep one layer's cache (K, V, or K and V packed) in the HND paged layout
`[num_blocks, heads, block_size, head_bytes]`: block-major, then head, then token slot, and one
token's vector of one head (`head_bytes`) contiguous. A hand-off may change

* the block size, when one side's is a multiple of the other's (e.g. prefill 16, decode 32), and
* the heads a rank holds, when prefill and decode run different tensor parallelism: a decode rank
  takes a contiguous range of a prefill rank's heads (decode TP > prefill TP), or places all of a
  prefill rank's heads at an offset among its own (decode TP < prefill TP, one read per prefill
  rank).

The owner exposes whole blocks of the heads the reader needs, in block order (`lease_runs`); the
reader maps that byte stream onto its own blocks (`reader_runs`), so the transport's pack/unpack
applies the transform with no extra pass. Bytes of prefill slots past the reader's last block
(the tail of a partial last block, when the reader's blocks are smaller) go to a scratch area.
Everything is vectorised over numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PagedLayout:
    """One layer's paged cache on one rank: `[num_blocks, heads, block_size, head_bytes]`, or,
    with `parts` > 1, `[num_blocks, heads, parts, block_size, head_bytes / parts]` (e.g. vLLM's
    CPU attention keeps, per head, all K token vectors of a block and then all V vectors).
    `head_bytes` is always the bytes of one token of one head (all parts).

    `part_rows[q]` > 1 says part q is stored channel-major: `rows` rows of `block_size` tokens
    (vLLM's CPU attention keeps K transposed, `[head_size, block_size]` elements, and V
    token-major); empty means every part is token-major."""

    heads: int
    block_size: int
    head_bytes: int
    parts: int = 1
    part_rows: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if min(self.heads, self.block_size, self.head_bytes, self.parts) <= 0:
            raise ValueError(f"layout sizes must be positive: {self}")
        if self.head_bytes % self.parts:
            raise ValueError(f"head_bytes {self.head_bytes} do not split into {self.parts} parts")
        if self.part_rows and (len(self.part_rows) != self.parts or any(
                r <= 0 or (self.head_bytes // self.parts) % r for r in self.part_rows)):
            raise ValueError(f"part_rows {self.part_rows} do not fit {self.parts} parts of "
                             f"{self.head_bytes // self.parts} bytes per token")

    @property
    def rows(self) -> tuple[int, ...]:
        return self.part_rows or (1,) * self.parts

    @property
    def block_bytes(self) -> int:
        return self.heads * self.block_size * self.head_bytes


@dataclass(frozen=True)
class HeadRange:
    """Heads [src_start, src_start+count) of the owner's blocks go to heads [dst_start, ...) of
    the reader's."""

    src_start: int
    dst_start: int
    count: int


@dataclass(frozen=True)
class ReaderRuns:
    """The reader's side of a transformed hand-off, in the lease's stream order: run i is
    `lengths[i]` bytes at `offsets[i]` of the reader's cache, or, where `scratch[i]`, of its
    scratch area (bytes that have no place on the reader)."""

    offsets: np.ndarray
    lengths: np.ndarray
    scratch: np.ndarray

    @property
    def scratch_bytes(self) -> int:
        return int(self.lengths[self.scratch].sum())


def tp_head_ranges(total_heads: int, prefill_tp: int, decode_tp: int, decode_rank: int
                   ) -> list[tuple[int, HeadRange]]:
    """Which prefill ranks a decode rank reads from, and which heads: [(prefill_rank, range)].

    Heads are split evenly and in order over the ranks of each side (as vLLM and TensorRT-LLM
    shard attention heads)."""
    for tp in (prefill_tp, decode_tp):
        if tp <= 0 or total_heads % tp:
            raise ValueError(f"{total_heads} KV heads do not split over TP {tp}")
    if not 0 <= decode_rank < decode_tp:
        raise ValueError(f"decode rank {decode_rank} out of range for TP {decode_tp}")
    hp, hd = total_heads // prefill_tp, total_heads // decode_tp
    lo, hi = decode_rank * hd, (decode_rank + 1) * hd
    out = []
    for p in range(lo // hp, (hi - 1) // hp + 1):
        a, b = max(lo, p * hp), min(hi, (p + 1) * hp)
        out.append((p, HeadRange(src_start=a - p * hp, dst_start=a - lo, count=b - a)))
    return out


def _check(src: PagedLayout, dst: PagedLayout, heads: HeadRange) -> None:
    if src.parts != dst.parts or src.rows != dst.rows:
        raise ValueError(f"blocks are split differently: {src.rows} vs {dst.rows} rows per part")
    if src.head_bytes != dst.head_bytes:
        raise ValueError(f"per-head token bytes differ ({src.head_bytes} vs {dst.head_bytes}): "
                         "dtype or head size mismatch")
    big, small = max(src.block_size, dst.block_size), min(src.block_size, dst.block_size)
    if big % small:
        raise ValueError(f"block sizes {src.block_size} and {dst.block_size}: one must divide the other")
    if heads.count <= 0 or heads.src_start < 0 or heads.dst_start < 0 \
            or heads.src_start + heads.count > src.heads or heads.dst_start + heads.count > dst.heads:
        raise ValueError(f"head range {heads} does not fit {src.heads} -> {dst.heads} heads")


def lease_runs(src: PagedLayout, blocks: np.ndarray, heads: HeadRange) -> tuple[np.ndarray, np.ndarray]:
    """The owner's runs (byte offsets into one layer's cache, lengths): per block, in block
    order, the contiguous heads `heads.src_start .. +count`."""
    blocks = np.asarray(blocks, dtype=np.int64)
    if heads.count <= 0 or heads.src_start < 0 or heads.src_start + heads.count > src.heads:
        raise ValueError(f"head range {heads} does not fit {src.heads} heads")
    run = src.block_size * src.head_bytes
    offsets = blocks * src.block_bytes + heads.src_start * run
    return offsets, np.full(len(blocks), heads.count * run, dtype=np.int64)


def reader_runs(src: PagedLayout, num_src_blocks: int, dst: PagedLayout, dst_blocks: np.ndarray,
                heads: HeadRange) -> ReaderRuns:
    """Map the stream of `lease_runs(src, <num_src_blocks blocks>, heads)` onto the reader's
    blocks `dst_blocks`: token slot t of the prefill stream (t = block index * block size + slot)
    lands in reader block t // dst.block_size, slot t % dst.block_size, same head shifted by
    `heads.dst_start - heads.src_start`."""
    _check(src, dst, heads)
    if src.rows != (1,):
        raise ValueError("reader_runs maps token-major blocks of one part; use pull_runs")
    dst_blocks = np.asarray(dst_blocks, dtype=np.int64)
    piece = min(src.block_size, dst.block_size)          # tokens contiguous on both sides
    per_block = src.block_size // piece
    b, h, j = np.meshgrid(np.arange(num_src_blocks, dtype=np.int64), np.arange(heads.count, dtype=np.int64),
                          np.arange(per_block, dtype=np.int64), indexing="ij")
    t = b * src.block_size + j * piece                   # first token of each piece, stream order
    t = t.ravel()
    h = h.ravel()
    dblock = t // dst.block_size
    placed = dblock < len(dst_blocks)
    lengths = np.full(len(t), piece * dst.head_bytes, dtype=np.int64)
    offsets = np.empty(len(t), dtype=np.int64)
    ids = dst_blocks[dblock[placed]]
    offsets[placed] = (ids * dst.block_bytes + (heads.dst_start + h[placed]) * dst.block_size * dst.head_bytes
                       + (t[placed] % dst.block_size) * dst.head_bytes)
    n_scratch = int((~placed).sum())
    offsets[~placed] = np.arange(n_scratch, dtype=np.int64) * piece * dst.head_bytes
    return ReaderRuns(offsets, lengths, ~placed)


def reader_descs(runs: ReaderRuns, cache, scratch=None):
    """`transport.Descs` of the reader's runs: rows in `cache` (a Region of one layer's cache),
    scratch rows in `scratch` (a Region of at least `runs.scratch_bytes`), in stream order."""
    from transport import Descs

    if runs.scratch.any():
        if scratch is None or scratch.nbytes < runs.scratch_bytes:
            raise ValueError(f"this hand-off needs a scratch region of {runs.scratch_bytes} bytes")
        regions = (cache, scratch)
    else:
        regions = (cache,)
    return Descs(regions, runs.scratch.astype(np.int32), runs.offsets, runs.lengths)


@dataclass(frozen=True)
class PullRuns:
    """A read of part of a lease of whole owner blocks: `src` are (offset, length) byte ranges
    into the lease's stream of one segment (its blocks back to back, `src.block_bytes` each),
    coalesced; the reader's runs follow in the same stream order: `dst_offsets` / `dst_lengths`
    are bytes from the start of the reader's segment (block b at `b * dst_stride`), or, where
    `scratch`, offsets into a scratch area of `scratch_bytes` (bytes of a block that is read
    for some of its tokens but whose other tokens have no place on the reader)."""

    src: np.ndarray          # [n, 2] int64 (offset, length) into the segment's lease stream
    dst_offsets: np.ndarray  # int64
    dst_lengths: np.ndarray  # int64
    scratch: np.ndarray      # bool

    @property
    def nbytes(self) -> int:
        return int(self.dst_lengths.sum())

    @property
    def scratch_bytes(self) -> int:
        return int(self.dst_lengths[self.scratch].sum())


def coalesce_ranges(offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """[n, 2] (offset, length) with neighbours that touch (in order) merged into one range."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if offsets.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], offsets[1:] != offsets[:-1] + lengths[:-1])))
    return np.stack([offsets[starts], np.add.reduceat(lengths, starts)], axis=1)


def pull_runs(src: PagedLayout, src_first_block: int, num_src_blocks: int, dst: PagedLayout,
              dst_table: np.ndarray, heads: HeadRange, token_start: int, token_end: int,
              dst_stride: int | None = None) -> PullRuns:
    """Which bytes of a lease of `num_src_blocks` whole owner blocks a reader pulls, and where
    they land (pure, vectorised).

    The lease holds the owner's blocks `src_first_block ..` of a request (block i covers tokens
    `[i * src.block_size, (i+1) * src.block_size)`), every head. The reader takes heads
    `heads.src_start .. +count` of them into its heads `heads.dst_start ..`, and needs only tokens
    `[token_start, token_end)` (the ones it lacks: `token_start` past its own prefix-cache hit).
    `dst_table[k]` is the reader's block for tokens `[k * dst.block_size, ...)`, or -1 where the
    reader keeps no block (null blocks of sliding-window groups).

    Tokens are mapped in pieces of `min(src.block_size, dst.block_size)` (so `token_start` must be
    a multiple of it). An owner block is read, whole (the heads taken), when any of its pieces has
    a place on the reader; its other pieces go to scratch. So the wire carries at most one range
    per owner block, however the blocks are cut on the reader.

    Same block layout on both sides and every head (same TP, same block size: the common
    hand-off) takes a shortcut with the same result: each owner block read lands whole in one
    reader block, so the runs are per block, not per head, part and row (a synchronous load
    plans on the engine thread, right before the forward pass)."""
    _check(src, dst, heads)
    piece = min(src.block_size, dst.block_size)
    if token_start % piece:
        raise ValueError(f"token_start {token_start} is not a multiple of {piece}")
    if src_first_block < 0 or num_src_blocks < 0:
        raise ValueError("negative block index or count")
    dst_table = np.asarray(dst_table, dtype=np.int64)
    stride = dst.block_bytes if dst_stride is None else int(dst_stride)
    if src == dst and heads.src_start == 0 and heads.dst_start == 0 and heads.count == src.heads:
        return _whole_block_runs(src.block_bytes, src.block_size, src_first_block, num_src_blocks, dst_table,
                                 token_start, token_end, stride)
    return _pull_runs_general(src, src_first_block, num_src_blocks, dst, dst_table, heads, token_start,
                              token_end, stride)


def _merge_dst(dst_off: np.ndarray, length: np.ndarray, scratch: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge neighbouring runs that are adjacent on the reader too (same stream, fewer runs)."""
    if len(dst_off) <= 1:
        return dst_off, length, scratch
    starts = np.flatnonzero(np.concatenate(([True], (scratch[1:] != scratch[:-1])
                                            | (dst_off[1:] != dst_off[:-1] + length[:-1]))))
    return dst_off[starts], np.add.reduceat(length, starts), scratch[starts]


def _whole_block_runs(block_bytes: int, block_size: int, src_first_block: int, num_src_blocks: int,
                      dst_table: np.ndarray, token_start: int, token_end: int, stride: int) -> PullRuns:
    """`pull_runs` when both sides cut blocks alike and the reader takes every head: owner block
    k is read when its first token is in [token_start, token_end) and the reader keeps block k;
    its bytes land whole there (no scratch: the whole block has a place)."""
    b = np.arange(num_src_blocks, dtype=np.int64)
    k = src_first_block + b
    t = k * block_size
    placed = (t >= token_start) & (t < token_end) & (k < len(dst_table))
    placed[placed] = dst_table[k[placed]] >= 0
    taken = b[placed]
    lengths = np.full(len(taken), block_bytes, dtype=np.int64)
    src_ranges = coalesce_ranges(taken * block_bytes, lengths)
    dst_off, length, scratch = _merge_dst(dst_table[src_first_block + taken] * stride, lengths,
                                          np.zeros(len(taken), dtype=bool))
    return PullRuns(src_ranges, dst_off, length, scratch)


def _pull_runs_general(src: PagedLayout, src_first_block: int, num_src_blocks: int, dst: PagedLayout,
                       dst_table: np.ndarray, heads: HeadRange, token_start: int, token_end: int,
                       stride: int) -> PullRuns:
    """`pull_runs` for any pair of layouts (head split/merge, block sizes, transposed parts)."""
    piece = min(src.block_size, dst.block_size)
    per_block = src.block_size // piece
    # which pieces have a place, and which owner blocks are read at all
    pb, pj = np.divmod(np.arange(num_src_blocks * per_block, dtype=np.int64), per_block)
    t = (src_first_block + pb) * src.block_size + pj * piece
    k = t // dst.block_size
    placed = (t >= token_start) & (t < token_end) & (k < len(dst_table))
    placed[placed] = dst_table[k[placed]] >= 0
    taken = np.flatnonzero(placed.reshape(num_src_blocks, per_block).any(axis=1)) if per_block else \
        np.zeros(0, np.int64)
    src_head = src.block_size * src.head_bytes                  # bytes of one head of one block
    src_ranges = coalesce_ranges(taken * src.block_bytes + heads.src_start * src_head,
                                 np.full(len(taken), heads.count * src_head, dtype=np.int64))
    tb = src.head_bytes // src.parts                            # bytes of one token in one part
    offs_s, offs_d, lens, place = [], [], [], []
    for q, rows in enumerate(src.rows):
        u = tb // rows                                          # bytes of one token in one row
        b, h, r, j = (a.ravel() for a in np.meshgrid(taken, np.arange(heads.count, dtype=np.int64),
                                                      np.arange(rows, dtype=np.int64),
                                                      np.arange(per_block, dtype=np.int64), indexing="ij"))
        tok = (src_first_block + b) * src.block_size + j * piece
        ok = placed[b * per_block + j]
        kk = tok // dst.block_size
        offs_s.append(b * src.block_bytes + (heads.src_start + h) * src_head + q * src.block_size * tb
                      + r * src.block_size * u + j * piece * u)
        d = np.zeros(len(tok), dtype=np.int64)
        d[ok] = (dst_table[kk[ok]] * stride + (heads.dst_start + h[ok]) * dst.block_size * dst.head_bytes
                 + q * dst.block_size * tb + r[ok] * dst.block_size * u + (tok[ok] % dst.block_size) * u)
        offs_d.append(d)
        lens.append(np.full(len(tok), piece * u, dtype=np.int64))
        place.append(ok)
    order = np.argsort(np.concatenate(offs_s), kind="stable")  # stream order = the owner's byte order
    dst_off = np.concatenate(offs_d)[order]
    length = np.concatenate(lens)[order]
    scratch = ~np.concatenate(place)[order]
    dst_off[scratch] = np.concatenate(([0], np.cumsum(length[scratch])[:-1])) if scratch.any() else 0
    dst_off, length, scratch = _merge_dst(dst_off, length, scratch)
    return PullRuns(src_ranges, dst_off, length, scratch)
