"""The compatibility dict both adapters put in the handshake (pure).

The transport compares it key by key before trusting a peer. It names what must be equal on
both sides for a hand-off to make sense (model, dtype, layer count, bytes per token of one
head); layout details that may legitimately differ and are mapped (TP size, block size) are
not in it, they travel in the adapters' own hand-off metadata.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

COMPAT_SCHEMA = 2


@dataclass(frozen=True)
class KvCompat:
    engine: str            # "vllm" / "trtllm": an adapter never talks to the other engine's
    model: str
    dtype: str
    num_layers: int
    kv_layout: str = ""    # engine-specific layout signature (shape without block count)
    extra: tuple[tuple[str, str | int | float | bool], ...] = ()

    def to_dict(self) -> dict[str, str | int | float | bool]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d["schema"] = COMPAT_SCHEMA
        for k, v in self.extra:
            if k in d:
                raise ValueError(f"compat extra key {k!r} collides with a base key")
            d[k] = v
        return d

    def with_extra(self, fields: Mapping[str, str | int | float | bool]) -> "KvCompat":
        return KvCompat(self.engine, self.model, self.dtype, self.num_layers, self.kv_layout,
                        tuple(sorted({**dict(self.extra), **dict(fields)}.items())))


def layout_signature(shapes: Mapping[str, tuple[int, ...]], block_dim: int | None = None) -> str:
    """A short text naming the per-layer KV shape without the number of blocks."""
    sig = set()
    for shape in shapes.values():
        sig.add("x".join("N" if i == block_dim else str(n) for i, n in enumerate(shape)))
    return ";".join(sorted(sig))
