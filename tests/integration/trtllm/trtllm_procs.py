"""Stand-in TensorRT-LLM instances in their own OS processes, for the integration tests.

Each `Instance` runs trtllm_instance.py; events arrive on a queue and are waited for with
deadlines.
"""
from __future__ import annotations

import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parents[1]
REPO = TESTS.parent

TPB = 4
DEADLINE_S = 90.0   # per awaited event; only a hang or a very busy machine gets near it


class Instance:
    """A child process running trtllm_instance.py; events arrive on a queue."""

    def __init__(self, config: dict, tp: int = 1, context_chunk: int | None = None,
                 device: str = "cpu", env: dict | None = None, extra: list | None = None):
        cmd = [sys.executable, str(HERE / "trtllm_instance.py"), "--config", json.dumps(config),
               "--tp", str(tp), "--tokens-per-block", str(TPB), "--device", device] + list(extra or [])
        if context_chunk:
            cmd += ["--context-chunk", str(context_chunk)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]),
                   **(env or {}))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO))
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.stderr: list[str] = []
        self.backlog: list[dict] = []
        self._ready: dict | None = None
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    @property
    def ready(self) -> dict:
        if self._ready is None:
            self._ready = self.wait("ready", timeout=120.0)   # imports + UCX start, on a busy machine
        return self._ready

    def _pump(self) -> None:
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put({"ev": "exited"})

    def _pump_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def wait(self, ev: str, timeout: float = DEADLINE_S, **match) -> dict:
        """Next event named ``ev`` (with ``match``ing fields); other events stay queued."""
        def hit(e: dict) -> bool:
            return e["ev"] == ev and all(e.get(k) == v for k, v in match.items())

        for i, e in enumerate(self.backlog):
            if hit(e):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {ev} {match} within {timeout}s; stderr:\n{''.join(self.stderr[-40:])}")
            try:
                e = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if hit(e):
                return e
            if e["ev"] == "exited":
                self.events.put(e)
                raise AssertionError(f"instance exited waiting for {ev}; stderr:\n{''.join(self.stderr[-40:])}")
            self.backlog.append(e)

    def collect(self, ev: str, n: int, timeout: float = DEADLINE_S) -> dict:
        out = {}
        for _ in range(n):
            e = self.wait(ev, timeout)
            out[e["rid"]] = e
        return out

    def stats(self) -> dict:
        self.send(op="stats")
        return self.wait("stats")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(5)
            except Exception:  # noqa: BLE001 - slow shutdown: not what these tests check
                self.proc.kill()
                self.proc.wait(10)


def free_port_base(n: int) -> int:
    """A base port with ``n`` consecutive ports free right now."""
    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def factory():
    made: list[Instance] = []

    def make(*a, **kw) -> Instance:
        inst = Instance(*a, **kw)
        made.append(inst)
        return inst

    return made, make


def pair(make, tp: int = 1, ctx_kw: dict | None = None, gen_kw: dict | None = None,
         context_chunk: int | None = None, device: str = "cpu", ctx_env: dict | None = None,
         gen_env: dict | None = None) -> tuple[Instance, Instance]:
    """Start a context and a generation instance at once (fixed context ports)."""
    base = free_port_base(tp)
    ctx = make(dict({"role": "context", "lease_ttl_s": 120.0, "listen_port_base": base},
                    **(ctx_kw or {})), tp=tp, context_chunk=context_chunk, device=device, env=ctx_env)
    gen = make(dict({"role": "generation", "context_agents": [f"127.0.0.1:{base + r}" for r in range(tp)],
                     "timeout_s": 30.0, "connect_timeout_s": 30.0, "lookup_wait_s": 1.0,
                     "probe_timeout_s": 30.0}, **(gen_kw or {})), tp=tp, device=device, env=gen_env)
    assert ctx.ready["addresses"] == [f"127.0.0.1:{base + r}" for r in range(tp)]
    gen.ready
    return ctx, gen


