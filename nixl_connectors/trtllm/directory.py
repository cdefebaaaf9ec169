"""Lease directory messages between a generation instance and a context worker (pure).

The generation side asks a context worker, with ``Agent.call`` over the transport's
authenticated channel, under which lease it holds a routing key's blocks (`Lookup` ->
`Answer`); it gives a lease back early with ``Agent.notify`` (`Release`). Messages are
msgpack maps behind a magic prefix, with an explicit schema and a size limit checked before
decoding; anything else is rejected with `DirectoryMessageError`. Read-completion
notifications (the routing key as bytes) never start with the magic.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

import msgpack

MAGIC = b"NXTD\x02"
MAX_MESSAGE_BYTES = 1024
MAX_KEY_CHARS = 128
MAX_WAIT_MS = 600_000


class DirectoryMessageError(ValueError):
    """A payload that is not a well-formed directory message."""


class Op(str, Enum):
    LOOKUP = "lookup"
    ANSWER = "answer"
    RELEASE = "release"


class LeaseStatus(str, Enum):
    READY = "ready"      # lease exposed; lease_id and nbytes are set
    PENDING = "pending"  # request known, not finished yet (after the lookup's wait)
    UNKNOWN = "unknown"  # never heard of it (or already freed / dropped)
    FAILED = "failed"    # the context side could not expose the blocks


@dataclass(frozen=True)
class Lookup:
    key: str
    wait_ms: int = 0


@dataclass(frozen=True)
class Answer:
    key: str
    status: LeaseStatus
    rank: int = 0
    lease_id: str = ""
    nbytes: int = 0


@dataclass(frozen=True)
class Release:
    key: str


Message = Union[Lookup, Answer, Release]


def is_directory_message(payload: bytes) -> bool:
    return isinstance(payload, (bytes, bytearray)) and bytes(payload[:len(MAGIC)]) == MAGIC


def encode(msg: Message) -> bytes:
    if isinstance(msg, Lookup):
        body: dict[str, Any] = {"op": Op.LOOKUP.value, "key": msg.key, "wait_ms": msg.wait_ms}
    elif isinstance(msg, Answer):
        body = {"op": Op.ANSWER.value, "key": msg.key, "status": msg.status.value, "rank": msg.rank,
                "lease_id": msg.lease_id, "nbytes": msg.nbytes}
    elif isinstance(msg, Release):
        body = {"op": Op.RELEASE.value, "key": msg.key}
    else:
        raise TypeError(f"not a directory message: {type(msg).__name__}")
    out = MAGIC + msgpack.packb(body, use_bin_type=True)
    if len(out) > MAX_MESSAGE_BYTES:
        raise DirectoryMessageError(f"message of {len(out)} bytes exceeds {MAX_MESSAGE_BYTES}")
    return out


def _field(body: dict, name: str, kind: type, *, limit: int | None = None) -> Any:
    value = body.get(name)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise DirectoryMessageError(f"field {name!r} must be {kind.__name__}, got {type(value).__name__}")
    if limit is not None and len(value) > limit:
        raise DirectoryMessageError(f"field {name!r} longer than {limit}")
    return value


def _bounded(body: dict, name: str, hi: int) -> int:
    value = _field(body, name, int)
    if not 0 <= value <= hi:
        raise DirectoryMessageError(f"field {name!r} out of range [0, {hi}]")
    return value


def decode(payload: bytes) -> Message:
    if not is_directory_message(payload):
        raise DirectoryMessageError("missing directory magic")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise DirectoryMessageError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(bytes(payload[len(MAGIC):]), raw=False, strict_map_key=True,
                               max_str_len=MAX_MESSAGE_BYTES, max_bin_len=0,
                               max_array_len=0, max_map_len=8)
    except Exception as e:  # noqa: BLE001 - msgpack raises several unrelated types on bad input
        raise DirectoryMessageError(f"undecodable directory message: {type(e).__name__}: {e}") from None
    if not isinstance(body, dict):
        raise DirectoryMessageError("directory message must be a map")
    op_raw = _field(body, "op", str, limit=16)
    try:
        op = Op(op_raw)
    except ValueError:
        raise DirectoryMessageError(f"unknown op {op_raw!r}") from None
    key = _field(body, "key", str, limit=MAX_KEY_CHARS)
    if not key:
        raise DirectoryMessageError("empty key")
    if op is Op.LOOKUP:
        return Lookup(key, _bounded(body, "wait_ms", MAX_WAIT_MS))
    if op is Op.RELEASE:
        return Release(key)
    status_raw = _field(body, "status", str, limit=16)
    try:
        status = LeaseStatus(status_raw)
    except ValueError:
        raise DirectoryMessageError(f"unknown status {status_raw!r}") from None
    return Answer(key, status, _bounded(body, "rank", 1 << 20), _field(body, "lease_id", str, limit=128),
                  _bounded(body, "nbytes", (1 << 63) - 1))
