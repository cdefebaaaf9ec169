"""Typed errors of the transport. Every failure a caller can see is a `TransferError`."""
from __future__ import annotations

from enum import Enum


class ErrorCode(str, Enum):
    """Error codes carried on the wire in ERROR replies."""

    TIMEOUT = "timeout"
    PEER_LOST = "peer_lost"
    NO_SUCH_LEASE = "no_such_lease"
    LEASE_EXPIRED = "lease_expired"
    NOT_ALLOWED = "not_allowed"
    SIZE_MISMATCH = "size_mismatch"
    PROTOCOL = "protocol"
    COMPAT = "compat"
    UNAUTHORIZED = "unauthorized"
    BAD_MESSAGE = "bad_message"
    CANCELLED = "cancelled"
    CALL_FAILED = "call_failed"
    PATH_UNAVAILABLE = "path_unavailable"   # the owner cannot serve the requested data path
    BUSY = "busy"                           # a bound was reached (inbox full, too many transfers)
    INTERNAL = "internal"


class TransferError(Exception):
    """Base class of every transport error."""

    code: ErrorCode = ErrorCode.INTERNAL


class TransferTimeout(TransferError, TimeoutError):
    """A deadline passed before the operation finished."""

    code = ErrorCode.TIMEOUT


class PeerLost(TransferError):
    """The peer died, closed the connection or became unreachable."""

    code = ErrorCode.PEER_LOST


class LeaseRejected(TransferError):
    """The owner refused a lease operation (unknown, expired, other peer's, wrong size...)."""

    code = ErrorCode.NO_SUCH_LEASE

    def __init__(self, message: str, code: ErrorCode = ErrorCode.NO_SUCH_LEASE):
        super().__init__(message)
        self.code = code


class ProtocolMismatch(TransferError):
    """The peer speaks another protocol version or sent a message that breaks the schema."""

    code = ErrorCode.PROTOCOL


class CompatMismatch(TransferError):
    """The peers' compatibility descriptions differ (model, dtype, layout, ...)."""

    code = ErrorCode.COMPAT

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Unauthorized(TransferError):
    """Authentication failed (wrong or missing key)."""

    code = ErrorCode.UNAUTHORIZED


class TransferCancelled(TransferError):
    """The transfer was cancelled by the caller."""

    code = ErrorCode.CANCELLED


class CallFailed(TransferError):
    """The peer's call handler raised, or the peer has no handler (`Agent.call`)."""

    code = ErrorCode.CALL_FAILED


class PathUnavailable(TransferError):
    """The owner cannot serve this lease over the requested data path (the reader falls back)."""

    code = ErrorCode.PATH_UNAVAILABLE


class Busy(TransferError):
    """The peer refused because one of its bounds is reached (notification inbox full, too many
    transfers in flight on the connection)."""

    code = ErrorCode.BUSY


class BadMessage(TransferError):
    """A malformed, truncated, oversized or unexpected message."""

    code = ErrorCode.BAD_MESSAGE


_BY_CODE: dict[ErrorCode, type[TransferError]] = {
    ErrorCode.TIMEOUT: TransferTimeout,
    ErrorCode.PEER_LOST: PeerLost,
    ErrorCode.PROTOCOL: ProtocolMismatch,
    ErrorCode.COMPAT: CompatMismatch,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.CANCELLED: TransferCancelled,
    ErrorCode.BAD_MESSAGE: BadMessage,
    ErrorCode.CALL_FAILED: CallFailed,
    ErrorCode.PATH_UNAVAILABLE: PathUnavailable,
    ErrorCode.BUSY: Busy,
}
_LEASE_CODES = {ErrorCode.NO_SUCH_LEASE, ErrorCode.LEASE_EXPIRED, ErrorCode.NOT_ALLOWED,
                ErrorCode.SIZE_MISMATCH}


def error_from_wire(code: str, message: str, field: str | None = None) -> TransferError:
    """Build the typed error for an ERROR reply received from a peer."""
    try:
        ec = ErrorCode(code)
    except ValueError:
        return TransferError(f"peer error ({code[:40]!r}): {message[:500]}")
    message = message[:500]
    if ec in _LEASE_CODES:
        return LeaseRejected(message, ec)
    if ec is ErrorCode.COMPAT:
        return CompatMismatch(message, field)
    return _BY_CODE.get(ec, TransferError)(message)
