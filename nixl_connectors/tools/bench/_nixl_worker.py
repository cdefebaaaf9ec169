"""Child-process side of the NIXL baseline: ``python -m nixl_connectors.tools.bench._nixl_worker ROLE``.

Protocol (JSON lines, see ``nixl_types.MsgType``): the parent writes CONFIG to both
children on stdin; the owner answers READY (its NIXL agent metadata and pool address);
the parent forwards that to the reader as PEER; the reader READs, verifies and answers
RESULT; the parent sends STOP to the owner, which answers DONE with the notifications
it received. Protocol messages go to a private duplicate of fd 1; fd 1 itself is pointed
at stderr so that library output cannot corrupt the protocol.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import numpy as np

from nixl_connectors.tools.bench.pipe_messages import LineReader, b64decode, b64encode, write_message
from nixl_connectors.tools.bench.nixl_import import find_nixl, import_nixl
from nixl_connectors.tools.bench.nixl_types import MsgType, NixlReadConfig, Role, XferState
from nixl_connectors.tools.blockfill import block_pattern, fill_pool, mismatched_blocks
from nixl_connectors.tools.bench.host_memory import host_pool

logger = logging.getLogger(__name__)

MEM_TYPE = "DRAM"
LOCAL_AGENT = "NIXL_INIT_AGENT"
OWNER_POLL_S = 0.002


class WorkerError(RuntimeError):
    pass


def _block_descs(base: int, num_blocks: int, block_bytes: int) -> np.ndarray:
    """Nx3 uint64 (address, length, device id) descriptors, one per block (no Python loop)."""
    descs = np.zeros((num_blocks, 3), dtype=np.uint64)
    descs[:, 0] = np.uint64(base) + np.arange(num_blocks, dtype=np.uint64) * np.uint64(block_bytes)
    descs[:, 1] = block_bytes
    return descs


def _make_agent(nixl: Any, name: str, cfg: NixlReadConfig) -> Any:
    agent = nixl.nixl_agent(name, nixl.nixl_agent_config(enable_prog_thread=cfg.progress_thread, backends=[]))
    agent.create_backend("UCX", cfg.backend_params())
    return agent


def _effective_params(agent: Any) -> dict[str, str]:
    """The UCX plugin's defaults overlaid with what the backend reports after creation."""
    params = {str(k): str(v) for k, v in dict(agent.get_plugin_params("UCX")).items()}
    params.update({str(k): str(v) for k, v in dict(agent.get_backend_params("UCX")).items()})
    return params


def _register_pool(agent: Any, cfg: NixlReadConfig) -> tuple[np.ndarray, int, Any]:
    # the run's page policy (host_memory.py), touched now as an engine's allocated KV pool is
    pool = host_pool((cfg.pool_blocks * cfg.block_bytes,))
    base = int(pool.ctypes.data)
    reg = agent.register_memory([(base, pool.nbytes, 0, "")], MEM_TYPE)
    return pool, base, reg


def _deadline_left(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise WorkerError(f"deadline passed while {what}")
    return left


def run_owner(cfg: NixlReadConfig, inbox: LineReader, out_fd: int, deadline: float) -> None:
    nixl = import_nixl()
    agent = _make_agent(nixl, "owner", cfg)
    pool, base, reg = _register_pool(agent, cfg)
    fill_pool(pool, cfg.block_bytes, cfg.seed)
    write_message(
        out_fd,
        {
            "type": MsgType.READY.value,
            "agent": agent.name,
            "metadata": b64encode(agent.get_agent_metadata()),
            "base": base,
            "pool_blocks": cfg.pool_blocks,
            "backend_params": _effective_params(agent),
        },
    )
    notifs: list[str] = []
    stop_at: float | None = None
    while True:
        _deadline_left(deadline, "owner waits for STOP")
        for msgs in agent.get_new_notifs().values():
            notifs.extend(m.decode("utf-8", "replace") for m in msgs)
        if stop_at is None:
            msg = inbox.read_by(time.monotonic() + OWNER_POLL_S)
            if msg is not None:
                if msg["type"] != MsgType.STOP.value:
                    raise WorkerError(f"owner expected STOP, got {msg['type']!r}")
                # Transfer notifications may trail the reader's RESULT: give them a moment.
                stop_at = time.monotonic() + float(msg.get("grace_s", 2.0))
        else:
            if len(notifs) >= cfg.transfers or time.monotonic() >= stop_at:
                break
            time.sleep(OWNER_POLL_S)
    write_message(out_fd, {"type": MsgType.DONE.value, "notifications": notifs})
    agent.deregister_memory(reg)


def _wait_xfer(agent: Any, handle: Any, state: str, deadline: float) -> str:
    while state == XferState.PROC.value:
        if time.monotonic() > deadline:
            raise WorkerError("NIXL transfer did not finish before the deadline")
        state = agent.check_xfer_state(handle)
    return state


def run_reader(cfg: NixlReadConfig, inbox: LineReader, out_fd: int, deadline: float) -> None:
    nixl = import_nixl()
    agent = _make_agent(nixl, "reader", cfg)
    pool, base, _reg = _register_pool(agent, cfg)
    local_prep = agent.prep_xfer_dlist(LOCAL_AGENT, _block_descs(base, cfg.pool_blocks, cfg.block_bytes), MEM_TYPE)

    peer = inbox.read(_deadline_left(deadline, "reader waits for PEER"))
    if peer["type"] != MsgType.PEER.value:
        raise WorkerError(f"reader expected PEER, got {peer['type']!r}")
    owner = agent.add_remote_agent(b64decode(peer["metadata"]))
    owner_blocks = int(peer["pool_blocks"])
    remote_prep = agent.prep_xfer_dlist(
        owner, _block_descs(int(peer["base"]), owner_blocks, cfg.block_bytes), MEM_TYPE
    )
    agent.make_connection(owner)

    rng = np.random.default_rng(cfg.seed + 1)
    blocks = pool.reshape(cfg.pool_blocks, cfg.block_bytes)
    nbytes = cfg.num_blocks * cfg.block_bytes
    xfer_s: list[float] = []
    prep_s: list[float] = []
    bad = 0
    expected: np.ndarray | None = None
    for rep in range(cfg.transfers):
        if not cfg.scattered:
            local_ids = remote_ids = np.arange(cfg.num_blocks, dtype=np.int32)
        elif rep == 0 or not cfg.same_blocks:
            local_ids = rng.choice(cfg.pool_blocks, cfg.num_blocks, replace=False).astype(np.int32)
            remote_ids = rng.choice(owner_blocks, cfg.num_blocks, replace=False).astype(np.int32)
        blocks[local_ids] = 0  # so that verification proves this rep's bytes
        t0 = time.perf_counter()
        handle = agent.make_prepped_xfer(
            "READ", local_prep, local_ids, remote_prep, remote_ids, notif_msg=f"rep-{rep}".encode()
        )
        t1 = time.perf_counter()
        state = agent.transfer(handle)
        state = _wait_xfer(agent, handle, state, deadline)
        t2 = time.perf_counter()
        if state != XferState.DONE.value:
            raise WorkerError(f"NIXL transfer of rep {rep} ended in state {state}")
        agent.release_xfer_handle(handle)
        if rep >= cfg.warmup:
            prep_s.append(t1 - t0)
            xfer_s.append(t2 - t1)
        if cfg.same_blocks:  # one block set read again and again: its expected bytes once
            if expected is None:
                expected = block_pattern(remote_ids, cfg.block_bytes, cfg.seed)
            bad += int(np.count_nonzero((blocks[local_ids] != expected).any(axis=1)))
        else:
            bad += mismatched_blocks(blocks[local_ids], remote_ids, cfg.block_bytes, cfg.seed)
    write_message(
        out_fd,
        {
            "type": MsgType.RESULT.value,
            "transfer_s": xfer_s,
            "prep_s": prep_s,
            "bytes_per_rep": nbytes,
            "mismatched_blocks": bad,
            "verified_reps": cfg.transfers,
            "backend_params": _effective_params(agent),
        },
    )
    agent.remove_remote_agent(owner)


def main(argv: list[str]) -> int:
    # Private protocol fd; fd 1 now goes to stderr (UCX/NIXL may print to stdout).
    out_fd = os.dup(1)
    os.dup2(2, 1)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if len(argv) != 1:
        print("usage: _nixl_worker owner|reader", file=sys.stderr)
        return 2
    role = Role(argv[0])
    inbox = LineReader(0)
    try:
        first = inbox.read(60.0)
        if first["type"] != MsgType.CONFIG.value:
            raise WorkerError(f"expected CONFIG, got {first['type']!r}")
        cfg = NixlReadConfig.from_json(first["config"])
        deadline = time.monotonic() + cfg.timeout_s
        if not find_nixl().available:
            raise WorkerError(find_nixl().reason or "NIXL unavailable")
        if role is Role.OWNER:
            run_owner(cfg, inbox, out_fd, deadline)
        else:
            run_reader(cfg, inbox, out_fd, deadline)
    except Exception as exc:  # report any failure to the parent, then exit non-zero
        logger.exception("%s failed", role.value)
        try:
            write_message(out_fd, {"type": MsgType.ERROR.value, "role": role.value, "error": f"{type(exc).__name__}: {exc}"})
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
