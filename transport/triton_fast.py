"""Launch a compiled Triton kernel again without Triton's per-call Python binding.

`kernel[grid](...)` binds and specializes every argument on every call (and asks the driver about
every tensor pointer), which costs tens of microseconds: a large share of a small GPU read. The
first launch of a variant goes through Triton as usual and keeps the compiled kernel it returns;
later launches of the same variant hand raw device addresses straight to that kernel's launcher.

A variant is everything Triton specializes on for our kernels: the constexpr values, the device,
and which pointer arguments are 16-byte aligned (Triton compiles alignment hints in). Pointer
arguments must all be tensors on the first launch and are passed as integers afterwards.
If this Triton's compiled-kernel interface differs (it is not a stable API), the first failure is
logged and every later launch takes Triton's normal path: slower, never wrong.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


def variant_key(device_index: int, ptrs: tuple[int, ...], consts: tuple, options: tuple = ()) -> tuple:
    """What the compiled code depends on (pure): device, constexprs, compile options (warps), and
    the 16-byte alignment of each pointer."""
    return (device_index, consts, options, tuple(p % 16 == 0 for p in ptrs))


class FastLauncher:
    """One per @triton.jit kernel whose arguments are `n_ptrs` pointers then constexprs."""

    def __init__(self, name: str):
        self.name = name
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.disabled: str | None = None   # why launches take Triton's normal path
        self.fast_launches = 0

    def launch(self, grid: tuple[int, int], device_index: int, stream: Any, ptrs: tuple[int, ...], consts: tuple,
               slow: Callable[[], Any], options: tuple = ()) -> None:
        """Launch on `stream` (a torch.cuda.Stream of device `device_index`, the current device).
        `slow()` launches through Triton (tensor arguments, inside a stream context) and returns
        what Triton returns (the compiled kernel). `options`: the compile options `slow` passes
        (part of the variant, not arguments)."""
        key = variant_key(device_index, ptrs, consts, options)
        ck = self._compiled.get(key) if self.disabled is None else None
        if ck is not None:
            try:
                ck[(grid[0], grid[1], 1)](*ptrs, *consts, stream=stream.cuda_stream)
                self.fast_launches += 1
                return
            except Exception as e:  # an interface change: say so once, then always Triton's path
                self.disabled = f"{type(e).__name__}: {e}"
                log.warning("direct launch of the compiled %s kernel failed (%s); using Triton's launch path",
                            self.name, self.disabled)
        compiled = slow()
        if self.disabled is None and compiled is not None and hasattr(compiled, "__getitem__"):
            with self._lock:
                self._compiled[key] = compiled
