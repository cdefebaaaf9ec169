"""Bench switches read from the environment: one enum value per variable."""
from __future__ import annotations

import enum
import os
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


def choice_from_env(env: str, choices: type[E], default: E) -> E:
    """The member of `choices` whose value `env` names (case and surrounding blanks ignored;
    unset or empty: `default`); ValueError names the variable, what it held and the choices."""
    raw = os.environ.get(env, "").strip().lower()
    if not raw:
        return default
    try:
        return choices(raw)
    except ValueError:
        raise ValueError(f"{env}={raw!r}: expected one of {', '.join(str(c.value) for c in choices)}") from None
