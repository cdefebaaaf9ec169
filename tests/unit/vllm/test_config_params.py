"""Typed config from kv_connector_extra_config, the kv_transfer_params contract, stats."""
import pytest

from nixl_connectors.vllm.config import UcxConnectorConfig
from nixl_connectors.vllm.params import Key, ParamsError, RemotePrefill
from nixl_connectors.vllm.stats import UcxConnectorStats


def test_config_defaults_work_for_two_instances_on_one_host():
    c = UcxConnectorConfig.from_extra_config(None)
    assert c.base_port == 0 and c.host == "127.0.0.1" and c.auth_key is None


def test_config_coerces_types_and_rejects_unknown_keys():
    c = UcxConnectorConfig.from_extra_config({"lease_ttl_s": "5", "renew_interval_s": 1,
                                              "base_port": "9000", "auth_key": "k"})
    assert c.lease_ttl_s == 5.0 and c.base_port == 9000 and c.auth_key == "k"
    with pytest.raises(ValueError, match="lease_tll_s"):
        UcxConnectorConfig.from_extra_config({"lease_tll_s": 5})
    with pytest.raises(ValueError, match="renew_interval_s"):
        UcxConnectorConfig.from_extra_config({"lease_ttl_s": 1, "renew_interval_s": 2})


def _params(**over):
    p = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_request_id": "r",
         "remote_block_ids": [3, 1], "remote_host": "h", "remote_port": 5,
         "remote_lease_ids": ["L"], "tp_size": 1, "remote_num_tokens": 40}
    p.update(over)
    return p


def test_remote_prefill_parse_nixl_compatible_keys():
    r = RemotePrefill.parse(_params())
    assert r.agents == ("h:5",) and r.block_ids == (3, 1) and r.lease_ids == ("L",)
    r = RemotePrefill.parse(_params(remote_agents=["a:1", "b:2"], remote_lease_ids=["x", "y"],
                                    tp_size=2, remote_block_ids=[[4, 5]]))
    assert r.agents == ("a:1", "b:2") and r.block_ids == (4, 5) and r.tp_size == 2


@pytest.mark.parametrize("broken", [
    {"remote_lease_ids": None}, {"remote_block_ids": ["x"]}, {"remote_agents": ["a:1", "b:2"]}])
def test_remote_prefill_parse_errors(broken):
    p = _params(**broken)
    if broken.get("remote_lease_ids", 1) is None:
        del p["remote_lease_ids"]
    with pytest.raises(ParamsError):
        RemotePrefill.parse(p)


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
