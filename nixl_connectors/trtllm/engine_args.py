"""What the connector reads from TensorRT-LLM's ``llm_args``, and the start-up checks.

Every read is tolerant (``getattr`` with a default): ``llm_args`` is TensorRT-LLM's
``TorchLlmArgs``, whose fields move between releases. The checks run when the connector
objects are built, i.e. at engine start-up, so an unsupported deployment fails there with
one clear message instead of misbehaving on the first request.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_TOKENS_PER_BLOCK = 32
NO_EVICT_POLICY = "GUARANTEED_NO_EVICT"
# config.json markers of models with SSM / linear-attention (Mamba-style) layers
_MAMBA_KEYS = ("ssm_cfg", "mamba_d_state", "mamba_expand", "hybrid_override_pattern", "ssm_state_size")


class UnsupportedDeployment(ValueError):
    """The engine configuration is outside what this connector supports."""


@dataclass(frozen=True)
class EngineShape:
    """The parts of the engine configuration the connector depends on."""

    tp_size: int
    configured_tokens_per_block: int
    model: str


def _policy_name(value: Any) -> str | None:
    if value is None:
        return None
    name = getattr(value, "name", None) or getattr(value, "value", None) or str(value)
    return str(name).rsplit(".", 1)[-1].upper()


def _int(obj: Any, name: str, default: int) -> int:
    value = getattr(obj, name, None)
    return default if value is None else int(value)


def _mamba_marker(model: Any) -> str | None:
    """The config.json key that marks a Mamba / hybrid model, when the checkpoint is local."""
    try:
        path = Path(str(model)) / "config.json"
        if not path.is_file():
            return None
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(cfg, dict):
        return None
    for key in _MAMBA_KEYS:
        if key in cfg:
            return key
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and any(
            isinstance(t, str) and ("mamba" in t or "linear" in t) for t in layer_types):
        return "layer_types"
    return None


def check_deployment(llm_args: Any) -> list[str]:
    """Problems that rule this connector out for ``llm_args`` (empty list: none)."""
    problems = []
    kv = getattr(llm_args, "kv_cache_config", None)
    reuse = getattr(kv, "enable_block_reuse", None)
    if reuse is False:
        problems.append(
            "kv_cache_config.enable_block_reuse is false: TensorRT-LLM's C++ "
            "KVCacheManager::addSequence asks a KV connector only on the block-reuse path, so with "
            "reuse off every hand-off would silently be skipped. Set enable_block_reuse: true (for "
            "MLA models TensorRT-LLM itself turns reuse off on some GPUs and KV quantisations)")
    pp = _int(llm_args, "pipeline_parallel_size", 1)
    cp = _int(llm_args, "context_parallel_size", 1)
    if pp != 1 or cp != 1:
        problems.append(f"pipeline or context parallelism is not supported (pipeline_parallel_size="
                        f"{pp}, context_parallel_size={cp})")
    beam = _int(llm_args, "max_beam_width", 1)
    if beam != 1:
        problems.append(f"beam search is not supported (max_beam_width={beam})")
    if getattr(llm_args, "enable_attention_dp", False):
        problems.append("attention data parallelism (enable_attention_dp) is not supported")
    if getattr(kv, "host_cache_size", None):
        problems.append(f"host KV offload is not supported (kv_cache_config.host_cache_size="
                        f"{kv.host_cache_size}): the connector sees only the primary (GPU) pool")
    windows = getattr(kv, "max_attention_window", None)
    if windows is not None and len(set(windows)) > 1:
        problems.append(f"variable sliding-window attention is not supported "
                        f"(max_attention_window={list(windows)})")
    if getattr(llm_args, "speculative_config", None) is not None:
        problems.append("speculative decoding is not supported (speculative_config is set)")
    sched = getattr(llm_args, "scheduler_config", None)
    policy = _policy_name(getattr(sched, "capacity_scheduler_policy", None))
    if policy is not None and policy != NO_EVICT_POLICY:
        problems.append(f"capacity_scheduler_policy must be {NO_EVICT_POLICY}, got {policy}")
    marker = _mamba_marker(getattr(llm_args, "model", ""))
    if marker is not None:
        problems.append(f"Mamba / hybrid linear-attention models are not supported (config.json "
                        f"has {marker!r})")
    return problems


def engine_shape(llm_args: Any) -> EngineShape:
    """Read the engine shape from ``llm_args``; raise `UnsupportedDeployment` naming every
    problem `check_deployment` finds."""
    problems = check_deployment(llm_args)
    if problems:
        raise UnsupportedDeployment("the UCX KV connector cannot run in this TensorRT-LLM "
                                    "configuration:\n  - " + "\n  - ".join(problems))
    if getattr(getattr(llm_args, "kv_cache_config", None), "enable_block_reuse", None) is None:
        logger.info("kv_cache_config.enable_block_reuse not given: TensorRT-LLM's default (on) applies")
    return EngineShape(tp_size=_int(llm_args, "tensor_parallel_size", 1),
                       configured_tokens_per_block=configured_tokens_per_block(llm_args),
                       model=str(getattr(llm_args, "model", "") or ""))


def configured_tokens_per_block(llm_args: Any) -> int:
    """``kv_cache_config.tokens_per_block`` as it reads *now* (the executor creator writes
    its override back there on current TensorRT-LLM; read it late, not at construction)."""
    kv = getattr(llm_args, "kv_cache_config", None)
    return _int(kv, "tokens_per_block", DEFAULT_TOKENS_PER_BLOCK)
