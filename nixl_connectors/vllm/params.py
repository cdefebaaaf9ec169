"""`kv_transfer_params` contract, compatible with vLLM's NixlConnector keys.

Prefill receives `{"do_remote_decode": true}`; its `request_finished` returns the params a
router forwards to decode: NixlConnector's `do_remote_prefill`, `remote_engine_id`,
`remote_request_id`, `remote_block_ids` (a flat list, or one list per KV-cache group for
hybrid models), `remote_host`, `remote_port`, `remote_num_tokens`, `tp_size`, plus ours:
`remote_agents` (one "host:port" per prefill TP rank), `remote_lease_ids` (one per rank),
`remote_block_size` and `transfer_mode`. Parsing is strict: a malformed field is a
`ParamsError` naming it, which fails that one request (never the engine).
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


TRANSFER_MODE = "ucx_pull"
MAX_TP = 1024


class ParamsError(ValueError):
    """kv_transfer_params are missing a key or carry a wrong type or value."""


def _int(params: Mapping[str, Any], key: Key, *, lo: int, hi: int | None = None,
         default: int | None = None) -> int:
    v = params.get(key.value, default)
    if v is None:
        raise ParamsError(f"kv_transfer_params lack {key.value!r}")
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamsError(f"kv_transfer_params {key.value!r} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise ParamsError(f"kv_transfer_params {key.value!r} = {v} out of range")
    return v


def _str(params: Mapping[str, Any], key: Key) -> str:
    v = params.get(key.value)
    if not isinstance(v, str) or not v:
        raise ParamsError(f"kv_transfer_params {key.value!r} must be a non-empty string, got {v!r}")
    return v


def _str_list(v: Any, name: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) and x for x in v):
        raise ParamsError(f"kv_transfer_params {name!r} must be a non-empty list of strings, got {v!r}")
    return tuple(v)


def _block_list(v: Any, name: str) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in v):
        raise ParamsError(f"kv_transfer_params {name!r} must hold lists of block ids >= 0")
    return tuple(v)


def _groups(v: Any) -> tuple[tuple[int, ...], ...]:
    """Flat list (one group) or one list per KV-cache group."""
    if not isinstance(v, (list, tuple)):
        raise ParamsError(f"kv_transfer_params 'remote_block_ids' must be a list, got {v!r}")
    if v and all(isinstance(g, (list, tuple)) for g in v):
        return tuple(_block_list(g, "remote_block_ids") for g in v)
    return (_block_list(v, "remote_block_ids"),)


@dataclass(frozen=True)
class RemotePrefill:
    """What a decode instance needs to pull a prefilled request."""

    engine_id: str
    request_id: str
    group_block_ids: tuple[tuple[int, ...], ...]   # one tuple per KV-cache group
    agents: tuple[str, ...]                        # one per prefill TP rank
    lease_ids: tuple[str, ...]                     # one per prefill TP rank
    num_tokens: int
    tp_size: int
    block_size: int | None                         # None: not sent (assume ours)

    @property
    def block_ids(self) -> tuple[int, ...]:
        return self.group_block_ids[0]

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> "RemotePrefill":
        if not isinstance(params, Mapping):
            raise ParamsError(f"kv_transfer_params must be a mapping, got {type(params).__name__}")
        if Key.REMOTE_BLOCK_IDS.value not in params:
            raise ParamsError("kv_transfer_params lack 'remote_block_ids'")
        groups = _groups(params[Key.REMOTE_BLOCK_IDS.value])
        if params.get(Key.REMOTE_AGENTS.value) is not None:
            agents = _str_list(params[Key.REMOTE_AGENTS.value], Key.REMOTE_AGENTS.value)
        else:
            host = _str(params, Key.REMOTE_HOST)
            agents = (f"{host}:{_int(params, Key.REMOTE_PORT, lo=1, hi=65535)}",)
        for a in agents:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ParamsError(f"kv_transfer_params 'remote_agents' entry {a!r} is not host:port")
        if Key.REMOTE_LEASE_IDS.value not in params:
            raise ParamsError("kv_transfer_params lack 'remote_lease_ids' (the prefill instance "
                              "finished before its lease ids were known)")
        leases = _str_list(params[Key.REMOTE_LEASE_IDS.value], Key.REMOTE_LEASE_IDS.value)
        tp = _int(params, Key.TP_SIZE, lo=1, hi=MAX_TP, default=len(agents))
        if not len(agents) == len(leases) == tp:
            raise ParamsError(f"tp_size {tp}, {len(agents)} remote agents and {len(leases)} lease ids "
                              "must agree")
        bs = params.get(Key.REMOTE_BLOCK_SIZE.value)
        block_size = None if bs is None else _int(params, Key.REMOTE_BLOCK_SIZE, lo=1, hi=1 << 20)
        return cls(_str(params, Key.REMOTE_ENGINE_ID), _str(params, Key.REMOTE_REQUEST_ID), groups,
                   agents, leases, _int(params, Key.REMOTE_NUM_TOKENS, lo=0, default=0), tp, block_size)


def wants_remote_prefill(params: Mapping[str, Any] | None) -> bool:
    return isinstance(params, Mapping) and bool(params.get(Key.DO_REMOTE_PREFILL.value))


def wants_remote_decode(params: Mapping[str, Any] | None) -> bool:
    return isinstance(params, Mapping) and bool(params.get(Key.DO_REMOTE_DECODE.value))
