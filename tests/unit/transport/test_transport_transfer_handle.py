"""Transfer handles: a read served on the calling thread returns an already completed Transfer
that shares one finished future; it behaves like any other successful transfer (wait, await,
done, error, cancel), and nothing one caller does to it reaches another's."""
from __future__ import annotations

import asyncio

from transport.transfer import Transfer


def _calls():
    seen = []
    return seen, seen.append


def test_a_completed_transfer_is_a_successful_one():
    seen, schedule = _calls()
    a, b = Transfer.completed(4096, schedule), Transfer.completed(8, schedule)
    for t in (a, b):
        assert t.done() and t.error is None
        t.wait(0)
        t.wait()
        t.cancel()   # finished: nothing to stop, nothing scheduled
        t._finish(RuntimeError("late"))   # a late report cannot turn a success into a failure
        assert t.error is None
    assert a.nbytes == 4096 and b.nbytes == 8 and seen == []


def test_a_completed_transfer_can_be_awaited_many_times_from_loops():
    t = Transfer.completed(1, lambda fn: None)

    async def main():
        await t
        await asyncio.gather(t, t)   # (each await wraps the shared future anew)

    for _ in range(3):   # a new loop each time
        asyncio.run(main())
    assert t.done() and t.error is None


def test_a_plain_transfer_still_settles_once():
    seen, schedule = _calls()
    t = Transfer(16, schedule)
    assert not t.done()
    t._finish(None)
    t._finish(RuntimeError("second report ignored"))
    assert t.done() and t.error is None
    u = Transfer(16, schedule)
    u._finish(ValueError("bad"))
    assert isinstance(u.error, ValueError)
    assert not Transfer(1, schedule).done(), "a new transfer shares no state with a completed one"
