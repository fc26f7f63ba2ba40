"""Request scopes: the per-request deadline, counters, and the current-handle accessor.

Framework adapters open a scope per request (``Resilience.request()``) and any
code the view calls can reach the request's handle with :func:`current_redis`.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token
from typing import Any


class RequestScope:
    """Per-request state: the deadline and what happened to this request's Redis calls."""

    __slots__ = (
        "deadline_at",
        "failures",
        "fallbacks",
        "handle",
        "operations",
        "rejections",
        "summary_span",
        "token",
    )

    def __init__(self, deadline_at: float | None) -> None:
        self.deadline_at = deadline_at
        #: The server span the request summary is written to; found at the first
        #: operation, when the framework's server span is surely active.
        self.summary_span: Any = None
        self.operations = 0
        self.failures = 0
        self.rejections = 0
        self.fallbacks = 0
        self.handle: Any = None
        self.token: Token[Any] | None = None

    @property
    def closed(self) -> bool:
        """Whether the scope has ended (its ``with`` block exited)."""
        return self.token is None and self.handle is not None

    @property
    def degraded(self) -> bool:
        """True when any Redis call of this request failed, was rejected or fell back."""
        return bool(self.rejections or self.fallbacks or self.failures)

    def set_deadline(self, seconds: float | None) -> None:
        """Replace the scope's deadline with ``seconds`` from now (None: no deadline).

        For per-route deadlines set after the scope opened (a route decorator,
        a FastAPI dependency).
        """
        from ._config import validate_deadline

        validate_deadline("RequestScope.set_deadline", seconds)
        self.deadline_at = None if seconds is None else time.monotonic() + seconds

    def remaining(self, now: float) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        return None if self.deadline_at is None else self.deadline_at - now


_CURRENT: ContextVar[RequestScope | None] = ContextVar("otel_redis_resilience_scope", default=None)


class NoActiveRequest(LookupError):
    """:func:`current_redis` was called outside a request scope."""


def current_scope() -> RequestScope | None:
    """The innermost open request scope, or None."""
    return _CURRENT.get()


def current_redis() -> Any:
    """The current request's resilient Redis handle.

    Works from any code called by a view (in the same thread or task) while a
    request scope is open: the Flask and Starlette adapters open one per
    request, and ``with res.request():`` opens one by hand.

    Raises:
        NoActiveRequest: outside a request scope.
    """
    scope = _CURRENT.get()
    if scope is None:
        raise NoActiveRequest(
            "no Redis request scope is active: call this from code running inside a request "
            "handled by the otel_redis_resilience middleware, or inside `with res.request():`"
        )
    return scope.handle


def enter(scope: RequestScope) -> None:
    scope.token = _CURRENT.set(scope)


def leave(scope: RequestScope) -> None:
    if scope.token is not None:
        try:
            _CURRENT.reset(scope.token)
        except ValueError:
            # Closed from another context (e.g. a generator finalised elsewhere): just clear it.
            _CURRENT.set(None)
        scope.token = None
