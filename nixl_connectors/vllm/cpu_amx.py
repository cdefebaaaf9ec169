"""Ask Linux for permission to use AMX tiles in this process (x86-64 CPU workers).

vLLM's CPU attention picks its AMX kernel whenever the CPU has AMX tiles, but Linux grants a
process the AMX tile state only after `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`;
oneDNN asks lazily, on its first AMX matrix multiply. A decode instance whose first forward is
a one-token step over KV loaded by a connector runs vLLM's AMX attention before any oneDNN AMX
GEMM, and dies with SIGILL. Asking once when the KV caches are registered prevents that.
"""
from __future__ import annotations

import ctypes
import logging
import platform
import sys

logger = logging.getLogger(__name__)

SYS_ARCH_PRCTL = 158          # x86-64
ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def _xcomp(libc, op: int) -> int | None:
    value = ctypes.c_ulong(0)
    if libc.syscall(SYS_ARCH_PRCTL, op, ctypes.byref(value)) != 0:
        return None
    return value.value


def amx_permitted() -> bool:
    """Whether this process may use AMX tile data now."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        return False
    perm = _xcomp(ctypes.CDLL(None, use_errno=True), ARCH_GET_XCOMP_PERM)
    return perm is not None and bool(perm >> XFEATURE_XTILEDATA & 1)


def request_amx() -> bool:
    """Request AMX tile permission if the CPU and kernel support it; True when granted.
    Never raises: on other CPUs and systems it does nothing."""
    if not (sys.platform == "linux" and platform.machine() == "x86_64"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    supported = _xcomp(libc, ARCH_GET_XCOMP_SUPP)
    if supported is None or not supported >> XFEATURE_XTILEDATA & 1:
        return False
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
        logger.warning("AMX tile permission refused (errno %d); vLLM's AMX kernels may fail",
                       ctypes.get_errno())
        return False
    return amx_permitted()
