"""Table slots (gpu_upload): a slot is reused only after the kernel that read it is known to be
done, by its event or by a waiter that synchronized it; a waiter of an older use cannot free a
slot that another read has taken since. No GPU: the event is a stand-in."""
from __future__ import annotations

import numpy as np

from transport import gpu_upload
from transport.gpu_upload import Held, Slot


class _Event:
    def __init__(self):
        self.done = False
        self.queries = 0

    def query(self):
        self.queries += 1
        return self.done


def _slot():
    return Slot(None, np.zeros(4, np.int64), None, True, _Event())


def test_a_recorded_slot_is_busy_until_its_event_completes():
    sl = _slot()
    assert sl.free()
    sl.busy = True
    assert not sl.free()
    gpu_upload.SLOTS.release(sl, True)
    assert not sl.free()
    assert sl.event.queries == 1
    sl.event.done = True
    assert sl.free() and sl.free()
    assert sl.event.queries == 2, "a completed event is not asked again"


def test_a_synchronized_waiter_frees_its_slot_without_a_query(monkeypatch):
    slots = gpu_upload.UploadSlots()
    monkeypatch.setattr(gpu_upload, "SLOTS", slots)
    sl = _slot()
    sl.busy, sl.uses = True, 1
    slots.release(sl, True)
    Held(sl, 1).synced()
    assert sl.free() and sl.event.queries == 0


def test_an_old_waiter_cannot_free_a_slot_taken_since(monkeypatch):
    slots = gpu_upload.UploadSlots()
    monkeypatch.setattr(gpu_upload, "SLOTS", slots)
    sl = _slot()
    sl.busy, sl.uses = True, 1
    slots.release(sl, True)
    sl.event.done = True
    assert sl.free()
    sl.busy, sl.uses = True, 2            # another read took it and recorded again
    sl.event.done = False
    slots.release(sl, True)
    Held(sl, 1).synced()                  # the first read's waiter, late
    assert not sl.free(), "freed while the second read's kernel may still read it"


def test_take_prefers_a_slot_known_free_over_asking_an_event():
    """A slot whose kernel may still run (say, the one a lease grant's upload just used) is asked
    (an event query: a driver call) only when no slot is known to be free."""
    class Dev:
        index = 0

    slots = gpu_upload.UploadSlots()
    pending, idle = _slot(), _slot()
    pending.pending = True
    pending.event.done = True
    slots._by_device[0] = [pending, idle]
    assert slots.take(Dev(), 4) is idle and pending.event.queries == 0
    assert slots.take(Dev(), 4) is pending and pending.event.queries == 1
    assert pending.busy and idle.busy


def test_an_unrecorded_slot_stays_taken_until_its_waiter_synchronized(monkeypatch):
    """A granted read records no event (it synchronizes the side stream itself): its slot stays
    busy, so no other read can take it and overwrite the table the kernel still reads, until
    that read's synced() frees it, with no event query ever."""
    slots = gpu_upload.UploadSlots()
    monkeypatch.setattr(gpu_upload, "SLOTS", slots)
    sl = _slot()
    slots._by_device[0] = [sl]
    dev = type("D", (), {"index": 0})()
    taken = slots.take(dev, 4)
    assert taken is sl and sl.busy
    held = Held(sl, sl.uses, recorded=False)
    assert not sl.free(), "an unrecorded slot looked free before its waiter synchronized"
    held.synced()
    assert sl.free() and not sl.pending and sl.event.queries == 0
    assert slots.take(dev, 4) is sl
