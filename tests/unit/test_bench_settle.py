import time

import pytest

from nixl_connectors.tools.bench.settle import SETTLE_ENV, SettleMode, mode_from_env, settle


def test_mode_from_env_default_and_choices(monkeypatch):
    monkeypatch.delenv(SETTLE_ENV, raising=False)
    assert mode_from_env() is SettleMode.SLEEP
    monkeypatch.setenv(SETTLE_ENV, "SPIN")
    assert mode_from_env() is SettleMode.SPIN
    monkeypatch.setenv(SETTLE_ENV, "nap")
    with pytest.raises(ValueError, match="sleep, spin"):
        mode_from_env()


@pytest.mark.parametrize("mode", list(SettleMode))
def test_settle_lets_the_time_pass(mode):
    t0 = time.perf_counter()
    settle(0.003, mode)
    assert time.perf_counter() - t0 >= 0.003


def test_spin_keeps_the_thread_busy():
    c0, t0 = time.thread_time(), time.perf_counter()
    settle(0.02, SettleMode.SPIN)
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    # a busy loop uses CPU for (nearly) all of it; on a loaded 2-core machine the thread may be
    # preempted, so only ask for a clear majority of some of it
    assert cpu > 0.002 and wall >= 0.02


def test_the_readers_direct_tables_follow_the_env_or_the_default(monkeypatch):
    from nixl_connectors.tools.bench.ours import GPU_DIRECT_ENV, gpu_direct_from_env
    from transport import AgentConfig

    monkeypatch.delenv(GPU_DIRECT_ENV, raising=False)
    assert gpu_direct_from_env() is AgentConfig().gpu_direct_tables
    monkeypatch.setenv(GPU_DIRECT_ENV, "1")
    assert gpu_direct_from_env() is True
    monkeypatch.setenv(GPU_DIRECT_ENV, "0")
    assert gpu_direct_from_env() is False
    monkeypatch.setenv(GPU_DIRECT_ENV, "yes")
    with pytest.raises(ValueError, match="1 .on. or 0"):
        gpu_direct_from_env()
