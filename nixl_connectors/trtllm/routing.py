"""Which TensorRT-LLM requests take part in a hand-off, and under which routing id.

TensorRT-LLM's connector manager rejects ``generation_only`` disaggregated requests, so both
instances receive ordinary requests and the identity that ties the context instance's request
to the generation instance's must come from our side. The example proxy puts a fresh routing id
into the OpenAI request's ``cache_salt`` on both instances (``"nixl-rt:ctx:<id>"`` and
``"nixl-rt:gen:<id>"``); a unique salt also keeps the request's blocks out of prefix reuse,
which is what a hand-off wants.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from .config import ConnectorRole, RoutingSource

MAX_KEY_CHARS = 256


class Leg(str, Enum):
    """Which side of a hand-off a request is on this instance."""

    CONTEXT = "ctx"      # compute the prompt, then hold its blocks for the generation instance
    GENERATION = "gen"   # pull the prompt's blocks, then decode


@dataclass(frozen=True)
class Routing:
    leg: Leg
    key: str


def make_salt(prefix: str, leg: Leg, key: str) -> str:
    """The ``cache_salt`` a proxy sends for one leg of a hand-off (see `routing_of`)."""
    return f"{prefix}{leg.value}:{key}"


def routing_of(request: Any, role: ConnectorRole, source: RoutingSource,
               prefix: str) -> Routing | None:
    """The request's leg and routing id on this instance, or None when it does not take part.

    With ``RoutingSource.CACHE_SALT`` the salt reads ``<prefix><leg>:<routing id>``, e.g.
    ``nixl-rt:ctx:5f0c...`` on the context instance and ``nixl-rt:gen:5f0c...`` on the
    generation instance, so one instance can play either leg (role ``both``). A leg the
    instance's role does not play is ignored (the request runs as an ordinary one).
    With ``RoutingSource.CACHE_SALT_ID`` the leg is the instance's role (which must not be
    ``both``) and the id is the salt's hash.
    """
    if source is RoutingSource.CACHE_SALT:
        salt = getattr(request, "cache_salt", None)
        if not isinstance(salt, str) or not salt.startswith(prefix):
            return None
        leg_s, sep, key = salt[len(prefix):].partition(":")
        if not sep or not key or len(key) > MAX_KEY_CHARS:
            return None
        try:
            leg = Leg(leg_s)
        except ValueError:
            return None
    else:
        salt_id = getattr(request, "cache_salt_id", None)
        if salt_id is None or int(salt_id) == 0 or role is ConnectorRole.BOTH:
            return None
        leg = Leg.CONTEXT if role is ConnectorRole.CONTEXT else Leg.GENERATION
        key = f"salt-id:{int(salt_id)}"
    if leg is Leg.CONTEXT and role is ConnectorRole.GENERATION:
        return None
    if leg is Leg.GENERATION and role is ConnectorRole.CONTEXT:
        return None
    return Routing(leg, key)


def prompt_length(request: Any) -> int:
    """Prompt length of a TensorRT-LLM request (python wrapper or C++ binding)."""
    for name in ("py_prompt_len", "prompt_len", "orig_prompt_len"):
        value = getattr(request, name, None)
        if value is not None:
            return int(value)
    return len(request.get_tokens(0))


def request_id(request: Any) -> int:
    value = getattr(request, "request_id", None)
    return int(value if value is not None else request.py_request_id)


def num_tokens(request: Any) -> int:
    """Tokens (prompt + generated) of beam 0."""
    return len(request.get_tokens(0))
