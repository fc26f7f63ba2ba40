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
        "ended",
        "failures",
        "fallbacks",
        "handle",
        "operations",
        "parent",
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
        #: The scope that was current when this one opened (nested scopes).
        self.parent: RequestScope | None = None
        #: Set once when the scope ends; the handles check it before every command.
        self.ended = False

    @property
    def closed(self) -> bool:
        """Whether the scope has ended (its ``with`` block exited)."""
        return self.ended

    @property
    def degraded(self) -> bool:
        """True when any Redis call of this request failed, was rejected or fell back."""
        return bool(self.rejections or self.fallbacks or self.failures)

    def set_deadline(self, seconds: float | None) -> None:
        """Replace the scope's deadline with ``seconds`` from now (None: no deadline).

        For per-route deadlines set after the scope opened (a route decorator,
        a FastAPI dependency).
        """
        from ._decide.config import validate_request_deadline

        validate_request_deadline("RequestScope.set_deadline", seconds)
        self.deadline_at = None if seconds is None else time.monotonic() + seconds

    def remaining(self, now: float) -> float | None:
        """Seconds left before the deadline (may be negative), or None without one."""
        return None if self.deadline_at is None else self.deadline_at - now


_CURRENT: ContextVar[RequestScope | None] = ContextVar("otel_redis_resilience_scope", default=None)


class NoActiveRequest(LookupError):
    """:func:`current_redis` was called outside a request scope."""


class ScopeClosedError(RuntimeError):
    """A handle was used after its request scope ended.

    A programming error (a handle kept past its ``with res.request():`` block, in a
    background task, a closure or a generator), never an outage: it is not a
    :class:`RedisUnavailable`, so fallbacks do not swallow it, and nothing is sent
    or recorded (no span, metric, log or hook event).
    """


def scope_closed_error(what: str) -> ScopeClosedError:
    """The error for a handle's ``what`` (a command name, ``pipeline``) after its scope ended."""
    return ScopeClosedError(
        f"{what} on a handle whose request scope has ended: a handle works only inside its "
        "`with res.request():` block (or the request that opened it); keep none past it, and "
        "open a new scope, or use res.handle() for work outside any request"
    )


def _open_from(scope: RequestScope | None) -> RequestScope | None:
    """``scope`` if still open, else the nearest enclosing scope that is (None: none is)."""
    while scope is not None and scope.ended:
        scope = scope.parent
    return scope


def current_scope() -> RequestScope | None:
    """The innermost open request scope, or None."""
    scope = _CURRENT.get()
    return scope if scope is None or not scope.ended else _open_from(scope)


def current_redis() -> Any:
    """The current request's resilient Redis handle.

    Works from any code called by a view (in the same thread or task) while a
    request scope is open: the Flask and Starlette adapters open one per
    request, and ``with res.request():`` opens one by hand.

    Raises:
        NoActiveRequest: outside a request scope, or once the scope ended (in a
            thread or task that outlived the request).
    """
    scope = _CURRENT.get()
    if scope is not None and scope.ended:
        scope = _open_from(scope)
        if scope is None:
            raise NoActiveRequest(
                "the Redis request scope this code ran in has ended: a thread or task that "
                "outlives its request must open its own `with res.request():` or use res.handle()"
            )
    if scope is None:
        raise NoActiveRequest(
            "no Redis request scope is active: call this from code running inside a request "
            "handled by the otel_redis_resilience middleware, or inside `with res.request():`"
        )
    return scope.handle


def enter(scope: RequestScope) -> None:
    scope.parent = _open_from(_CURRENT.get())
    scope.token = _CURRENT.set(scope)


def leave(scope: RequestScope) -> None:
    """End ``scope``; the current scope becomes the nearest one still open.

    Scopes may close out of order (an outer one first, or one from another
    context): an ended scope is never left current, and a scope that is still
    open (an inner one, or another context's) is never replaced.
    """
    if scope.ended:
        return
    scope.ended = True
    token, scope.token = scope.token, None
    if _CURRENT.get() is not scope:
        # Not current here: an inner scope is still open (it stays current, and finds
        # its nearest open parent when it closes), or it is closed from another context.
        return
    restore = _open_from(scope.parent)
    if token is not None and token.old_value is restore:
        try:
            _CURRENT.reset(token)
            return
        except ValueError:  # the token belongs to another context
            pass
    _CURRENT.set(restore)
