"""Lease directory: wire messages (round trip, hostile input) and the context side's answers."""
from __future__ import annotations

import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nixl_connectors.trtllm import directory as d
from nixl_connectors.trtllm.context_directory import ContextDirectory, InboxItem, InboxKind

keys = st.text(min_size=1, max_size=64)


@given(key=keys, wait=st.integers(0, d.MAX_WAIT_MS))
def test_lookup_round_trip(key, wait):
    m = d.Lookup(key, wait)
    assert d.decode(d.encode(m)) == m


@given(key=keys, status=st.sampled_from(list(d.LeaseStatus)), rank=st.integers(0, 64),
       lease=st.text(max_size=40), nbytes=st.integers(0, 2**62))
def test_answer_round_trip(key, status, rank, lease, nbytes):
    m = d.Answer(key, status, rank, lease, nbytes)
    assert d.decode(d.encode(m)) == m


def test_release_round_trip():
    assert d.decode(d.encode(d.Release("k"))) == d.Release("k")


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_garbage_after_magic_is_rejected_cleanly(blob):
    try:
        d.decode(d.MAGIC + blob)
    except d.DirectoryMessageError:
        pass


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["op", "key", "wait_ms", "status", "lease_id", "nbytes", "rank", "x"]),
                       st.one_of(st.integers(-2**63, 2**64 - 1), st.text(max_size=8), st.none(), st.booleans(),
                                 st.sampled_from(["lookup", "answer", "release", "ready"])),
                       max_size=8))
def test_wrong_schema_is_rejected_cleanly(body):
    try:
        d.decode(d.MAGIC + msgpack.packb(body))
    except d.DirectoryMessageError:
        pass


@pytest.mark.parametrize("payload", [
    b"", b"request-id", d.MAGIC, d.MAGIC + b"\xc1",
    d.MAGIC + msgpack.packb({"op": "lookup", "key": "k", "wait_ms": True}),
    d.MAGIC + msgpack.packb({"op": "lookup", "key": "k", "wait_ms": -1}),
    d.MAGIC + msgpack.packb({"op": "lookup", "key": "", "wait_ms": 1}),
    d.MAGIC + msgpack.packb({"op": "answer", "key": "k", "status": "ready", "rank": 0, "lease_id": "x",
                             "nbytes": -1}),
    d.MAGIC + msgpack.packb({"op": "nope", "key": "k"}),
    d.MAGIC + msgpack.packb({"op": "release", "key": "k" * (d.MAX_KEY_CHARS + 1)}),
    d.MAGIC + b"\x00" * (d.MAX_MESSAGE_BYTES + 1),
])
def test_bad_payloads(payload):
    with pytest.raises(d.DirectoryMessageError):
        d.decode(payload)


# -- the context side's directory ---------------------------------------------------------------
@pytest.fixture
def directory():
    table = ContextDirectory(rank=1)
    yield table
    table.close()


def ask(table, key, wait_ms=0):
    return d.decode(table.on_call("gen", d.encode(d.Lookup(key, wait_ms))))


def test_answers_known_states_at_once(directory):
    assert ask(directory, "k").status is d.LeaseStatus.UNKNOWN
    directory.pending("k")
    assert ask(directory, "k").status is d.LeaseStatus.PENDING
    directory.ready("k", "lease-1", 4096)
    assert ask(directory, "k", wait_ms=60_000) == d.Answer("k", d.LeaseStatus.READY, 1, "lease-1", 4096)
    directory.failed("k")
    assert ask(directory, "k").status is d.LeaseStatus.FAILED
    directory.remove("k")
    assert ask(directory, "k").status is d.LeaseStatus.UNKNOWN


def test_a_waiting_lookup_is_woken_by_the_lease_not_by_a_poll(directory):
    directory.pending("k")
    waiting = threading.Event()
    real_wait = directory._cond.wait

    def wait(timeout=None):
        waiting.set()
        return real_wait(timeout)

    directory._cond.wait = wait
    got: list = []
    t = threading.Thread(target=lambda: got.append(ask(directory, "k", wait_ms=60_000)))
    t.start()
    assert waiting.wait(30), "the lookup did not wait for the pending key"
    directory.ready("k", "lease-9", 8)      # wakes the waiter long before its 60 s bound
    t.join(timeout=30)
    assert not t.is_alive() and got[0].status is d.LeaseStatus.READY and got[0].lease_id == "lease-9"


def test_non_lookup_calls_are_refused(directory):
    with pytest.raises(d.DirectoryMessageError):
        directory.on_call("gen", d.encode(d.Release("k")))
    with pytest.raises(d.DirectoryMessageError):
        directory.on_call("gen", b"junk")


def test_notifications_are_queued_for_the_engine_thread(directory):
    directory.pending("k")
    directory.on_notify("gen", d.encode(d.Release("k")))
    directory.on_notify("gen", b"salt-id:00ff")
    directory.on_notify("gen", d.MAGIC + b"\xc1")      # logged and dropped
    directory.on_notify("gen", b"\xff\xfe")            # not utf-8: dropped
    assert directory.drain() == [InboxItem(InboxKind.RELEASE, "k", "gen"),
                                 InboxItem(InboxKind.READ_DONE, "salt-id:00ff", "gen")]
    assert directory.drain() == []
    assert directory.released_early("k")   # a reader gave up before the lease existed
