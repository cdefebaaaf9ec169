"""The compatibility dict that the handshake compares field by field (pure).

Built with the adapter kit's `KvCompat`: what must be equal on both sides for the bytes of a
block to mean the same thing (engine, model, dtype, layer count, total KV heads, head size, the
inside of a block per segment, the KV-cache groups). TP size and block size are *not* in it:
they may differ and are mapped (`handoff.layout_transform`); they travel in kv_transfer_params.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..kit import KvCompat
from .layout import Segment


def segments_signature(device: str, segments: Sequence[Segment]) -> str:
    """`<device>:<kind>[<rows of each part>]/<bytes of one token of one head>` per segment of the first layer."""
    if not segments:
        return f"{device}:none"
    first = segments[0].layer
    parts = [f"{s.kind.value}{list(s.paged.rows) if s.paged else ''}/{s.paged.head_bytes if s.paged else s.block_bytes}"
             for s in segments if s.layer == first]
    return f"{device}:" + ",".join(parts)


def groups_signature(kv_cache_config: Any) -> str:
    """`<spec class>[<sliding window>]x<layers>` per KV-cache group, in group order."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
    out = []
    for g in groups:
        spec = g.kv_cache_spec
        window = getattr(spec, "sliding_window", None)
        out.append(f"{type(spec).__name__}{f'[{window}]' if window else ''}x{len(g.layer_names)}")
    return ";".join(out) or "single"


def compat_from_vllm(vllm_config: Any, *, device: str, segments: Sequence[Segment],
                     kv_cache_config: Any = None) -> dict[str, Any]:
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(cache_dtype if cache_dtype != "auto" else mc.dtype).replace("torch.", "")
    return KvCompat(
        engine="vllm", model=str(mc.model), dtype=dtype, num_layers=int(mc.get_num_layers(pc)),
        kv_layout=segments_signature(device, segments),
    ).with_extra({"kv_heads_total": int(mc.get_total_num_kv_heads()),
                  "head_size": int(mc.get_head_size()),
                  "kv_groups": groups_signature(kv_cache_config)}).to_dict()
