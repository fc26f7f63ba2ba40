"""Per-attempt state shared between the drivers and the connection hooks."""

from __future__ import annotations

from contextvars import ContextVar


class Attempt:
    """One attempt in flight.

    The connection hooks read ``deadline`` to cap every blocking socket call,
    and set ``sent`` when a byte of the command (not of the connection
    handshake) is handed to the socket: from then on, the command may have run.
    """

    __slots__ = ("deadline", "expired", "sent")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.sent = False
        #: Set by the asyncio watchdog when it cancels the attempt at its deadline.
        self.expired = False


CURRENT_ATTEMPT: ContextVar[Attempt | None] = ContextVar("otel_redis_resilience_attempt", default=None)
