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

On a Triton whose launcher this module knows (`RAW_LAUNCH_VERSIONS`), a launch goes one step
further: straight to the compiled C launcher (`CudaLauncher.launch`: argument parsing and
cuLaunchKernelEx), without `CompiledKernel.__getitem__`'s closure, its launch-metadata dict and
the two launch-hook calls Triton makes even when no hook is set, and only for kernels that need
no scratch memory. Anything else, or a raw launch that raises (arguments are parsed before the
launch, so nothing was launched), takes the compiled kernel's own launch path.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

# Triton releases whose CudaLauncher.launch takes (gridX, gridY, gridZ, stream, function,
# cooperative, pdl, global scratch, profile scratch, packed metadata, launch metadata, enter hook,
# exit hook, *kernel arguments) (read in triton/backends/nvidia/driver.py of those releases).
RAW_LAUNCH_VERSIONS = ("3.6.",)


def variant_key(device_index: int, ptrs: tuple[int, ...], consts: tuple, options: tuple = ()) -> tuple:
    """What the compiled code depends on (pure): device, constexprs, compile options (warps), and
    the 16-byte alignment of each pointer."""
    return (device_index, consts, options, tuple([p & 15 == 0 for p in ptrs]))


class FastLauncher:
    """One per @triton.jit kernel whose arguments are `n_ptrs` pointers then constexprs."""

    def __init__(self, name: str):
        self.name = name
        self._compiled: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.disabled: str | None = None   # why launches take Triton's normal path
        self.raw_disabled: str | None = None   # why launches skip the raw C launcher
        self.fast_launches = 0   # through the compiled kernel's own launch path
        self.raw_launches = 0    # straight to its C launcher

    def launch(self, grid: tuple[int, int], device_index: int, stream: Any, ptrs: tuple[int, ...], consts: tuple,
               slow: Callable[[], Any], options: tuple = ()) -> None:
        """Launch on `stream` (a torch.cuda.Stream of device `device_index`, the current device).
        `slow()` launches through Triton (tensor arguments, inside a stream context) and returns
        what Triton returns (the compiled kernel). `options`: the compile options `slow` passes
        (part of the variant, not arguments)."""
        key = variant_key(device_index, ptrs, consts, options)
        entry = self._compiled.get(key) if self.disabled is None else None
        if entry is not None:
            ck, raw = entry
            if raw is not None and self.raw_disabled is None:
                try:
                    raw(grid[0], grid[1], stream.cuda_stream, ptrs + consts)
                    self.raw_launches += 1
                    return
                except Exception as e:  # parsed before launching: nothing ran; the compiled path next
                    self.raw_disabled = f"{type(e).__name__}: {e}"
                    log.warning("raw launch of the compiled %s kernel failed (%s); using its own launch path",
                                self.name, self.raw_disabled)
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
                self._compiled[key] = (compiled, raw_launcher(compiled))


def _triton_version() -> str:
    try:
        import triton
    except Exception:
        return ""
    return str(getattr(triton, "__version__", ""))


def raw_launcher(ck: Any, version: str | None = None) -> Callable[[int, int, int, tuple], None] | None:
    """`go(grid_x, grid_y, stream_handle, args)` launching compiled kernel `ck` through its C
    launcher directly, or None where that is not known to be right: another Triton release, not
    the CUDA launcher, scratch memory needed, clusters, or anything missing."""
    v = _triton_version() if version is None else version
    if not v.startswith(RAW_LAUNCH_VERSIONS):
        return None
    try:
        run = ck.run
        launch = run.launch
        if (type(run).__name__ != "CudaLauncher" or run.global_scratch_size or run.profile_scratch_size
                or getattr(run, "num_ctas", 1) != 1):
            return None
        function, meta = ck.function, ck.packed_metadata
        coop, pdl = bool(run.launch_cooperative_grid), bool(run.launch_pdl)
    except Exception:
        return None
    if not isinstance(function, int) or not callable(launch):
        return None

    def go(gx: int, gy: int, stream: int, args: tuple) -> None:
        launch(gx, gy, 1, stream, function, coop, pdl, None, None, meta, None, None, None, *args)
    return go
