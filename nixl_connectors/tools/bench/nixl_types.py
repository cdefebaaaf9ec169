"""Configuration, results and wire vocabulary of the NIXL baseline benchmark."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from nixl_connectors.tools.blockfill import check_block_bytes


class Role(str, enum.Enum):
    OWNER = "owner"
    READER = "reader"


class MsgType(str, enum.Enum):
    """Messages between the benchmark parent and its two child processes."""

    CONFIG = "config"  # parent -> child: NixlReadConfig
    READY = "ready"  # owner -> parent: metadata + pool address
    PEER = "peer"  # parent -> reader: the owner's READY payload
    RESULT = "result"  # reader -> parent: timings and verification
    STOP = "stop"  # parent -> owner: the reader is finished
    DONE = "done"  # owner -> parent: notifications received
    ERROR = "error"  # child -> parent: what failed


class UcxErrorHandling(str, enum.Enum):
    """Values of the NIXL UCX backend parameter ``ucx_error_handling_mode``."""

    PEER = "peer"  # NIXL 1.5 default: UCP_ERR_HANDLING_MODE_PEER on every endpoint
    NONE = "none"


class XferState(str, enum.Enum):
    """States returned by ``nixl_agent.transfer`` / ``check_xfer_state``."""

    DONE = "DONE"
    PROC = "PROC"
    ERR = "ERR"


UCX_ERROR_HANDLING_PARAM = "ucx_error_handling_mode"


@dataclass(frozen=True)
class NixlReadConfig:
    """One benchmark run: the reader READs ``num_blocks`` random blocks of the owner's pool.

    ``env`` is applied to the two child processes only (a value of None unsets a
    variable there); the parent's environment is never changed.
    ``ucx_error_handling`` None keeps NIXL's default backend parameters.
    """

    block_bytes: int = 16 * 1024
    num_blocks: int = 16_384
    pool_blocks: int = 32_768
    reps: int = 5
    warmup: int = 0  # transfers run first and discarded
    same_blocks: bool = False  # True: the same block ids every rep (latency policy), else new random ones
    env: dict[str, str | None] = field(default_factory=dict)
    ucx_error_handling: UcxErrorHandling | None = None
    scattered: bool = True  # False: blocks 0..num_blocks-1 on both sides (NIXL merges them)
    progress_thread: bool = True  # nixl_agent_config(enable_prog_thread=...); NIXL's default is on
    seed: int = 1234
    timeout_s: float = 180.0
    label: str = "nixl"

    def validate(self) -> None:
        check_block_bytes(self.block_bytes)
        if self.num_blocks <= 0 or self.reps <= 0 or self.warmup < 0:
            raise ValueError("num_blocks and reps must be positive, warmup >= 0")
        if self.pool_blocks < self.num_blocks:
            raise ValueError(f"pool_blocks ({self.pool_blocks}) < num_blocks ({self.num_blocks})")
        if self.pool_blocks >= 2**31:
            raise ValueError("pool_blocks must fit NIXL's int32 descriptor indices")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    @property
    def transfers(self) -> int:
        """Transfers the reader posts (and notifications the owner should see)."""
        return self.warmup + self.reps

    def backend_params(self) -> dict[str, str]:
        if self.ucx_error_handling is None:
            return {}
        return {UCX_ERROR_HANDLING_PARAM: self.ucx_error_handling.value}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ucx_error_handling"] = None if self.ucx_error_handling is None else self.ucx_error_handling.value
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "NixlReadConfig":
        eh = d.get("ucx_error_handling")
        cfg = cls(
            block_bytes=int(d["block_bytes"]),
            num_blocks=int(d["num_blocks"]),
            pool_blocks=int(d["pool_blocks"]),
            reps=int(d["reps"]),
            warmup=int(d.get("warmup", 0)),
            same_blocks=bool(d.get("same_blocks", False)),
            env={str(k): (None if v is None else str(v)) for k, v in dict(d.get("env", {})).items()},
            ucx_error_handling=None if eh is None else UcxErrorHandling(eh),
            scattered=bool(d.get("scattered", True)),
            progress_thread=bool(d.get("progress_thread", True)),
            seed=int(d["seed"]),
            timeout_s=float(d["timeout_s"]),
            label=str(d.get("label", "nixl")),
        )
        cfg.validate()
        return cfg


@dataclass
class NixlReadResult:
    """What one run measured (warm-up transfers excluded). Per rep: ``post_to_done_s`` is one
    transfer request end to end (``make_prepped_xfer`` + ``transfer`` until ``check_xfer_state``
    says DONE: what the bench compares), ``transfer_s`` the part after ``make_prepped_xfer``.
    ``gbps`` is the best rep of ``post_to_done_s`` (1e9 bytes/s); None when the run could not
    happen or failed, and ``reason`` says why."""

    label: str
    config: dict[str, Any]
    gbps: float | None = None
    reason: str | None = None
    gbps_per_rep: list[float] = field(default_factory=list)
    transfer_s_per_rep: list[float] = field(default_factory=list)
    post_to_done_s_per_rep: list[float] = field(default_factory=list)
    prep_s_per_rep: list[float] = field(default_factory=list)
    bytes_per_rep: int = 0
    verified: bool = False
    mismatched_blocks: int = 0
    notifications_received: int = 0
    nixl_module: str | None = None
    nixl_version: str | None = None
    backend_params: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.gbps is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
