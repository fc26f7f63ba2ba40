"""Sorting the errors of one attempt into kinds, at the I/O boundary.

This is the one place that knows redis-py's exception classes: the decisions
(``_decide``) get the :class:`ErrorKind` and the error code computed here, never
the exception's class. The table of error replies is ``_decide/errors.py``.
"""

from __future__ import annotations

import socket

import redis.exceptions as rexc

from .._decide.errors import KNOWN_CODES, NOT_EVIDENCE, REFUSED, ErrorKind, code_in_text, kind_of_code

__all__ = ["KNOWN_CODES", "NOT_EVIDENCE", "REFUSED", "ErrorKind", "classify", "error_code", "error_type"]


def error_code(exc: BaseException) -> str | None:
    """The Redis error code of an error reply (``"READONLY"``), or None.

    redis-py strips the code from the message of the errors it knows and keeps
    it in ``status_code``; for the others it is the first word of the message.
    """
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code in KNOWN_CODES:
        return code
    if isinstance(exc, rexc.ResponseError) and exc.args:
        return code_in_text(str(exc.args[0]))
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
            return kind_of_code(code)
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


def fallback_reason(exc: BaseException) -> str | None:
    """Why a fallback may answer instead of redis-py's own error, or None if it must not.

    Only redis-py's connection and timeout errors are unavailability; among them an
    authentication or authorization failure is the caller's (``CALLER``).
    """
    if not isinstance(exc, rexc.ConnectionError | rexc.TimeoutError):
        return None
    kind = classify(exc)
    if kind is ErrorKind.TIMEOUT:
        return "timeout"
    if kind is ErrorKind.CALLER:
        return None
    return "connection_error"


# One name for one thing: a timeout is redis-py's TimeoutError whichever layer
# noticed it (redis-py's socket read, our sync socket cap, our asyncio watchdog).
_TIMEOUT_TYPE = "redis.exceptions.TimeoutError"
_PACKAGE = "otel_redis_resilience"


def error_type(exc: BaseException) -> str:
    """A low-cardinality name for an error, for ``error.type``.

    Our own classes are named by the package (``otel_redis_resilience.X``), never by
    the private module that defines them: a module move must not rename a metric series.
    """
    code = error_code(exc)
    if code is not None:
        return code
    if isinstance(exc, rexc.TimeoutError | TimeoutError):
        return _TIMEOUT_TYPE
    cls = type(exc)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module.startswith(_PACKAGE + "."):
        module = _PACKAGE
    return f"{module}.{cls.__qualname__}"
