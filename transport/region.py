"""Registered memory: a flat byte view over a torch tensor or numpy array."""
from __future__ import annotations

import itertools
import functools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch

_ids = itertools.count(1)


class MemoryKind(str, Enum):
    HOST = "host"
    CUDA = "cuda"


@dataclass(eq=False)
class Region:
    """A registered, contiguous range of memory, addressed by byte offset.

    `flat` is a 1-D uint8 torch tensor aliasing the registered memory (no copy); `owner_obj`
    keeps the registered object alive for as long as the region is.
    """

    flat: torch.Tensor
    kind: MemoryKind
    device_index: int | None
    owner_obj: Any = field(repr=False, default=None)
    uid: int = field(default_factory=lambda: next(_ids))

    @property
    def nbytes(self) -> int:
        return int(self.flat.numel())

    @functools.cached_property
    def ptr(self) -> int:
        """Address of the region's first byte (fixed for its life: it keeps its memory alive)."""
        return int(self.flat.data_ptr())

    @functools.cached_property
    def device(self) -> torch.device:
        """(Fixed for its life, as `ptr`; asked on every transfer.)"""
        return self.flat.device

    def view(self, offset: int, length: int) -> torch.Tensor:
        """Byte view [offset, offset+length) of the region (no copy)."""
        if offset < 0 or length < 0 or offset + length > self.nbytes:
            raise ValueError(f"range [{offset}, {offset + length}) outside region of {self.nbytes} bytes")
        return self.flat.narrow(0, offset, length)


def _flat_bytes_of_tensor(t: torch.Tensor, whole_storage: bool) -> torch.Tensor:
    if whole_storage:
        storage = t.untyped_storage()
        return torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
    if not t.is_contiguous():
        raise ValueError("register() needs a contiguous tensor; pass whole_storage=True to register "
                         "its whole storage and address blocks by storage byte offset")
    return t.reshape(-1).view(torch.uint8)


def make_region(obj: Any, whole_storage: bool = False) -> Region:
    """Wrap a torch tensor (cpu or cuda), a numpy array, or an object exposing
    `__cuda_array_interface__` (through torch.as_tensor) as a Region."""
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise ValueError("register() needs a C-contiguous numpy array")
        if not obj.flags.writeable:
            raise ValueError("register() needs a writable numpy array")
        flat = torch.from_numpy(obj.reshape(-1).view(np.uint8))
        return Region(flat=flat, kind=MemoryKind.HOST, device_index=None, owner_obj=obj)
    if not isinstance(obj, torch.Tensor):
        if hasattr(obj, "__cuda_array_interface__"):
            obj = torch.as_tensor(obj, device="cuda")
        else:
            raise TypeError(f"cannot register {type(obj).__name__}: expected a torch tensor or numpy array")
    flat = _flat_bytes_of_tensor(obj, whole_storage)
    if obj.device.type == "cuda":
        return Region(flat=flat, kind=MemoryKind.CUDA, device_index=obj.device.index, owner_obj=obj)
    if obj.device.type != "cpu":
        raise ValueError(f"unsupported device {obj.device}")
    return Region(flat=flat, kind=MemoryKind.HOST, device_index=None, owner_obj=obj)
