"""Exceptions raised by the library."""

from __future__ import annotations

from typing import Literal

import redis.exceptions

#: Why a call did not reach a usable reply from Redis.
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


class RedisUnavailable(redis.exceptions.ConnectionError):
    """Redis could not serve this call, and the library gave up on it.

    A subclass of :class:`redis.exceptions.ConnectionError`, so ``except
    ConnectionError`` clauses written for plain redis-py keep working.

    Attributes:
        reason: Why the call was given up:

            - ``"breaker_open"``: the circuit breaker rejected the call without
              touching the network.
            - ``"retries_exhausted"``: every one of ``RetryPolicy.max_attempts``
              attempts failed.
            - ``"budget_exhausted"``: a retry was due but the process-wide retry
              budget was spent.
            - ``"deadline_exceeded"``: the request scope's deadline ran out.
            - ``"unsafe_to_retry"``: a command that is not idempotent may
              already have run on the server (it was sent and no reply came
              back), so it was not sent again. ``outcome_unknown`` is true.
        operation: The Redis operation name (``"GET"``, ``"PIPELINE"``...).
        attempts: How many attempts were made (0 when rejected up front).
        outcome_unknown: True when the command may have been applied by the
            server although no reply arrived.

    The last underlying error, if any, is chained as ``__cause__``.
    """

    def __init__(
        self,
        reason: UnavailableReason,
        *,
        operation: str = "",
        attempts: int = 0,
        outcome_unknown: bool = False,
        detail: str = "",
    ) -> None:
        self.reason: UnavailableReason = reason
        self.operation = operation
        self.attempts = attempts
        self.outcome_unknown = outcome_unknown
        msg = f"Redis unavailable ({reason})"
        if operation:
            msg += f" for {operation} after {attempts} attempt{'s' if attempts != 1 else ''}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments need help to survive pickling (multiprocessing, Celery).
        return (
            _rebuild,
            (self.reason, self.operation, self.attempts, self.outcome_unknown, str(self)),
        )


def _rebuild(
    reason: UnavailableReason, operation: str, attempts: int, outcome_unknown: bool, message: str
) -> RedisUnavailable:
    exc = RedisUnavailable(reason, operation=operation, attempts=attempts, outcome_unknown=outcome_unknown)
    exc.args = (message,)
    return exc


class ConfigurationError(ValueError):
    """A configuration value is invalid. Raised at construction, naming the field."""
