"""The CUDA stream/event contract between an engine and the transport.

The transport never runs on the engine's streams. For CUDA regions, packing
(`index_select` into a staging slot) and unpacking (`index_copy_` out of it) run on one side
stream per agent and device (`Agent._stream`), called from the agent's worker threads; each
pack/unpack is followed by a synchronisation of that side stream before UCX touches the
staging slot (UCX's cuda_ipc / cuda_copy transports use their own streams and complete a
request only when their copy has finished). Zero-copy chunks (a chunk lying in one contiguous
run) are handed to UCX directly after the device's current stream in the worker thread (the
default stream) has been synchronised.

What the engine (adapter) must do:

Owner (exposes blocks, e.g. the prefill worker)
    The blocks' bytes must be *complete in device memory* before `Agent.expose()` is called:
    the side stream does not wait on the engine's compute stream (the transport cannot know
    which stream wrote the blocks). Either synchronise the stream(s) that wrote the KV cache
    (`torch.cuda.current_stream(dev).synchronize()` after the forward pass, or
    `wait_for_engine_writes()` below), or record an event after the last write and wait for
    it before exposing (`record_ready()` / `ready.synchronize()`). vLLM's worker-side
    `wait_for_save()` and TensorRT-LLM's `wait_for_save(stream)` are the natural places.
    The owner must not overwrite or free leased blocks until the lease appears in
    `freed_leases()` (released or expired and no transfer touching it any more).

Reader (reads into its blocks, e.g. the decode worker)
    The destination blocks are safe to use once the Transfer has completed successfully
    (`t.wait()` returned, or `await t`): every chunk's unpack was synchronised on the side
    stream before the transfer finished, and zero-copy chunks were written by UCX whose
    requests completed. Work the engine launches afterwards, on any stream, sees the bytes.
    Until then the engine must not read the blocks, nor write them (a failed or cancelled
    transfer may have written part of them: treat them as garbage and recompute).
    The reader's blocks must not be in use by the engine's streams when the read starts
    (they are normally freshly allocated blocks).

Writer (pushes into a writable lease)
    Same as the owner for its local source blocks: complete before `write()` is called. On
    the peer, the written blocks are safe once it has received the WRITE notification (the
    owner confirms only after its unpack was synchronised).
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
