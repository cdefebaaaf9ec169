"""Benchmarks: the NIXL baseline and the local copy limit the transport is compared with."""

from nixl_connectors.tools.bench.copy_limit import local_copy_limit
from nixl_connectors.tools.bench.nixl_baseline import (
    DEFAULT_PROFILES,
    NixlBenchError,
    NixlProfile,
    measure_nixl_read,
    profile_config,
    run_nixl_read,
)
from nixl_connectors.tools.bench.nixl_import import NixlAvailability, find_nixl
from nixl_connectors.tools.bench.nixl_types import NixlReadConfig, NixlReadResult, UcxErrorHandling

__all__ = [
    "DEFAULT_PROFILES",
    "NixlAvailability",
    "NixlBenchError",
    "NixlProfile",
    "NixlReadConfig",
    "NixlReadResult",
    "UcxErrorHandling",
    "find_nixl",
    "local_copy_limit",
    "measure_nixl_read",
    "profile_config",
    "run_nixl_read",
]
