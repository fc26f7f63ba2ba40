"""The example Flask app: ``gunicorn examples.flask_app:app`` (sync or gthread workers).

Routes and configuration: see :mod:`examples.common`.
"""

from __future__ import annotations

from typing import Any

import redis
from flask import Flask, Response, g, jsonify, request
from opentelemetry.instrumentation.flask import FlaskInstrumentor

from examples import common
from otel_redis_resilience import Journaled, JournalFullError, RedisUnavailable, Resilience, WriteBehindConfig
from otel_redis_resilience_flask import RedisResilience

settings = common.Settings.from_env()
common.setup_telemetry("otel-redis-resilience-flask-example")
store = common.ItemStore(settings.database)

res = Resilience(
    redis.Redis.from_url(settings.redis_url, socket_connect_timeout=0.5, socket_timeout=1.0),
    retry=common.RETRY,
    breaker=common.BREAKER,
    write_behind=WriteBehindConfig(directory=settings.write_behind_dir),
)

app = Flask(__name__)
FlaskInstrumentor().instrument_app(app, excluded_urls="health,metrics")
RedisResilience(app, resilience=res, deadline=common.REQUEST_DEADLINE)


@res.fallback(value=False)  # Redis down: the item is simply not cached this time
def cache_item(item: dict[str, Any]) -> bool:
    return bool(g.redis.set(common.item_key(item["id"]), common.encode_item(item), ex=common.CACHE_TTL))


@app.get("/items/<int:item_id>")
def get_item(item_id: int) -> Any:
    # An outage reads as a cache miss, so the database answers: never a 5xx for Redis.
    raw = g.redis.miss_on_outage().get(common.item_key(item_id))
    if raw is not None:
        return jsonify(item=common.decode_item(raw), source="cache")
    item = store.get(item_id)
    if item is None:
        return jsonify(error="not_found"), 404
    cache_item(item)
    return jsonify(item=item, source="database")


@app.post("/counter")
def increment() -> Any:
    try:
        value = g.redis.incr("counter")  # never retried once sent: never counted twice
    except redis.exceptions.ConnectionError as exc:  # RedisUnavailable and its base
        return jsonify(common.counter_unavailable_body(exc)), 503
    return jsonify(counter=value)


@app.post("/events")
def post_event() -> Any:
    event_id, body = common.new_event(request.get_json(silent=True))
    try:
        # HSET is idempotent: even a write whose reply was lost can be journaled and replayed.
        outcome = g.redis.write_behind().hset(common.EVENTS_KEY, event_id, body)
    # RedisUnavailable includes reason "journal_failed": Redis is down and the journal could not
    # keep the write either (its disk is full). Either way the event was not kept: 503.
    except (RedisUnavailable, JournalFullError) as exc:
        return jsonify(common.event_refused_body(exc)), 503
    journaled = isinstance(outcome, Journaled)
    return jsonify(id=event_id, journaled=journaled), 202 if journaled else 201


@app.get("/health")
def health() -> Any:
    return jsonify(common.health_body(res.breaker_state))


@app.get("/metrics")
def prometheus_metrics() -> Response:
    body, content_type = common.prometheus_exposition()
    return Response(body, content_type=content_type)
