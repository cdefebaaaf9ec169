"""dataeps.abort_when_idle: an endpoint left open for its blocked sends is aborted once they end,
or at the park limit (then with a warning), and is counted while it waits."""
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


def test_aborted_once_its_sends_end():
    async def main():
        ep, parked = _Endpoint(), set()
        release = asyncio.Event()
        send = asyncio.create_task(release.wait())
        dataeps.abort_when_idle(ep, [send], parked)
        await asyncio.sleep(0.05)
        assert ep.aborted == 0 and len(parked) == 1      # kept open under the blocked send
        release.set()
        while parked:
            await asyncio.sleep(0.01)
        assert ep.aborted == 1

    asyncio.run(asyncio.wait_for(main(), 30))


def test_aborted_at_the_park_limit_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(dataeps, "ENDPOINT_PARK_S", 0.1)

    async def main():
        ep, parked = _Endpoint(), set()
        never = asyncio.create_task(asyncio.Event().wait())
        dataeps.abort_when_idle(ep, [never], parked)
        while parked:
            await asyncio.sleep(0.01)
        assert ep.aborted == 1
        never.cancel()

    with caplog.at_level(logging.WARNING, logger="transport.dataeps"):
        asyncio.run(asyncio.wait_for(main(), 30))
    assert any("still blocked" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("ended", [True, False])
def test_no_sends_left_means_an_abort_at_once(ended):
    async def main():
        ep, parked = _Endpoint(), set()
        done = asyncio.create_task(asyncio.sleep(0))
        await done
        dataeps.abort_when_idle(ep, [done] if ended else [], parked)
        while parked:
            await asyncio.sleep(0.01)
        assert ep.aborted == 1

    asyncio.run(asyncio.wait_for(main(), 30))
