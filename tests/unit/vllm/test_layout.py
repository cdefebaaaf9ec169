"""Pure layout math: vLLM KV tensors + block ids -> byte ranges (no transport, no vLLM)."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from nixl_connectors.vllm import layout
from nixl_connectors.vllm.layout import LayoutError


def gather_bytes(kv, segments, block_ids):
    """Bytes of `block_ids` in stream order, read through the planned ranges."""
    out = []
    for name in sorted(kv):
        t = kv[name]
        storage = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy()
        for key, offs, lens in layout.stream_ranges(
                [s for s in segments if s.layer == name], block_ids):
            for o, n in zip(offs, lens):
                out.append(storage[o:o + n])
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


def expected_bytes(kv, block_ids, block_dim):
    out = []
    for name in sorted(kv):
        t = kv[name]
        outer = t.shape[:block_dim]
        for idx in np.ndindex(*outer):
            sub = t[idx] if idx else t
            for b in block_ids:
                out.append(sub[b].contiguous().view(torch.uint8).reshape(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.uint8)


@pytest.mark.parametrize("shape,block_dim", [
    ((2, 10, 32, 2, 64), 1),       # [2, num_blocks, block_size, heads, head]
    ((10, 2, 32, 128), 0),         # 0.33 packed [num_blocks, heads, block_size, 2*head]
    ((10, 2, 2, 32, 64), 0),       # [num_blocks, 2, heads, block_size, head]
])
def test_segments_cover_exact_block_bytes(shape, block_dim):
    g = torch.Generator().manual_seed(0)
    kv = {f"l{i}": torch.randint(0, 1000, shape, generator=g).to(torch.bfloat16) for i in range(3)}
    segs = layout.segments_for(kv, num_blocks=10)
    ids = [7, 0, 3, 3, 9]
    np.testing.assert_array_equal(gather_bytes(kv, segs, ids), expected_bytes(kv, ids, block_dim))
    per = int(np.prod(shape)) // 10 * 2
    assert layout.bytes_per_block(segs) == 3 * per


def test_block_outermost_shared_storage():
    """Layers as strided views of one allocation (block-outermost): one storage, stride > block."""
    nb, page, layers = 6, 256, 4
    raw = torch.arange(nb * layers * page, dtype=torch.int16) % 97
    kv = {f"l{i}": raw.view(nb, layers, page)[:, i] for i in range(layers)}
    segs = layout.segments_for(kv, num_blocks=nb)
    assert len(layout.distinct_storages(kv)) == 1
    assert all(s.stride == layers * page * 2 and s.block_bytes == page * 2 for s in segs)
    ids = [5, 1]
    want = np.concatenate([kv[n][b].numpy().view(np.uint8) for n in sorted(kv) for b in ids])
    np.testing.assert_array_equal(gather_bytes(kv, segs, ids), want)


def test_non_contiguous_inner_dims_rejected():
    t = torch.zeros(10, 32, 4).transpose(1, 2)
    with pytest.raises(LayoutError, match="not contiguous"):
        layout.segments_for({"l": t}, num_blocks=10)


def test_block_dim_must_exist_and_be_unambiguous():
    with pytest.raises(LayoutError):
        layout.find_block_dim((4, 8, 16), num_blocks=10)
    assert layout.find_block_dim((3, 10, 10), num_blocks=10) == 1  # dim 1 preferred
    with pytest.raises(LayoutError):
        layout.find_block_dim((3, 4, 10, 10), num_blocks=10)
    assert layout.find_block_dim((3, 4, 10, 10), num_blocks=10, hint=3) == 3


def test_negative_block_ids_rejected():
    segs = [layout.Segment("l", 1, 0, 64, 64)]
    with pytest.raises(LayoutError):
        layout.stream_ranges(segs, [1, -1])


@settings(max_examples=60, deadline=None)
@given(nb=st.integers(1, 12), inner=st.lists(st.integers(1, 5), min_size=1, max_size=3),
       outer=st.integers(1, 3), data=st.data())
def test_plan_matches_torch_indexing(nb, inner, outer, data):
    shape = (outer, nb, *inner)
    t = torch.arange(int(np.prod(shape)), dtype=torch.int32).reshape(shape)
    ids = data.draw(st.lists(st.integers(0, nb - 1), max_size=8))
    segs = layout.segments_for({"x": t}, num_blocks=nb, block_dim_hint=1)
    np.testing.assert_array_equal(gather_bytes({"x": t}, segs, ids),
                                  expected_bytes({"x": t}, ids, 1))


def test_block_kind_of_vllm_cpu_and_split_kv_layouts():
    # vLLM CPU: one [B, H, N, 2*D] tensor per layer -> heads outermost in a block
    t = torch.zeros(6, 2, 32, 128, dtype=torch.bfloat16)
    (seg,) = layout.segments_for({"l0": t}, num_blocks=6, local_heads=2, block_size=32)
    assert seg.kind is layout.BlockKind.HEADS_OUTER
    assert (seg.paged.heads, seg.paged.block_size, seg.paged.head_bytes) == (2, 32, 256)
    # [2, B, N, H, D]: K and V segments, tokens outermost (heads cannot be split)
    t = torch.zeros(2, 6, 32, 2, 64, dtype=torch.bfloat16)
    segs = layout.segments_for({"l0": t}, num_blocks=6, local_heads=2, block_size=32)
    assert [s.kind for s in segs] == [layout.BlockKind.TOKENS_OUTER] * 2
    assert segs[0].paged.head_bytes == 2 * 64 * 2
    # group order first, then layer name
    segs = layout.segments_for({"a": torch.zeros(6, 64), "b": torch.zeros(6, 64)}, num_blocks=6,
                               group_of={"a": 1, "b": 0})
    assert [(s.layer, s.group) for s in segs] == [("b", 0), ("a", 1)]
