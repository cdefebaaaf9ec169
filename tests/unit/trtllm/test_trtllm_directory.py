"""Lease directory wire messages: round trip, and hostile input gets a clear error."""
from __future__ import annotations


import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


from nixl_connectors.trtllm import directory as d  # noqa: E402

keys = st.text(min_size=1, max_size=64)


@given(key=keys, reply=st.text(max_size=40), nonce=st.integers(0, 2**62))
def test_lookup_round_trip(key, reply, nonce):
    m = d.Lookup(key, reply, nonce)
    assert d.decode(d.encode(m)) == m


@given(key=keys, nonce=st.integers(0, 2**62), status=st.sampled_from(list(d.LeaseStatus)),
       lease=st.text(max_size=40), nbytes=st.integers(0, 2**62))
def test_answer_round_trip(key, nonce, status, lease, nbytes):
    m = d.Answer(key, nonce, status, lease, nbytes)
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
@given(st.dictionaries(st.sampled_from(["op", "key", "nonce", "status", "lease_id", "nbytes",
                                        "reply_to", "x"]),
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
    d.MAGIC + msgpack.packb({"op": "lookup", "key": "k", "reply_to": "a", "nonce": True}),
    d.MAGIC + msgpack.packb({"op": "answer", "key": "k", "nonce": 1, "status": "ready",
                             "lease_id": "x", "nbytes": -1}),
    d.MAGIC + msgpack.packb({"op": "nope", "key": "k"}),
    d.MAGIC + msgpack.packb({"op": "release", "key": "k" * (d.MAX_KEY_CHARS + 1)}),
    d.MAGIC + b"\x00" * (d.MAX_MESSAGE_BYTES + 1),
])
def test_bad_payloads(payload):
    with pytest.raises(d.DirectoryMessageError):
        d.decode(payload)


def test_plain_read_notifications_are_not_directory_messages():
    assert not d.is_directory_message(b"nixl-rt-key")
    assert d.is_directory_message(d.encode(d.Release("k")))
