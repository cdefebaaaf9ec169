"""Helpers of the TensorRT-LLM adapter's unit tests (in-memory agents, no processes)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from fake_agent import ImmediateExecutor

from trtllm_standin import install

API = install.ensure()

from nixl_connectors.trtllm.config import ConnectorSettings  # noqa: E402
from nixl_connectors.trtllm.scheduler import UcxKvConnectorScheduler  # noqa: E402
from nixl_connectors.trtllm.worker import UcxKvConnectorWorker  # noqa: E402

TPB = 4


def llm_args(tp: int = 1, **kv):
    kv_cfg = dict(tokens_per_block=TPB, enable_block_reuse=True)
    kv_cfg.update(kv)
    return SimpleNamespace(tensor_parallel_size=tp, model="m",
                           kv_cache_config=SimpleNamespace(**kv_cfg))


def settings(**kw) -> ConnectorSettings:
    return ConnectorSettings.from_mapping(kw)


def make_worker(args, cfg: ConnectorSettings, num_blocks: int = 16, per_block: int = 2 * 8 * TPB,
                fill: float = 0.0) -> UcxKvConnectorWorker:
    w = UcxKvConnectorWorker(args, cfg)
    pool = torch.full((num_blocks, 2, 2, per_block), fill, dtype=torch.float16)
    w.register_kv_caches(pool)
    w.pool = pool
    if w._gen is not None:   # pulls start and finish on the calling thread: deterministic
        w._gen._consumer._pool = ImmediateExecutor()
    return w


def make_scheduler(args, cfg: ConnectorSettings) -> UcxKvConnectorScheduler:
    return UcxKvConnectorScheduler(args, cfg)


def scheduler_output(new=(), cached=()):
    return API.SchedulerOutput(list(new), list(cached))


def request_data(rid, blocks, pos=0, n=4):
    return API.RequestData(rid, [], list(blocks), pos, n)
