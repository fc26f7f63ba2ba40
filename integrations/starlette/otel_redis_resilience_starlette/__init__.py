"""Starlette / FastAPI integration for otel-redis-resilience: one request scope per HTTP request.

.. code-block:: python

    res = Resilience(redis.asyncio.Redis.from_url(url))

    @redis_deadline(0.2)                                   # optional, per endpoint
    async def item(request):
        value = await request.state.redis.get("k")         # or current_redis()

    app = Starlette(routes=[Route("/items/{id:int}", item)],
                    middleware=[Middleware(ResilienceMiddleware, resilience=res)])

    # FastAPI: the same decorator under @app.get, or the dependency
    @app.get("/items/{item_id}", dependencies=[Depends(redis_deadline(0.2))])
    async def item(item_id: int, redis=Depends(get_redis)): ...

A plain ASGI middleware: each ``http`` scope runs inside ``async with resilience.request()``
with the handle on ``request.state.redis``; other scopes pass through. Lifespan shutdown:
``resilience.close()``, and the client is closed only with ``close_client=True`` (it is yours).
Routing stays Starlette's: the endpoint sets its own deadline (``@redis_deadline``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar, overload

from starlette.endpoints import HTTPEndpoint
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otel_redis_resilience import (
    ConfigurationError,
    NoActiveRequest,
    Resilience,
    current_scope,
    validate_deadline,
)

from ._route_deadlines import apply_route_deadline, check_route_deadlines

__all__ = ["SCOPE_KEY", "ResilienceMiddleware", "RouteDeadline", "get_redis", "redis_deadline"]
__version__ = "0.1.0"

#: Key of the handle in the ASGI scope (it is also ``scope["state"]["redis"]``).
SCOPE_KEY = "otel_redis_resilience.redis"
logger = logging.getLogger("otel_redis_resilience")
_SHUTDOWN_DONE = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})
E = TypeVar("E")


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"ResilienceMiddleware.{name} must be True or False, got {value!r}")
    return value


class ResilienceMiddleware:
    """Opens a request scope of ``resilience`` for every HTTP request.

    Args:
        app: The ASGI app to wrap.
        resilience: The shared :class:`~otel_redis_resilience.Resilience` of a
            ``redis.asyncio.Redis``.
        deadline: Redis time per request, in seconds (``None``: the Resilience's own).
            Per route: :func:`redis_deadline`.
        close_on_shutdown: Call ``resilience.close()`` at lifespan shutdown (it
            re-opens at the next request).
        close_client: Also ``await resilience.client.aclose()`` at lifespan shutdown.
            Off by default: the client is yours.
        route_deadlines: Deprecated, use :func:`redis_deadline`. ``{route path: seconds}``
            with the paths as declared on the app's top-level routes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        resilience: Resilience,
        deadline: float | None = 0.5,
        close_on_shutdown: bool = True,
        close_client: bool = False,
        route_deadlines: Mapping[str, float | None] | None = None,
    ) -> None:
        if not isinstance(resilience, Resilience) or not resilience.is_async:
            raise ConfigurationError(
                "ResilienceMiddleware needs resilience=Resilience(redis.asyncio.Redis(...)), "
                f"got {resilience!r}"
            )
        self.app = app
        self.resilience = resilience
        self.deadline = validate_deadline("ResilienceMiddleware", deadline)
        self.close_on_shutdown = _flag("close_on_shutdown", close_on_shutdown)
        self.close_client = _flag("close_client", close_client)
        self.route_deadlines = check_route_deadlines(route_deadlines)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            ctx = self.resilience.request(deadline=self.deadline)
            async with ctx as handle:
                if self.route_deadlines:
                    apply_route_deadline(scope, self.route_deadlines, ctx.scope)
                # A new dict: servers copy the lifespan state per request, but none must share ours.
                scope["state"] = {**scope.get("state", {}), "redis": handle}
                scope[SCOPE_KEY] = handle
                await self.app(scope, receive, send)
        elif kind == "lifespan" and (self.close_on_shutdown or self.close_client):
            await self.app(scope, receive, self._closing_send(send))
        else:
            await self.app(scope, receive, send)

    def _closing_send(self, send: Send) -> Send:
        async def closing_send(message: Message) -> None:
            if message["type"] in _SHUTDOWN_DONE:  # the app's own shutdown has run
                try:
                    if self.close_on_shutdown:
                        self.resilience.close()
                    if self.close_client:
                        await self.resilience.client.aclose()  # type: ignore[union-attr]
                except Exception:  # the server must still hear that shutdown finished
                    logger.exception("closing at lifespan shutdown failed")
            await send(message)

        return closing_send


class RouteDeadline:
    """What :func:`redis_deadline` returns: a FastAPI dependency and an endpoint decorator."""

    __slots__ = ("__wrapped__", "seconds")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = validate_deadline("redis_deadline", seconds)
        # FastAPI reads a dependency's signature and kind through __wrapped__: no
        # parameters, awaited on the event loop.
        self.__wrapped__ = self._apply_async

    def apply(self) -> None:
        """Set the current request scope's deadline to ``seconds`` from now."""
        scope = current_scope()
        if scope is None:
            raise NoActiveRequest("redis_deadline() needs ResilienceMiddleware on the app")
        scope.set_deadline(self.seconds)

    async def _apply_async(self) -> None:
        self.apply()

    @overload
    def __call__(self) -> Coroutine[Any, Any, None]: ...
    @overload
    def __call__(self, endpoint: E) -> E: ...
    def __call__(self, endpoint: Any = None) -> Any:
        if endpoint is None:  # called by FastAPI as a dependency
            return self._apply_async()
        if isinstance(endpoint, type) and issubclass(endpoint, HTTPEndpoint):
            apply, base = self.apply, endpoint

            async def dispatch(self: HTTPEndpoint) -> None:
                apply()
                await base.dispatch(self)

            return type(base.__name__, (base,), {"dispatch": dispatch, "__module__": base.__module__})
        if not callable(endpoint):
            raise ConfigurationError(f"@redis_deadline decorates an endpoint, got {endpoint!r}")
        return _wrap(endpoint, self.apply)


def _wrap(endpoint: Callable[..., Any], apply: Callable[[], None]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(endpoint):

        @functools.wraps(endpoint)
        async def async_endpoint(*args: Any, **kwargs: Any) -> Any:
            apply()
            return await endpoint(*args, **kwargs)

        return async_endpoint

    @functools.wraps(endpoint)
    def sync_endpoint(*args: Any, **kwargs: Any) -> Any:  # in the thread pool, context copied
        apply()
        return endpoint(*args, **kwargs)

    return sync_endpoint


def redis_deadline(seconds: float | None) -> RouteDeadline:
    """This route's Redis deadline, ``seconds`` from when its endpoint starts (``None``: none).

    - ``@redis_deadline(0.2)`` on a Starlette endpoint (function or ``HTTPEndpoint``
      class), or on a FastAPI endpoint below ``@app.get(...)``;
    - ``dependencies=[Depends(redis_deadline(0.2))]`` on a FastAPI route or router.
    """
    return RouteDeadline(seconds)


async def get_redis(conn: HTTPConnection) -> Any:
    """FastAPI dependency: ``redis = Depends(get_redis)`` gives the request's handle.

    Raises:
        otel_redis_resilience.NoActiveRequest: the app has no ResilienceMiddleware.
    """
    handle = conn.scope.get(SCOPE_KEY)
    if handle is None:
        raise NoActiveRequest("no Redis handle on this request: add ResilienceMiddleware to the app")
    return handle
