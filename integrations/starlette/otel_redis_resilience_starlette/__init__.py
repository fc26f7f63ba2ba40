"""Starlette / FastAPI integration for otel-redis-resilience: one request scope per HTTP request.

.. code-block:: python

    res = Resilience(redis.asyncio.Redis.from_url(url))
    app = Starlette(routes=..., middleware=[Middleware(ResilienceMiddleware, resilience=res)])

    async def item(request):
        value = await request.state.redis.get("k")        # or current_redis()

    # FastAPI
    @app.get("/items/{item_id}", dependencies=[Depends(redis_deadline(0.2))])
    async def item(item_id: int, redis=Depends(get_redis)): ...

A plain ASGI middleware (no ``BaseHTTPMiddleware``): every ``http`` scope runs inside
``async with resilience.request()``, so the scope also closes when the app raises.
``websocket`` and other scopes pass through untouched: a connection lives far longer
than a request deadline, so open ``async with resilience.request():`` per message there.
On lifespan shutdown, once the app's own shutdown finished, the background work is stopped
(``resilience.close()``) and the client closed (``await resilience.client.aclose()``); the next
lifespan's first request re-opens both, so a lifespan restart (two ``TestClient`` sessions) works.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from starlette.requests import HTTPConnection
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otel_redis_resilience import (
    ConfigurationError,
    NoActiveRequest,
    Resilience,
    current_scope,
    validate_deadline,
)

__all__ = ["SCOPE_KEY", "ResilienceMiddleware", "get_redis", "redis_deadline"]
__version__ = "0.1.0"

#: Key of the handle in the ASGI scope (it is also ``scope["state"]["redis"]``).
SCOPE_KEY = "otel_redis_resilience.redis"
_UNSET: Any = object()
logger = logging.getLogger("otel_redis_resilience")
_SHUTDOWN_DONE = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class ResilienceMiddleware:
    """Opens a request scope of ``resilience`` for every HTTP request.

    Args:
        app: The ASGI app to wrap.
        resilience: The shared :class:`~otel_redis_resilience.Resilience` of a
            ``redis.asyncio.Redis``.
        deadline: Redis time per request, in seconds (``None``: the Resilience's own).
        route_deadlines: Per-route deadlines, ``{path: seconds}``; a path is exact
            (``"/health"``) or a Starlette route template (``"/items/{id:int}"``),
            matched against the path the router sees (without ``root_path``).
            ``None`` as a value means no deadline for that route.
        close_on_shutdown: Stop the background work and close the client on lifespan
            shutdown (both re-open at the next request).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        resilience: Resilience,
        deadline: float | None = 0.5,
        route_deadlines: Mapping[str, float | None] | None = None,
        close_on_shutdown: bool = True,
    ) -> None:
        if not isinstance(resilience, Resilience) or not resilience.is_async:
            raise ConfigurationError(
                "ResilienceMiddleware needs resilience=Resilience(redis.asyncio.Redis(...)), "
                f"got {resilience!r}"
            )
        validate_deadline("ResilienceMiddleware", deadline)
        if not isinstance(close_on_shutdown, bool):
            raise ConfigurationError(
                f"ResilienceMiddleware.close_on_shutdown must be True or False, got {close_on_shutdown!r}"
            )
        if route_deadlines is not None and not isinstance(route_deadlines, Mapping):
            raise ConfigurationError(
                "ResilienceMiddleware.route_deadlines must be a mapping {path: seconds}, "
                f"got {route_deadlines!r}"
            )
        self.app = app
        self.resilience = resilience
        self.deadline = deadline
        self.close_on_shutdown = close_on_shutdown
        self._exact: dict[str, float | None] = {}
        self._templates: list[tuple[re.Pattern[str], float | None]] = []
        for path, seconds in (route_deadlines or {}).items():
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(
                    "ResilienceMiddleware.route_deadlines keys must be paths starting with '/' "
                    f"(as the router sees them), got {path!r}"
                )
            validate_deadline(f"ResilienceMiddleware route_deadlines[{path!r}]", seconds)
            if "{" in path:
                self._templates.append((compile_path(path)[0], seconds))
            else:
                self._exact[path] = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            ctx = self.resilience.request(deadline=self.deadline)
            async with ctx as handle:
                if self._exact or self._templates:
                    seconds = self._route_deadline(scope)
                    if seconds is not _UNSET:
                        ctx.scope.set_deadline(seconds)  # type: ignore[union-attr]
                # A new dict: servers copy the lifespan state per request, but none must share ours.
                scope["state"] = {**scope.get("state", {}), "redis": handle}
                scope[SCOPE_KEY] = handle
                await self.app(scope, receive, send)
        elif kind == "lifespan" and self.close_on_shutdown:
            await self.app(scope, receive, self._closing_send(send))
        else:
            await self.app(scope, receive, send)

    def _route_deadline(self, scope: Scope) -> Any:
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root + "/"):
            path = path[len(root) :]
        if path in self._exact:
            return self._exact[path]
        for regex, seconds in self._templates:
            if regex.match(path):
                return seconds
        return _UNSET

    def _closing_send(self, send: Send) -> Send:
        async def closing_send(message: Message) -> None:
            if message["type"] in _SHUTDOWN_DONE:
                try:
                    self.resilience.close()
                    await self.resilience.client.aclose()  # type: ignore[union-attr]
                except Exception:  # the server must still hear that shutdown finished
                    logger.exception("closing the Redis client at lifespan shutdown failed")
            await send(message)

        return closing_send


async def get_redis(conn: HTTPConnection) -> Any:
    """FastAPI dependency: ``redis = Depends(get_redis)`` gives the request's handle.

    Raises:
        otel_redis_resilience.NoActiveRequest: the app has no ResilienceMiddleware.
    """
    handle = conn.scope.get(SCOPE_KEY)
    if handle is None:
        raise NoActiveRequest("no Redis handle on this request: add ResilienceMiddleware to the app")
    return handle


def redis_deadline(seconds: float | None) -> Callable[[], Coroutine[Any, Any, None]]:
    """FastAPI dependency factory setting this route's Redis deadline, from now.

    ``@app.get("/x", dependencies=[Depends(redis_deadline(0.2))])``; ``None``: no deadline.
    """
    validate_deadline("redis_deadline", seconds)

    async def apply_redis_deadline() -> None:
        scope = current_scope()
        if scope is None:
            raise NoActiveRequest("redis_deadline() needs ResilienceMiddleware on the app")
        scope.set_deadline(seconds)

    return apply_redis_deadline
