"""Sorting the errors of one attempt into kinds the decisions act on. Pure.

The error-reply table (docs/configuration.md, "Error replies") is written here
once: which replies are evidence against Redis, which are retried, which reach
the caller unchanged and which are a refused write.
"""

from __future__ import annotations

import enum
import socket

import redis.exceptions as rexc


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


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of an error reply (``"READONLY"``), or None.

    redis-py strips the code from the message of the errors it knows and keeps
    it in ``status_code``; for the others it is the first word of the message.
    """
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code in KNOWN_CODES:
        return code
    if isinstance(exc, rexc.ResponseError) and exc.args:
        text = str(exc.args[0])
        # A pipeline's error is re-worded: "Command # 2 (<its args>) of pipeline caused
        # error: CODE ..." (asyncio: "('CODE ...',)"); the args may hold that phrase too.
        marker = text.rfind("caused error: ")
        if marker >= 0:
            text = text[marker + 14 :].lstrip("('\"")
        word = text.split(" ", 1)[0]
        if word in KNOWN_CODES:
            return word
    return None


_MAXCLIENTS = "max number of clients reached"


def classify(exc: BaseException) -> ErrorKind:
    """Sort an exception raised by one attempt."""
    if not isinstance(exc, Exception):
        return ErrorKind.ABORTED
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
        return ErrorKind.CALLER
    if isinstance(exc, rexc.ResponseError | rexc.BusyLoadingError):
        code = error_code(exc)
        if code is not None:
            return ERROR_REPLIES.get(code, ErrorKind.CALLER)
        return ErrorKind.NOT_SERVING if isinstance(exc, rexc.BusyLoadingError) else ErrorKind.CALLER
    if isinstance(exc, rexc.MaxConnectionsError) or (
        isinstance(exc, rexc.ConnectionError)
        and (str(exc).startswith("Too many connections") or _MAXCLIENTS in str(exc))
    ):
        # The server's maxclients refuses new connections only; pooled ones still work.
        return ErrorKind.POOL_EXHAUSTED
    if isinstance(exc, rexc.TimeoutError | socket.timeout | TimeoutError):
        return ErrorKind.TIMEOUT
    if isinstance(exc, rexc.ConnectionError | OSError):
        return ErrorKind.CONNECTION
    return ErrorKind.CALLER


# One name for one thing: a timeout is redis-py's TimeoutError whichever layer
# noticed it (redis-py's socket read, our sync socket cap, our asyncio watchdog).
_TIMEOUT_TYPE = "redis.exceptions.TimeoutError"


def error_type(exc: BaseException) -> str:
    """A low-cardinality name for an error, for ``error.type``."""
    code = error_code(exc)
    if code is not None:
        return code
    if isinstance(exc, rexc.TimeoutError | TimeoutError):
        return _TIMEOUT_TYPE
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"
