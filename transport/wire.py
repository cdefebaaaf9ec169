"""Control-plane wire format: msgpack with an explicit schema per message type.

Frame: msgpack array [PROTOCOL_VERSION, msg_type, {field: value}]. Sizes are checked before
decoding, decoding limits container and string sizes, and every field is type-checked against
its schema. Never pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

from .errors import BadMessage, ProtocolMismatch

PROTOCOL_VERSION = 2
MAX_STR_BYTES = 64 << 10


class Msg(str, Enum):
    HELLO = "hello"              # client -> server: version, name, nonce, compat, worker address
    HELLO_ACK = "hello_ack"      # server -> client: name, nonce, worker address, server MAC
    AUTH = "auth"                # client -> server: client MAC
    WELCOME = "welcome"          # server -> client: handshake done
    ERROR = "error"              # either way: typed failure (rid names the request it answers)
    READ_REQ = "read_req"        # reader -> owner: pull a lease into the reader's tags
    READ_ACK = "read_ack"        # owner -> reader: accepted, chunk size, or same-host iovecs
    READ_DONE = "read_done"      # reader -> owner: all bytes landed (+ notification); answered OK
    WRITE_REQ = "write_req"      # writer -> owner: push into a writable lease
    WRITE_ACK = "write_ack"      # owner -> writer: accepted, chunk size, tag base
    WRITE_DONE = "write_done"    # owner -> writer: all bytes landed
    XFER_ABORT = "xfer_abort"    # either way: stop a transfer (cancel/timeout)
    RENEW = "renew"              # reader -> owner: extend a lease
    OK = "ok"                    # generic success reply
    NOTIFY = "notify"            # plain notification
    PING = "ping"                # keepalive probe
    CALL = "call"                # application request (Agent.call); answered CALL_REPLY or ERROR
    CALL_REPLY = "call_reply"    # application reply
    PONG = "pong"


# field name -> accepted python types (msgpack decoding yields int, float, str, bytes, bool,
# list, dict, None)
_B, _S, _I, _F = (bytes,), (str,), (int,), (int, float)
_OPT_B = (bytes, type(None))
SCHEMAS: dict[Msg, dict[str, tuple[type, ...]]] = {
    Msg.HELLO: {"name": _S, "nonce": _B, "compat": (dict,), "worker": _B, "host": _S, "pid": _I},
    Msg.HELLO_ACK: {"name": _S, "nonce": _B, "worker": _B, "mac": _B, "host": _S, "pid": _I},
    Msg.AUTH: {"mac": _B},
    Msg.WELCOME: {},
    Msg.ERROR: {"code": _S, "message": _S, "field": (str, type(None))},
    Msg.READ_REQ: {"xid": _I, "lease": _S, "nbytes": _I, "chunk": _I, "tag": _I, "cma": (bool,), "ranges": _OPT_B},
    Msg.READ_ACK: {"xid": _I, "chunk": _I, "iov": _OPT_B},
    Msg.READ_DONE: {"xid": _I, "lease": _S, "notify": _OPT_B},
    Msg.WRITE_REQ: {"xid": _I, "lease": _S, "nbytes": _I, "chunk": _I, "notify": _OPT_B},
    Msg.WRITE_ACK: {"xid": _I, "chunk": _I, "tag": _I},
    Msg.WRITE_DONE: {"xid": _I},
    Msg.XFER_ABORT: {"xid": _I, "reason": _S},
    Msg.RENEW: {"lease": _S, "ttl": _F},
    Msg.OK: {"expires_in": (int, float, type(None))},
    Msg.NOTIFY: {"payload": _B},
    Msg.PING: {},
    Msg.CALL: {"payload": _B},
    Msg.CALL_REPLY: {"payload": _B},
    Msg.PONG: {},
}


@dataclass(frozen=True)
class Frame:
    type: Msg
    rid: int          # request id; replies carry the id of the request they answer
    body: dict[str, Any]


def encode(msg: Msg, rid: int = 0, **body: Any) -> bytes:
    schema = SCHEMAS[msg]
    if set(body) != set(schema):
        raise ValueError(f"{msg.value}: fields {sorted(body)} != schema {sorted(schema)}")
    return msgpack.packb([PROTOCOL_VERSION, msg.value, rid, body], use_bin_type=True)


def decode(data: bytes | bytearray | memoryview, max_bytes: int) -> Frame:
    """Decode and validate one control frame; raise BadMessage / ProtocolMismatch."""
    n = len(data)
    if n > max_bytes:
        raise BadMessage(f"control message of {n} bytes exceeds limit {max_bytes}")
    if n == 0:
        raise BadMessage("empty control message")
    try:
        obj = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True,
                              max_bin_len=max_bytes, max_str_len=MAX_STR_BYTES,
                              max_array_len=64, max_map_len=256, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise BadMessage(f"undecodable control message: {type(e).__name__}: {e}") from None
    if not isinstance(obj, list) or len(obj) != 4:
        raise BadMessage("control message is not a [version, type, rid, body] frame")
    version, mtype, rid, body = obj
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadMessage("protocol version is not an integer")
    if version != PROTOCOL_VERSION:
        raise ProtocolMismatch(f"peer speaks protocol {version}, this agent {PROTOCOL_VERSION}")
    try:
        msg = Msg(mtype)
    except ValueError:
        raise BadMessage(f"unknown message type {mtype!r}") from None
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 1 << 63:
        raise BadMessage("request id is not a non-negative 63-bit integer")
    if not isinstance(body, dict):
        raise BadMessage(f"{msg.value}: body is not a map")
    schema = SCHEMAS[msg]
    if set(body) != set(schema):
        raise BadMessage(f"{msg.value}: fields {sorted(map(str, body))} != schema {sorted(schema)}")
    for k, types in schema.items():
        v = body[k]
        if isinstance(v, bool) and bool not in types:
            raise BadMessage(f"{msg.value}.{k}: bool where {types} expected")
        if not isinstance(v, types):
            raise BadMessage(f"{msg.value}.{k}: {type(v).__name__} where {[t.__name__ for t in types]} expected")
        if isinstance(v, int) and not isinstance(v, bool) and not -(1 << 63) <= v < 1 << 64:
            raise BadMessage(f"{msg.value}.{k}: integer out of range")
    if msg is Msg.HELLO:
        for ck, cv in body["compat"].items():  # same shape as AgentConfig.compat
            if not isinstance(ck, str) or not isinstance(cv, (str, int, float, bool)):
                raise BadMessage(f"hello.compat: entries must be str -> str/int/float/bool, got {ck!r:.80}")
    return Frame(msg, rid, body)
