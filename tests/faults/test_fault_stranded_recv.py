"""A UCX receive stranded by a sender that stops part-way through a message (the cause of the
flaky `test_owner_stopped_mid_read[ucx-tcp]`: "a 4.0 s read failed only after 13.4 s", reader
log "1 chunk operation(s) did not stop after abort").

A receive that has matched its message cannot be cancelled: aborting the endpoint (and ucxx's
worker-level cancel) only removes receives that have not matched yet. So it waits for the
stopped sender, and when the sender runs again it writes the rest of the message into its buffer
and completes. The reader used to receive contiguous chunks zero-copy into the caller's memory
and waited QUARANTINE_GRACE_S (10 s) for such receives before reporting its deadline error, and
even then the receive could still write the caller's memory after the read had failed.

The scenario is made deterministic in a child process (stranded_recv_child.py): the sender is a
UCX worker that makes progress only when the child drives it, so it "stops" exactly once its
message has reached the receiving worker, with no signal and no race.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(240)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run(cls_name: str, deadline_s: float, grace_s: float) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    for k in [k for k in env if k.startswith("UCX_")]:
        del env[k]   # the child sets its own UCX options (tcp only)
    p = subprocess.run([sys.executable, str(HERE / "stranded_recv_child.py"), cls_name, str(deadline_s),
                        str(grace_s)], env=env, capture_output=True, text=True, timeout=180)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, f"child failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_read_fails_at_its_deadline_and_a_stranded_receive_never_writes_the_callers_memory():
    """The initiator's receiver (what a read uses): error at the deadline, not after the 10 s
    grace; the stranded receive holds only a (retired) staging slot; once the sender runs again
    and the receive completes, nothing lands in the caller's memory."""
    from transport import initiator_ucx
    from transport.datapath import StagedReceiver

    assert getattr(initiator_ucx, "StagedReceiver", None) is StagedReceiver  # what reads use
    deadline = 1.0
    r = _run("StagedReceiver", deadline, 10.0)
    assert r["error"] == "TransferTimeout", r
    assert r["failed_after"] < deadline + 2.0, f"a {deadline}s read failed only after {r['failed_after']}s"
    # stranded on a staging slot, which is retired; nothing of the caller's memory is at stake,
    # so nothing is reported lingering (what would keep the memory's owner waiting)
    assert r["lingering"] == 0 and r["retired"] == 1, r
    assert r["stranded_after"] == 0, r                       # the slot was let go once the sender ran again
    assert r["written_at_failure"] == 0 and r["written_after"] == 0, r


def test_owner_side_zero_copy_receive_is_reported_lingering():
    """The owner's receiver (writes into its lease) keeps zero-copy chunks: a stranded receive
    there does write the lease memory after the failure (what this test shows happening), so it
    must be reported in `token.lingering`, for which the owner keeps the lease until it ends."""
    r = _run("Receiver", 1.0, 1.0)
    assert r["error"] == "TransferTimeout", r
    assert r["lingering"] == 1, r
    assert r["written_after"] > r["written_at_failure"], r   # the reason the lease stays quarantined
