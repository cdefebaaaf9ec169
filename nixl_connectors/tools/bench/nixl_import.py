"""Find NIXL's Python API without importing it (the import pulls in torch and UCX)."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from types import ModuleType

# Import names of NIXL's Python API, most specific first: the CUDA-12 and CUDA-13 wheels
# ship `nixl_cu12` / `nixl_cu13`; the `nixl` meta wheel re-exports one of them.
NIXL_MODULES: tuple[str, ...] = ("nixl_cu12", "nixl_cu13", "nixl._api")
NIXL_DISTRIBUTIONS: tuple[str, ...] = ("nixl-cu12", "nixl-cu13", "nixl")
INSTALL_HINT = "pip install 'nixl-connectors[nixl]'  (or: pip install nixl-cu12)"


@dataclass(frozen=True)
class NixlAvailability:
    available: bool
    module: str | None
    version: str | None
    reason: str | None


def _spec_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def find_nixl() -> NixlAvailability:
    """Say whether NIXL's Python API is installed, and which module/distribution provides it."""
    version = None
    for dist in NIXL_DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    for name in NIXL_MODULES:
        top = name.split(".")[0]
        if _spec_exists(top):
            return NixlAvailability(True, name, version, None)
    return NixlAvailability(False, None, version, f"NIXL's Python API is not installed: {INSTALL_HINT}")


def import_nixl() -> ModuleType:
    """Import and return the module that defines ``nixl_agent`` (raises ImportError if none)."""
    errors: list[str] = []
    for name in NIXL_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
            continue
        if hasattr(mod, "nixl_agent") and hasattr(mod, "nixl_agent_config"):
            return mod
        errors.append(f"{name}: no nixl_agent")
    raise ImportError("NIXL is not importable (" + "; ".join(errors) + ")")
