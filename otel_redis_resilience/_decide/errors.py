"""What the decisions know of errors: kinds, the error-reply table, the reasons to give up. Pure.

Exceptions are sorted into an :class:`ErrorKind` at the I/O boundary
(``_drive/classify.py``, which knows redis-py's exception classes); the decisions
only ever see the kind and the error code. The error-reply table
(docs/configuration.md, "Error replies") is written here once: which replies are
evidence against Redis, which are retried, which reach the caller unchanged and
which are a refused write.
"""

from __future__ import annotations

import enum
from typing import Literal


class ConfigurationError(ValueError):
    """A configuration value is invalid. Raised at construction, naming the field."""


# Printed and pickled under the public name, not the private module's.
ConfigurationError.__module__ = "otel_redis_resilience"

#: Why a call did not reach a usable reply from Redis (``RedisUnavailable.reason``).
UnavailableReason = Literal[
    "breaker_open",
    "breaker_opened",
    "retries_exhausted",
    "budget_exhausted",
    "deadline_exceeded",
    "unsafe_to_retry",
    "write_refused",
    "journal_failed",
]


class ErrorKind(enum.Enum):
    #: The caller's bug or configuration (WRONGTYPE, syntax, NOSCRIPT, NOAUTH,
    #: WRONGPASS, NOPERM...): raised unchanged, never retried, never counted.
    CALLER = "caller"
    #: No reply in time: Redis may be hung, or the attempt's time was too short.
    TIMEOUT = "timeout"
    #: The connection failed (refused, reset, closed): Redis is unreachable.
    CONNECTION = "connection"
    #: The server answered that it serves nothing now (LOADING, BUSY,
    #: MASTERDOWN): the command did not run; retried, and evidence against it.
    NOT_SERVING = "not_serving"
    #: The cluster answered "not now" (TRYAGAIN, CLUSTERDOWN): the command did
    #: not run; retried, but no evidence against this node.
    TRANSIENT = "transient"
    #: The server refused a write it cannot take now (READONLY, OOM, MISCONF,
    #: NOREPLICAS) while it still serves reads: not retried, not evidence.
    WRITE_REFUSED = "write_refused"
    #: No connection could be had from the client's own pool: a local limit,
    #: retried but not held against Redis.
    POOL_EXHAUSTED = "pool_exhausted"
    #: Not an error of the call at all (cancellation, KeyboardInterrupt).
    ABORTED = "aborted"


#: Error codes and their kind. Codes not listed are the caller's.
ERROR_REPLIES: dict[str, ErrorKind] = {
    "LOADING": ErrorKind.NOT_SERVING,
    "BUSY": ErrorKind.NOT_SERVING,
    "MASTERDOWN": ErrorKind.NOT_SERVING,
    "TRYAGAIN": ErrorKind.TRANSIENT,
    "CLUSTERDOWN": ErrorKind.TRANSIENT,
    "READONLY": ErrorKind.WRITE_REFUSED,
    "OOM": ErrorKind.WRITE_REFUSED,
    "MISCONF": ErrorKind.WRITE_REFUSED,
    "NOREPLICAS": ErrorKind.WRITE_REFUSED,
    "NOAUTH": ErrorKind.CALLER,
    "WRONGPASS": ErrorKind.CALLER,
    "NOPERM": ErrorKind.CALLER,
}

#: The error codes redis-server sends. Only these are believed when read from an
#: error's text: a script's error reply or a pipeline's re-worded message can put
#: anything there, a key or a value included.
KNOWN_CODES = frozenset(
    {
        "ERR", "WRONGTYPE", "NOSCRIPT", "OOM", "EXECABORT", "LOADING", "BUSY", "BUSYKEY", "BUSYGROUP",
        "NOGROUP", "READONLY", "NOAUTH", "WRONGPASS", "NOPERM", "NOPROTO", "MISCONF", "MASTERDOWN",
        "NOREPLICAS", "CROSSSLOT", "CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK", "UNKILLABLE", "NOTBUSY",
        "UNBLOCKED", "NOTSUPPORTED",
    }
)  # fmt: skip

#: Kinds that say nothing against this Redis node.
NOT_EVIDENCE = frozenset({ErrorKind.TRANSIENT, ErrorKind.WRITE_REFUSED, ErrorKind.POOL_EXHAUSTED})
#: Kinds of error reply with which the server refused the command without running it.
REFUSED = frozenset({ErrorKind.NOT_SERVING, ErrorKind.TRANSIENT, ErrorKind.WRITE_REFUSED})


def code_in_text(text: str) -> str | None:
    """The error code an error reply's text starts with, if redis-server sends it.

    A pipeline's error is re-worded: "Command # 2 (<its args>) of pipeline caused
    error: CODE ..." (asyncio: "('CODE ...',)"); the args may hold that phrase too,
    so the last one counts.
    """
    marker = text.rfind("caused error: ")
    if marker >= 0:
        text = text[marker + 14 :].lstrip("('\"")
    word = text.split(" ", 1)[0]
    return word if word in KNOWN_CODES else None


def kind_of_code(code: str) -> ErrorKind:
    """The kind of an error reply with a known code."""
    return ERROR_REPLIES.get(code, ErrorKind.CALLER)
