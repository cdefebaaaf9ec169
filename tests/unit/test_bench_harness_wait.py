import pytest

from nixl_connectors.tools.bench.harness_wait import WAIT_ENV, HarnessWait, mode_from_env, sync_device


def test_mode_from_env_default_and_choices(monkeypatch):
    monkeypatch.delenv(WAIT_ENV, raising=False)
    assert mode_from_env() is HarnessWait.POLL
    monkeypatch.setenv(WAIT_ENV, " Block ")
    assert mode_from_env() is HarnessWait.BLOCK
    monkeypatch.setenv(WAIT_ENV, "nap")
    with pytest.raises(ValueError, match="poll, block"):
        mode_from_env()


@pytest.mark.parametrize("mode", list(HarnessWait))
def test_a_host_device_needs_no_wait(mode):
    sync_device("cpu", mode)   # (must not import CUDA machinery or fail on a CPU machine)
