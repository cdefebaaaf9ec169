"""A peer that sends notifications or calls faster than this process's callback runs cannot grow
its memory: what waits for (or runs on) an `on_notify` / `on_call` executor is bounded by
`max_notify_count` / `max_notify_bytes`; past that the sender gets Busy, and once the callback
catches up new ones are accepted again. Two real agents over loopback; the callback blocks on an
event, so "the backlog is full" is a state the test waits for, not a race."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from transport import Agent, AgentConfig, Busy
from transport.backlog import Backlog

pytestmark = pytest.mark.timeout(120)

LIMIT = 4


def _until(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def pair():
    owner = Agent("backlog-owner", AgentConfig(auth_key=b"k", max_notify_count=LIMIT, max_notify_bytes=1 << 20))
    sender = Agent("backlog-sender", AgentConfig(auth_key=b"k"))
    pool = ThreadPoolExecutor(1, thread_name_prefix="slow-callback")
    yield owner, sender, sender.connect(owner.address), pool
    pool.shutdown(wait=False, cancel_futures=True)
    sender.close()
    owner.close()


def test_notifications_beyond_a_slow_callbacks_backlog_are_refused(pair):
    owner, sender, peer, pool = pair
    gate, got = threading.Event(), []

    def slow(name, payload):
        gate.wait(60)
        got.append(payload)
    owner.on_notify(slow, pool)
    for i in range(LIMIT):
        sender.notify(peer, b"n%d" % i)
    backlog = owner._core.inbox.backlog
    _until(lambda: backlog.count == LIMIT, "the backlog to fill")
    with pytest.raises(Busy, match="backlog full"):
        sender.notify(peer, b"one too many")
    assert backlog.count == LIMIT               # the refused one was never queued
    gate.set()
    _until(lambda: len(got) == LIMIT and backlog.count == 0, "the callback to catch up")
    sender.notify(peer, b"after")               # accepted again
    _until(lambda: got[-1:] == [b"after"], "the next notification")
    assert got == [b"n0", b"n1", b"n2", b"n3", b"after"]


def test_calls_beyond_a_slow_handlers_backlog_are_refused(pair):
    owner, sender, peer, pool = pair
    gate = threading.Event()

    def slow(name, payload):
        gate.wait(60)
        return payload[::-1]
    owner.on_call(slow, pool)
    answers: dict[int, bytes] = {}
    callers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, sender.call(peer, b"ab%d" % i, timeout=60)))
               for i in range(LIMIT)]
    for t in callers:
        t.start()
    backlog = owner._core.calls.backlog
    _until(lambda: backlog.count == LIMIT, "the call backlog to fill")
    with pytest.raises(Busy, match="backlog full"):
        sender.call(peer, b"one too many", timeout=30)
    gate.set()
    for t in callers:
        t.join(60)
    assert answers == {i: (b"ab%d" % i)[::-1] for i in range(LIMIT)}
    _until(lambda: backlog.count == 0, "the backlog to empty")
    assert sender.call(peer, b"xy", timeout=30) == b"yx"


def test_backlog_counts_bytes_and_frees_on_completion_or_refusal():
    b = Backlog("test", max_count=10, max_bytes=100)
    gate = threading.Event()
    with ThreadPoolExecutor(1) as ex:
        f1 = b.submit(ex, gate.wait, 60, 30)
        with pytest.raises(Busy, match="60 bytes"):
            b.submit(ex, gate.wait, 41, 30)      # 60 + 41 > 100
        f2 = b.submit(ex, gate.wait, 40, 30)     # exactly 100
        assert (b.count, b.nbytes) == (2, 100)
        gate.set()
        f1.result(30), f2.result(30)
        _until(lambda: b.count == 0, "the counts to drop")
        assert b.nbytes == 0
    with pytest.raises(RuntimeError):            # a shut-down executor: nothing stays counted
        b.submit(ex, print, 5)
    assert (b.count, b.nbytes) == (0, 0)
