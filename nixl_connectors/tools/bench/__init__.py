"""Benchmarks: our transport next to NIXL and the copy limits of this machine."""

from nixl_connectors.tools.bench.limits import host_contiguous_copy, host_scattered_copy
from nixl_connectors.tools.bench.nixl_baseline import (
    COMPARE_PROFILES,
    DEFAULT_PROFILES,
    LATENCY_PROFILES,
    NixlBenchError,
    NixlProfile,
    compare_entry,
    measure_nixl_read,
    profile_config,
    run_nixl_read,
)
from nixl_connectors.tools.bench.nixl_import import NixlAvailability, find_nixl
from nixl_connectors.tools.bench.nixl_types import NixlReadConfig, NixlReadResult, UcxErrorHandling

__all__ = [
    "COMPARE_PROFILES",
    "DEFAULT_PROFILES",
    "LATENCY_PROFILES",
    "NixlAvailability",
    "NixlBenchError",
    "NixlProfile",
    "NixlReadConfig",
    "NixlReadResult",
    "UcxErrorHandling",
    "compare_entry",
    "find_nixl",
    "host_contiguous_copy",
    "host_scattered_copy",
    "measure_nixl_read",
    "profile_config",
    "run_nixl_read",
]
