"""Child-process side of the doctor's same-host copy probe.

``python -m nixl_connectors.tools.doctor_cma_probe hold``: keep a 4 KiB buffer of known bytes,
print ``{"pid", "addr", "len"}`` as one JSON line, and wait until stdin closes (at most 60 s).

``python -m nixl_connectors.tools.doctor_cma_probe read PID ADDR LEN``: read that buffer with
``process_vm_readv`` and print ``{"ok", "errno", "error"}``.

The doctor starts both as children of itself, so neither is the other's ancestor: the same
relation as a prefill and a decode process started by a launcher (under Yama ptrace_scope 1 a
parent could read its child and the probe would say yes where the deployment says no).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import sys

PROBE_LEN = 4096
HOLD_MAX_S = 60.0


def expected_bytes(n: int = PROBE_LEN) -> bytes:
    return bytes(i * 7 % 251 for i in range(n))


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def read_remote(pid: int, addr: int, length: int) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.process_vm_readv
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    buf = ctypes.create_string_buffer(length)
    local = _Iovec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = _Iovec(ctypes.c_void_p(addr), length)
    n = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n < 0:
        e = ctypes.get_errno()
        return {"ok": False, "errno": errno.errorcode.get(e, str(e)), "error": os.strerror(e)}
    if n != length or buf.raw[:length] != expected_bytes(length):
        return {"ok": False, "errno": None, "error": f"read {n} bytes that do not match the holder's"}
    return {"ok": True, "errno": None, "error": None}


def hold() -> int:
    buf = ctypes.create_string_buffer(expected_bytes(), PROBE_LEN)
    line = json.dumps({"pid": os.getpid(), "addr": ctypes.addressof(buf), "len": PROBE_LEN}) + "\n"
    os.write(1, line.encode())
    select.select([0], [], [], HOLD_MAX_S)  # until the doctor closes our stdin (or the deadline)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["hold"]:
        return hold()
    if len(argv) == 4 and argv[0] == "read":
        res = read_remote(int(argv[1]), int(argv[2]), int(argv[3]))
        print(json.dumps(res), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
