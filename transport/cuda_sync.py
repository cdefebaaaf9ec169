"""The CUDA stream/event contract between an engine and the transport.

The transport never runs on the engine's streams. On one host the initiator's fused copy kernel
(transport/gpu_copy.py, gpu_runs.py) runs on one side stream per agent and device, reading (or,
for writes, writing) the owner's memory through CUDA IPC mappings; the transfer completes only
after an event recorded behind that kernel has completed. On the UCX fallback, packing and
unpacking run on the same side stream and are synchronised before UCX touches a staging slot.

What the engine (adapter) must do:

Owner (exposes blocks, e.g. the prefill worker)
    The blocks' bytes must be *complete in device memory* before `Agent.expose()` is called:
    the reader's kernel does not wait on the owner's compute stream (no process can know which
    stream of another process wrote the blocks). Synchronise the stream(s) that wrote the KV
    cache (`wait_for_engine_writes()` below), or record an event after the last write and wait
    for it before exposing (`record_ready()` / `ready.synchronize()`). vLLM's worker-side
    `wait_for_save()` and TensorRT-LLM's `wait_for_save(stream)` are the natural places.
    The owner must not overwrite or free leased blocks until the lease appears in
    `freed_leases()` (released or expired, and no transfer touching it any more: a reader's
    kernel that may still run keeps the lease held until its XFER_DONE or the hold time).

Reader (reads into its blocks, e.g. the decode worker)
    The destination blocks are safe to use once the Transfer has completed successfully
    (`t.wait()` returned, or `await t`): the kernel's completion event was synchronised before
    the transfer finished. Work the engine launches afterwards, on any stream, sees the bytes.
    Until then the engine must not read the blocks, nor write them (a failed or cancelled
    transfer may have written part of them: treat them as garbage and recompute). The reader's
    blocks must not be in use by the engine's streams when the read starts.

Writer (pushes into a writable lease)
    Same as the owner for its local source blocks: complete before `write()` is called. On
    the owner, the written blocks are safe once its notification for the write has arrived
    (sent after the writer's kernel completed).
"""
from __future__ import annotations

from typing import Any


def wait_for_engine_writes(device: Any = None, stream: Any = None) -> None:
    """Block until the engine's writes on `stream` (default: the device's current stream)
    are complete: call before `expose()` / `write()` of blocks on that device."""
    import torch

    s = stream if stream is not None else torch.cuda.current_stream(device)
    s.synchronize()


def record_ready(stream: Any = None, device: Any = None) -> Any:
    """Record an event after the engine's last write on `stream`; call `.synchronize()` on it
    (any thread) before exposing the blocks. Cheaper than a stream sync when the event is
    recorded early and waited for later."""
    import torch

    s = stream if stream is not None else torch.cuda.current_stream(device)
    ev = torch.cuda.Event()
    ev.record(s)
    return ev
