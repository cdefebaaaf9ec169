"""Newline-delimited JSON messages over pipe file descriptors, with deadlines.

Used between the benchmark's parent process and its child processes. JSON only
(binary payloads are base64 strings), never pickle; every read has a deadline and a
size limit that is checked before decoding.
"""

from __future__ import annotations

import base64
import json
import os
import select
import time
from dataclasses import dataclass, field
from typing import Any

MAX_LINE_BYTES = 64 * 1024 * 1024


class ChannelError(RuntimeError):
    """The peer closed the pipe, sent a malformed message or missed a deadline."""


class ChannelTimeout(ChannelError):
    """No complete message arrived before the deadline."""


class ChannelClosed(ChannelError):
    """The peer closed its end of the pipe."""


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


@dataclass
class LineReader:
    """Reads JSON objects, one per line, from a file descriptor."""

    fd: int
    max_line_bytes: int = MAX_LINE_BYTES
    _buf: bytearray = field(default_factory=bytearray)

    def poll(self) -> dict[str, Any] | None:
        """Return a message if one is already complete or readable now, else None."""
        return self.read_by(time.monotonic())

    def read(self, timeout: float) -> dict[str, Any]:
        """Block up to ``timeout`` seconds for the next message."""
        msg = self.read_by(time.monotonic() + max(0.0, timeout))
        if msg is None:
            raise ChannelTimeout(f"no message within {timeout:.1f}s")
        return msg

    def read_by(self, deadline: float) -> dict[str, Any] | None:
        """Return the next message, or None if none is complete by ``deadline`` (monotonic)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                return _decode(line)
            if len(self._buf) > self.max_line_bytes:
                raise ChannelError(f"message longer than {self.max_line_bytes} bytes")
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if not ready:
                return None
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                raise ChannelClosed("peer closed the pipe")
            self._buf += chunk


def _decode(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ChannelError(f"malformed message: {exc}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ChannelError("message must be a JSON object with a string 'type'")
    return msg


def write_message(fd: int, msg: dict[str, Any]) -> None:
    """Write one JSON object as a line to ``fd`` (blocking until written)."""
    data = json.dumps(msg, separators=(",", ":")).encode("utf-8") + b"\n"
    if len(data) > MAX_LINE_BYTES:
        raise ChannelError(f"message longer than {MAX_LINE_BYTES} bytes")
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
