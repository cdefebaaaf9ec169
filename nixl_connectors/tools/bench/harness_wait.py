"""How the bench's own code waits for the GPU (zeroing the destination before a timed transfer,
the synchronize that ends one), the same for ours, NIXL and the in-process references.

`block` is `torch.cuda.synchronize()`: the thread parks in the driver. On the GPU machine a
thread that parked for a few hundred microseconds (zeroing 512 MiB of blocks) ran the next
hundred microseconds 4-7x slower, so a transfer timed right after it paid for the harness's
wait. `poll` first polls an event recorded on the device's current stream (`transport.event_wait`,
the hot wait the transport itself uses), then synchronizes the device as `block` does (by then
nothing is left to wait for). Which one a run used is in the JSON (`harness_wait`);
``NIXL_CONNECTORS_BENCH_WAIT`` picks it.
"""
from __future__ import annotations

import enum

from .env_choice import choice_from_env

WAIT_ENV = "NIXL_CONNECTORS_BENCH_WAIT"
POLL_LIMIT_S = 1.0   # the harness's waits are short; past this it blocks


class HarnessWait(enum.Enum):
    POLL = "poll"
    BLOCK = "block"


def mode_from_env(default: HarnessWait = HarnessWait.POLL) -> HarnessWait:
    """The mode ``NIXL_CONNECTORS_BENCH_WAIT`` names; ValueError names the choices."""
    return choice_from_env(WAIT_ENV, HarnessWait, default)


def sync_device(device: str, mode: HarnessWait) -> None:
    """Wait until `device` (a torch device string) has finished all its work (nothing on CPU)."""
    if not device.startswith("cuda"):
        return
    import torch

    if mode is HarnessWait.POLL:
        from transport import event_wait

        event_wait.wait_stream(torch.cuda.current_stream(device), POLL_LIMIT_S)
    torch.cuda.synchronize(device)
