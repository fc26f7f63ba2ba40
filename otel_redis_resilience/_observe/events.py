"""Instrumentation events and the hook protocol (in the style of stamina's hooks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeAlias

from .._decide.breaker import BreakerState


@dataclass(frozen=True, slots=True)
class Endpoint:
    """The Redis endpoint a ``Resilience`` guards."""

    address: str
    port: int | None
    db: int

    def __str__(self) -> str:
        return self.address if self.port is None else f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """An attempt failed and another one will run after ``delay`` seconds.

    ``error_message`` is the failure's redacted text (``"Timeout reading from socket"``):
    events never carry the exception itself, whose message may quote keys and values.
    """

    endpoint: Endpoint
    operation: str
    attempt: int
    delay: float
    error_type: str
    error_message: str = ""


@dataclass(frozen=True, slots=True)
class BreakerTransitioned:
    """The circuit breaker changed state."""

    endpoint: Endpoint
    previous: BreakerState
    new: BreakerState
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class CallRejected:
    """A call was short-circuited (``reason``: breaker_open, budget_exhausted, deadline_exceeded)."""

    endpoint: Endpoint
    operation: str
    reason: str


@dataclass(frozen=True, slots=True)
class OperationFinished:
    """A logical operation ended.

    ``outcome``: ok, retried, rejected, failed, deadline_exceeded, error (an error
    reply or another caller error, raised unchanged), or cancelled (the task was
    cancelled, or KeyboardInterrupt).

    On failure ``error_message`` is the redacted text also recorded on the span's
    ``exception`` event (``"ERR unknown command"``, ``"WRONGTYPE Operation against a key
    holding the wrong kind of value"``); None on success. The exception itself is not
    passed: its message may quote keys and values.
    """

    endpoint: Endpoint
    operation: str
    outcome: str
    attempts: int
    duration: float
    error_type: str | None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class FallbackUsed:
    """A fallback answered instead of Redis (``kind``: value, function, last_known_good, miss)."""

    endpoint: Endpoint
    operation: str
    kind: str
    reason: str


Event: TypeAlias = RetryScheduled | BreakerTransitioned | CallRejected | OperationFinished | FallbackUsed


class Hook(Protocol):
    """Receives every event. Must be fast and thread-safe; exceptions are logged and dropped."""

    def __call__(self, event: Event) -> None: ...
