"""The NIXL configurations the benchmark compares with (pure)."""
from __future__ import annotations

import enum
from dataclasses import replace

from nixl_connectors.tools.bench.nixl_types import NixlReadConfig, UcxErrorHandling


class NixlProfile(str, enum.Enum):
    """The NIXL configurations compared by the benchmark.

    Found with nixl-cu12 1.5.1: ``UCX_TLS=sm,self`` alone (``SHM``) cannot even create the UCX
    backend, because NIXL's default ``ucx_error_handling_mode=peer`` needs a transport with a
    peer failure handler for active messages, which shared memory lacks ("no active messages
    transport ... no peer failure handler"); it works once error handling is ``none``.
    NIXL's progress thread (on by default) busy-polls, which on a 2-core machine competes with
    the reader and costs about 3x; ``TUNED`` turns it off too.
    """

    DEFAULT = "default"  # NIXL and UCX defaults
    NO_ERR_HANDLING = "no-err-handling"  # ucx_error_handling_mode=none
    NO_PROGRESS_THREAD = "no-progress-thread"  # nixl_agent_config(enable_prog_thread=False)
    SHM = "shm"  # UCX_TLS=sm,self (fails with NIXL's default error handling, see above)
    SHM_NO_ERR_HANDLING = "shm-no-err-handling"  # UCX_TLS=sm,self + ucx_error_handling_mode=none
    TUNED = "tuned"  # UCX_TLS=sm,self + ucx_error_handling_mode=none + no progress thread


DEFAULT_PROFILES: tuple[NixlProfile, ...] = (
    NixlProfile.DEFAULT,
    NixlProfile.NO_ERR_HANDLING,
    NixlProfile.NO_PROGRESS_THREAD,
    NixlProfile.SHM_NO_ERR_HANDLING,
    NixlProfile.TUNED,
)
# what `nixl-connectors bench` runs beside ours: throughput workloads, latency workloads
COMPARE_PROFILES: tuple[NixlProfile, ...] = (NixlProfile.DEFAULT, NixlProfile.SHM_NO_ERR_HANDLING, NixlProfile.TUNED)
LATENCY_PROFILES: tuple[NixlProfile, ...] = (NixlProfile.DEFAULT, NixlProfile.TUNED)

SHM_ENV: dict[str, str | None] = {"UCX_TLS": "sm,self"}
_SHM = (NixlProfile.SHM, NixlProfile.SHM_NO_ERR_HANDLING, NixlProfile.TUNED)
_NO_EH = (NixlProfile.NO_ERR_HANDLING, NixlProfile.SHM_NO_ERR_HANDLING, NixlProfile.TUNED)
_NO_PTHREAD = (NixlProfile.NO_PROGRESS_THREAD, NixlProfile.TUNED)


def profile_config(profile: NixlProfile, base: NixlReadConfig | None = None) -> NixlReadConfig:
    """The config of ``profile`` with the workload (and timeout, seed) of ``base``."""
    base = base or NixlReadConfig()
    return replace(
        base,
        env={**base.env, **SHM_ENV} if profile in _SHM else dict(base.env),
        ucx_error_handling=UcxErrorHandling.NONE if profile in _NO_EH else base.ucx_error_handling,
        progress_thread=False if profile in _NO_PTHREAD else base.progress_thread,
        label=profile.value,
    )
