"""Pool tensor -> descriptor layout (pure), checked against the tensor's real bytes."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st


from nixl_connectors.trtllm.layout import (PoolLayoutError, full_blocks, pool_layout,  # noqa: E402
                                           transferable_tokens, validate_block_ids)


def layout_of(t: torch.Tensor):
    return pool_layout(t.shape, t.stride(), t.element_size(), t.storage_offset())


def storage_bytes(t: torch.Tensor) -> np.ndarray:
    st_ = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(st_).numpy()


@settings(max_examples=60, deadline=None)
@given(nb=st.integers(1, 12), nl=st.integers(1, 4), kvf=st.integers(1, 2), per=st.integers(1, 40),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.int8]),
       pad=st.integers(0, 3), lead=st.integers(0, 2), data=st.data())
def test_block_ranges_are_exactly_pool_blocks(nb, nl, kvf, per, dtype, pad, lead, data):
    # A pool that is either contiguous or a view over a larger buffer (padding between blocks,
    # blocks not starting at the storage's first byte).
    block = nl * kvf * per
    base = torch.arange((lead + nb) * (block + pad), dtype=torch.int64).to(dtype)
    pool = base.view(lead + nb, block + pad)[lead:, :block].view(nb, nl, kvf, per)
    lay = layout_of(pool)
    assert lay.whole_storage == (not pool.is_contiguous() or pool.storage_offset() != 0)
    ids = data.draw(st.lists(st.integers(0, nb - 1), min_size=0, max_size=2 * nb))
    offsets, lengths = lay.block_range(ids)
    raw = storage_bytes(pool) if lay.whole_storage else pool.contiguous().view(-1).view(torch.uint8).numpy()
    for b, off, ln in zip(ids, offsets, lengths):
        expect = pool[b].contiguous().view(-1).view(torch.uint8).numpy()
        assert np.array_equal(raw[off:off + ln], expect)


def test_contiguous_pool_geometry():
    pool = torch.zeros(10, 3, 2, 64, dtype=torch.float16)
    lay = layout_of(pool)
    assert (lay.num_blocks, lay.num_layers, lay.kv_factor) == (10, 3, 2)
    assert lay.block_bytes == lay.stride == 3 * 2 * 64 * 2
    assert lay.base_offset == 0 and not lay.whole_storage
    assert lay.layer_bytes == 2 * 64 * 2


@pytest.mark.parametrize("make", [
    lambda: torch.zeros(4, 3, 2, 8).transpose(1, 2),          # layers not outermost within a block
    lambda: torch.zeros(4, 3, 2, 16)[..., ::2],               # strided last dimension
    lambda: torch.zeros(4, 2, 8),                             # wrong rank
])
def test_unsupported_pools_are_rejected(make):
    t = make()
    with pytest.raises(PoolLayoutError):
        layout_of(t)


def test_block_ids_are_checked():
    lay = layout_of(torch.zeros(4, 1, 1, 8))
    with pytest.raises(PoolLayoutError):
        lay.block_range([0, 4])
    with pytest.raises(PoolLayoutError):
        lay.block_range([-1])
    with pytest.raises(PoolLayoutError):
        validate_block_ids(np.array([0.5]), 4)
    assert lay.block_range([]).__len__() == 2


@given(prompt=st.integers(0, 10_000), tpb=st.integers(1, 256))
def test_transferable_tokens_leaves_a_token_to_compute(prompt, tpb):
    n = transferable_tokens(prompt, tpb)
    assert n % tpb == 0
    assert 0 <= n <= max(0, prompt - 1)
    assert prompt - 1 - n < tpb or prompt == 0
    assert full_blocks(n, tpb) * tpb == n
