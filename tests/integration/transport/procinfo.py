"""What the kernel says about a process: CPU time of all its threads, RSS, open file
descriptors, listening TCP sockets (from /proc, no tools needed)."""
from __future__ import annotations

import os
import socket
import struct
import time


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of `pid`, in clock ticks."""
    total = 0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def busy_cores(pids, secs: float = 5.0) -> dict[int, float]:
    """CPU cores each process kept busy over the same `secs`-second window."""
    pids = list(pids)
    before = {p: cpu_ticks(p) for p in pids}
    time.sleep(secs)
    hz = os.sysconf("SC_CLK_TCK")
    return {p: (cpu_ticks(p) - before[p]) / hz / secs for p in pids}


def status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mib(pid: int) -> float:
    return status_kb(pid, "VmRSS") / 1024.0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def _addr(hexaddr: str, v6: bool) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:
        raw = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw), int(port, 16)
    return socket.inet_ntop(socket.AF_INET, raw[::-1]), int(port, 16)


def tcp_table(pid: int) -> list[dict]:
    """Every TCP socket in the process's network namespace: local, remote, state, inode."""
    rows = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            p = line.split()
            rows.append({"local": _addr(p[1], v6), "remote": _addr(p[2], v6), "state": int(p[3], 16),
                         "inode": int(p[9]), "v6": v6})
    return rows


TCP_LISTEN = 0x0A
TCP_ESTABLISHED = 0x01


def listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket of `pid` in LISTEN state."""
    mine = socket_inodes(pid)
    return sorted(r["local"] for r in tcp_table(pid) if r["state"] == TCP_LISTEN and r["inode"] in mine)


def tcp_connections(pid: int, port: int) -> int:
    """Established/closing TCP sockets of `pid` whose local port is `port` (accepted connections)."""
    mine = socket_inodes(pid)
    return sum(1 for r in tcp_table(pid)
               if r["inode"] in mine and r["local"][1] == port and r["state"] != TCP_LISTEN)
