"""One TensorRT-LLM stand-in instance (context or generation) in its own OS process.

Driven by the integration tests over stdin/stdout, one JSON object a line.
Commands: {"op": "add", "rid", "prompt", "max_new", "salt"}, {"op": "abort_after", "rid",
"steps"}, {"op": "stats"}, {"op": "quit"}.
Events: ready (agent addresses), finished (tokens), loaded (bytes_equal), freed (blocks of a
held request returned), load_error (KvLoadError), stats.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import sys
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2]
REPO = TESTS.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="connector config JSON")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--tokens-per-block", type=int, default=4)
    ap.add_argument("--num-blocks", type=int, default=64)
    ap.add_argument("--context-chunk", type=int, default=1 << 30)
    ap.add_argument("--device", default="cpu", help='KV pool device, e.g. "cuda" or "cuda:{rank}"')
    args = ap.parse_args()
    logging.basicConfig(level=os.environ.get("TRTLLM_INSTANCE_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ["NIXL_TRTLLM_CONNECTOR_CONFIG"] = args.config

    import torch

    from trtllm_standin import fake_model, install
    api = install.ensure()
    from trtllm_standin.executor import (KvCacheConfig, KvCacheConnectorConfig, LlmArgs, ModelShape,
                                         StandinExecutor)
    from trtllm_standin.llm_request import LlmRequest
    from nixl_connectors.trtllm.worker import KvLoadError

    cc = KvCacheConnectorConfig("nixl_connectors.trtllm.connector", "UcxKvConnectorScheduler",
                                "UcxKvConnectorWorker")
    llm_args = LlmArgs("tiny", cc, tensor_parallel_size=args.tp,
                       kv_cache_config=KvCacheConfig(tokens_per_block=args.tokens_per_block))
    shape = ModelShape(num_blocks=args.num_blocks, context_chunk=args.context_chunk, device=args.device)
    ex = StandinExecutor(llm_args, shape, api)
    tpb = args.tokens_per_block

    def emit(**ev) -> None:
        sys.stdout.write(json.dumps(ev) + "\n")
        sys.stdout.flush()

    cmds: "queue.Queue[dict]" = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                cmds.put(json.loads(line))
        cmds.put({"op": "quit"})

    threading.Thread(target=read_stdin, daemon=True).start()
    emit(ev="ready", addresses=[w.address for w in ex.workers], free_blocks=len(ex.free_blocks))
    reported_finished: set = set()
    abort_at: dict = {}
    running = True
    while running:
        while True:
            try:
                cmd = cmds.get_nowait()
            except queue.Empty:
                break
            op = cmd["op"]
            if op == "add":
                ex.add_request(LlmRequest(cmd["rid"], cmd["prompt"], cmd["max_new"],
                                          cache_salt=cmd.get("salt")))
            elif op == "abort_after":
                abort_at[cmd["rid"]] = ex.iterations + cmd["steps"]
            elif op == "stats":
                emit(ev="stats", free_blocks=len(ex.free_blocks), saving=sorted(ex.saving),
                     busy=ex.busy())
            elif op == "quit":
                running = False
        for rid, at in list(abort_at.items()):
            if ex.iterations >= at:
                ex.abort(rid)
                del abort_at[rid]
        if not ex.busy():
            time.sleep(0.002)
            continue
        loading_before = dict(ex.loading)
        saving_before = set(ex.saving)
        try:
            ex.step()
        except KvLoadError as e:
            for rid in e.request_ids:
                emit(ev="load_error", rid=rid, reason=e.reasons.get(rid, ""))
                # The test's engine gives up on the request (TensorRT-LLM would fail it).
                ex.loading.pop(rid, None)
                ex._free(rid)
                ex.finished[rid] = []
            continue
        if not ex.active:
            time.sleep(0.001)   # only waiting on transfers: do not starve the other process
        for rid, req in loading_before.items():
            if rid in ex.active:
                n = ex.loaded_tokens[rid]
                blocks = ex.block_table[rid]
                ok = True
                for rank, pool in enumerate(ex.pools):
                    exp = fake_model.expected_blocks(req.get_tokens(0), blocks, n, pool,
                                                     heads=ex.heads, head_offset=rank * ex.heads,
                                                     head_dim=shape.head_dim, tokens_per_block=tpb)
                    got = pool.index_select(0, torch.as_tensor(blocks[:n // tpb], device=pool.device))
                    ok = ok and bool(exp.view(-1).view(torch.uint8).equal(
                        got.reshape(-1).view(torch.uint8)))
                emit(ev="loaded", rid=rid, tokens=n, bytes_equal=ok)
        for rid in saving_before - set(ex.saving):
            emit(ev="freed", rid=rid, free_blocks=len(ex.free_blocks))
        for rid, toks in ex.finished.items():
            if rid not in reported_finished:
                reported_finished.add(rid)
                emit(ev="finished", rid=rid, tokens=toks, loaded=ex.loaded_tokens.get(rid, 0),
                     held=rid in ex.saving)
    ex.close()
    emit(ev="bye")


if __name__ == "__main__":
    main()
