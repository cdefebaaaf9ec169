"""Control-plane wire format: msgpack with an explicit schema per message type (pure).

Frame body: msgpack array [PROTOCOL_VERSION, msg_type, rid, {field: value}]. The frame layer
(framing.py) checks sizes before anything is buffered; here decoding limits container and
string sizes and every field is type-checked against its schema. Error texts name our schema,
never echo the peer's bytes. Never pickle.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

from .errors import BadMessage, ProtocolMismatch

PROTOCOL_VERSION = 4
MAX_STR_BYTES = 64 << 10
MAX_ARRAY_LEN = 4096


class Msg(str, Enum):
    HELLO = "hello"              # client -> server: identity, nonce, compat, capabilities
    HELLO_ACK = "hello_ack"      # server -> client: identity, nonce, capabilities, server MAC
    AUTH = "auth"                # client -> server: client MAC
    WELCOME = "welcome"          # server -> client: handshake done (frames are MAC'd from here on)
    ERROR = "error"              # either way: typed failure (rid names the request it answers)
    READ_REQ = "read_req"        # initiator -> owner: read (part of) a lease over a named data path
    READ_ACK = "read_ack"        # owner -> initiator: accepted; what the path needs (iovecs, IPC table)
    WRITE_REQ = "write_req"      # initiator -> owner: write into a writable lease
    WRITE_ACK = "write_ack"      # owner -> initiator: accepted; iovecs / IPC table / UCX tag base
    GRANT = "grant"              # owner -> reader: a new lease's grant, sent ahead (no reply)
    GRANT_READ = "grant_read"    # initiator -> owner: lease re-read(s) under its grant, after the fact (no reply)
    XFER_DONE = "xfer_done"      # initiator -> owner: finished with the owner's memory (rid != 0: confirm)
    WRITE_DONE = "write_done"    # owner -> initiator (UCX writes): every byte landed
    XFER_ABORT = "xfer_abort"    # either way: stop a transfer of this connection
    RENEW = "renew"              # initiator -> owner: extend a lease
    OK = "ok"                    # generic success reply
    NOTIFY = "notify"            # notification (rid != 0: the sender wants OK / ERROR busy back)
    CALL = "call"                # application request (Agent.call); answered CALL_REPLY or ERROR
    CALL_REPLY = "call_reply"
    UCX_HELLO = "ucx_hello"      # initiator -> owner: my UCX worker address (before the first UCX transfer)
    UCX_ACK = "ucx_ack"          # owner -> initiator: mine
    REGION_GONE = "region_gone"  # owner -> reader: drop the IPC mapping of a region
    PING = "ping"
    PONG = "pong"


class DataPath(str, Enum):
    """How the bytes of one transfer move."""

    CMA = "cma"    # same host, host memory: the initiator's process_vm_readv / writev
    IPC = "ipc"    # same host, CUDA memory: the initiator's fused kernel over CUDA IPC mappings
    UCX = "ucx"    # the owner packs and UCX moves chunks (other hosts, and every fallback)


REPLY_TYPES = frozenset({Msg.HELLO_ACK, Msg.WELCOME, Msg.ERROR, Msg.READ_ACK, Msg.WRITE_ACK, Msg.OK,
                         Msg.CALL_REPLY, Msg.PONG, Msg.UCX_ACK})

# field name -> accepted python types (msgpack decoding yields int, float, str, bytes, bool,
# list, dict, None)
_B, _S, _I, _F, _BOOL = (bytes,), (str,), (int,), (int, float), (bool,)
_OPT_B = (bytes, type(None))
_OPT_L = (list, type(None))
SCHEMAS: dict[Msg, dict[str, tuple[type, ...]]] = {
    Msg.HELLO: {"name": _S, "instance": _B, "nonce": _B, "compat": (dict,), "host": _S, "pid": _I,
                "chunk": _I, "paths": (list,), "lane": _BOOL},
    Msg.HELLO_ACK: {"name": _S, "instance": _B, "nonce": _B, "host": _S, "pid": _I, "chunk": _I,
                    "paths": (list,), "mac": _B},
    Msg.AUTH: {"mac": _B},
    Msg.WELCOME: {},
    Msg.ERROR: {"code": _S, "message": _S, "field": (str, type(None))},
    Msg.READ_REQ: {"xid": _I, "lease": _S, "nbytes": _I, "ranges": _OPT_B, "path": _S, "tag": _I,
                   "notify": _OPT_B},
    Msg.READ_ACK: {"xid": _I, "hold_ms": _F, "iov": _OPT_B, "ipc": _OPT_L, "table": _OPT_B, "grant": _OPT_L},
    Msg.GRANT: {"lease": _S, "nbytes": _I, "iov": _OPT_B, "ipc": _OPT_L, "table": _OPT_B, "grant": (list,)},
    Msg.GRANT_READ: {"lease": _S, "reads": _I, "nbytes": _I, "notify": _OPT_B, "path": _S},
    Msg.WRITE_REQ: {"xid": _I, "lease": _S, "nbytes": _I, "path": _S, "notify": _OPT_B},
    Msg.WRITE_ACK: {"xid": _I, "hold_ms": _F, "iov": _OPT_B, "ipc": _OPT_L, "table": _OPT_B, "tag": _I},
    Msg.XFER_DONE: {"xid": _I},
    Msg.WRITE_DONE: {"xid": _I},
    Msg.XFER_ABORT: {"xid": _I, "reason": _S, "by_owner": _BOOL},
    Msg.RENEW: {"lease": _S, "ttl": _F},
    Msg.OK: {"expires_in": (int, float, type(None))},
    Msg.NOTIFY: {"payload": _B},
    Msg.CALL: {"payload": _B},
    Msg.CALL_REPLY: {"payload": _B},
    Msg.UCX_HELLO: {"worker": _B},
    Msg.UCX_ACK: {"worker": _B},
    Msg.REGION_GONE: {"slot": _I},
    Msg.PING: {},
    Msg.PONG: {},
}
_NON_NEGATIVE = {"xid", "nbytes", "tag", "pid", "chunk", "slot", "reads"}


@dataclass(frozen=True)
class Frame:
    type: Msg
    rid: int          # request id; replies carry the id of the request they answer
    body: dict[str, Any]


def encode(msg: Msg, rid: int = 0, **body: Any) -> bytes:
    schema = SCHEMAS[msg]
    if body.keys() != schema.keys():
        raise ValueError(f"{msg.value}: fields {sorted(body)} != schema {sorted(schema)}")
    return msgpack.packb([PROTOCOL_VERSION, msg.value, rid, body], use_bin_type=True)


def decode(data: bytes | bytearray | memoryview, max_bytes: int) -> Frame:
    """Decode and validate one control frame body; raise BadMessage / ProtocolMismatch."""
    n = len(data)
    if n > max_bytes:
        raise BadMessage(f"control message of {n} bytes exceeds limit {max_bytes}")
    if n == 0:
        raise BadMessage("empty control message")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                              max_bin_len=max_bytes, max_str_len=MAX_STR_BYTES,
                              max_array_len=MAX_ARRAY_LEN, max_map_len=256, max_ext_len=0)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise BadMessage(f"undecodable control message ({type(e).__name__})") from None
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
        raise BadMessage("unknown message type") from None
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 1 << 63:
        raise BadMessage("request id is not a non-negative 63-bit integer")
    if not isinstance(body, dict):
        raise BadMessage(f"{msg.value}: body is not a map")
    schema = SCHEMAS[msg]
    if body.keys() != schema.keys():
        raise BadMessage(f"{msg.value}: fields do not match the schema {sorted(schema)}")
    for k, types in schema.items():
        v = body[k]
        if isinstance(v, bool) and bool not in types:
            raise BadMessage(f"{msg.value}.{k}: bool where {[t.__name__ for t in types]} expected")
        if not isinstance(v, types):
            raise BadMessage(f"{msg.value}.{k}: {type(v).__name__} where {[t.__name__ for t in types]} expected")
        if isinstance(v, int) and not isinstance(v, bool):
            lo = 0 if k in _NON_NEGATIVE else -(1 << 63)
            if not lo <= v < 1 << 63:
                raise BadMessage(f"{msg.value}.{k}: integer out of range")
        if isinstance(v, float) and not (v == v and abs(v) < 1e18):
            raise BadMessage(f"{msg.value}.{k}: not a finite number")
    if msg in (Msg.HELLO,):
        for ck, cv in body["compat"].items():  # same shape as AgentConfig.compat
            if not isinstance(ck, str) or not isinstance(cv, (str, int, float, bool)):
                raise BadMessage("hello.compat: entries must be str -> str/int/float/bool")
    if msg in (Msg.HELLO, Msg.HELLO_ACK):
        if not all(isinstance(p, str) for p in body["paths"]):
            raise BadMessage(f"{msg.value}.paths: entries must be strings")
    return Frame(msg, rid, body)


def parse_path(value: str) -> DataPath:
    try:
        return DataPath(value)
    except ValueError:
        raise BadMessage("unknown data path") from None
