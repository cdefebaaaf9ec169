"""The hot wait for a CUDA event (event_wait.py), with a stand-in driver query and event: the
poll's ending conditions, and that every way out that is not "done" blocks in synchronize()."""
import itertools

import pytest

from transport import AgentConfig, event_wait
from transport.event_wait import CUDA_ERROR_NOT_READY, CUDA_SUCCESS


class FakeEvent:
    def __init__(self, handle=1234):
        self.cuda_event = handle
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


def answers(*codes):
    it = iter(codes)
    seen = []

    def query(h):
        seen.append(h)
        return next(it)
    return query, seen


def test_poll_returns_true_once_the_event_is_done():
    q, seen = answers(CUDA_ERROR_NOT_READY, CUDA_ERROR_NOT_READY, CUDA_SUCCESS)
    assert event_wait.poll(q, 77, 10.0) is True
    assert seen == [77, 77, 77]


def test_poll_gives_up_on_a_driver_error_at_once():
    q, seen = answers(CUDA_ERROR_NOT_READY, 700)   # 700: an illegal address, sticky
    assert event_wait.poll(q, 1, 10.0) is False
    assert len(seen) == 2


def test_poll_gives_up_when_its_time_has_passed():
    ticks = itertools.count()
    q, seen = answers(*[CUDA_ERROR_NOT_READY] * 100)
    assert event_wait.poll(q, 1, 5.0, clock=lambda: float(next(ticks))) is False
    assert 1 <= len(seen) <= 7   # (one clock read to start, one per unfinished answer)


@pytest.fixture
def driver(monkeypatch):
    box = {}

    def install(*codes):
        q, seen = answers(*codes)
        box["seen"] = seen
        monkeypatch.setattr(event_wait, "_driver_query", lambda: q)
        return seen
    return install


def test_wait_polls_and_does_not_block_when_the_kernel_ends_in_time(driver):
    seen = driver(CUDA_ERROR_NOT_READY, CUDA_SUCCESS)
    ev = FakeEvent(99)
    event_wait.wait(ev, 1.0)
    assert ev.synchronized == 0 and seen == [99, 99]


def test_wait_blocks_after_a_driver_error_so_torch_raises_it(driver):
    driver(719)
    ev = FakeEvent()
    event_wait.wait(ev, 1.0)
    assert ev.synchronized == 1


@pytest.mark.parametrize("case", ["no driver", "no handle", "spin off"])
def test_wait_blocks_when_it_cannot_or_must_not_poll(monkeypatch, case):
    calls = []
    monkeypatch.setattr(event_wait, "_driver_query",
                        lambda: None if case == "no driver" else (lambda h: calls.append(h) or CUDA_SUCCESS))
    ev = FakeEvent(0 if case == "no handle" else 5)
    event_wait.wait(ev, 0.0 if case == "spin off" else 1.0)
    assert ev.synchronized == 1 and calls == []


def test_handle_of_an_object_without_one_is_zero():
    assert event_wait.handle_of(object()) == 0
    assert event_wait.handle_of(FakeEvent(None)) == 0
    assert event_wait.handle_of(FakeEvent(0x7f00)) == 0x7f00


def test_no_libcuda_on_this_machine_means_blocking_waits():
    # (CPU CI has no driver: the helper must say so rather than fail)
    q = event_wait._driver_query()
    assert q is None or callable(q)


@pytest.mark.parametrize("bad", [-0.001, 1.5])
def test_config_refuses_a_spin_outside_zero_to_one_second(bad):
    with pytest.raises(ValueError, match="gpu_spin_wait_s"):
        AgentConfig(gpu_spin_wait_s=bad)
    assert AgentConfig(gpu_spin_wait_s=0.0).gpu_spin_wait_s == 0.0
