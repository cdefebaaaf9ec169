"""Pure mapping from two byte streams (source and destination address runs) to the pairs and
pieces one fused copy kernel moves (numpy, no Python loop over blocks)."""
from __future__ import annotations

import numpy as np


def run_addresses(bases: np.ndarray, region_idx: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Absolute address of each run: the base of its region plus its offset."""
    return np.asarray(bases, dtype=np.int64)[region_idx] + offset.astype(np.int64)


def pair_streams(src: np.ndarray, src_len: np.ndarray, dst: np.ndarray,
                 dst_len: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, length) triples covering both streams in order, cut wherever either side has
    a run boundary. Both streams must have the same total length (ValueError otherwise)."""
    src_len = src_len.astype(np.int64)
    dst_len = dst_len.astype(np.int64)
    if len(src_len) == len(dst_len) and np.array_equal(src_len, dst_len):
        return src.astype(np.int64), dst.astype(np.int64), src_len  # the common case: one pair per run
    cs = np.concatenate(([0], np.cumsum(src_len)))
    cd = np.concatenate(([0], np.cumsum(dst_len)))
    if cs[-1] != cd[-1]:
        raise ValueError(f"source has {int(cs[-1])} bytes, destination {int(cd[-1])}")
    bounds = np.union1d(cs, cd)
    starts, ends = bounds[:-1], bounds[1:]
    i = np.searchsorted(cs, starts, side="right") - 1
    j = np.searchsorted(cd, starts, side="right") - 1
    return (src[i].astype(np.int64) + (starts - cs[i]), dst[j].astype(np.int64) + (starts - cd[j]),
            ends - starts)


def pieces(src: np.ndarray, dst: np.ndarray, length: np.ndarray,
           piece: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair cut into pieces of at most `piece` bytes (the last of a pair may be shorter)."""
    count = -(-length // piece)
    total = int(count.sum())
    first = np.repeat(np.concatenate(([0], np.cumsum(count)[:-1])), count)
    k = np.arange(total, dtype=np.int64) - first            # piece number within its pair
    pair = np.repeat(np.arange(len(length)), count)
    off = k * piece
    return src[pair] + off, dst[pair] + off, np.minimum(piece, length[pair] - off)


def word_bytes(*arrays: np.ndarray) -> int:
    """8 when every address and length is a multiple of 8 (copy by int64), else 1."""
    acc = np.int64(0)
    for a in arrays:
        acc |= np.bitwise_or.reduce(a.astype(np.int64)) if len(a) else np.int64(0)
    return 8 if int(acc) & 7 == 0 else 1


def grid_for(length: np.ndarray, piece: int, max_pairs: int = 65535) -> tuple[int, int] | None:
    """Grid (pieces per pair, pairs) of the two-level launch, or None when host-side pieces are
    better (too many pairs for the grid's second axis, or lengths so uneven that most programs
    would find nothing to do)."""
    n = len(length)
    if n == 0 or n > max_pairs:
        return None
    per = int(-(-int(length.max()) // piece))
    needed = int((-(-length // piece)).sum())
    if per * n > 2 * needed + n:
        return None
    return per, n


# -- the owner's run table on the wire ----------------------------------------------------------
_UNIFORM, _MULTI = 1, 2
MAX_RUNS = 1 << 24


def encode_runs(slot: np.ndarray, offset: np.ndarray, length: np.ndarray) -> bytes:
    """Compact (slot, offset, length) table: a 3-word header, then slots (int32, only with
    several regions), offsets (int64), lengths (int64, only when they differ)."""
    n = len(offset)
    uniform = n > 0 and bool((length == length[0]).all())
    multi = n > 0 and bool(slot.any())
    flags = (_UNIFORM if uniform else 0) | (_MULTI if multi else 0)
    parts = [np.array([n, flags, int(length[0]) if uniform else 0], dtype="<i8").tobytes()]
    if multi:
        parts.append(slot.astype("<i4").tobytes())
    parts.append(offset.astype("<i8", copy=False).tobytes())
    if not uniform:
        parts.append(length.astype("<i8", copy=False).tobytes())
    return b"".join(parts)


def decode_runs(raw: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of encode_runs; raises ValueError for anything malformed (sizes checked exactly)."""
    if len(raw) < 24:
        raise ValueError("run table too short")
    n, flags, ulen = (int(x) for x in np.frombuffer(raw, dtype="<i8", count=3))
    if not 0 < n <= MAX_RUNS or flags & ~(_UNIFORM | _MULTI):
        raise ValueError("bad run table header")
    uniform, multi = bool(flags & _UNIFORM), bool(flags & _MULTI)
    want = 24 + (4 * n if multi else 0) + 8 * n + (0 if uniform else 8 * n)
    if len(raw) != want:
        raise ValueError("run table size does not match its header")
    pos = 24
    if multi:
        slot = np.frombuffer(raw, dtype="<i4", count=n, offset=pos).astype(np.int64)
        pos += 4 * n
    else:
        slot = np.zeros(n, dtype=np.int64)
    offset = np.frombuffer(raw, dtype="<i8", count=n, offset=pos)
    pos += 8 * n
    length = np.full(n, ulen, dtype=np.int64) if uniform else np.frombuffer(raw, dtype="<i8", count=n, offset=pos)
    return slot, offset, length
