"""The adapter kit: typed coercion of settings, aliases, keys by name, compat dict."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from nixl_connectors.kit import AgentSettings, ConfigError, KvCompat, coerce_mapping
from nixl_connectors.kit.agent_factory import agent_config
from nixl_connectors.kit.settings import DEPRECATED_ALIASES
from transport import TransportSet


@dataclass(frozen=True)
class S:
    flag: bool = False
    n: int = 0
    x: float = 1.0
    name: str = ""
    opt: int | None = None
    hosts: tuple[str, ...] = ()
    ts: TransportSet = TransportSet.AUTO


@pytest.mark.parametrize("raw,want", [(True, True), (False, False), ("False", False), ("true", True),
                                      ("0", False), ("1", True), (0, False), (1, True)])
def test_bool_is_parsed_not_truthy(raw, want):
    assert S(**coerce_mapping(S, {"flag": raw})).flag is want


@pytest.mark.parametrize("raw", ["maybe", 2, 1.5, None])
def test_bad_bool_is_an_error(raw):
    with pytest.raises(ConfigError, match="flag"):
        coerce_mapping(S, {"flag": raw})


def test_types():
    kw = coerce_mapping(S, {"n": "7", "x": 3, "name": "a", "opt": None, "hosts": ["h:1", "h:2"], "ts": "tcp"})
    assert S(**kw) == S(n=7, x=3.0, name="a", opt=None, hosts=("h:1", "h:2"), ts=TransportSet.TCP)
    assert coerce_mapping(S, {"opt": 5})["opt"] == 5
    for bad in ({"n": 1.5}, {"n": True}, {"x": "fast"}, {"name": 3}, {"hosts": "h:1"}, {"ts": "carrier-pigeon"}):
        with pytest.raises(ConfigError):
            coerce_mapping(S, bad)


def test_unknown_and_aliases():
    with pytest.raises(ConfigError, match="nope"):
        coerce_mapping(S, {"nope": 1})
    assert coerce_mapping(S, {"old": 3}, aliases={"old": "n"}) == {"n": 3}
    with pytest.raises(ConfigError, match="both"):
        coerce_mapping(S, {"old": 3, "n": 4}, aliases={"old": "n"})


def test_agent_settings_from_mapping_with_deprecated_names():
    kw = coerce_mapping(AgentSettings, {"base_port": "5600", "transfer_timeout_s": 9, "gpu_ipc": "false"},
                        aliases=DEPRECATED_ALIASES)
    s = AgentSettings(**kw)
    assert (s.listen_port_base, s.timeout_s, s.gpu_ipc) == (5600, 9.0, False)
    assert s.listen_address(3) == "127.0.0.1:5603"
    assert s.advertised("127.0.0.1:41000") == "127.0.0.1:41000"
    assert AgentSettings(listen_host="0.0.0.0", advertise_host="10.0.0.2").advertised("0.0.0.0:7") == "10.0.0.2:7"


def test_auth_key_from_env_or_file(tmp_path):
    s = AgentSettings(auth_key_env="MY_KEY")
    assert s.auth_key({}) is None
    assert s.auth_key({"MY_KEY": "sekret"}) == b"sekret"
    f = tmp_path / "key"
    f.write_text("filekey\n")
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        AgentSettings(auth_key_file=str(f)).auth_key()
    os.chmod(f, 0o600)
    assert AgentSettings(auth_key_file=str(f)).auth_key({"NIXL_CONNECTORS_AUTH_KEY": "x"}) == b"filekey"
    with pytest.raises(ConfigError, match="missing|No such"):
        AgentSettings(auth_key_file=str(tmp_path / "missing")).auth_key()


def test_agent_config_carries_everything():
    s = AgentSettings(listen_port_base=7000, timeout_s=4, transports=TransportSet.TCP, same_host_copy=False,
                      gpu_ipc=False, gpu_direct_tables=False, auth_key_env="K")
    os.environ["K"] = "abc"
    try:
        c = agent_config(s, 2, {"model": "m"})
    finally:
        del os.environ["K"]
    assert (c.listen, c.auth_key, c.timeout_s, c.transports, c.same_host_copy, c.gpu_ipc, c.compat) == (
        "127.0.0.1:7002", b"abc", 4.0, TransportSet.TCP, False, False, {"model": "m"})
    assert c.gpu_direct_tables is False and agent_config(AgentSettings(), 0, {}).gpu_direct_tables is True


def test_compat_dict():
    c = KvCompat("vllm", "m", "bfloat16", 4, "Nx2x16x64").with_extra({"head_bytes": 128})
    d = c.to_dict()
    assert d == {"engine": "vllm", "model": "m", "dtype": "bfloat16", "num_layers": 4, "kv_layout": "Nx2x16x64",
                 "schema": 2, "head_bytes": 128}
    with pytest.raises(ValueError):
        KvCompat("vllm", "m", "x", 1).with_extra({"model": "y"}).to_dict()
