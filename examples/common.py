"""Code shared by the example apps: settings, the SQLite source of truth, telemetry, HTTP bodies.

Both apps (``examples.flask_app`` and ``examples.starlette_app``) serve the same API:

- ``GET /items/{id}``: cache-aside read; the SQLite database answers when Redis cannot.
- ``POST /counter``: ``INCR``, never double-counted; 503 with the outcome when Redis is unavailable.
- ``POST /events``: stores the JSON body (``HSET events <id> <json>``) through write-behind:
  201 ``{"journaled": false}`` when applied now, 202 ``{"journaled": true}`` when journaled
  (Redis down); the journal replays it exactly once when Redis is back. 503 with
  ``{"journaled": false}`` when it was neither: the journal is full or failed (its disk is full).
- ``GET /health``: the breaker state; never touches Redis.
- ``GET /metrics``: Prometheus exposition of the app's metrics.

Configuration, all from the environment:

- ``REDIS_URL`` (``redis://127.0.0.1:6379/0``)
- ``DATABASE``: the SQLite file (created and seeded if missing; default in the temp dir)
- ``WRITE_BEHIND_DIR``: the write-behind journal's directory (default in the temp dir)
- ``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT`` (OTLP/HTTP export of traces and
  metrics when set) and the other standard ``OTEL_*`` variables.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from otel_redis_resilience import BreakerPolicy, JournalFullError, RedisUnavailable, RetryPolicy

ITEM_COUNT = 100
#: Seconds a cached item lives in Redis.
CACHE_TTL = 300
#: The hash holding events, by event id.
EVENTS_KEY = "events"
#: Redis time per request (the adapters' default deadline).
REQUEST_DEADLINE = 0.3

RETRY = RetryPolicy(max_attempts=3, attempt_timeout=0.2, backoff_base=0.02, backoff_cap=0.1)
BREAKER = BreakerPolicy(failure_threshold=5, reset_timeout=5.0, probe_interval=0.25, probe_timeout=0.2)


@dataclass(frozen=True)
class Settings:
    redis_url: str
    database: Path
    write_behind_dir: Path

    @classmethod
    def from_env(cls) -> Settings:
        tmp = Path(tempfile.gettempdir())
        return cls(
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            database=Path(os.environ.get("DATABASE", tmp / "otel-redis-resilience-example.sqlite3")),
            write_behind_dir=Path(
                os.environ.get("WRITE_BEHIND_DIR", tmp / "otel-redis-resilience-example-journal")
            ),
        )


# -- the source of truth: a real SQLite database ----------------------------------------


class ItemStore:
    """Items in SQLite, seeded with ``ITEM_COUNT`` rows. Safe from any thread or process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:  # every worker may run this at once: idempotent
            db.execute("CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT, price REAL)")
            db.executemany(
                "INSERT OR IGNORE INTO items (id, name, price) VALUES (?, ?, ?)",
                [(i, f"item {i}", round(1 + i * 0.25, 2)) for i in range(1, ITEM_COUNT + 1)],
            )
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10.0)

    def get(self, item_id: int) -> dict[str, Any] | None:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=10.0)
        row = db.execute("SELECT id, name, price FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else {"id": row[0], "name": row[1], "price": row[2]}


def item_key(item_id: int) -> str:
    return f"item:{item_id}"


def encode_item(item: dict[str, Any]) -> bytes:
    return json.dumps(item, separators=(",", ":")).encode()


def decode_item(raw: bytes) -> dict[str, Any]:
    return json.loads(raw)  # type: ignore[no-any-return]


# -- HTTP bodies shared by both apps ---------------------------------------------------


def counter_unavailable_body(exc: Exception) -> dict[str, Any]:
    """The 503 body of ``POST /counter``: say plainly whether the increment happened."""
    unknown = bool(getattr(exc, "outcome_unknown", True))
    reason = exc.reason if isinstance(exc, RedisUnavailable) else type(exc).__name__
    return {
        "error": "redis_unavailable",
        "reason": reason,
        "applied": "unknown" if unknown else False,
        "detail": (
            "Redis did not answer after the increment was sent: it may or may not have been "
            "applied, and it was not retried so that it is never counted twice"
            if unknown
            else "the increment was not applied; it is safe to retry later"
        ),
    }


def event_refused_body(exc: Exception) -> dict[str, Any]:
    """The 503 body of ``POST /events`` when the write was neither applied nor journaled.

    ``error`` says why: ``journal_full`` (the journal's configured bound), ``journal_failed``
    (Redis is down and the journal could not take the write either, e.g. its disk is full) or
    ``redis_unavailable`` (e.g. an INCR-like write whose outcome is unknown, never journaled).
    """
    if isinstance(exc, JournalFullError):
        error = "journal_full"
    elif isinstance(exc, RedisUnavailable) and exc.reason == "journal_failed":
        error = "journal_failed"
    else:
        error = "redis_unavailable"
    # The event is not kept; the client may retry it later. (An HSET whose reply was lost may
    # have been applied; retrying it is harmless.)
    return {"error": error, "journaled": False, "detail": str(exc)}


def new_event(payload: Any) -> tuple[str, bytes]:
    """(event id, the JSON stored in Redis) for a ``POST /events`` body."""
    event_id = payload.get("id") if isinstance(payload, dict) else None
    event_id = str(event_id) if event_id else uuid.uuid4().hex
    return event_id, json.dumps({"id": event_id, "data": payload}, separators=(",", ":")).encode()


def health_body(breaker_state: Any) -> dict[str, Any]:
    state = getattr(breaker_state, "value", str(breaker_state))
    return {"status": "ok", "redis": {"breaker": state, "degraded": state != "closed"}}


# -- telemetry ------------------------------------------------------------------------

_telemetry_lock = threading.Lock()
_telemetry: tuple[TracerProvider, MeterProvider] | None = None


def setup_telemetry(default_service_name: str) -> tuple[TracerProvider, MeterProvider]:
    """Global tracer and meter providers: Prometheus always, OTLP/HTTP when configured.

    Idempotent per process (each gunicorn/uvicorn worker sets up its own after the fork).
    """
    global _telemetry
    with _telemetry_lock:
        if _telemetry is not None:
            return _telemetry
        from opentelemetry.exporter.prometheus import PrometheusMetricReader

        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", default_service_name)}
        )
        readers: list[MetricReader] = [PrometheusMetricReader()]
        tracer_provider = TracerProvider(resource=resource)
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
        _telemetry = (tracer_provider, meter_provider)
        return _telemetry


def prometheus_exposition() -> tuple[bytes, str]:
    """(body, content type) of ``GET /metrics``."""
    return generate_latest(), CONTENT_TYPE_LATEST
