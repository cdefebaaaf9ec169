"""GPU workloads of issue 4 (`nixl-connectors bench --suite cuda`): owner on cuda:0, reader on
cuda:1, two processes, data over UCX (cuda_ipc on NVLink). Pure data, no CUDA at import.

(a) 16,384 random 32 KiB blocks (512 MiB), the case per-block transfers are slow at;
(b) 1 GiB contiguous (zero-copy path; compare with ucx_perftest put bandwidth);
(c) one small request, 64 x 32 KiB (latency);
(d) one vLLM-shaped request of an 8B model (Llama-3-8B-like: 32 layers, 8 KV heads x head
    size 128, block 16 tokens, bf16) with a 4K-token prompt: 256 blocks per layer, one region
    per layer of [num_blocks, 8, 16, 256] bf16 (K|V packed), 64 KiB per block and layer,
    512 MiB per request. Its time is what the transfer adds to time-to-first-token.
"""
from __future__ import annotations

from dataclasses import dataclass

from .workloads import Memory, Workload


@dataclass(frozen=True)
class LayeredWorkload(Workload):
    """A request's blocks in each of `num_layers` per-layer pools (one region per layer); the
    same block ids in every layer, as a paged KV cache has them."""

    num_layers: int = 1
    kv_shape: tuple[int, ...] | None = None  # per-block bf16 shape of one layer

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.num_blocks * self.num_layers


SCATTERED_32K = Workload("cuda-scattered-32k-x16384", 32 << 10, 16384, memory=Memory.CUDA)
CONTIGUOUS_1G = Workload("cuda-contiguous-1g", 1 << 20, 1024, scattered=False, memory=Memory.CUDA,
                         pool_factor=1)
SMALL_64 = Workload("cuda-small-request-32k-x64", 32 << 10, 64, memory=Memory.CUDA, reps=20)
VLLM_8B_4K = LayeredWorkload("cuda-vllm-8b-4k-prompt", 2 * 8 * 16 * 128 * 2, 4096 // 16,
                             memory=Memory.CUDA, pool_factor=4, num_layers=32, kv_shape=(8, 16, 256))

CUDA_SWEEP = [SCATTERED_32K, CONTIGUOUS_1G, SMALL_64, VLLM_8B_4K]

# chunk size of the pipelined data path for CUDA runs (ours.run_ours): measured on 2 x H200,
# 16,384 x 32 KiB: 8 MiB 16.6 GB/s, 32 MiB 43 GB/s, 128 MiB 65 GB/s (docs/gpu-notes.md)
CUDA_CHUNK_BYTES = 128 << 20
