"""Helpers of the transport integration tests: `Node`, a spawned child process that hosts any
number of real `transport.Agent`s (one UCX context per process, so one transport set per
node), driven over a multiprocessing pipe. Nothing of the transport is mocked.

Block contents follow a deterministic pattern (word w of block b of a pool with seed s is
b*K1 + w*K2 + s), so a reader checks what landed without a copy of the source.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass

import numpy as np

K1 = np.uint64(0x9E3779B97F4A7C15)
K2 = np.uint64(0xBF58476D1CE4E5B9)


# a node that hears nothing for this long exits by itself (a safety net for orphans); it must
# outlast a whole test session on a slow machine, since session-wide nodes sit idle between uses
NODE_IDLE_EXIT_S = 3600.0


def pattern(block_ids, block_bytes: int, seed: int) -> np.ndarray:
    b = np.asarray(block_ids, dtype=np.uint64).reshape(-1, 1)
    w = np.arange(block_bytes // 8, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        words = b * K1 + w * K2 + np.uint64(seed)
    return words.view(np.uint8).reshape(len(b), block_bytes)


class RemoteError(Exception):
    """An exception raised inside a node; `type` is its class name (e.g. "LeaseRejected")."""

    def __init__(self, type_name: str, message: str, field=None, code=None, tb: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type = type_name
        self.message = message
        self.field = field
        self.code = code
        self.tb = tb


# ============================================================================ child side
@dataclass
class _AgentState:
    agent: object
    pool: np.ndarray
    region: object
    block_bytes: int


class _Child:
    def __init__(self, transports: str):
        self.transports = transports
        self.agents: dict[str, _AgentState] = {}
        self.peers: dict[tuple[str, str], object] = {}
        self.transfers: dict[int, object] = {}
        self.next_tid = 1

    # -- agents and memory
    def agent(self, name, pool_blocks, block_bytes, seed=None, **cfg):
        from transport import Agent, AgentConfig, TransportSet

        fields = AgentConfig.__dataclass_fields__
        if "same_host_copy" in cfg and "same_host_copy" not in fields:
            cfg.pop("same_host_copy")   # transport without the same-host path: UCX only anyway
        a = Agent(name, AgentConfig(transports=TransportSet(self.transports), **cfg))
        pool = np.zeros((pool_blocks, block_bytes), dtype=np.uint8)
        if seed is not None:
            pool[:] = pattern(np.arange(pool_blocks), block_bytes, seed)
        self.agents[name] = _AgentState(a, pool, a.register(pool), block_bytes)
        return a.address

    def agent_guarded(self, name, pool_blocks, block_bytes, guard_blocks, seed=None, **cfg):
        """Like `agent`, but the registered pool sits between two guard areas of 0xA5 bytes
        (not registered): `guards_intact` tells whether anything wrote outside the region."""
        from transport import Agent, AgentConfig, TransportSet

        a = Agent(name, AgentConfig(transports=TransportSet(self.transports), **cfg))
        whole = np.full((pool_blocks + 2 * guard_blocks, block_bytes), 0xA5, dtype=np.uint8)
        pool = whole[guard_blocks:guard_blocks + pool_blocks]
        pool[:] = 0 if seed is None else pattern(np.arange(pool_blocks), block_bytes, seed)
        self.agents[name] = _AgentState(a, pool, a.register(pool), block_bytes)
        self.agents[name].whole = whole
        self.agents[name].guard = guard_blocks
        return a.address

    def guards_intact(self, name):
        st = self.agents[name]
        g = st.guard
        return bool((st.whole[:g] == 0xA5).all() and (st.whole[g + len(st.pool):] == 0xA5).all())

    def control_addresses(self):
        return [st.agent.address for st in self.agents.values()]

    def has_field(self, field):
        from transport import AgentConfig

        return field in AgentConfig.__dataclass_fields__

    def close(self, name):
        st = self.agents.pop(name)
        st.agent.close()

    def fill(self, name, seed=None):
        st = self.agents[name]
        if seed is None:
            st.pool[:] = 0
        else:
            st.pool[:] = pattern(np.arange(len(st.pool)), st.block_bytes, seed)

    def bad_blocks(self, name, ids, src_ids, src_seed, src_block_bytes=None):
        """How many of blocks `ids` differ from the stream of source blocks `src_ids` (pattern
        `src_seed`, blocks of `src_block_bytes`, default: the same as here)."""
        st = self.agents[name]
        exp = pattern(src_ids, src_block_bytes or st.block_bytes, src_seed).reshape(-1, st.block_bytes)
        return int(np.count_nonzero(np.any(st.pool[np.asarray(ids)] != exp, axis=1)))

    def zero_blocks(self, name, ids):
        st = self.agents[name]
        return int(np.count_nonzero(~np.any(st.pool[np.asarray(ids)] != 0, axis=1)))

    def _descs(self, name, ids):
        from transport import Descs

        st = self.agents[name]
        return Descs.from_blocks(st.region, np.asarray(ids, dtype=np.int64), st.block_bytes)

    # -- owner
    def expose(self, name, ids, ttl_s=30.0, writable=False, peer=None):
        lease = self.agents[name].agent.expose(self._descs(name, ids), peer=peer, ttl_s=ttl_s, writable=writable)
        return lease.id, lease.nbytes, lease.expires_at

    def expose_many(self, name, id_lists, ttl_s=60.0, peer=None):
        """One lease per list of block ids; returns the lease ids."""
        a = self.agents[name].agent
        return [a.expose(self._descs(name, ids), peer=peer, ttl_s=ttl_s).id for ids in id_lists]

    def release_many(self, name, lids):
        a = self.agents[name].agent
        return sum(bool(a.release(lid)) for lid in lids)

    def expose_runs(self, name, offsets, lengths, ttl_s=30.0):
        """Lease arbitrary byte runs of the agent's pool (layout-transform tests)."""
        from transport import Descs

        st = self.agents[name]
        lease = st.agent.expose(Descs.from_ranges(st.region, offsets, lengths), ttl_s=ttl_s)
        return lease.id

    def read_runs(self, name, address, offsets, lengths, scratch_mask, lid, timeout=30.0):
        """Read a lease into byte runs of the pool, runs flagged in `scratch_mask` into a scratch area."""
        from transport import Descs

        st = self.agents[name]
        scratch_mask = np.asarray(scratch_mask, dtype=bool)
        need = int(np.asarray(lengths)[scratch_mask].sum())
        regions = (st.region,)
        if need:
            st.scratch = np.zeros(need, dtype=np.uint8)
            regions = (st.region, st.agent.register(st.scratch))
        d = Descs(regions, scratch_mask.astype(np.int32), np.asarray(offsets, dtype=np.int64),
                  np.asarray(lengths, dtype=np.int64))
        st.agent.read(self._peer(name, address), d, lid, timeout=timeout).wait(timeout + 5)

    def pool(self, name):
        return self.agents[name].pool.tobytes()

    def release(self, name, lid):
        return self.agents[name].agent.release(lid)

    def freed(self, name):
        return self.agents[name].agent.freed_leases()

    def notifs(self, name):
        return self.agents[name].agent.notifications()

    def stats(self, name):
        return self.agents[name].agent.stats.snapshot()

    def snapshot(self, name):
        """The agent's counters plus its live state (quarantined slots, parked endpoints)."""
        return self.agents[name].agent.snapshot()

    def peer_names(self, name):
        return self.agents[name].agent.peers()

    # -- reader / writer
    def connect(self, name, address, timeout=None):
        p = self.agents[name].agent.connect(address, timeout=timeout)
        self.peers[(name, address)] = p
        return p.name, p.address

    def _peer(self, name, address):
        return self.peers.get((name, address)) or address

    def _xfer(self, op, name, address, ids, lid, notify, timeout, wait, wait_timeout):
        a = self.agents[name].agent
        fn = a.read if op == "read" else a.write
        t0 = time.monotonic()
        t = fn(self._peer(name, address), self._descs(name, ids), lid, notify=notify, timeout=timeout)
        if not wait:
            tid, self.next_tid = self.next_tid, self.next_tid + 1
            self.transfers[tid] = t
            return tid
        t.wait(wait_timeout)
        return time.monotonic() - t0

    def read(self, name, address, ids, lid, notify=None, timeout=None, wait=True, wait_timeout=60.0):
        return self._xfer("read", name, address, ids, lid, notify, timeout, wait, wait_timeout)

    def write(self, name, address, ids, lid, notify=None, timeout=None, wait=True, wait_timeout=60.0):
        return self._xfer("write", name, address, ids, lid, notify, timeout, wait, wait_timeout)

    def wait(self, tid, timeout):
        t0 = time.monotonic()
        t = self.transfers[tid]
        try:
            t.wait(timeout)
        finally:
            if t.done():
                self.transfers.pop(tid, None)
        return time.monotonic() - t0

    def done(self, tid):
        return self.transfers[tid].done()

    def cancel(self, tid):
        self.transfers[tid].cancel()

    def renew(self, name, address, lid, ttl_s, timeout=None):
        return self.agents[name].agent.renew(self._peer(name, address), lid, ttl_s=ttl_s, timeout=timeout)

    def notify(self, name, address, payload):
        self.agents[name].agent.notify(self._peer(name, address), payload)

    # -- async API from a user's own asyncio loop
    def async_read(self, name, address, ids, lid, notify=None, renew_ttl=None):
        import asyncio

        a = self.agents[name].agent

        async def main():
            peer = await a.aconnect(address)
            t = a.read(peer, self._descs(name, ids), lid, notify=notify)
            await asyncio.wait_for(t, 60)
            await a.aread(peer, self._descs(name, ids), lid)   # the awaitable twin
            left = await a.arenew(peer, lid, ttl_s=renew_ttl) if renew_ttl else None
            return peer.name, t.done(), t.error, left

        name_, done, err, left = asyncio.run(main())
        return name_, done, repr(err), left

    # -- fault injection (tests/faults): stall points inside this process
    def install_stall(self, target, after=0):
        """From the call after `after` successful calls on, `target` ("cma": the same-host copy
        syscall wrapper, "pack" / "unpack": UCX staging of one chunk) signals `stalled()` and
        blocks until `release_stall()`; then it runs normally. Deterministic "mid-transfer"."""
        import threading

        import transport.cma as cma
        import transport.packing as packing

        mod, attr = {"cma": (cma, "copy_batch"), "pack": (packing, "pack"), "unpack": (packing, "unpack")}[target]
        real = getattr(mod, attr)
        st = self._stall = {"count": 0, "reached": threading.Event(), "gate": threading.Event(),
                            "restore": (mod, attr, real), "lock": threading.Lock()}

        def wrapper(*a, **kw):
            with st["lock"]:
                st["count"] += 1
                n = st["count"]
            if n > after:
                st["reached"].set()
                st["gate"].wait()
            return real(*a, **kw)

        setattr(mod, attr, wrapper)

    def stalled(self):
        st = getattr(self, "_stall", None)
        return bool(st and st["reached"].is_set())

    def release_stall(self, restore=True):
        st = getattr(self, "_stall", None)
        if st is None:
            return
        if restore:
            mod, attr, real = st["restore"]
            setattr(mod, attr, real)
            self._stall = None
        st["gate"].set()

    # -- logs of this process (WARNING and above), for "rejected and logged" checks
    def capture_logs(self):
        import logging

        if getattr(self, "_logs", None) is None:
            self._logs = []
            logs = self._logs

            class H(logging.Handler):
                def emit(self, record):
                    try:
                        logs.append((record.levelname, record.name, record.getMessage()))
                    except Exception:
                        pass
            h = H(logging.INFO)
            logging.getLogger("transport").addHandler(h)
            logging.getLogger("transport").setLevel(logging.INFO)

    def logs(self, clear=True):
        out = list(getattr(self, "_logs", None) or [])
        if clear and getattr(self, "_logs", None) is not None:
            del self._logs[:]
        return out

    # -- memory of this process (confused-deputy tests)
    def pool_address(self, name):
        st = self.agents[name]
        return int(st.pool.ctypes.data), int(st.pool.nbytes)

    def agent_attr(self, name, path):
        """Read a (dotted) attribute of an agent, e.g. "_core.instance"."""
        obj = self.agents[name].agent
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    # -- many concurrent transfers (load runs)
    def read_many(self, name, address, jobs, timeout=60.0, verify_seed=None, src_block_bytes=None):
        """Start every (local_ids, lease_id, src_ids) read at once, wait for all; returns
        (seconds, bytes, bad blocks). `src_ids` (with `verify_seed`) checks every byte."""
        a = self.agents[name].agent
        st = self.agents[name]
        peer = self._peer(name, address)
        t0 = time.monotonic()
        ts = [a.read(peer, self._descs(name, ids), lid, timeout=timeout) for ids, lid, _ in jobs]
        errors = []
        for t in ts:
            try:
                t.wait(timeout + 10)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        dt = time.monotonic() - t0
        if errors:
            raise RuntimeError(f"{len(errors)} of {len(ts)} reads failed: {errors[:3]}")
        bad = 0
        if verify_seed is not None:
            for ids, _, src in jobs:
                bad += self.bad_blocks(name, ids, src, verify_seed, src_block_bytes)
        return dt, sum(len(ids) for ids, _, _ in jobs) * st.block_bytes, bad

    def set_nofile(self, n):
        """Lower this process's open-file limit (soft)."""
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
        return n

    def dump_stacks(self):
        """Python stacks of every thread and of every task on the transport loop (diagnosis)."""
        import asyncio
        import io
        import sys

        from transport.runtime import Runtime

        out = io.StringIO()
        for tid, frame in sys._current_frames().items():
            out.write(f"--- thread {tid}\n" + "".join(traceback.format_stack(frame)))
        rt = Runtime._instance
        if rt is not None:
            for t in asyncio.all_tasks(rt.loop):
                out.write(f"--- task {t.get_name()}\n")
                t.print_stack(file=out)
        return out.getvalue()

    def read_many_cancel_some(self, name, address, jobs, cancel_every, timeout=60.0, verify_seed=None):
        """Like read_many, but cancels every `cancel_every`-th transfer right after starting all;
        returns (cancelled ones' errors, the others' errors, bad blocks among the others)."""
        a = self.agents[name].agent
        peer = self._peer(name, address)
        ts = [a.read(peer, self._descs(name, ids), lid, timeout=timeout) for ids, lid, _ in jobs]
        for i, t in enumerate(ts):
            if i % cancel_every == 0:
                t.cancel()
        errs_c, errs_o, bad = [], [], 0
        for i, t in enumerate(ts):
            try:
                t.wait(timeout + 10)
                err = None
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
            if i % cancel_every == 0:
                errs_c.append(err)
            else:
                errs_o.append(err)
                if err is None and verify_seed is not None:
                    ids, _, src = jobs[i]
                    bad += self.bad_blocks(name, ids, src, verify_seed)
        return errs_c, errs_o, bad

    # -- misc
    def set_protocol_version(self, v):
        import transport.wire as wire

        wire.PROTOCOL_VERSION = v

    def pid(self):
        return os.getpid()


class NodeDied(RuntimeError):
    """A test node's process ended while the test talked to it (a crash of the code under test)."""


def _node_main(conn, transports: str, protocol_version: int | None, ucx_options: dict | None = None) -> None:
    import faulthandler
    import logging

    faulthandler.enable()   # a crash in native code (UCX, torch) prints every thread's stack

    logging.basicConfig(level=logging.WARNING, format="%(processName)s %(name)s: %(message)s")
    child = _Child(transports)
    if protocol_version is not None:
        child.set_protocol_version(protocol_version)
    # import torch and start this process's UCX context now, so that nodes started together
    # pay for it in parallel rather than in their first test
    from transport.config import TransportSet
    from transport.runtime import Runtime

    Runtime.get(TransportSet(transports), ucx_options)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            if not conn.poll(NODE_IDLE_EXIT_S):
                break
            cmd, args, kw = conn.recv()
        except (EOFError, OSError):
            break
        if cmd == "stop":
            break
        try:
            conn.send(("ok", getattr(child, cmd)(*args, **kw)))
        except BaseException as e:  # report everything to the test
            conn.send(("err", type(e).__name__, str(e), getattr(e, "field", None),
                       getattr(getattr(e, "code", None), "value", None), traceback.format_exc()))
    os._exit(0)  # agents are not closed one by one: the tests are over, and UCX threads need no wait


# ============================================================================ parent side
def _start_in_netns(proc, netns: str) -> str:
    """Start a spawn-context process under `ip netns exec`, which also gives it the namespace's
    own /sys (UCX finds network devices there; a bare setns() would leave the host's view).
    Returns the wrapper script's path: remove it once the process is gone."""
    import sys
    import tempfile
    from multiprocessing import spawn

    fd, wrapper = tempfile.mkstemp(prefix=f"py-{netns}-", suffix=".sh")
    with os.fdopen(fd, "w") as f:
        f.write(f'#!/bin/sh\nexec ip netns exec {netns} "{sys.executable}" "$@"\n')
    os.chmod(wrapper, 0o755)
    old = spawn.get_executable()
    spawn.set_executable(wrapper)
    try:
        proc.start()
    finally:
        spawn.set_executable(old)
    return wrapper


class Node:
    """A child process hosting agents. Start several, then `wait_ready()` each (they import
    torch and start UCX in parallel)."""

    def __init__(self, transports: str = "shm", protocol_version: int | None = None, label: str = "node",
                 netns: str | None = None, ucx_options: dict | None = None):
        ctx = mp.get_context("spawn")
        self.label = label
        self.transports = transports
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_node_main, args=(child, transports, protocol_version, ucx_options),
                                name=f"xport-{label}", daemon=True)
        self._wrapper = None
        if netns is None:
            self.proc.start()
        else:
            self._wrapper = _start_in_netns(self.proc, netns)
        child.close()
        self.pid = self.proc.pid
        self._ready = False

    def wait_ready(self, timeout: float = 180.0) -> "Node":
        if not self._ready:
            if not self._conn.poll(timeout):
                self.kill()
                raise TimeoutError(f"node {self.label} did not start within {timeout}s")
            self._conn.recv()
            self._ready = True
        return self

    def call(self, cmd: str, *args, call_timeout: float = 90.0, **kw):
        """Run `cmd` in the node; keyword arguments (`timeout` included) go to the command."""
        self.wait_ready()
        try:
            self._conn.send((cmd, args, kw))
            if not self._conn.poll(call_timeout):
                raise TimeoutError(f"node {self.label} did not answer {cmd!r} within {call_timeout}s")
            r = self._conn.recv()
        except (EOFError, OSError) as e:
            self.proc.join(5)
            raise NodeDied(f"node {self.label} (pid {self.pid}) is gone, exit code {self.proc.exitcode}, "
                           f"during {cmd!r}: {e!r}") from e
        if r[0] == "ok":
            return r[1]
        raise RemoteError(*r[1:])

    def send_call(self, cmd: str, *args, **kw) -> None:
        """Start `cmd` in the node without waiting; collect it with `result()` (lets the test
        drive several nodes at once)."""
        self.wait_ready()
        self._conn.send((cmd, args, kw))

    def result(self, call_timeout: float = 90.0):
        if not self._conn.poll(call_timeout):
            raise TimeoutError(f"node {self.label} did not answer within {call_timeout}s")
        r = self._conn.recv()
        if r[0] == "ok":
            return r[1]
        raise RemoteError(*r[1:])

    def __getattr__(self, cmd: str):
        if cmd.startswith("_"):
            raise AttributeError(cmd)
        return lambda *a, **kw: self.call(cmd, *a, **kw)

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def stop_signal(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def cont_signal(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self._conn.send(("stop", (), {}))
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(15)
        self.kill()
        if self._wrapper:
            os.unlink(self._wrapper)
            self._wrapper = None


def wait_until(fn, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll `fn` until it returns a truthy value; return it, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s (last: {v!r})")
        time.sleep(interval)
