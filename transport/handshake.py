"""Handshake helpers: MACs over the transcript and compat comparison (pure)."""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets

from .errors import CompatMismatch

NONCE_BYTES = 16


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def compat_hash(compat: dict) -> str:
    """Stable short hash of a compat dict (for logs and metrics)."""
    blob = json.dumps(compat, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def mac(key: bytes | None, role: bytes, client_nonce: bytes, server_nonce: bytes,
        client_name: str, server_name: str) -> bytes:
    """MAC proving knowledge of `key` bound to both nonces, both names and the role (so a MAC
    cannot be reflected back). Empty when no key is configured."""
    if key is None:
        return b""
    msg = b"|".join([b"nixl-connectors-v1", role, client_nonce, server_nonce,
                     client_name.encode(), server_name.encode()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def macs_equal(expected: bytes, got: bytes) -> bool:
    return hmac.compare_digest(expected, got)


def check_compat(mine: dict, theirs: dict) -> None:
    """Raise CompatMismatch naming the first differing field (sorted order)."""
    for k in sorted(set(mine) | set(theirs)):
        a, b = mine.get(k, "<missing>"), theirs.get(k, "<missing>")
        if a != b:
            raise CompatMismatch(f"compatibility mismatch on {k!r}: local {a!r} != peer {b!r}", field=k)
