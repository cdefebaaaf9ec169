"""What the connector reads from TensorRT-LLM's ``llm_args``, and the deployment limits it checks.

Every read is tolerant (``getattr`` with a default): ``llm_args`` is TensorRT-LLM's
``TorchLlmArgs``, whose fields move between releases.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_BLOCK = 32
NO_EVICT_POLICY = "GUARANTEED_NO_EVICT"


class UnsupportedDeployment(ValueError):
    """The engine configuration is outside what this connector supports."""


@dataclass(frozen=True)
class EngineShape:
    """The parts of the engine configuration the connector depends on."""

    tp_size: int
    pp_size: int
    tokens_per_block: int
    beam_width: int
    model: str


def _policy_name(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "name", None) or getattr(value, "value", None) or str(value)
    return str(name).rsplit(".", 1)[-1].upper()


def engine_shape(llm_args: Any, tokens_per_block_override: int | None = None) -> EngineShape:
    """Read the engine shape from ``llm_args`` and reject what the connector cannot serve.

    Limits: pipeline parallelism 1, beam width 1, one attention window, and the
    ``GUARANTEED_NO_EVICT`` capacity scheduler policy (TensorRT-LLM itself requires the
    last two of any KV connector).
    """
    tp = int(getattr(llm_args, "tensor_parallel_size", 1) or 1)
    pp = int(getattr(llm_args, "pipeline_parallel_size", 1) or 1)
    beam = int(getattr(llm_args, "max_beam_width", 1) or 1)
    kv_cfg = getattr(llm_args, "kv_cache_config", None)
    tpb = tokens_per_block_override or getattr(kv_cfg, "tokens_per_block", None) \
        or DEFAULT_TOKENS_PER_BLOCK
    if pp != 1:
        raise UnsupportedDeployment(f"pipeline parallelism is not supported (pipeline_parallel_size={pp})")
    if beam != 1:
        raise UnsupportedDeployment(f"beam search is not supported (max_beam_width={beam})")
    windows = getattr(kv_cfg, "max_attention_window", None)
    if windows is not None and len(set(windows)) > 1:
        raise UnsupportedDeployment(
            f"one attention window is supported, got max_attention_window={list(windows)}")
    sched = getattr(llm_args, "scheduler_config", None)
    policy = _policy_name(getattr(sched, "capacity_scheduler_policy", None))
    if policy is not None and policy != NO_EVICT_POLICY:
        raise UnsupportedDeployment(
            f"capacity_scheduler_policy must be {NO_EVICT_POLICY}, got {policy}")
    return EngineShape(tp_size=tp, pp_size=pp, tokens_per_block=int(tpb), beam_width=beam,
                       model=str(getattr(llm_args, "model", "") or ""))
