"""Which TensorRT-LLM requests take part in a hand-off, and under which routing key.

TensorRT-LLM's connector manager rejects ``generation_only`` disaggregated requests, so both
instances receive ordinary requests and the identity that ties the context instance's request
to the generation instance's comes from the request's ``cache_salt``: the example proxy gives
both legs of one client request the same fresh salt. The OpenAI layer turns the salt into
``cache_salt_id`` (an unsigned 64-bit hash of it); that integer is what the C++ ``LlmRequest``
handed to ``get_num_new_matched_tokens`` carries, so it is the routing key. A unique salt also
keeps the request's blocks out of prefix reuse across requests, which a hand-off wants.

Only attributes bound on the C++ ``LlmRequest`` (``nanobind/batch_manager/bindings.cpp``) are
read here: ``request_id``, ``prompt_len``, ``get_tokens``, ``cache_salt_id``.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .config import ConnectorRole

MAX_SALT_ID = (1 << 64) - 1


class Leg(str, Enum):
    """Which side of a hand-off a request is on this instance."""

    CONTEXT = "ctx"      # compute the prompt, then hold its blocks for the generation instance
    GENERATION = "gen"   # pull the prompt's blocks, then decode


@dataclass(frozen=True)
class Routing:
    leg: Leg
    key: str


def salt_key(salt_id: int) -> str:
    """The routing key of a ``cache_salt_id`` (a string: it names leases and notifications)."""
    return f"salt-id:{salt_id:016x}"


def routing_of(request: Any, role: ConnectorRole) -> Routing | None:
    """The request's leg and routing key on this instance, or None when it does not take part
    (no salt). The leg is the instance's role: every salted request takes part."""
    salt_id = getattr(request, "cache_salt_id", None)
    if salt_id is None or isinstance(salt_id, bool):
        return None
    try:
        value = int(salt_id)
    except (TypeError, ValueError):
        return None
    if not 0 <= value <= MAX_SALT_ID:
        return None
    leg = Leg.CONTEXT if role is ConnectorRole.CONTEXT else Leg.GENERATION
    return Routing(leg, salt_key(value))


def request_id(request: Any) -> int:
    """The id TensorRT-LLM keys connector calls by (bound as ``request_id`` on the C++ request)."""
    return int(request.request_id)


def prompt_length(request: Any) -> int:
    """Prompt length, from the C++ binding (``prompt_len``), else the tokens."""
    value = getattr(request, "prompt_len", None)
    if value is not None:
        return int(value)
    return len(request.get_tokens(0))


def num_tokens(request: Any) -> int:
    """Tokens (prompt + generated) of beam 0."""
    return len(request.get_tokens(0))
