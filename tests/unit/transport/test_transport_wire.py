"""wire.py schemas, validation and fuzzing: decode only ever raises BadMessage / ProtocolMismatch."""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from transport import wire
from transport.errors import BadMessage, ProtocolMismatch
from transport.wire import PROTOCOL_VERSION, SCHEMAS, Msg, decode, encode

pytestmark = pytest.mark.timeout(120)
LIMIT = 1 << 20

# One sample value per accepted type; SAMPLES is built from the schemas so it follows them.
_SAMPLE_BY_TYPE = {bytes: b"\x01binary", str: "text", int: 7, float: 1.5, bool: True, type(None): None, list: ["cma"],
                   dict: {"model": "m", "tp": 2, "x": 1.5, "b": True}}
SAMPLES = {m: {k: _SAMPLE_BY_TYPE[types[0]] for k, types in SCHEMAS[m].items()} for m in Msg}
MAX_STR = getattr(wire, "MAX_STR_BYTES", getattr(wire, "MAX_FIELD_BYTES", 64 << 10))


def frame(version=PROTOCOL_VERSION, mtype="ping", rid=0, body=None) -> bytes:
    return msgpack.packb([version, mtype, rid, {} if body is None else body], use_bin_type=True)


def test_every_message_type_has_a_sample():
    assert set(SAMPLES) == set(Msg) == set(SCHEMAS)


@pytest.mark.parametrize("msg", list(Msg), ids=lambda m: m.value)
def test_roundtrip(msg):
    data = encode(msg, 7, **SAMPLES[msg])
    f = decode(data, LIMIT)
    assert f.type is msg and f.rid == 7 and f.body == SAMPLES[msg]


def test_roundtrip_memoryview_and_bytearray():
    data = encode(Msg.NOTIFY, 1, payload=b"x")
    assert decode(memoryview(data), LIMIT).body == {"payload": b"x"}
    assert decode(bytearray(data), LIMIT).type is Msg.NOTIFY


def test_encode_rejects_wrong_fields():
    with pytest.raises(ValueError):
        encode(Msg.NOTIFY)
    with pytest.raises(ValueError):
        encode(Msg.NOTIFY, payload=b"", extra=1)
    with pytest.raises(ValueError):
        encode(Msg.PING, x=1)


def test_decode_size_limit_checked_before_decoding():
    data = encode(Msg.NOTIFY, payload=b"x" * 1000)
    with pytest.raises(BadMessage, match="exceeds"):
        decode(data, len(data) - 1)
    assert decode(data, len(data)).body["payload"] == b"x" * 1000
    # garbage that is too large is refused by size, not parsed
    with pytest.raises(BadMessage, match="exceeds"):
        decode(b"\xff" * (LIMIT + 1), LIMIT)


def test_decode_empty():
    with pytest.raises(BadMessage, match="empty"):
        decode(b"", LIMIT)


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 1 << 40, -1])
def test_decode_wrong_version_is_protocol_mismatch(version):
    with pytest.raises(ProtocolMismatch):
        decode(frame(version=version), LIMIT)


@pytest.mark.parametrize("data", [
    frame(version="1"), frame(version=True), frame(version=1.0), frame(version=None),
])
def test_decode_non_integer_version(data):
    with pytest.raises(BadMessage, match="version"):
        decode(data, LIMIT)


def test_patched_protocol_version_is_used(monkeypatch):
    data = encode(Msg.PING)
    monkeypatch.setattr(wire, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolMismatch):
        decode(data, LIMIT)
    assert decode(encode(Msg.PING), LIMIT).type is Msg.PING


@pytest.mark.parametrize("data,match", [
    (msgpack.packb({"a": 1}), "frame"),
    (msgpack.packb([1, "ping", 0]), "frame"),
    (msgpack.packb([1, "ping", 0, {}, 5]), "frame"),
    (msgpack.packb(42), "frame"),
    (frame(mtype="steal_blocks"), "unknown message type"),
    (frame(mtype=3), "unknown message type"),
    (frame(rid=-1), "request id"),
    (frame(rid=True), "request id"),
    (frame(rid=1 << 63), "request id"),
    (frame(rid="1"), "request id"),
    (msgpack.packb([PROTOCOL_VERSION, "ping", 0, [1, 2]]), "not a map"),
    (frame(mtype="notify", body={}), "fields"),
    (frame(mtype="notify", body={"payload": b"", "x": 1}), "fields"),
    (frame(mtype="notify", body={"payload": "text"}), "notify.payload"),
    (frame(mtype="read_req", body=dict(SAMPLES[Msg.READ_REQ], xid=True)), "bool"),
    (frame(mtype="read_req", body=dict(SAMPLES[Msg.READ_REQ], xid=1.0)), "read_req.xid"),
    (frame(mtype="read_req", body=dict(SAMPLES[Msg.READ_REQ], lease=None)), "read_req.lease"),
    (frame(mtype="renew", body=dict(lease="l", ttl="30")), "renew.ttl"),
    (frame(mtype="renew", body=dict(lease="l", ttl=False)), "bool"),
    (frame(mtype="ok", body=dict(expires_in=b"1")), "ok.expires_in"),
    (frame(mtype="error", body=dict(code="x", message="y", field=3)), "error.field"),
    (frame(mtype="hello", body=dict(SAMPLES[Msg.HELLO], compat=[])), "hello.compat"),
    (frame(mtype="hello", body=dict(SAMPLES[Msg.HELLO], compat={b"k": 1})), "compat"),
    (frame(mtype="hello", body=dict(SAMPLES[Msg.HELLO], compat={"k": [1]})), "compat"),
    (frame(mtype="hello", body=dict(SAMPLES[Msg.HELLO], compat={"k": {"a": 1}})), "compat"),
    (frame(mtype="hello", body=dict(SAMPLES[Msg.HELLO], compat={"k": None})), "compat"),
    (frame(body={b"bytes-key": 1}), "fields"),
    (b"\xc1", "undecodable"),                                  # reserved byte
    (frame()[:-1], "undecodable"),                            # truncated
    (frame() + b"\x00", "undecodable"),                       # trailing data
    (msgpack.packb([1, "ping", 0, {1: 2}]), "undecodable"),   # non-string map key
    (msgpack.packb([1, "ping", 0, {"x": msgpack.ExtType(5, b"x")}]), "undecodable"),  # ext types
])
def test_decode_rejects_bad_frames(data, match):
    with pytest.raises(BadMessage, match=match):
        decode(data, LIMIT)


def test_decode_size_limits_of_fields():
    big = frame(mtype="error", body=dict(code="x", message="m" * (MAX_STR + 1), field=None))
    with pytest.raises(BadMessage):
        decode(big, LIMIT)
    ok = frame(mtype="error", body=dict(code="x", message="m" * MAX_STR, field=None))
    assert len(decode(ok, LIMIT).body["message"]) == MAX_STR
    with pytest.raises(BadMessage):   # a binary field bigger than the message limit
        decode(frame(mtype="notify", body={"payload": b"x" * 5000}), 4096)
    with pytest.raises(BadMessage):
        decode(msgpack.packb([1, "ping", 0, {}, list(range(65))]), LIMIT)
    hello = dict(SAMPLES[Msg.HELLO], compat={f"k{i}": i for i in range(300)})
    with pytest.raises(BadMessage):
        decode(frame(mtype="hello", body=hello), LIMIT)


def test_decode_deep_nesting_is_bad_message():
    nested = b"\x91" * 100_000 + b"\xc0"   # 100k nested one-element arrays
    with pytest.raises(BadMessage):
        decode(nested, 1 << 20)


# ----------------------------------------------------------------------------- fuzzing
def _only_typed_errors(data: bytes, limit: int = LIMIT) -> None:
    try:
        f = decode(data, limit)
    except (BadMessage, ProtocolMismatch):
        return
    # anything accepted must satisfy its schema exactly
    assert isinstance(f.type, Msg)
    assert set(f.body) == set(SCHEMAS[f.type])
    assert isinstance(f.rid, int) and 0 <= f.rid < 1 << 63


@settings(max_examples=250, deadline=None)
@given(st.binary(max_size=512))
@example(b"\x94\x01\xa4ping\x00\x80")
@example(b"\xdd\xff\xff\xff\xff")          # array32 claiming 4G elements
@example(b"\xc6\xff\xff\xff\xff")          # bin32 claiming 4 GiB
@example(b"\xdf\xff\xff\xff\xff")          # map32 claiming 4G entries
@example(b"\xd7\xff" + b"\x00" * 8)        # timestamp ext
def test_fuzz_random_bytes(data):
    _only_typed_errors(data)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(Msg)), st.data())
def test_fuzz_truncated_and_mutated_valid_frames(msg, data):
    good = encode(msg, data.draw(st.integers(0, (1 << 63) - 1)), **SAMPLES[msg])
    cut = data.draw(st.integers(0, len(good)))
    _only_typed_errors(good[:cut])
    mutated = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(mutated) - 1))
        mutated[i] = data.draw(st.integers(0, 255))
    _only_typed_errors(bytes(mutated))
    _only_typed_errors(good + data.draw(st.binary(min_size=1, max_size=16)))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    msgpack_values,
    st.tuples(st.sampled_from([PROTOCOL_VERSION, 0, 2]),
              st.sampled_from([m.value for m in Msg]) | st.text(max_size=10),
              st.integers(-(1 << 63), (1 << 64) - 1) | msgpack_values,
              st.dictionaries(st.sampled_from(sorted({k for s in SCHEMAS.values() for k in s})) | st.text(max_size=6),
                              msgpack_values, max_size=6)).map(list),
))
def test_fuzz_structured_msgpack(obj):
    _only_typed_errors(msgpack.packb(obj, use_bin_type=True))


@st.composite
def schema_valid_body(draw, msg):
    gen = {bytes: st.binary(max_size=40), str: st.text(max_size=40), int: st.integers(0, (1 << 63) - 1),
           float: st.floats(-1e17, 1e17, allow_nan=False), dict: st.dictionaries(st.text(max_size=8),
                                                                   st.integers(-(1 << 63), (1 << 63) - 1) | st.text(max_size=8), max_size=4),
           bool: st.booleans(), type(None): st.none(), list: st.lists(st.text(max_size=8), max_size=4)}
    return {k: draw(st.one_of(*[gen[t] for t in types])) for k, types in SCHEMAS[msg].items()}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Msg)), st.data())
def test_fuzz_schema_valid_bodies_roundtrip(msg, data):
    body = data.draw(schema_valid_body(msg))
    rid = data.draw(st.integers(0, (1 << 63) - 1))
    f = decode(encode(msg, rid, **body), LIMIT)
    assert (f.type, f.rid, f.body) == (msg, rid, body)


@settings(max_examples=50, deadline=None)
@given(st.integers(LIMIT + 1, LIMIT + 4096), st.sampled_from([b"\x00", b"\xff", b"\x94"]))
def test_fuzz_oversized(n, fill):
    with pytest.raises(BadMessage):
        decode(fill * n, LIMIT)


@pytest.mark.parametrize("field", sorted(wire._NON_NEGATIVE))
def test_negative_ids_and_sizes_are_rejected(field):
    for msg, schema in SCHEMAS.items():
        if field in schema:
            body = dict(SAMPLES[msg], **{field: -1})
            with pytest.raises(BadMessage, match="out of range"):
                decode(frame(mtype=msg.value, rid=1, body=body), LIMIT)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e19])
def test_non_finite_numbers_are_rejected(bad):
    with pytest.raises(BadMessage, match="finite"):
        decode(frame(mtype="renew", rid=1, body={"lease": "x", "ttl": bad}), LIMIT)


def test_schema_errors_do_not_echo_the_peers_bytes():
    """A peer's own keys or values never come back in an error text (nothing to fish with)."""
    secretish = "Z" * 30
    for body in ({secretish: 1}, {"payload": secretish}):
        with pytest.raises(BadMessage) as e:
            decode(frame(mtype="notify", rid=1, body=body), LIMIT)
        assert secretish not in str(e.value)
