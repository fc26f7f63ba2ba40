"""What the decisions report, and to whom: the :class:`Observer` protocol. Pure.

The decisions (``Operation``, ``Shared``) call an observer at each step of an
operation and at every breaker transition; ``_observe.telemetry.Telemetry``
implements it (spans, events, metrics, logs, hooks). An observer keeps its own
per-operation state (a span, a context token) in the one slot an operation keeps
for it, ``Operation.observed``; the decisions never read it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from .breaker import Transition
    from .operation import Operation

#: How an operation ended (``redis.resilience.outcome``).
Outcome = Literal["ok", "retried", "rejected", "failed", "deadline_exceeded", "error", "cancelled"]


class Scope(Protocol):
    """What the decisions and the observer keep on a request scope (``RequestScope``)."""

    #: ``time.monotonic()`` value at which the scope's Redis time is spent, or None.
    deadline_at: float | None
    operations: int
    failures: int
    rejections: int
    fallbacks: int
    #: The observer's: where it writes the request summary (found at first use).
    summary_span: Any

    @property
    def degraded(self) -> bool: ...


class Observer(Protocol):
    """Receives every step of every operation, and every breaker transition.

    Must never raise into the decisions: an observer catches its own failures.
    ``error`` is opaque to the decisions: the exception an attempt raised, or the
    ``RedisUnavailable`` the driver raised for a verdict.
    """

    def on_start(self, op: Operation) -> None:
        """The operation begins (before its first attempt is permitted)."""

    def on_retry(self, op: Operation, delay: float, error: BaseException) -> None:
        """Attempt ``op.attempts`` failed with ``error``; another runs after ``delay`` seconds."""

    def on_rejected(self, op: Operation, reason: str) -> None:
        """The operation (or its retry) was short-circuited without touching the network."""

    def on_finish(self, op: Operation, outcome: Outcome, error: BaseException | None, now: float) -> None:
        """The operation ended."""

    def on_transitions(self, moved: Sequence[Transition]) -> None:
        """The breaker changed state (reported outside the lock, in order)."""
