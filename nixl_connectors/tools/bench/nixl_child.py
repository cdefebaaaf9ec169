"""A benchmark child process with a JSON-lines channel on its stdin/stdout, and its environment."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

from nixl_connectors.tools.bench.nixl_types import MsgType, Role
from nixl_connectors.tools.bench.pipe_messages import ChannelError, LineReader, write_message

logger = logging.getLogger(__name__)

WORKER_MODULE = "nixl_connectors.tools.bench._nixl_worker"
_PACKAGE_ROOT = Path(__file__).resolve().parents[3]
_STDERR_TAIL = 4000
EXIT_GRACE_S = 10.0


class NixlBenchError(RuntimeError):
    """A child process failed, broke the protocol or missed a deadline."""


def child_env(overrides: Mapping[str, str | None]) -> dict[str, str]:
    """This process's environment plus ``overrides`` (None unsets), for a child process."""
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    # The children import this package even when it runs from a source checkout.
    paths = [str(_PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class NixlChild:
    """One worker process with a JSON-lines channel on its stdin/stdout."""

    def __init__(self, role: Role, env: dict[str, str]) -> None:
        self.role = role
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE, role.value],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            start_new_session=True,
        )
        if self.proc.stdout is None or self.proc.stdin is None:
            raise NixlBenchError("could not open pipes to the worker")
        self._inbox = LineReader(self.proc.stdout.fileno())

    def send(self, msg: dict[str, Any]) -> None:
        if self.proc.stdin is None:
            raise NixlBenchError(f"{self.role.value}: stdin closed")
        try:
            write_message(self.proc.stdin.fileno(), msg)
        except (BrokenPipeError, ChannelError) as exc:
            raise self._failure(f"could not send {msg['type']}: {exc}") from exc

    def expect(self, kind: MsgType, deadline: float) -> dict[str, Any]:
        try:
            msg = self._inbox.read(max(0.0, deadline - time.monotonic()))
        except ChannelError as exc:
            raise self._failure(f"waiting for {kind.value}: {exc}") from exc
        if msg["type"] == MsgType.ERROR.value:
            raise self._failure(f"reported: {msg.get('error')}")
        if msg["type"] != kind.value:
            raise self._failure(f"expected {kind.value}, got {msg['type']!r}")
        return msg

    def stderr_tail(self) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - _STDERR_TAIL))
        return self._stderr.read().decode("utf-8", "replace")

    def _failure(self, what: str) -> NixlBenchError:
        rc = self.proc.poll()
        return NixlBenchError(f"{self.role.value} {what} (exit code {rc}); stderr tail:\n{self.stderr_tail()}")

    def close(self, timeout: float) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=max(0.1, timeout))
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit in time; killing pid %d", self.role.value, self.proc.pid)
            self.proc.kill()
            self.proc.wait(timeout=EXIT_GRACE_S)
        self._stderr.close()
