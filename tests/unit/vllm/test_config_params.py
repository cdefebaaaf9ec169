"""Typed config from kv_connector_extra_config, the kv_transfer_params contract, stats."""
import pytest

from nixl_connectors.vllm.config import UcxConnectorConfig
from nixl_connectors.vllm.params import Key, ParamsError, RemotePrefill
from nixl_connectors.vllm.stats import UcxConnectorStats


def test_config_defaults_work_for_two_instances_on_one_host():
    c = UcxConnectorConfig.from_extra_config(None)
    assert c.agent.listen_port_base == 0 and c.host == "127.0.0.1"
    assert c.agent.auth_key({}) is None


def test_config_coerces_types_and_rejects_unknown_keys():
    c = UcxConnectorConfig.from_extra_config({"lease_ttl_s": "5", "renew_interval_s": 1,
                                              "listen_port_base": "9000", "same_host_copy": "false"})
    assert c.lease_ttl_s == 5.0 and c.agent.listen_port_base == 9000
    assert c.agent.same_host_copy is False, "the string 'false' is false (no string tests)"
    with pytest.raises(ValueError, match="lease_tll_s"):
        UcxConnectorConfig.from_extra_config({"lease_tll_s": 5})
    with pytest.raises(ValueError, match="renew_interval_s"):
        UcxConnectorConfig.from_extra_config({"lease_ttl_s": 1, "renew_interval_s": 2})
    with pytest.raises(ValueError, match="pull_workers"):
        UcxConnectorConfig.from_extra_config({"pull_workers": 1.5})


def test_base_port_is_a_deprecated_alias(caplog):
    c = UcxConnectorConfig.from_extra_config({"base_port": 9100, "timeout_s": 3})
    assert c.agent.listen_port_base == 9100 and c.timeout_s == 3.0
    assert "deprecated" in caplog.text
    with pytest.raises(ValueError, match="both"):
        UcxConnectorConfig.from_extra_config({"base_port": 1, "listen_port_base": 2})


def test_literal_auth_key_is_refused_naming_the_alternatives():
    with pytest.raises(ValueError, match="auth_key_env.*auth_key_file"):
        UcxConnectorConfig.from_extra_config({"auth_key": "secret"})


def test_auth_key_from_env_var_or_private_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_UCX_KEY", "k1")
    c = UcxConnectorConfig.from_extra_config({"auth_key_env": "MY_UCX_KEY"})
    assert c.agent.auth_key() == b"k1"
    f = tmp_path / "key"
    f.write_text("k2\n")
    f.chmod(0o644)
    c = UcxConnectorConfig.from_extra_config({"auth_key_file": str(f)})
    with pytest.raises(ValueError, match="chmod 600"):
        c.agent.auth_key()
    f.chmod(0o600)
    assert c.agent.auth_key() == b"k2"


def _params(**over):
    p = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_request_id": "r",
         "remote_block_ids": [3, 1], "remote_host": "h", "remote_port": 5,
         "remote_lease_ids": ["L"], "tp_size": 1, "remote_num_tokens": 40}
    p.update(over)
    return p


def test_remote_prefill_parse_nixl_compatible_keys():
    r = RemotePrefill.parse(_params())
    assert r.agents == ("h:5",) and r.block_ids == (3, 1) and r.lease_ids == ("L",)
    assert r.block_size is None and r.group_block_ids == ((3, 1),)
    r = RemotePrefill.parse(_params(remote_agents=["a:1", "b:2"], remote_lease_ids=["x", "y"],
                                    tp_size=2, remote_block_ids=[[4, 5], [6]], remote_block_size=64))
    assert r.agents == ("a:1", "b:2") and r.group_block_ids == ((4, 5), (6,)) and r.tp_size == 2
    assert r.block_size == 64


@pytest.mark.parametrize("broken,match", [
    ({"remote_lease_ids": None}, "remote_lease_ids"),
    ({"remote_block_ids": ["x"]}, "remote_block_ids"),
    ({"remote_block_ids": [1, -2]}, "remote_block_ids"),
    ({"remote_block_ids": "12"}, "remote_block_ids"),
    ({"remote_agents": ["a:1", "b:2"]}, "agree"),
    ({"tp_size": 2}, "agree"),
    ({"tp_size": True}, "tp_size"),
    ({"tp_size": "1"}, "tp_size"),
    ({"remote_port": 70000}, "remote_port"),
    ({"remote_agents": ["nohostport"]}, "host:port"),
    ({"remote_engine_id": 7}, "remote_engine_id"),
    ({"remote_block_size": 0}, "remote_block_size"),
    ({"remote_num_tokens": -1}, "remote_num_tokens"),
])
def test_remote_prefill_parse_errors_name_the_field(broken, match):
    p = _params(**broken)
    if "remote_lease_ids" in broken and broken["remote_lease_ids"] is None:
        del p["remote_lease_ids"]
    with pytest.raises(ParamsError, match=match):
        RemotePrefill.parse(p)
    with pytest.raises(ParamsError):
        RemotePrefill.parse(["not", "a", "mapping"])


def test_keys_are_nixl_names():
    for k in ("do_remote_decode", "do_remote_prefill", "remote_engine_id", "remote_request_id",
              "remote_block_ids", "remote_host", "remote_port", "tp_size"):
        assert Key(k).value == k


def test_stats_aggregate_and_reduce():
    a, b = UcxConnectorStats(), UcxConnectorStats()
    assert a.is_empty()
    a.add("bytes_read", 2e9)
    a.add("transfer_seconds", 1.0)
    b.add("read_failures")
    b.add("leases_expired", 2)
    red = a.aggregate(b).reduce()
    assert red["bytes_read"] == 2e9 and red["read_GBps"] == 2.0
    assert red["read_failures"] == 1 and red["leases_expired"] == 2
    with pytest.raises(KeyError):
        a.add("nope")
    rebuilt = UcxConnectorStats(data=a.to_dict())
    assert rebuilt.reduce()["bytes_read"] == 2e9
