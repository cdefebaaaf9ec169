"""The compatibility dict that the handshake compares field by field (pure)."""
from __future__ import annotations

from typing import Any, Mapping


def layout_signature(shapes: Mapping[str, tuple[int, ...]], block_dim: int | None = None) -> str:
    """A short text naming the per-layer KV shape without the number of blocks."""
    sig = set()
    for shape in shapes.values():
        sig.add("x".join("N" if i == block_dim else str(n) for i, n in enumerate(shape)))
    return ";".join(sorted(sig))


def compat_dict(*, model: str, dtype: str, kv_layout: str, block_size: int, kv_heads: int,
                head_size: int, layers: int, tp_size: int, tp_rank: int,
                bytes_per_block: int) -> dict[str, Any]:
    return {
        "model": model,
        "dtype": dtype,
        "kv_layout": kv_layout,
        "block_size": int(block_size),
        "kv_heads": int(kv_heads),
        "head_size": int(head_size),
        "layers": int(layers),
        "tp_size": int(tp_size),
        "tp_rank": int(tp_rank),
        "bytes_per_block": int(bytes_per_block),
    }


def compat_from_vllm(vllm_config: Any, *, kv_layout: str, tp_rank: int,
                     bytes_per_block: int) -> dict[str, Any]:
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    return compat_dict(
        model=str(mc.model), dtype=str(vllm_config.cache_config.cache_dtype if
                                       vllm_config.cache_config.cache_dtype != "auto"
                                       else mc.dtype).replace("torch.", ""),
        kv_layout=kv_layout, block_size=vllm_config.cache_config.block_size,
        kv_heads=mc.get_num_kv_heads(pc), head_size=mc.get_head_size(),
        layers=mc.get_num_layers(pc), tp_size=pc.tensor_parallel_size, tp_rank=tp_rank,
        bytes_per_block=bytes_per_block)
