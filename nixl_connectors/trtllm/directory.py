"""Lease directory messages between a generation worker and a context worker.

A generation worker knows a request's routing id but not the lease under which the context
worker of the same TP rank holds its blocks; it asks, over the transport's authenticated
notification channel, and the context worker answers by notifying the asker's agent address.
Messages are msgpack maps behind a magic prefix, with an explicit schema and a size limit
checked before decoding; anything else is rejected with `DirectoryMessageError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

import msgpack

MAGIC = b"NXTD\x01"
MAX_MESSAGE_BYTES = 4096
MAX_KEY_CHARS = 512


class DirectoryMessageError(ValueError):
    """A payload that is not a well-formed directory message."""


class Op(str, Enum):
    LOOKUP = "lookup"
    ANSWER = "answer"
    RELEASE = "release"


class LeaseStatus(str, Enum):
    READY = "ready"      # lease exposed; lease_id and nbytes are set
    PENDING = "pending"  # request known, not finished yet: ask again
    UNKNOWN = "unknown"  # never heard of it (or already freed / aborted)
    FAILED = "failed"    # the context side could not expose the blocks


@dataclass(frozen=True)
class Lookup:
    key: str
    reply_to: str
    nonce: int


@dataclass(frozen=True)
class Answer:
    key: str
    nonce: int
    status: LeaseStatus
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
        body: dict[str, Any] = {"op": Op.LOOKUP.value, "key": msg.key, "reply_to": msg.reply_to,
                                "nonce": msg.nonce}
    elif isinstance(msg, Answer):
        body = {"op": Op.ANSWER.value, "key": msg.key, "nonce": msg.nonce,
                "status": msg.status.value, "lease_id": msg.lease_id, "nbytes": msg.nbytes}
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


def decode(payload: bytes) -> Message:
    if not is_directory_message(payload):
        raise DirectoryMessageError("missing directory magic")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise DirectoryMessageError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(bytes(payload[len(MAGIC):]), raw=False, strict_map_key=True,
                               max_str_len=MAX_MESSAGE_BYTES, max_bin_len=0,
                               max_array_len=0, max_map_len=16)
    except Exception as e:  # msgpack raises several unrelated types on bad input
        raise DirectoryMessageError(f"undecodable directory message: {type(e).__name__}: {e}") from None
    if not isinstance(body, dict):
        raise DirectoryMessageError("directory message must be a map")
    op_raw = _field(body, "op", str, limit=16)
    try:
        op = Op(op_raw)
    except ValueError:
        raise DirectoryMessageError(f"unknown op {op_raw!r}") from None
    key = _field(body, "key", str, limit=MAX_KEY_CHARS)
    if op is Op.LOOKUP:
        return Lookup(key, _field(body, "reply_to", str, limit=256), _field(body, "nonce", int))
    if op is Op.RELEASE:
        return Release(key)
    status_raw = _field(body, "status", str, limit=16)
    try:
        status = LeaseStatus(status_raw)
    except ValueError:
        raise DirectoryMessageError(f"unknown status {status_raw!r}") from None
    nbytes = _field(body, "nbytes", int)
    if nbytes < 0:
        raise DirectoryMessageError("nbytes must be >= 0")
    return Answer(key, _field(body, "nonce", int), status,
                  _field(body, "lease_id", str, limit=128), nbytes)
