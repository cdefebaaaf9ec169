"""Same-host fast path for host memory: one kernel copy (process_vm_readv / process_vm_writev)
between the owner's leased blocks and the initiator's blocks, with scatter/gather lists.

UCX's own shared-memory path moves one contiguous message at a time, so scattered blocks would
cost a pack, a copy and an unpack; cross-memory attach with iovecs does it in one copy. It needs
the two processes on one host, in one PID namespace, with ptrace permission (the same rule as
UCX's cma transport); any failure makes the caller fall back to the UCX path.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import logging
import os
import threading
import socket
import struct

import numpy as np

from .descs import Descs

log = logging.getLogger(__name__)

IOV_MAX = 1024


class CmaUnavailable(Exception):
    """The kernel refused cross-memory attach (permissions, namespaces, unsupported)."""


@functools.lru_cache(maxsize=1)
def host_key() -> str:
    """Identifies this host boot and PID namespace: equal keys mean CMA can work."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{ns}"


def _diag_inode(ours, theirs) -> int | None:
    """Inode of the socket at the other end of our TCP connection, looked up by its exact address
    pair through NETLINK_SOCK_DIAG (tens of microseconds; /proc/net/tcp walks the whole hash
    table, tens of milliseconds). None if it is not in our network namespace."""
    fam = socket.AF_INET6 if ":" in theirs[0] else socket.AF_INET

    def ip(a: str) -> bytes:
        b = socket.inet_pton(fam, a.split("%")[0])
        return b + b"\0" * (16 - len(b))

    sockid = (struct.pack(">HH", theirs[1], ours[1]) + ip(theirs[0]) + ip(ours[0])
              + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))        # any interface, no cookie
    req = struct.pack("=BBBBI", fam, socket.IPPROTO_TCP, 0, 0, 0xFFF) + sockid
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.settimeout(1.0)
        nl.send(struct.pack("=IHHII", 16 + len(req), 20, 1, 1, 0) + req)  # SOCK_DIAG_BY_FAMILY, REQUEST
        data = nl.recv(4096)
    if len(data) < 16 + 72 or struct.unpack_from("=H", data, 4)[0] != 20:
        return None
    return struct.unpack_from("=I", data, 16 + 68)[0]                    # inet_diag_msg.idiag_inode


def _proc_inodes(pid: int, ours, theirs) -> set[int]:
    """The same from the peer's own /proc/<pid>/net/tcp{,6} (another network namespace)."""
    def forms(addr) -> set[str]:
        port = "%04X" % addr[1]
        out = set()
        try:
            packed = socket.inet_pton(socket.AF_INET, addr[0])
            out.add(packed[::-1].hex().upper() + ":" + port)
            packed6 = b"\0" * 10 + b"\xff\xff" + packed
        except OSError:
            packed6 = socket.inet_pton(socket.AF_INET6, addr[0].split("%")[0])
        out.add("".join(packed6[i:i + 4][::-1].hex().upper() for i in range(0, 16, 4)) + ":" + port)
        return out

    local, remote, found = forms(theirs), forms(ours), set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in f.read().splitlines()[1:]:
                    fields = line.split()
                    if len(fields) > 9 and fields[1] in local and fields[2] in remote:
                        found.add(int(fields[9]))
        except OSError:
            continue
    return found


def pid_holds_connection(pid: int, ours, theirs) -> bool:
    """Does process `pid` hold the other end of our TCP connection (`ours`: our socket's address,
    `theirs`: the peer's)? A peer's pid is only its claim, and the same-host copy runs with OUR
    ptrace rights against that pid: it is used only with a peer that passes this check (the
    /proc reads need the rights process_vm_readv needs anyway)."""
    try:
        inode = _diag_inode(ours, theirs)
        inodes = {inode} if inode else _proc_inodes(pid, ours, theirs)
        fds = sorted((int(fd) for fd in os.listdir(f"/proc/{pid}/fd")), reverse=True)  # newest first
    except (OSError, TypeError, ValueError, IndexError, struct.error):
        return False
    want = {f"socket:[{i}]" for i in inodes if i}
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in want:
                return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=2)
def _syscall(name: str):
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, name)
    fn.restype = ctypes.c_ssize_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                   ctypes.c_ulong]
    return fn


MAX_IOV_LEN = 1 << 47  # no single range of a real process is larger; keeps sums far from overflow


def parse_remote(iov: bytes, nbytes: int) -> np.ndarray:
    """The owner's (address, length) list, checked: whole pairs, positive lengths that sum
    (exactly, without wrapping) to `nbytes`. Raises ValueError."""
    if len(iov) % 16 or not iov:
        raise ValueError("iovec list is not a whole, non-empty number of (address, length) pairs")
    remote = np.frombuffer(iov, dtype="<u8").reshape(-1, 2)
    lens = remote[:, 1]
    if len(lens) == 1:
        if int(lens[0]) != nbytes or int(remote[0, 0]) > (1 << 64) - 1 - nbytes or nbytes == 0:
            raise ValueError("the owner's iovec does not match the transfer size")
        return remote
    if int((lens - np.uint64(1)).max()) >= MAX_IOV_LEN:  # a zero length wraps to 2**64-1
        raise ValueError("iovec lengths must be in [1, 2**47]")
    # up to 2**16 lengths of at most 2**47 cannot wrap a uint64 sum; beyond that, sum exactly
    total = int(lens.sum()) if len(lens) <= 1 << 16 else sum(int(x) for x in np.add.reduceat(
        lens, np.arange(0, len(lens), 1 << 16)))
    if total != nbytes:
        raise ValueError("the owner's iovecs do not add up to the transfer size")
    if np.any(remote[:, 0] > np.uint64((1 << 64) - 1) - lens):
        raise ValueError("an iovec wraps around the address space")
    return remote


def iovecs(descs: Descs) -> np.ndarray:
    """[n, 2] uint64 (address, length) of the coalesced host descriptors."""
    d = descs.coalesced()
    out = np.empty((len(d), 2), dtype=np.uint64)
    if len(d.regions) == 1:
        out[:, 0] = d.offset
        out[:, 0] += np.uint64(d.regions[0].flat.data_ptr())
    else:
        bases = np.array([r.flat.data_ptr() for r in d.regions], dtype=np.uint64)
        out[:, 0] = bases[d.region_idx] + d.offset.astype(np.uint64)
    out[:, 1] = d.length
    return out


def split_batches(local: np.ndarray, remote: np.ndarray, max_iov: int = IOV_MAX,
                  max_bytes: int = 64 << 20) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut two iovec lists of equal total length into aligned batches of at most `max_iov`
    entries each (entries split at batch edges), so each batch is one syscall (pure). The
    kernel walks both lists itself, so lists that fit one call stay whole (the common case)."""
    total = int(local[:, 1].sum())
    if total != int(remote[:, 1].sum()):
        raise ValueError("local and remote iovecs differ in total length")
    if len(local) <= max_iov and len(remote) <= max_iov and total <= max_bytes:
        return [(np.ascontiguousarray(local), np.ascontiguousarray(remote))]
    # Every byte position where either list has a boundary, plus batch limits.
    lc = np.concatenate(([0], np.cumsum(local[:, 1], dtype=np.uint64)))
    rc = np.concatenate(([0], np.cumsum(remote[:, 1], dtype=np.uint64)))
    total = int(lc[-1])
    batches = []
    pos, li, ri = 0, 0, 0
    while pos < total:
        # Largest end such that both sides use <= max_iov entries and <= max_bytes.
        l_end = int(lc[min(li + max_iov, len(local))])
        r_end = int(rc[min(ri + max_iov, len(remote))])
        end = min(l_end, r_end, pos + max_bytes, total)
        batches.append((_slice(local, lc, li, pos, end), _slice(remote, rc, ri, pos, end)))
        pos = end
        li = int(np.searchsorted(lc, pos, side="right")) - 1
        ri = int(np.searchsorted(rc, pos, side="right")) - 1
    return batches


def _slice(iov: np.ndarray, cum: np.ndarray, first: int, pos: int, end: int) -> np.ndarray:
    last = int(np.searchsorted(cum, end, side="left"))  # entries first..last-1 overlap [pos, end)
    part = iov[first:last].copy()
    part[0, 0] += np.uint64(pos - int(cum[first]))
    part[0, 1] -= np.uint64(pos - int(cum[first]))
    over = int(cum[last]) - end
    part[-1, 1] -= np.uint64(over)
    return part


class PeerGone(OSError):
    """The other process exited (ESRCH) or its memory is not there any more (EFAULT)."""


def copy_batch(pid: int, local: np.ndarray, remote: np.ndarray, write: bool) -> None:
    """One syscall: remote -> local (read) or local -> remote (write)."""
    name = "process_vm_writev" if write else "process_vm_readv"
    want = int(local[:, 1].sum())
    got = _syscall(name)(pid, local.ctypes.data, len(local), remote.ctypes.data, len(remote), 0)
    if got < 0:
        e = ctypes.get_errno()
        if e in (errno.EPERM, errno.ENOSYS, errno.EACCES):
            raise CmaUnavailable(f"{name}: {os.strerror(e)}")
        if e == errno.ESRCH:
            raise PeerGone(e, f"{name}: the peer process is gone")
        raise PeerGone(e, f"{name}: {os.strerror(e)}")
    if got != want:
        raise PeerGone(errno.EFAULT, f"{name} copied {got} of {want} bytes")


def plan_batches(local: Descs, remote_iov: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    return split_batches(iovecs(local), remote_iov)


def copy_all(pid: int, batches: list[tuple[np.ndarray, np.ndarray]], write: bool) -> None:
    """Every batch, on the calling thread (small transfers: no thread hand-off)."""
    for lo, re in batches:
        copy_batch(pid, lo, re, write)


_word_bufs = threading.local()


def read_word(pid: int, address: int) -> int:
    """One little-endian int64 at `address` in process `pid` (a lease grant's word)."""
    w = getattr(_word_bufs, "w", None)
    if w is None:  # per thread: the value, and the two one-entry iovec lists
        buf = np.zeros(1, dtype="<i8")
        w = _word_bufs.w = (buf, np.array([[buf.ctypes.data, 8]], dtype=np.uint64), np.zeros((1, 2), np.uint64))
    buf, local, remote = w
    remote[0, 0], remote[0, 1] = address, 8
    got = _syscall("process_vm_readv")(pid, local.ctypes.data, 1, remote.ctypes.data, 1, 0)
    if got != 8:
        e = ctypes.get_errno() if got < 0 else errno.EFAULT
        if e in (errno.EPERM, errno.ENOSYS, errno.EACCES):
            raise CmaUnavailable(f"process_vm_readv: {os.strerror(e)}")
        raise PeerGone(e, f"process_vm_readv of a grant word: {os.strerror(e)}")
    return int(buf[0])
