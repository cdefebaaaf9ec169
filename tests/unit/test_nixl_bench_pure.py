"""Pure parts of the NIXL baseline: block pattern, JSON-lines channel, configs and profiles."""

from __future__ import annotations

import os

import numpy as np
import pytest

from nixl_connectors.tools.bench.pipe_messages import (
    ChannelClosed,
    ChannelError,
    ChannelTimeout,
    LineReader,
    b64decode,
    b64encode,
    write_message,
)
from nixl_connectors.tools.bench.nixl_baseline import NixlProfile, child_env, profile_config
from nixl_connectors.tools.bench.nixl_types import NixlReadConfig, UcxErrorHandling
from nixl_connectors.tools.blockfill import block_pattern, fill_pool, mismatched_blocks


def test_pattern_is_per_block_and_deterministic():
    ids = np.array([5, 0, 5, 1023])
    a = block_pattern(ids, 64, seed=7)
    assert a.shape == (4, 64) and a.dtype == np.uint8
    assert np.array_equal(a[0], a[2])
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a, block_pattern(ids, 64, seed=8))
    assert np.array_equal(a, block_pattern(ids, 64, seed=7))


def test_fill_pool_and_mismatch():
    pool = np.zeros(10 * 32, dtype=np.uint8)
    fill_pool(pool, 32, seed=1, chunk_blocks=3)
    blocks = pool.reshape(10, 32)
    ids = np.array([9, 2, 4])
    assert mismatched_blocks(blocks[ids], ids, 32, 1) == 0
    got = blocks[ids].copy()
    got[1, 0] ^= 1
    assert mismatched_blocks(got, ids, 32, 1) == 1
    assert mismatched_blocks(blocks[ids], ids[::-1], 32, 1) == 2


@pytest.mark.parametrize("bad", [0, 7, -8])
def test_pattern_rejects_bad_block_size(bad):
    with pytest.raises(ValueError):
        block_pattern(np.arange(2), bad, 0)


def test_channel_roundtrip_and_errors():
    r, w = os.pipe()
    try:
        reader = LineReader(r, max_line_bytes=1024)
        assert reader.poll() is None
        write_message(w, {"type": "a", "blob": b64encode(b"\x00\xff")})
        write_message(w, {"type": "b"})
        m = reader.read(1.0)
        assert m["type"] == "a" and b64decode(m["blob"]) == b"\x00\xff"
        assert reader.read(1.0) == {"type": "b"}
        with pytest.raises(ChannelTimeout):
            reader.read(0.05)
        os.write(w, b"[1,2]\n")
        with pytest.raises(ChannelError):
            reader.read(1.0)
        os.write(w, b"not json\n")
        with pytest.raises(ChannelError):
            reader.read(1.0)
        os.write(w, b"x" * 2048)
        with pytest.raises(ChannelError):
            reader.read(1.0)
    finally:
        os.close(w)
        os.close(r)


def test_channel_closed():
    r, w = os.pipe()
    os.close(w)
    try:
        with pytest.raises(ChannelClosed):
            LineReader(r).read(1.0)
    finally:
        os.close(r)


def test_config_json_roundtrip_and_validation():
    cfg = NixlReadConfig(block_bytes=4096, num_blocks=8, pool_blocks=16, reps=2, env={"UCX_TLS": "sm,self", "X": None},
                         ucx_error_handling=UcxErrorHandling.NONE, progress_thread=False, scattered=False)
    assert NixlReadConfig.from_json(cfg.to_json()) == cfg
    assert cfg.backend_params() == {"ucx_error_handling_mode": "none"}
    assert NixlReadConfig().backend_params() == {}
    for bad in (dict(pool_blocks=4, num_blocks=8), dict(block_bytes=12), dict(reps=0), dict(timeout_s=0)):
        with pytest.raises(ValueError):
            NixlReadConfig(**bad).validate()


def test_profiles():
    base = NixlReadConfig(num_blocks=8, pool_blocks=16, env={"A": "1"})
    d = profile_config(NixlProfile.DEFAULT, base)
    assert d.env == {"A": "1"} and d.ucx_error_handling is None and d.progress_thread and d.label == "default"
    t = profile_config(NixlProfile.TUNED, base)
    assert t.env == {"A": "1", "UCX_TLS": "sm,self"}
    assert t.ucx_error_handling is UcxErrorHandling.NONE and not t.progress_thread
    assert (t.num_blocks, t.pool_blocks) == (8, 16)
    s = profile_config(NixlProfile.SHM, base)
    assert s.env["UCX_TLS"] == "sm,self" and s.ucx_error_handling is None


def test_child_env_does_not_touch_ours(monkeypatch):
    monkeypatch.setenv("NIXL_BENCH_TEST_VAR", "keep")
    before = dict(os.environ)
    env = child_env({"UCX_TLS": "sm,self", "NIXL_BENCH_TEST_VAR": None})
    assert dict(os.environ) == before
    assert env["UCX_TLS"] == "sm,self" and "NIXL_BENCH_TEST_VAR" not in env
    assert env["PYTHONPATH"]
