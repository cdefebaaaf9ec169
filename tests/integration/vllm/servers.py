"""Real vLLM CPU servers for the end-to-end tests: start, health, metrics, stop; the example
proxy's request flow; prompts and request bodies."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]
MAX_TOKENS = 12


def _load_vllm_proxy():
    """examples/vllm/proxy.py under a unique module name (examples/trtllm has a proxy.py too)."""
    path = REPO / "examples" / "vllm" / "proxy.py"
    spec = importlib.util.spec_from_file_location("vllm_example_proxy", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["vllm_example_proxy"] = module
    spec.loader.exec_module(module)
    return module


_proxy = _load_vllm_proxy()
disagg_completion, post_json, prefill_request = _proxy.disagg_completion, _proxy.post_json, _proxy.prefill_request

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc/<pid>/task/*/children), deepest last."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


class Server:
    def __init__(self, name: str, model: str, core: int | str, policy: str, log_dir: Path,
                 extra: dict | None = None, tp: int = 1, new_session: bool = True, block_size: int = 32,
                 connector: bool = True, args: tuple[str, ...] = (), dtype: str = "bfloat16"):
        """new_session: start the server in its own session (stopped with its process group);
        False keeps it in the test's session and scheduling group (stopped as a process tree)."""
        self.name, self.port = name, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        ktc = {"kv_connector": "UcxConnector", "kv_role": "kv_both",
               "kv_load_failure_policy": policy,
               "kv_connector_extra_config": extra or {}}
        from importlib.metadata import entry_points
        if not any(ep.name == "ucx_connector" for ep in entry_points(group="vllm.general_plugins")):
            ktc["kv_connector_module_path"] = "nixl_connectors.vllm.connector"  # not pip-installed
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(core),
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
             "--port", str(self.port), "--block-size", str(block_size), "--kv-cache-memory-bytes",
             "67108864", "--max-model-len", "1024", "--enforce-eager", "--dtype", dtype,
             "--max-num-seqs", "8", "--tensor-parallel-size", str(tp), *args,
             *(["--kv-transfer-config", json.dumps(ktc)] if connector else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session)
        self.new_session = new_session
        self.model = model

    def wait_ready(self, timeout: float = 400) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"{self.name} not ready:\n{self.log_path.read_text()[-4000:]}")

    def _signal(self, sig: int) -> None:
        if self.new_session:
            os.killpg(self.proc.pid, sig)
            return
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in
                   re.finditer(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))


@contextlib.contextmanager
def running(servers: dict[str, "Server"]):
    """Wait until every server is ready; stop them all on the way out, whatever happened."""
    try:
        for s in servers.values():
            s.wait_ready()
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, 900, (n,), generator=g).tolist()


def body(model: str, prompt: list[int]) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True}


def tokens(resp: dict) -> list[int]:
    return list(resp["choices"][0]["token_ids"])


