"""Drive vLLM's real Scheduler + UcxConnector (both roles) with real transport agents.

The only stand-in is the model forward: after a step, each scheduled prefill request's
blocks are filled with bytes derived from (token ids, position, layer), so a decode engine
that pulled them can verify every byte. Everything else is vLLM's code and ours.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig,
                         SchedulerConfig, VllmConfig)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
from vllm.v1.structured_output import StructuredOutputManager

from nixl_connectors.vllm.connector import UcxConnector
from nixl_connectors.vllm.metadata import UcxHandshakeMetadata
from nixl_connectors.vllm.plugin import register

BLOCK_SIZE = 32
NUM_BLOCKS = 64
LAYERS = 4
KV_HEADS = 2
HEAD_SIZE = 64
_ids = itertools.count()

try:
    from vllm.utils.hashing import sha256 as _hash_fn
except ImportError:  # pragma: no cover - older layouts
    from vllm.utils import sha256 as _hash_fn


def make_vllm_config(model_dir: str, *, policy: str = "recompute", extra: dict | None = None,
                     engine_id: str | None = None, max_num_seqs: int = 8) -> VllmConfig:
    register()  # what the vllm.general_plugins entry point does in a served engine
    model = ModelConfig(model=model_dir, tokenizer=model_dir, dtype="bfloat16",
                        max_model_len=1024, seed=0, skip_tokenizer_init=True)
    cache = CacheConfig(block_size=BLOCK_SIZE, cache_dtype="auto", enable_prefix_caching=True)
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=1024, max_model_len=1024,
                            is_encoder_decoder=False)
    ktc = KVTransferConfig(kv_connector="UcxConnector", kv_role="kv_both",
                           engine_id=engine_id or f"eng-{next(_ids)}",
                           kv_connector_extra_config=extra or {},
                           kv_load_failure_policy=policy)
    return VllmConfig(model_config=model, cache_config=cache, scheduler_config=sched,
                      kv_transfer_config=ktc, device_config=DeviceConfig("cpu"))


def make_kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE,
                             dtype=torch.bfloat16)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def pattern(token_ids: list[int], layer: int) -> torch.Tensor:
    """Deterministic per-token bytes (what the 'forward' writes for a token at a layer)."""
    t = torch.tensor(token_ids, dtype=torch.int64)
    pos = torch.arange(len(token_ids), dtype=torch.int64)
    vals = (t * 131 + pos * 7 + layer * 17) % 251
    # one slot = 2 (K,V) x KV_HEADS x HEAD_SIZE bf16 values: fill them all with vals
    return vals.to(torch.bfloat16)[:, None].expand(len(token_ids), 2 * KV_HEADS * HEAD_SIZE)


@dataclass
class Engine:
    """One engine: vLLM scheduler + scheduler-side connector + one worker-side connector."""

    name: str
    config: VllmConfig
    scheduler: Scheduler
    worker: UcxConnector
    kv: dict[str, torch.Tensor]
    outputs: list[Any] = field(default_factory=list)
    next_token: int = 7

    @property
    def sched_conn(self) -> UcxConnector:
        return self.scheduler.connector

    def add(self, prompt: list[int], *, max_tokens: int, params: dict | None = None,
            rid: str | None = None) -> Request:
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args={"kv_transfer_params": params} if params else None)
        req = Request(rid or f"{self.name}-r{next(_ids)}", list(prompt), sp, None,
                      block_hasher=get_request_block_hasher(BLOCK_SIZE, _hash_fn))
        self.scheduler.add_request(req)
        return req

    def block_ids(self, rid: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(rid)[0])

    def read_tokens(self, block_ids: list[int], n_tokens: int, layer: int) -> torch.Tensor:
        """Slots [0, n_tokens) of the given blocks at one layer, as [n, 2*H*D]."""
        t = self.kv[f"model.layers.{layer}.self_attn.attn"]  # [2, NB, BS, H, D]
        ids = torch.tensor(block_ids, dtype=torch.int64)
        kv = t[:, ids].permute(1, 2, 0, 3, 4).reshape(len(block_ids) * BLOCK_SIZE, -1)
        return kv[:n_tokens]

    def _forward(self, so: Any) -> None:
        for rid, n in so.num_scheduled_tokens.items():
            req = self.scheduler.requests[rid]
            start = req.num_computed_tokens - n  # schedule() already advanced it
            toks = req.all_token_ids[:start + n]
            ids = self.block_ids(rid)
            for layer in range(LAYERS):
                t = self.kv[f"model.layers.{layer}.self_attn.attn"]
                vals = pattern(toks, layer)[start:start + n]
                for i, pos in enumerate(range(start, start + n)):
                    b, s = ids[pos // BLOCK_SIZE], pos % BLOCK_SIZE
                    t[:, b, s] = vals[i].reshape(2, KV_HEADS, HEAD_SIZE)

    def step(self, abort_mid_step: tuple[str, ...] = ()) -> dict[str, Any]:
        """One engine step; returns {request_id: EngineCoreOutput} emitted by it.

        abort_mid_step: requests the engine aborts after the step's forward ran and before its
        outputs are applied (an abort arriving while the step is in flight)."""
        so = self.scheduler.schedule()
        w = self.worker
        w.bind_connector_metadata(so.kv_connector_metadata)
        w.start_load_kv(None)
        self._forward(so)
        w.wait_for_save()
        if abort_mid_step:
            self.scheduler.finish_requests(list(abort_mid_step), RequestStatus.FINISHED_ABORTED)
        res = w.get_transfer_results(so.finished_req_ids)
        kv_out = KVConnectorOutput(
            finished_sending=res.finished_sending or None,
            finished_recving=res.finished_recving or None,
            failed_recving=res.failed_recving,
            invalid_block_ids=w.get_block_ids_with_load_errors(),
            kv_connector_stats=w.get_kv_connector_stats(),
            kv_connector_worker_meta=w.build_connector_worker_meta())
        w.clear_connector_metadata()
        req_ids = list(so.num_scheduled_tokens)
        sampled = []
        for rid in req_ids:
            req = self.scheduler.requests[rid]
            done_prompt = req.num_computed_tokens >= req.num_tokens
            sampled.append([self.next_token] if done_prompt else [])
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled, kv_connector_output=kv_out)
        eco = self.scheduler.update_from_output(so, mro)
        out = {}
        for client_outs in eco.values():
            for o in client_outs.outputs:
                out[o.request_id] = o
                self.outputs.append(o)
        self.last_stats = kv_out.kv_connector_stats
        return out

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()


def make_engine(name: str, model_dir: str, **kw: Any) -> Engine:
    init_none_hash(_hash_fn)
    cfg = make_vllm_config(model_dir, **kw)
    cfg.cache_config.num_gpu_blocks = NUM_BLOCKS
    kcc = make_kv_cache_config()
    worker = UcxConnector(cfg, KVConnectorRole.WORKER, kcc)
    kv = {f"model.layers.{i}.self_attn.attn":
          torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_SIZE, dtype=torch.bfloat16)
          for i in range(LAYERS)}
    worker.register_kv_caches(kv)
    sched = Scheduler(cfg, kcc, StructuredOutputManager(cfg), block_size=BLOCK_SIZE)
    hs = worker.get_handshake_metadata()
    sched.connector.set_xfer_handshake_metadata_pp_aware({(0, 0): hs})
    assert isinstance(hs, UcxHandshakeMetadata)
    return Engine(name, cfg, sched, worker, kv)


def run_until(engine: Engine, pred, max_steps: int = 200, sleep_s: float = 0.01) -> None:
    import time
    for _ in range(max_steps):
        if pred():
            return
        engine.step()
        time.sleep(sleep_s)
    raise TimeoutError(f"{engine.name}: condition not reached in {max_steps} steps")


# ---------------------------------------------------------------------------------------------
# One engine per OS process (as in production: one transport Agent per process).
# ---------------------------------------------------------------------------------------------
def _summary(o: Any) -> dict[str, Any]:
    ps = o.prefill_stats
    return {"request_id": o.request_id, "tokens": list(o.new_token_ids),
            "finish": o.finish_reason.name if o.finish_reason is not None else None,
            "params": dict(o.kv_transfer_params) if o.kv_transfer_params else None,
            "external": ps.num_external_cached_tokens if ps else None,
            "local": ps.num_local_cached_tokens if ps else None}


def _serve(conn: Any, name: str, model_dir: str, kw: dict) -> None:
    import logging
    import os
    logging.basicConfig(level=logging.WARNING)
    try:
        e = make_engine(name, model_dir, **kw)
        conn.send((True, None))
    except Exception as ex:  # noqa: BLE001
        conn.send((False, repr(ex)))
        return
    while True:
        op, args = conn.recv()
        try:
            if op == "add":
                prompt, max_tokens, params, rid = args
                val = e.add(prompt, max_tokens=max_tokens, params=params, rid=rid).request_id
            elif op == "step":
                outs = e.step()
                stats = e.last_stats.data if e.last_stats is not None else None
                val = ([_summary(o) for o in outs.values()], stats)
            elif op == "finish":
                e.scheduler.finish_requests(args[0], RequestStatus.FINISHED_ABORTED)
                val = None
            elif op == "free_blocks":
                val = e.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
            elif op == "requests":
                val = {rid: r.status.name for rid, r in e.scheduler.requests.items()}
            elif op == "read_tokens":
                rid, n, layer = args
                val = e.read_tokens(e.block_ids(rid), n, layer).float().numpy()
            elif op == "held":
                val = sorted(e.worker._worker.producer.held_ids)
            elif op == "step_abort":  # a step during which the engine aborts requests
                outs = e.step(abort_mid_step=tuple(args[0]))
                stats = e.last_stats.data if e.last_stats is not None else None
                val = ([_summary(o) for o in outs.values()], stats)
            elif op == "kill":
                os._exit(0)
            elif op == "close":
                e.close()
                conn.send((True, None))
                return
            else:
                raise ValueError(op)
            conn.send((True, val))
        except Exception as ex:  # noqa: BLE001
            import traceback
            conn.send((False, traceback.format_exc()))


class EngineProc:
    """Parent-side handle of an engine living in its own process."""

    def __init__(self, name: str, model_dir: str, **kw: Any):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, name, model_dir, kw), daemon=True)
        self.proc.start()
        ok, err = self._recv(120)
        if not ok:
            raise RuntimeError(f"engine {name} failed to start: {err}")
        self.outputs: list[dict] = []
        self.stats: list[dict] = []
        self._n = itertools.count()

    def _recv(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"engine {self.name} did not answer in {timeout}s")
        return self._conn.recv()

    def _call(self, op: str, *args: Any, timeout: float = 60.0) -> Any:
        self._conn.send((op, args))
        ok, val = self._recv(timeout)
        if not ok:
            raise RuntimeError(f"engine {self.name} {op} failed:\n{val}")
        return val

    def add(self, prompt: list[int], *, max_tokens: int, params: dict | None = None) -> str:
        return self._call("add", list(prompt), max_tokens, params, f"{self.name}-{next(self._n)}")

    def step(self) -> dict[str, dict]:
        outs, stats = self._call("step")
        self.outputs.extend(outs)
        if stats is not None:
            self.stats.append(stats)
        return {o["request_id"]: o for o in outs}

    def finish(self, rid: str) -> None:
        self._call("finish", rid)

    def free_blocks(self) -> int:
        return self._call("free_blocks")

    def requests(self) -> dict[str, str]:
        return self._call("requests")

    def read_tokens(self, rid: str, n: int, layer: int):
        return self._call("read_tokens", rid, n, layer)

    def held(self) -> list[str]:
        return self._call("held")

    def step_abort(self, rids: list[str]) -> dict[str, dict]:
        outs, stats = self._call("step_abort", list(rids))
        self.outputs.extend(outs)
        if stats is not None:
            self.stats.append(stats)
        return {o["request_id"]: o for o in outs}

    def outputs_of(self, rid: str) -> list[dict]:
        return [o for o in self.outputs if o["request_id"] == rid]

    def kill(self) -> None:
        self._conn.send(("kill", ()))
        self.proc.join(30)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self._call("close", timeout=30)
            except Exception:  # noqa: BLE001
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
