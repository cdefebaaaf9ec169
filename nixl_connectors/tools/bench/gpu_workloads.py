"""CUDA workloads of `nixl-connectors bench --suite cuda` and which GPU each process uses.
Pure data, no CUDA at import.

One GPU (the lent machine): owner and reader are two processes on cuda:0, and the same-host
path is CUDA IPC within one device. Two or more GPUs visible: owner on cuda:0, reader on
cuda:1 (peer access over NVLink/PCIe). ``NIXL_CONNECTORS_BENCH_ONE_GPU=1`` or ``--one-gpu``
forces the one-GPU layout on a bigger machine.

(a) 16,384 random 32 KiB blocks of a 65,536-block pool (512 MiB): what per-block transfers are
    slow at;
(b) 1 GiB contiguous;
(c) one small request, 64 x 32 KiB: latency of ``read()`` to ``wait()`` (control round trip
    included), median and p90;
(d) one vLLM-shaped request of an 8B model (Llama-3-8B-like: 32 layers, 8 KV heads x head size
    128, block 16 tokens, bf16) with a 4K-token prompt: 256 blocks per layer, one region per layer
    of [num_blocks, 8, 16, 256] bf16 (K|V packed), 64 KiB per block and layer, 512 MiB per
    request; its median time is what the hand-off adds to time-to-first-token.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .workloads import Measure, Memory, Workload

ONE_GPU_ENV = "NIXL_CONNECTORS_BENCH_ONE_GPU"

SCATTERED_32K = Workload("cuda-scattered-32k-x16384", 32 << 10, 16384, memory=Memory.CUDA, pool_factor=4)
CONTIGUOUS_1G = Workload("cuda-contiguous-1g", 1 << 20, 1024, scattered=False, memory=Memory.CUDA,
                         pool_factor=1)
SMALL_64 = Workload("cuda-small-request-32k-x64", 32 << 10, 64, memory=Memory.CUDA, pool_factor=1024,
                    reps=200, warmup=20, measure=Measure.LATENCY)
VLLM_8B_4K = Workload("cuda-vllm-8b-4k-prompt", 8 * 16 * 256 * 2, 4096 // 16, memory=Memory.CUDA,
                      pool_factor=4, num_layers=32, kv_shape=(8, 16, 256), reps=10, warmup=2)

CUDA_SWEEP = [SCATTERED_32K, CONTIGUOUS_1G, SMALL_64, VLLM_8B_4K]
TTFT_WORKLOADS = frozenset({VLLM_8B_4K.name})  # also reported as ms added to time-to-first-token


@dataclass(frozen=True)
class Devices:
    """Devices of the owner and the reader process ("cpu", "cuda:0", ...)."""

    owner: str = "cpu"
    reader: str = "cpu"

    @property
    def one_gpu(self) -> bool:
        return self.owner == self.reader and self.owner.startswith("cuda")

    @property
    def owner_index(self) -> int:
        return _index(self.owner)

    @property
    def reader_index(self) -> int:
        return _index(self.reader)

    def to_json(self) -> dict:
        return {"owner": self.owner, "reader": self.reader, "one_gpu": self.one_gpu}


def _index(dev: str) -> int:
    return int(dev.split(":", 1)[1]) if ":" in dev else 0


def one_gpu_forced(flag: bool = False, env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return flag or env.get(ONE_GPU_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def gpu_devices(device_count: int, force_one_gpu: bool = False) -> Devices:
    """Owner on cuda:0; reader on cuda:1 when two GPUs are visible and one-GPU mode is not forced."""
    if device_count < 1:
        raise ValueError("no CUDA device visible")
    if device_count >= 2 and not force_one_gpu:
        return Devices("cuda:0", "cuda:1")
    return Devices("cuda:0", "cuda:0")


def detect_gpu_devices(force_one_gpu: bool = False) -> Devices:
    import torch

    return gpu_devices(torch.cuda.device_count() if torch.cuda.is_available() else 0,
                       one_gpu_forced(force_one_gpu))
