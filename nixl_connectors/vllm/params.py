"""`kv_transfer_params` contract, compatible with vLLM's NixlConnector keys.

Prefill receives `{"do_remote_decode": true}`; its `request_finished` returns the params a
router forwards to decode (`do_remote_prefill`, `remote_engine_id`, `remote_request_id`,
`remote_block_ids`, `remote_host`, `remote_port`, `tp_size`, ...) plus our own
`remote_agents` (one "host:port" per prefill TP rank) and `remote_lease_ids` (one per rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping


class Key(str, Enum):
    DO_REMOTE_DECODE = "do_remote_decode"
    DO_REMOTE_PREFILL = "do_remote_prefill"
    REMOTE_ENGINE_ID = "remote_engine_id"
    REMOTE_REQUEST_ID = "remote_request_id"
    REMOTE_BLOCK_IDS = "remote_block_ids"
    REMOTE_HOST = "remote_host"
    REMOTE_PORT = "remote_port"
    REMOTE_NUM_TOKENS = "remote_num_tokens"
    TP_SIZE = "tp_size"
    REMOTE_AGENTS = "remote_agents"
    REMOTE_LEASE_IDS = "remote_lease_ids"
    REMOTE_BLOCK_SIZE = "remote_block_size"
    TRANSFER_MODE = "transfer_mode"


class ParamsError(ValueError):
    """kv_transfer_params are missing a key or carry a wrong type."""


@dataclass(frozen=True)
class RemotePrefill:
    """What a decode instance needs to pull a prefilled request."""

    engine_id: str
    request_id: str
    block_ids: tuple[int, ...]
    agents: tuple[str, ...]
    lease_ids: tuple[str, ...]
    num_tokens: int
    tp_size: int

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> "RemotePrefill":
        try:
            block_ids = params[Key.REMOTE_BLOCK_IDS.value]
            if block_ids and isinstance(block_ids[0], (list, tuple)):  # per-group (HMA) form
                block_ids = block_ids[0]
            agents = params.get(Key.REMOTE_AGENTS.value) or [
                f"{params[Key.REMOTE_HOST.value]}:{int(params[Key.REMOTE_PORT.value])}"]
            leases = params[Key.REMOTE_LEASE_IDS.value]
            out = cls(str(params[Key.REMOTE_ENGINE_ID.value]),
                      str(params[Key.REMOTE_REQUEST_ID.value]),
                      tuple(int(b) for b in block_ids),
                      tuple(str(a) for a in agents), tuple(str(x) for x in leases),
                      int(params.get(Key.REMOTE_NUM_TOKENS.value) or 0),
                      int(params.get(Key.TP_SIZE.value) or len(agents)))
        except KeyError as e:
            raise ParamsError(f"kv_transfer_params lack {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ParamsError(f"bad kv_transfer_params: {e}") from None
        if len(out.lease_ids) != len(out.agents):
            raise ParamsError(f"{len(out.agents)} remote agents but {len(out.lease_ids)} leases")
        return out


def wants_remote_prefill(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and bool(params.get(Key.DO_REMOTE_PREFILL.value))


def wants_remote_decode(params: Mapping[str, Any] | None) -> bool:
    return bool(params) and bool(params.get(Key.DO_REMOTE_DECODE.value))
