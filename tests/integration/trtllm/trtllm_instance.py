"""One TensorRT-LLM stand-in instance (context or generation) in its own OS process.

Driven by the integration tests over stdin/stdout, one JSON object a line.
Commands: {"op": "add", "rid", "prompt", "max_new", "salt", "abort": bool (cancel it in the
iteration that schedules it), "abort_at_position": n (cancel once its prompt is computed up to
n tokens), "when_running": rid (hand it to the engine only while request rid is in the batch,
so that the next iteration processes a previous batch, where TensorRT-LLM applies
cancellations)}, {"op": "abort", "rid"}, {"op": "kill_on_claim", "rid", "pid"} (SIGKILL process pid right after the
connector claimed request rid's tokens, before its pull starts), {"op": "stats"}, {"op": "quit"}.
Events: ready (agent addresses), startup_error, finished (tokens, tokens loaded by the
connector, held: blocks kept for a transfer), loaded (bytes checked against the fake model),
freed (a held request's blocks came back), load_failed (a pull failed after the claim), stats,
crashed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="connector config JSON")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--tokens-per-block", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=64)
    ap.add_argument("--context-chunk", type=int, default=1 << 30)
    ap.add_argument("--device", default="cpu", help='KV pool device, e.g. "cuda" or "cuda:{rank}"')
    ap.add_argument("--flavour", default="main", choices=["main", "1.2"])
    ap.add_argument("--no-block-reuse", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=os.environ.get("TRTLLM_INSTANCE_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ["NIXL_TRTLLM_CONNECTOR_CONFIG"] = args.config

    import torch

    from trtllm_standin import fake_model, install
    api = install.ensure()
    from trtllm_standin.instance import (KvCacheConfig, KvCacheConnectorConfig, LlmArgs, ModelShape,
                                         StandinExecutor)
    from trtllm_standin.llm_request import LlmRequestState
    from trtllm_standin.manager import Flavour

    def emit(**ev) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    cc = KvCacheConnectorConfig("nixl_connectors.trtllm.connector", "UcxKvConnectorScheduler",
                                "UcxKvConnectorWorker")
    llm_args = LlmArgs("tiny", cc, tensor_parallel_size=args.tp,
                       kv_cache_config=KvCacheConfig(tokens_per_block=args.tokens_per_block,
                                                     enable_block_reuse=not args.no_block_reuse))
    shape = ModelShape(num_blocks=args.num_blocks, context_chunk=args.context_chunk, device=args.device)
    try:
        ex = StandinExecutor(llm_args, shape, api, flavour=Flavour(args.flavour))
    except Exception as e:  # noqa: BLE001 - reported to the test: a start-up error
        emit(ev="startup_error", error=f"{type(e).__name__}: {e}")
        sys.exit(3)
    tpb, r0 = ex.tpb, ex.rank0

    cmds: "queue.Queue[dict]" = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                cmds.put(json.loads(line))
        cmds.put({"op": "quit"})

    threading.Thread(target=read_stdin, daemon=True).start()
    emit(ev="ready", addresses=[w.address for w in ex.workers], free_blocks=ex.free_blocks())
    reported: set = set()
    abort_at: dict = {}
    held_back: list = []
    checked: set = set()
    failed_pulls = 0   # adds waiting for their "when_running" request
    running = True
    idle = False
    while running:
        try:
            # Blocks while there is no work; paces an engine that only waits on transfers.
            cmd = cmds.get(timeout=None if not ex.busy() else (0.002 if idle else 0))
        except queue.Empty:
            cmd = None
        while cmd is not None:
            op = cmd["op"]
            if op == "add":
                held_back.append(cmd)
            elif op == "abort":
                ex.abort(cmd["rid"])
            elif op == "kill_on_claim":
                def kill(rex, rid=cmd["rid"], pid=cmd["pid"]) -> None:
                    if rid in rex.active and not ex.hooks.get("_killed"):
                        ex.hooks["_killed"] = True
                        os.kill(pid, signal.SIGKILL)
                ex.hooks["after_prepare_resources"] = kill
            elif op == "stats":
                emit(ev="stats", free_blocks=ex.free_blocks(), busy=ex.busy(), held=sorted(r0.held),
                     deferred=sorted(r0.deferred), iterations=ex.iterations,
                     pending_transfers=sorted(rid for rid in set(r0.held) | set(r0.deferred) | set(r0.active)
                                              if r0.manager.has_pending_transfers(rid)),
                     failed_pulls=sum(getattr(w, "failed_pulls", 0) for w in ex.workers),
                     connector_errors=sum(getattr(w, "connector_errors", 0) for w in ex.workers))
            elif op == "quit":
                running = False
            try:
                cmd = cmds.get_nowait()
            except queue.Empty:
                cmd = None
        for cmd in list(held_back):
            other = cmd.get("when_running")
            if other is not None and not (r0.previous is not None and other in r0.active
                                          and not r0.active[other].is_finished):
                continue
            held_back.remove(cmd)
            ex.add_request(cmd["rid"], cmd["prompt"], cmd["max_new"], salt=cmd.get("salt"))
            if cmd.get("abort"):
                ex.abort(cmd["rid"])
            if cmd.get("abort_at_position") is not None:
                abort_at[cmd["rid"]] = cmd["abort_at_position"]
        if not running or not ex.busy():
            continue
        kept_before = set(r0.held) | set(r0.deferred)
        try:
            ex.step()
        except Exception as e:  # noqa: BLE001 - the engine died: tell the test, then stop
            emit(ev="crashed", error=f"{type(e).__name__}: {e}")
            break
        idle = r0.previous is None
        failed = sum(getattr(w, "failed_pulls", 0) for w in ex.workers)
        if failed > failed_pulls:
            failed_pulls = failed
            emit(ev="load_failed", count=failed)
        for rid, at in list(abort_at.items()):
            req = r0.active.get(rid)
            if req is not None and req.context_current_position >= at:
                ex.abort(rid)
                del abort_at[rid]
        for rid, req in r0.active.items():
            # loaded in this iteration: back to CONTEXT_INIT, its own forward not yet run
            n = ex.loaded_tokens.get(rid, 0)
            if not n or rid in checked or req.state is not LlmRequestState.CONTEXT_INIT:
                continue
            checked.add(rid)
            ok = True
            for rank, rex in enumerate(ex.ranks):
                blocks = rex.kv.blocks[rid]
                exp = fake_model.expected_blocks(req.prompt, blocks, n, rex.pool, heads=ex.heads,
                                                 head_offset=rank * ex.heads, head_dim=shape.head_dim,
                                                 tokens_per_block=tpb)
                got = rex.pool.index_select(0, torch.as_tensor(blocks[:n // tpb], device=rex.pool.device))
                ok = ok and bool(exp.view(-1).view(torch.uint8).equal(got.reshape(-1).view(torch.uint8)))
            emit(ev="loaded", rid=rid, tokens=n, bytes_equal=ok)
        for rid in kept_before - set(r0.held) - set(r0.deferred):
            emit(ev="freed", rid=rid, free_blocks=ex.free_blocks())
        for rid, toks in r0.finished.items():
            if rid not in reported:
                reported.add(rid)
                emit(ev="finished", rid=rid, tokens=toks, loaded=ex.loaded_tokens.get(rid, 0),
                     held=rid in r0.held or rid in r0.deferred, error=r0.errors.get(rid))
    ex.close()
    emit(ev="bye")


if __name__ == "__main__":
    main()
