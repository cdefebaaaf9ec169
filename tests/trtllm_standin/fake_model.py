"""A deterministic fake model: the KV of a token depends only on the tokens up to it.

So two instances that see the same prompt compute bit-identical KV, and a generation instance
that loaded a prompt's KV from elsewhere produces the same tokens as one that computed it,
while NaN/garbage KV (a missed or wrong transfer) changes the sampled tokens.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

VOCAB = 32000
_MOD = (1 << 31) - 1


def prefix_hashes(tokens: Sequence[int]) -> np.ndarray:
    out = np.empty(len(tokens), dtype=np.int64)
    h = 7
    for i, t in enumerate(tokens):
        h = (h * 1000003 + int(t) + 1) % _MOD
        out[i] = h
    return out


def kv_values(hashes: np.ndarray, layer: int, kv: int, head_offset: int, heads: int,
              head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """KV of positions with the given prefix hashes: tensor [n, heads, head_dim]."""
    base = (hashes % 9973).astype(np.float64) / 9973.0
    h = np.arange(head_offset, head_offset + heads, dtype=np.float64)
    d = np.arange(head_dim, dtype=np.float64)
    vals = (base[:, None, None] + layer * 1.0 + kv * 0.5 + h[None, :, None] * 0.01
            + d[None, None, :] * 0.0001)
    return torch.from_numpy(vals).to(dtype)


def write_kv(pool: torch.Tensor, block_ids: Sequence[int], tokens: Sequence[int], start: int,
             end: int, layer: int, heads: int, head_offset: int, head_dim: int,
             tokens_per_block: int) -> None:
    """Compute and store the KV of positions [start, end) of one layer into the paged pool.

    Per block, the last pool dimension is laid out [heads, tokens_per_block, head_dim].
    """
    if end <= start:
        return
    hashes = prefix_hashes(tokens[:end])[start:end]
    pos = np.arange(start, end)
    dev = pool.device
    blocks = torch.as_tensor(np.asarray(block_ids, dtype=np.int64)[pos // tokens_per_block], device=dev)
    slots = torch.as_tensor(pos % tokens_per_block, device=dev)
    kv_factor = pool.shape[2]
    view = pool.view(pool.shape[0], pool.shape[1], kv_factor, heads, tokens_per_block, head_dim)
    for kv in range(kv_factor):
        vals = kv_values(hashes, layer, kv, head_offset, heads, head_dim, pool.dtype).to(dev)  # [n, H, D]
        view[blocks, layer, kv, :, slots, :] = vals


def partial_score(pool: torch.Tensor, block_ids: Sequence[int], n: int, heads: int, head_dim: int,
                  tokens_per_block: int) -> float:
    """One rank's share of the next-token score: the sum of its stored KV of ``n`` positions."""
    nblocks = (n + tokens_per_block - 1) // tokens_per_block
    idx = torch.as_tensor(list(block_ids[:nblocks]), dtype=torch.long, device=pool.device)
    blk = pool.index_select(0, idx).double()
    v = blk.view(nblocks, pool.shape[1], pool.shape[2], heads, tokens_per_block, head_dim)
    v = v.permute(0, 4, 1, 2, 3, 5).reshape(nblocks * tokens_per_block, -1)[:n]
    return float(v.sum())


def token_from(tokens: Sequence[int], score: float) -> int:
    """Next token from the all-reduced score (garbage KV -> a different token)."""
    h = int(prefix_hashes(tokens)[-1])
    if not np.isfinite(score):
        return (h + 1) % VOCAB
    return (h + int(round(score * 1000))) % VOCAB


def sample(pools: Sequence[torch.Tensor], block_ids: Sequence[int], tokens: Sequence[int],
           heads: int, head_dim: int, tokens_per_block: int) -> int:
    """Next token: a function of the request's whole stored KV (every rank's shard, summed in
    rank order, as an all-reduce would)."""
    acc = 0.0
    for pool in pools:
        acc += partial_score(pool, block_ids, len(tokens), heads, head_dim, tokens_per_block)
    return token_from(tokens, acc)


def reference_generate(prompt: Sequence[int], max_new_tokens: int, *, num_layers: int,
                       kv_factor: int, num_kv_heads: int, head_dim: int, tokens_per_block: int,
                       tp_size: int, dtype: torch.dtype) -> list:
    """Tokens a single, non-disaggregated instance generates for ``prompt``."""
    heads = num_kv_heads // tp_size
    nblocks = -(-(len(prompt) + max_new_tokens) // tokens_per_block)
    pools = [torch.full((nblocks, num_layers, kv_factor, heads * head_dim * tokens_per_block),
                        float("nan"), dtype=dtype) for _ in range(tp_size)]
    blocks = list(range(nblocks))
    tokens = list(prompt)
    start = 0
    out = []
    for _ in range(max_new_tokens):
        for layer in range(num_layers):
            for rank, pool in enumerate(pools):
                write_kv(pool, blocks, tokens, start, len(tokens), layer, heads, rank * heads,
                         head_dim, tokens_per_block)
        start = len(tokens)
        tok = sample(pools, blocks, tokens, heads, head_dim, tokens_per_block)
        out.append(tok)
        tokens.append(tok)
    return out


def expected_blocks(tokens: Sequence[int], block_ids: Sequence[int], num_tokens: int,
                    pool_like: torch.Tensor, *, heads: int, head_offset: int, head_dim: int,
                    tokens_per_block: int) -> torch.Tensor:
    """The KV an instance must hold in ``block_ids`` for the first ``num_tokens`` tokens."""
    scratch = torch.zeros_like(pool_like)
    for layer in range(pool_like.shape[1]):
        write_kv(scratch, block_ids, tokens, 0, num_tokens, layer, heads, head_offset, head_dim,
                 tokens_per_block)
    idx = torch.as_tensor(list(block_ids[:num_tokens // tokens_per_block]), dtype=torch.long,
                          device=pool_like.device)
    return scratch.index_select(0, idx)
