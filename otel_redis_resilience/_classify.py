"""Which errors mean "Redis is unavailable" and which are the caller's bug. Pure."""

from __future__ import annotations

import enum
import socket

import redis.exceptions as rexc

# Error replies with which the server refuses a command without running it:
# retrying is safe whatever the command, and they say nothing about the caller.
_UNAVAILABLE_REPLIES = frozenset(
    {"LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "NOREPLICAS", "MISCONF"}
)


class ErrorKind(enum.Enum):
    #: The caller's bug (WRONGTYPE, syntax, NOSCRIPT, auth...): raise unchanged.
    CALLER = "caller"
    #: Redis is unreachable or did not answer in time; the command may have run.
    UNAVAILABLE = "unavailable"
    #: The server answered "not now" (LOADING, BUSY...): the command did not run.
    REFUSED = "refused"
    #: No connection could be had from the client's own pool: a local limit,
    #: retried but not held against Redis.
    POOL_EXHAUSTED = "pool_exhausted"
    #: Not an error of the call at all (cancellation, KeyboardInterrupt).
    ABORTED = "aborted"


def classify(exc: BaseException) -> ErrorKind:
    """Sort an exception raised by one attempt."""
    if not isinstance(exc, Exception):
        return ErrorKind.ABORTED
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
        return ErrorKind.CALLER
    if isinstance(exc, rexc.MaxConnectionsError) or (
        isinstance(exc, rexc.ConnectionError) and str(exc).startswith("Too many connections")
    ):
        return ErrorKind.POOL_EXHAUSTED
    if isinstance(
        exc, rexc.BusyLoadingError | rexc.TryAgainError | rexc.ClusterDownError | rexc.ReadOnlyError
    ):
        return ErrorKind.REFUSED
    if isinstance(exc, rexc.ConnectionError | rexc.TimeoutError | socket.timeout | TimeoutError | OSError):
        return ErrorKind.UNAVAILABLE
    if isinstance(exc, rexc.ResponseError):
        word = str(exc).split(" ", 1)[0]
        if word in _UNAVAILABLE_REPLIES:
            return ErrorKind.REFUSED
    return ErrorKind.CALLER


def error_type(exc: BaseException) -> str:
    """A low-cardinality name for an error, for ``error.type``."""
    if isinstance(exc, rexc.ResponseError):
        word = str(exc).split(" ", 1)[0]
        if word.isupper() and word.isalpha():
            return word
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"
