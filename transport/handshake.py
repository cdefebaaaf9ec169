"""Handshake: transcript, MACs, session keys, compat comparison (pure).

Both sides hash the same transcript: the client's HELLO body and the server's HELLO_ACK body
(without its MAC), encoded canonically. It holds everything a peer is later trusted for:
names, per-process instance ids, nonces, host and PID-namespace key, pid, capabilities,
compat dict and protocol version. With a key, the server proves it with
HMAC(key, "server" | transcript), the client with HMAC(key, "client" | transcript), and every
later frame carries a MAC under per-direction keys derived from the transcript (framing.py),
so a relay without the key can neither substitute its own identity or addresses, nor inject or
alter frames after authentication.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any, Mapping

import msgpack

from .errors import CompatMismatch
from .framing import FrameMac

NONCE_BYTES = 16
INSTANCE_BYTES = 16
LABEL = b"nixl-connectors/3"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def new_instance() -> bytes:
    return secrets.token_bytes(INSTANCE_BYTES)


def compat_hash(compat: Mapping[str, Any]) -> str:
    """Stable short hash of a compat dict (for logs and metrics)."""
    blob = json.dumps(dict(compat), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return [[k, _canonical(obj[k])] for k in sorted(obj)]
    if isinstance(obj, (list, tuple)):
        return [_canonical(x) for x in obj]
    return obj


def transcript(hello: Mapping[str, Any], hello_ack: Mapping[str, Any]) -> bytes:
    """SHA-256 of both handshake bodies (the ack without its MAC), canonically encoded."""
    ack = {k: v for k, v in hello_ack.items() if k != "mac"}
    blob = msgpack.packb([LABEL, _canonical(dict(hello)), _canonical(ack)], use_bin_type=True)
    return hashlib.sha256(blob).digest()


def proof(key: bytes | None, role: bytes, th: bytes) -> bytes:
    """MAC proving knowledge of `key` for this transcript and role; empty without a key."""
    if key is None:
        return b""
    return hmac.digest(key, LABEL + b"|" + role + b"|" + th, "sha256")


def proofs_equal(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def frame_macs(key: bytes | None, th: bytes, client: bool) -> FrameMac | None:
    """Per-direction frame MAC keys of the session (None without a key)."""
    if key is None:
        return None
    c2s = hmac.digest(key, LABEL + b"|c2s|" + th, "sha256")
    s2c = hmac.digest(key, LABEL + b"|s2c|" + th, "sha256")
    return FrameMac(c2s, s2c) if client else FrameMac(s2c, c2s)


def session_secret(key: bytes | None, th: bytes) -> bytes | None:
    """A secret both sides share for this session only (keystream for IPC handles)."""
    if key is None:
        return None
    return hmac.digest(key, LABEL + b"|secret|" + th, "sha256")


def keystream_xor(secret: bytes | None, label: bytes, data: bytes) -> bytes:
    """XOR `data` with an HMAC-SHA256 counter-mode keystream (identity without a secret)."""
    if secret is None:
        return data
    out = bytearray(len(data))
    for i in range(0, len(data), 32):
        block = hmac.digest(secret, label + i.to_bytes(8, "little"), "sha256")
        chunk = data[i:i + 32]
        out[i:i + len(chunk)] = bytes(a ^ b for a, b in zip(chunk, block))
    return bytes(out)


def check_compat(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> None:
    """Raise CompatMismatch naming the first differing field (sorted order)."""
    for k in sorted(set(mine) | set(theirs)):
        a, b = mine.get(k, "<missing>"), theirs.get(k, "<missing>")
        if a != b:
            raise CompatMismatch(f"compatibility mismatch on {k!r}: local {a!r} != peer {str(b)[:200]!r}", field=k)
