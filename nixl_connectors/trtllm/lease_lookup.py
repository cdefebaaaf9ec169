"""Generation side: ask the context worker under which lease it holds a request's blocks."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import directory as d
from .directory_service import AnswerMailbox

logger = logging.getLogger(__name__)

ANSWER_WAIT_S = 1.0
FIRST_RETRY_S = 0.01
MAX_RETRY_S = 0.2


class LeaseLookupFailed(RuntimeError):
    """The context side does not (or no longer, or cannot) hold the request's blocks."""


def lookup_lease(agent: Any, peer: Any, key: str, reply_to: str, mailbox: AnswerMailbox, *,
                 timeout_s: float, unknown_grace_s: float,
                 cancelled: threading.Event | None = None) -> d.Answer:
    """Ask until the lease is READY; raise `LeaseLookupFailed` on FAILED, on a key that stays
    UNKNOWN for ``unknown_grace_s``, on ``timeout_s`` in all, or when ``cancelled`` is set.
    Transport errors (peer lost, ...) propagate as they are."""
    start = time.monotonic()
    deadline = start + timeout_s
    delay = FIRST_RETRY_S
    while True:
        if cancelled is not None and cancelled.is_set():
            raise LeaseLookupFailed(f"lookup of {key} cancelled")
        now = time.monotonic()
        if now >= deadline:
            raise LeaseLookupFailed(f"no lease for {key} within {timeout_s:.1f}s")
        nonce = mailbox.new_nonce()
        agent.notify(peer, d.encode(d.Lookup(key, reply_to, nonce)))
        ans = mailbox.take(nonce, min(ANSWER_WAIT_S, max(0.01, deadline - now)))
        if ans is None:
            logger.debug("no answer to lookup %d of %s yet", nonce, key)
            continue
        if ans.status is d.LeaseStatus.READY:
            return ans
        if ans.status is d.LeaseStatus.FAILED:
            raise LeaseLookupFailed(f"the context side could not expose the blocks of {key}")
        if ans.status is d.LeaseStatus.UNKNOWN and time.monotonic() - start >= unknown_grace_s:
            raise LeaseLookupFailed(
                f"the context side does not know {key} (never ran, aborted, expired or already read)")
        time.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_S)
