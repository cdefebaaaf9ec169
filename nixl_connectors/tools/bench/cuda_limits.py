"""One-process CUDA references for the GPU workloads (torch, imported lazily):

- ``contiguous_copy``: one contiguous device copy of the same bytes from the owner's device to
  the reader's (one GPU: device to device on cuda:0; two: a peer copy) - the limit;
- ``index_select_index_copy``: the same blocks gathered with ``index_select`` on the owner's
  device, copied to the reader's device when it is another one, and scattered with
  ``index_copy_``, one region (layer) after another - a named reference.

Timed with ``torch.cuda.synchronize`` of both devices around each rep, warm-up reps discarded.
(With CPU devices the same code runs on host tensors: how the tests exercise it.)
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from ..blockfill import fill_pool_torch
from .gpu_workloads import Devices
from .limits import CONTIGUOUS, INDEX_COPY, NAMES, Reference
from .timing import Timings
from .workloads import Measure, Workload

log = logging.getLogger(__name__)


def _sync(devices: Devices) -> None:
    import torch

    for dev in {devices.owner, devices.reader}:
        if dev.startswith("cuda"):
            torch.cuda.synchronize(dev)


def _timed(fn, devices: Devices, reps: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + reps):
        _sync(devices)
        t0 = time.perf_counter()
        fn(i)
        _sync(devices)
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def cuda_contiguous_copy(nbytes: int, devices: Devices, reps: int = 10, warmup: int = 2) -> Reference:
    import torch

    src = torch.full((nbytes,), 1, dtype=torch.uint8, device=devices.owner)
    dst = torch.zeros((nbytes,), dtype=torch.uint8, device=devices.reader)
    secs = _timed(lambda _: dst.copy_(src, non_blocking=True), devices, reps, warmup)
    if not bool(torch.equal(dst[:: max(1, nbytes // 4096)].cpu(), src[:: max(1, nbytes // 4096)].cpu())):
        raise RuntimeError("contiguous device copy did not copy")
    return Reference(CONTIGUOUS, Timings.of(secs, nbytes),
                     f"one contiguous tensor copy_ {devices.owner} -> {devices.reader}")


def cuda_index_copy(w: Workload, devices: Devices, reps: int = 10, warmup: int = 2, seed: int = 0) -> Reference:
    """Gather + (peer copy) + scatter of ``w``'s blocks, per layer, with torch ops."""
    import torch

    rng = np.random.default_rng(seed)
    same = w.measure is Measure.LATENCY
    bb, n, pool = w.block_bytes, w.num_blocks, w.pool_blocks
    src = [torch.empty((pool, bb), dtype=torch.uint8, device=devices.owner) for _ in range(w.num_layers)]
    for layer, s in enumerate(src):
        fill_pool_torch(s, bb, seed + layer)
    dst = [torch.zeros((pool, bb), dtype=torch.uint8, device=devices.reader) for _ in range(w.num_layers)]
    st0 = torch.empty((n, bb), dtype=torch.uint8, device=devices.owner)
    st1 = st0 if devices.owner == devices.reader else torch.empty((n, bb), dtype=torch.uint8, device=devices.reader)

    def ids(dev: str) -> Any:
        a = rng.permutation(pool)[:n] if w.scattered else np.arange(n)
        return torch.as_tensor(a, dtype=torch.int64, device=dev)

    sets = [(ids(devices.owner), ids(devices.reader)) for _ in range(1 if same else warmup + reps)]

    def copy(i: int) -> None:
        s_ids, d_ids = sets[0 if same else i]
        for s, d in zip(src, dst):
            torch.index_select(s, 0, s_ids, out=st0)
            if st1 is not st0:
                st1.copy_(st0, non_blocking=True)
            d.index_copy_(0, d_ids, st1)

    secs = _timed(copy, devices, reps, warmup)
    s_ids, d_ids = sets[-1]
    for s, d in zip(src, dst):
        if not bool(torch.equal(d.index_select(0, d_ids).cpu(), s.index_select(0, s_ids).cpu())):
            raise RuntimeError("index_select + index_copy_ reference moved wrong bytes")
    how = (f"index_select on {devices.owner}" + ("" if devices.one_gpu else f", copy_ to {devices.reader}")
           + f", index_copy_ on {devices.reader}" + (f"; {w.num_layers} regions one after another" if w.num_layers > 1 else ""))
    return Reference(INDEX_COPY, Timings.of(secs, w.nbytes), how)


def cuda_references(w: Workload, devices: Devices) -> dict[str, dict[str, Any]]:
    """Both references as JSON entries; each failure is reported in its entry, never raised."""
    import torch

    reps = w.reps if w.measure is Measure.LATENCY else max(10, w.reps)
    out: dict[str, dict[str, Any]] = {}
    jobs = {CONTIGUOUS: lambda: cuda_contiguous_copy(w.nbytes, devices, reps, max(2, w.warmup)),
            INDEX_COPY: lambda: cuda_index_copy(w, devices, reps, max(2, w.warmup))}
    for key, job in jobs.items():
        try:
            out[key] = job().to_json()
        except Exception as e:  # a failed reference must not stop the suite
            log.warning("CUDA reference %s failed on %s: %s", key, w.name, e)
            out[key] = {"name": NAMES[key], "error": f"{type(e).__name__}: {e}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return out
