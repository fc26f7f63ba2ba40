"""Exceptions raised by the library."""

from __future__ import annotations

import redis.exceptions

# Defined on the decision floor, which may not import redis; raised from here too.
from ._decide.errors import ConfigurationError, UnavailableReason

__all__ = ["ConfigurationError", "RedisUnavailable", "UnavailableReason"]


class RedisUnavailable(redis.exceptions.ConnectionError):
    """Redis could not serve this call, and the library gave up on it.

    A subclass of :class:`redis.exceptions.ConnectionError`, so ``except
    ConnectionError`` clauses written for plain redis-py keep working.

    Attributes:
        reason: Why no (further) attempt was made. When several hold, the first
            in this list is given, so timing never changes the reason:

            - ``"unsafe_to_retry"``: the command may already have run on the
              server (it was sent and no reply came back), and a second run
              would not answer what the first did (``INCR``, ``DEL``,
              ``SADD``...), so it was not sent again. ``outcome_unknown`` is true.
            - ``"write_refused"``: the server refused the write without running
              it and still serves reads (``READONLY``, ``OOM``, ``MISCONF``,
              ``NOREPLICAS``; see ``error_code``). Not retried.
            - ``"deadline_exceeded"``: the request scope's deadline ran out.
            - ``"retries_exhausted"``: every one of ``RetryPolicy.max_attempts``
              attempts failed.
            - ``"breaker_opened"``: an attempt failed and that failure (or a
              concurrent one) opened the breaker, so no retry was made.
            - ``"budget_exhausted"``: a retry was due but the process-wide retry
              budget was spent.
            - ``"breaker_open"``: the circuit breaker rejected the call (or its
              retry) without touching the network.
            - ``"journal_failed"``: a ``write_behind()`` write could neither be
              applied nor journaled (the journal's disk is full or failing).
              Nothing was kept; the journal error is the ``__cause__``.
        operation: The Redis operation name (``"GET"``, ``"PIPELINE"``...).
        attempts: How many attempts were made (0 when rejected up front).
        outcome_unknown: True when the command may have been applied by the
            server although no reply arrived: it was sent, and the connection
            failed or timed out before the reply. False means it was certainly
            not applied by any attempt that failed (it was never sent, or the
            server refused it without running it).
        error_code: The Redis error code of the last error reply
            (``"READONLY"``, ``"LOADING"``...), or None.
        node: On a Redis Cluster, the node the call gave up on (``"host:port"``);
            for a cross-slot call that failed on several nodes, the first of them
            (all are named in the message and in ``nodes``). None for a single
            endpoint.
        nodes: Every node that failed (a cross-slot call); ``()`` for a single endpoint.

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
        error_code: str | None = None,
        node: str | None = None,
        nodes: tuple[str, ...] = (),
    ) -> None:
        self.reason: UnavailableReason = reason
        self.operation = operation
        self.attempts = attempts
        self.outcome_unknown = outcome_unknown
        self.error_code = error_code
        if node is not None and not nodes:
            nodes = (node,)
        self.nodes = nodes
        self.node = node if node is not None else (nodes[0] if nodes else None)
        msg = f"Redis unavailable ({reason})"
        if operation:
            msg += f" for {operation} after {attempts} attempt{'s' if attempts != 1 else ''}"
        if nodes:
            msg += f" on {', '.join(nodes)}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments need help to survive pickling (multiprocessing, Celery).
        return (
            _rebuild,
            (
                self.reason,
                self.operation,
                self.attempts,
                self.outcome_unknown,
                str(self),
                self.error_code,
                self.node,
                self.nodes,
            ),
        )


def _rebuild(
    reason: UnavailableReason,
    operation: str,
    attempts: int,
    outcome_unknown: bool,
    message: str,
    error_code: str | None = None,
    node: str | None = None,
    nodes: tuple[str, ...] = (),
) -> RedisUnavailable:
    exc = RedisUnavailable(
        reason,
        operation=operation,
        attempts=attempts,
        outcome_unknown=outcome_unknown,
        error_code=error_code,
        node=node,
        nodes=nodes,
    )
    exc.args = (message,)
    return exc


# Printed and pickled under the public name, not the private module's.
RedisUnavailable.__module__ = "otel_redis_resilience"
