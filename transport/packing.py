"""Pack / unpack one chunk between regions and a staging buffer with torch index ops.

The UCX path's staging step. Runs in worker threads (torch releases the GIL); for CUDA regions
the caller runs it on the agent's side stream and synchronises that stream before UCX touches
the staging slot (datapath.py).
"""
from __future__ import annotations

import torch

from .descs import Descs
from .plan import ChunkPlan


def _rows(region_flat: torch.Tensor, unit: int) -> torch.Tensor:
    n = region_flat.numel() // unit
    return region_flat.narrow(0, 0, n * unit).view(n, unit)


def _index(seg_index, device: torch.device) -> torch.Tensor:
    idx = torch.from_numpy(seg_index)
    return idx.to(device, non_blocking=True) if device.type != "cpu" else idx


def pack(descs: Descs, unit: int, plan: ChunkPlan, staging: torch.Tensor) -> torch.Tensor:
    """Gather the chunk's units into `staging` (uint8, >= plan.nbytes); returns the used view."""
    out = staging.narrow(0, 0, plan.nbytes)
    rows_out = out.view(-1, unit)
    for seg in plan.segments:
        src = _rows(descs.regions[seg.region].flat, unit)
        dst = rows_out.narrow(0, seg.stage_start, len(seg.index))
        torch.index_select(src, 0, _index(seg.index, src.device), out=dst)
    return out


def unpack(descs: Descs, unit: int, plan: ChunkPlan, staging: torch.Tensor) -> None:
    """Scatter the chunk's units from `staging` into the regions."""
    rows_in = staging.narrow(0, 0, plan.nbytes).view(-1, unit)
    for seg in plan.segments:
        dst = _rows(descs.regions[seg.region].flat, unit)
        src = rows_in.narrow(0, seg.stage_start, len(seg.index))
        if dst.device.type == "cpu":
            # numpy's fancy-index assignment is a tight memcpy loop: ~10x torch's CPU index_copy_
            dst.numpy()[seg.index] = src.numpy()
        else:
            dst.index_copy_(0, _index(seg.index, dst.device), src)


def contiguous_view(descs: Descs, plan: ChunkPlan) -> torch.Tensor:
    region, off, n = plan.contiguous  # type: ignore[misc]
    return descs.regions[region].view(off, n)
