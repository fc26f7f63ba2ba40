"""Flask integration for otel-redis-resilience: one Redis request scope per Flask request.

.. code-block:: python

    res = Resilience(redis.Redis.from_url(url))
    app = Flask(__name__)
    RedisResilience(app, resilience=res, deadline=0.5)

    @app.get("/items/<int:item_id>")
    @redis_deadline(0.2)                 # optional, per route
    def item(item_id):
        return g.redis.get(f"item:{item_id}")   # or get_redis(), or current_redis()

The scope opens in a ``before_request`` hook and closes in a ``teardown_request`` hook,
which Flask runs also when the view raises; both are registered with Flask's public
decorators at ``init_app``, so the scope opens in registration order among the app's
``before_request`` hooks. Everything else (breaker, retries, deadline, request summary on
the server span) is the core's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app, g, has_app_context, request

from otel_redis_resilience import ConfigurationError, Resilience, current_redis, validate_deadline

__all__ = ["CONFIG_DEADLINE", "EXTENSION_KEY", "RedisResilience", "get_redis", "redis_deadline"]
__version__ = "0.1.0"

#: Key of the extension's state in ``app.extensions``.
EXTENSION_KEY = "otel_redis_resilience"
#: App config key holding the per-request deadline (seconds; ``None``: the Resilience's own).
CONFIG_DEADLINE = "REDIS_RESILIENCE_DEADLINE"
_VIEW_ATTR = "_otel_redis_deadline"
_G_CONTEXT = "_otel_redis_request_context"
_UNSET: Any = object()

F = TypeVar("F", bound=Callable[..., Any])


def redis_deadline(seconds: float | None) -> Callable[[F], F]:
    """Give one view its own Redis deadline (``None``: no deadline for this route).

    Works above or below ``@app.route``; for class-based views set the class
    attribute ``redis_deadline = seconds`` instead.
    """
    validate_deadline("redis_deadline", seconds)

    def decorate(view: F) -> F:
        setattr(view, _VIEW_ATTR, seconds)
        return view

    return decorate


class _State:
    """What ``app.extensions["otel_redis_resilience"]`` holds: the extension and this app's Resilience."""

    __slots__ = ("extension", "resilience")

    def __init__(self, extension: RedisResilience, resilience: Resilience) -> None:
        self.extension = extension
        self.resilience = resilience


class RedisResilience:
    """The Flask extension: opens a request scope of ``resilience`` for every request.

    One extension object may serve several apps (``init_app`` once per app), each
    with its own ``Resilience``.

    Args:
        app: The app, or ``None`` to call :meth:`init_app` later (app factories).
        resilience: The shared :class:`~otel_redis_resilience.Resilience` of a sync
            ``redis.Redis`` (may instead be passed to :meth:`init_app`).
        deadline: Default Redis time per request, in seconds; the app config key
            ``REDIS_RESILIENCE_DEADLINE`` wins over it, :func:`redis_deadline` over both.
            ``None``: the Resilience's own deadline.
    """

    def __init__(
        self, app: Flask | None = None, *, resilience: Resilience | None = None, deadline: float | None = 0.5
    ) -> None:
        self.deadline = validate_deadline("RedisResilience", deadline)
        self.resilience = resilience
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, resilience: Resilience | None = None) -> None:
        """Register the hooks on ``app``; once per app.

        Raises:
            ConfigurationError: no sync ``Resilience``, an invalid
                ``REDIS_RESILIENCE_DEADLINE``, or ``app`` already initialised.
        """
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(
                f"RedisResilience.init_app() called twice for the Flask app {app.name!r}: it already "
                f"has app.extensions[{EXTENSION_KEY!r}]; call init_app() once per app (a Resilience "
                "is not swapped on a running app: build the app again with the new one)"
            )
        res = resilience if resilience is not None else self.resilience
        if not isinstance(res, Resilience):
            raise ConfigurationError(
                f"RedisResilience needs resilience=Resilience(redis.Redis(...)), got {res!r}"
            )
        if res.is_async:
            raise ConfigurationError(
                "RedisResilience needs a Resilience of a sync redis.Redis (Flask runs views in "
                "threads, async views included), got one of a redis.asyncio.Redis"
            )
        app.config.setdefault(CONFIG_DEADLINE, self.deadline)
        # Checked now, not at the first request: a string from an env var would
        # otherwise make every request fail.
        validate_deadline(f"app.config[{CONFIG_DEADLINE!r}]", app.config[CONFIG_DEADLINE], field=None)
        app.extensions[EXTENSION_KEY] = _State(self, res)
        app.before_request(_open_scope)
        app.teardown_request(_close_scope)


def _open_scope() -> None:
    app = current_app
    ctx = app.extensions[EXTENSION_KEY].resilience.request(deadline=app.config[CONFIG_DEADLINE])
    g.redis = ctx.__enter__()
    setattr(g, _G_CONTEXT, ctx)
    view = app.view_functions.get(request.endpoint) if request.endpoint else None
    if view is not None:
        seconds = getattr(view, _VIEW_ATTR, _UNSET)
        if seconds is _UNSET:
            seconds = getattr(getattr(view, "view_class", None), "redis_deadline", _UNSET)
        if seconds is not _UNSET:
            ctx.scope.set_deadline(seconds)


def _close_scope(exc: BaseException | None) -> None:
    ctx = g.pop(_G_CONTEXT, None)
    if ctx is not None:
        ctx.__exit__(None, None, None)


def get_redis() -> Any:
    """The current request's resilient Redis handle (``g.redis``).

    Raises:
        otel_redis_resilience.NoActiveRequest: outside a request (and outside any
            ``with res.request():`` block).
    """
    if has_app_context():
        handle = g.get("redis")
        if handle is not None:
            return handle
    return current_redis()
