"""dataeps.abort_when_idle: an endpoint left open for its blocked sends is aborted once they end,
never on a timer; past MAX_PARKED endpoints the oldest is aborted anyway (with an error logged)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from transport import dataeps


class _Endpoint:
    """Stands in for a ucxx endpoint: records when it was aborted."""

    def __init__(self) -> None:
        self.aborted = 0

    def abort(self, period: int, max_attempts: int) -> None:
        self.aborted += 1


async def _until(cond, what: str) -> None:
    while not cond():
        await asyncio.sleep(0.01)


def test_aborted_once_its_sends_end():
    async def main():
        ep, parked = _Endpoint(), {}
        release = asyncio.Event()
        send = asyncio.create_task(release.wait())
        dataeps.abort_when_idle(ep, [send], parked)
        await asyncio.sleep(0.05)
        assert ep.aborted == 0 and list(parked.values()) == [ep]   # kept open under the blocked send
        release.set()
        await _until(lambda: not parked, "closer done")
        assert ep.aborted == 1

    asyncio.run(asyncio.wait_for(main(), 30))


def test_past_the_bound_the_oldest_is_aborted_anyway(monkeypatch, caplog):
    monkeypatch.setattr(dataeps, "MAX_PARKED", 2)

    async def main():
        parked = {}
        eps = [_Endpoint() for _ in range(3)]
        never = [asyncio.create_task(asyncio.Event().wait()) for _ in eps]
        for ep, send in zip(eps, never):
            dataeps.abort_when_idle(ep, [send], parked)
            await asyncio.sleep(0.01)
        await _until(lambda: eps[0].aborted == 1 and len(parked) == 2, "the oldest aborted")
        await asyncio.sleep(0.05)
        assert [ep.aborted for ep in eps] == [1, 0, 0]
        assert list(parked.values()) == eps[1:]
        for t in never:
            t.cancel()
        await _until(lambda: not parked, "the rest aborted once their sends ended")
        assert [ep.aborted for ep in eps] == [1, 1, 1]

    with caplog.at_level(logging.ERROR, logger="transport.dataeps"):
        asyncio.run(asyncio.wait_for(main(), 30))
    assert any("aborting the oldest anyway" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ended", [True, False])
def test_no_sends_left_means_an_abort_at_once(ended):
    async def main():
        ep, parked = _Endpoint(), {}
        done = asyncio.create_task(asyncio.sleep(0))
        await done
        dataeps.abort_when_idle(ep, [done] if ended else [], parked)
        await _until(lambda: not parked, "closer done")
        assert ep.aborted == 1

    asyncio.run(asyncio.wait_for(main(), 30))
