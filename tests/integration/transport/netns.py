"""Two test "hosts" on one machine: network namespaces joined by a veth pair (iproute2).

`Link` makes them, slows the wire with `tc tbf` (a rate limit with a queue; the kernels here
have no netem, so latency and loss cannot be emulated), cuts it (`ip link set down`) for
partition tests, and removes everything on close. Only the namespaces' own
addresses (10.233.x.0/24) and their loopbacks are used.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"nxprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"ip netns add failed: {e.stderr.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Side:
    netns: str
    dev: str
    addr: str


class Link:
    """Namespaces `a` and `b`, one veth pair between them, addresses 10.233.<subnet>.1 / .2."""

    def __init__(self, tag: str, subnet: int):
        self.a = Side(f"nx{tag}a", f"nx{tag}va", f"10.233.{subnet}.1")
        self.b = Side(f"nx{tag}b", f"nx{tag}vb", f"10.233.{subnet}.2")
        self._made: list[str] = []
        try:
            for side in (self.a, self.b):
                _ip("netns", "add", side.netns)
                self._made.append(side.netns)
                _ip("-n", side.netns, "link", "set", "lo", "up")
            _ip("link", "add", self.a.dev, "type", "veth", "peer", "name", self.b.dev)
            for side in (self.a, self.b):
                _ip("link", "set", side.dev, "netns", side.netns)
                _ip("-n", side.netns, "addr", "add", f"{side.addr}/24", "dev", side.dev)
                _ip("-n", side.netns, "link", "set", side.dev, "up")
        except BaseException:
            self.close()
            raise

    def throttle(self, rate_mbit: float) -> None:
        """Limit both directions to `rate_mbit` (token bucket, 50 ms of queue)."""
        for side in (self.a, self.b):
            self._tc(side, "replace", "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", "32kb",
                     "latency", "50ms")

    def unthrottle(self) -> None:
        for side in (self.a, self.b):
            subprocess.run(["ip", "netns", "exec", side.netns, "tc", "qdisc", "del", "dev", side.dev, "root"],
                           capture_output=True, timeout=30)

    @staticmethod
    def _tc(side: Side, *args: str) -> None:
        subprocess.run(["ip", "netns", "exec", side.netns, "tc", "qdisc", args[0], "dev", side.dev, *args[1:]],
                       check=True, capture_output=True, timeout=30)

    def cut(self) -> None:
        """Partition: both ends down; nothing crosses, and no reset tells either side."""
        for side in (self.a, self.b):
            _ip("-n", side.netns, "link", "set", side.dev, "down")

    def heal(self) -> None:
        for side in (self.a, self.b):
            _ip("-n", side.netns, "link", "set", side.dev, "up")

    def state(self) -> str:
        """Addresses, routes and neighbours of both namespaces (for a failure's message)."""
        out = []
        for side in (self.a, self.b):
            for what in (["-br", "addr"], ["route"], ["neigh"]):
                r = subprocess.run(["ip", "-n", side.netns, *what], capture_output=True, text=True, timeout=30)
                out.append(f"[{side.netns} ip {' '.join(what)}] {r.stdout.strip()} {r.stderr.strip()}")
        return "\n".join(out)

    def close(self) -> None:
        for ns in self._made:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
