"""The example Starlette app: ``uvicorn examples.starlette_app:app``.

Plain Starlette (the observability Dockerfile installs no FastAPI); with FastAPI, use
``Depends(get_redis)`` instead of ``request.state.redis``. Routes and configuration:
see :mod:`examples.common`.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio
import redis.exceptions
from opentelemetry.instrumentation.starlette import StarletteInstrumentor
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from examples import common
from otel_redis_resilience import Journaled, JournalFullError, RedisUnavailable, Resilience, WriteBehindConfig
from otel_redis_resilience_starlette import ResilienceMiddleware

settings = common.Settings.from_env()
common.setup_telemetry("otel-redis-resilience-starlette-example")
store = common.ItemStore(settings.database)

res = Resilience(
    redis.asyncio.Redis.from_url(settings.redis_url, socket_connect_timeout=0.5),
    retry=common.RETRY,
    breaker=common.BREAKER,
    write_behind=WriteBehindConfig(directory=settings.write_behind_dir),
)


@res.fallback(value=False)  # Redis down: the item is simply not cached this time
async def cache_item(redis_handle: Any, item: dict[str, Any]) -> bool:
    key = common.item_key(item["id"])
    return bool(await redis_handle.set(key, common.encode_item(item), ex=common.CACHE_TTL))


async def get_item(request: Request) -> Response:
    item_id: int = request.path_params["id"]
    # An outage reads as a cache miss, so the database answers: never a 5xx for Redis.
    raw = await request.state.redis.miss_on_outage().get(common.item_key(item_id))
    if raw is not None:
        return JSONResponse({"item": common.decode_item(raw), "source": "cache"})
    item = await run_in_threadpool(store.get, item_id)
    if item is None:
        return JSONResponse({"error": "not_found"}, status_code=404)
    await cache_item(request.state.redis, item)
    return JSONResponse({"item": item, "source": "database"})


async def increment(request: Request) -> Response:
    try:
        value = await request.state.redis.incr("counter")  # never retried once sent
    except redis.exceptions.ConnectionError as exc:  # RedisUnavailable and its base
        return JSONResponse(common.counter_unavailable_body(exc), status_code=503)
    return JSONResponse({"counter": value})


async def post_event(request: Request) -> Response:
    try:
        payload = await request.json()
    except ValueError:
        payload = None
    event_id, body = common.new_event(payload)
    try:
        # HSET is idempotent: even a write whose reply was lost can be journaled and replayed.
        outcome = await request.state.redis.write_behind().hset(common.EVENTS_KEY, event_id, body)
    # RedisUnavailable includes reason "journal_failed": Redis is down and the journal could not
    # keep the write either (its disk is full). Either way the event was not kept: 503.
    except (RedisUnavailable, JournalFullError) as exc:
        return JSONResponse(common.event_refused_body(exc), status_code=503)
    journaled = isinstance(outcome, Journaled)
    return JSONResponse({"id": event_id, "journaled": journaled}, status_code=202 if journaled else 201)


async def health(request: Request) -> Response:
    return JSONResponse(common.health_body(res.breaker_state))


async def prometheus_metrics(request: Request) -> Response:
    body, content_type = common.prometheus_exposition()
    return Response(body, headers={"Content-Type": content_type})


app = Starlette(
    routes=[
        Route("/items/{id:int}", get_item),
        Route("/counter", increment, methods=["POST"]),
        Route("/events", post_event, methods=["POST"]),
        Route("/health", health),
        Route("/metrics", prometheus_metrics),
    ],
    # This app owns its client: the middleware closes it at lifespan shutdown (close_client=True).
    # Per-route deadlines would be @redis_deadline(seconds) on an endpoint.
    middleware=[
        Middleware(ResilienceMiddleware, resilience=res, deadline=common.REQUEST_DEADLINE, close_client=True)
    ],
)
StarletteInstrumentor.instrument_app(app)
