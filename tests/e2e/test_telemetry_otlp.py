"""The telemetry contract, end to end over OTLP/HTTP.

The SDK's real OTLP/HTTP exporters send spans and metrics to a real HTTP receiver
(demo/otlp_receiver.py) that decodes the protobuf; every assertion here is on what
was decoded from the wire, never on SDK objects. The providers are passed to
``Resilience(tracer_provider=..., meter_provider=...)``; the global providers are
left alone.

Scenario (the same for a sync and an asyncio client), each step one "request" span
around one request scope:

1. healthy: GET and a 2-command pipeline succeed;
2. redis-server is SIGKILLed; outage: GETs until the breaker opens (3 attempts each,
   ``failure_threshold=3``), then a GET behind ``res.fallback`` that the open breaker
   rejects and that falls back;
3. redis-server is restarted; once the background probe has moved the breaker to
   half-open, recovery: GETs until the ``half_open_max_calls`` trial successes close it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Tracer

from demo.otlp_receiver import MetricPoint, OTLPReceiver, SpanRecord, format_trace_tree
from otel_redis_resilience import BreakerPolicy, BreakerState, RedisUnavailable, RetryPolicy
from testbed import RedisServer
from tests.support import Runner

pytestmark = pytest.mark.slow

BREAKER = BreakerPolicy(failure_threshold=3, probe_interval=0.1)
RETRY = RetryPolicy(attempt_timeout=0.2)
FALLBACK = b"from-fallback"
# The advisory buckets the library declares for db.client.operation.duration.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
SCOPE = "otel_redis_resilience"
UNAVAILABLE = "otel_redis_resilience.RedisUnavailable"
# What a GET against a SIGKILLed server fails with: a dead pooled connection, then refused connects.
CONNECTION_ERROR = "redis.exceptions.ConnectionError"


class SdkPipeline:
    """SDK providers exporting over OTLP/HTTP to a live receiver."""

    def __init__(self, receiver: OTLPReceiver, service: str) -> None:
        resource = Resource.create({"service.name": service})
        self.tp = TracerProvider(resource=resource)
        self.tp.add_span_processor(
            BatchSpanProcessor(
                # gzip for traces, none for metrics: the receiver must handle both encodings.
                OTLPSpanExporter(endpoint=receiver.traces_endpoint, compression=Compression.Gzip),
                schedule_delay_millis=100,
            )
        )
        self.mp = MeterProvider(
            resource=resource,
            metric_readers=[
                PeriodicExportingMetricReader(
                    OTLPMetricExporter(endpoint=receiver.metrics_endpoint), export_interval_millis=200
                )
            ],
        )
        self.tracer: Tracer = self.tp.get_tracer("tests.app")

    def flush(self) -> None:
        assert self.tp.force_flush(10_000), "span export did not finish"
        assert self.mp.force_flush(10_000), "metric export did not finish"

    def shutdown(self) -> None:
        self.tp.shutdown()
        self.mp.shutdown()


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as r:
        yield r


# ---------------------------------------------------------------------------------------
# the scenario, once per driver
# ---------------------------------------------------------------------------------------
def _hex_id(span: Any) -> str:
    return format(span.get_span_context().span_id, "016x")


def _wait_open_gauge(runner: Runner, receiver: OTLPReceiver) -> None:
    """Keep the breaker open until a periodic export has carried breaker.state{open}=1."""
    assert runner.wait_for(
        lambda: any(p.value == 1 for p in receiver.points("redis.resilience.breaker.state", state="open")),
        timeout=10,
    ), "no redis.resilience.breaker.state{state=open} == 1 point was exported while the breaker was open"


def _run_sync(
    runner: Runner, server: RedisServer, tel: SdkPipeline, receiver: OTLPReceiver
) -> dict[str, str]:
    res = runner.res
    tracer = tel.tracer
    ids: dict[str, str] = {}

    @res.fallback(value=FALLBACK)
    def cached_get(h: Any, key: str) -> Any:
        return h.get(key)

    with tracer.start_as_current_span("request", attributes={"app.phase": "healthy"}) as span:
        ids["healthy"] = _hex_id(span)
        with res.request() as h:
            assert h.get("k") == b"v"
            assert h.pipeline(transaction=False).get("k").get("missing").execute() == [b"v", None]

    server.kill()
    with tracer.start_as_current_span("request", attributes={"app.phase": "outage"}) as span:
        ids["outage"] = _hex_id(span)
        with res.request() as h:
            for _ in range(10):
                with pytest.raises(RedisUnavailable) as info:
                    h.get("k")
                assert info.value.reason == "retries_exhausted"
                if res.breaker_state is BreakerState.OPEN:
                    break
            assert res.breaker_state is BreakerState.OPEN
            assert cached_get(h, "k") == FALLBACK

    _wait_open_gauge(runner, receiver)
    server.restart()
    assert runner.wait_for(lambda: res.breaker_state is not BreakerState.OPEN, timeout=10), (
        "the background probe never moved the breaker out of open after the restart"
    )
    assert res.breaker_state is BreakerState.HALF_OPEN
    with tracer.start_as_current_span("request", attributes={"app.phase": "recovery"}) as span:
        ids["recovery"] = _hex_id(span)
        with res.request() as h:
            for _ in range(10):
                assert h.get("k") is None  # the restarted server has no data
                if res.breaker_state is BreakerState.CLOSED:
                    break
    assert res.breaker_state is BreakerState.CLOSED
    return ids


def _run_async(
    runner: Runner, server: RedisServer, tel: SdkPipeline, receiver: OTLPReceiver
) -> dict[str, str]:
    res = runner.res
    tracer = tel.tracer
    loop = runner.loop
    assert loop is not None
    ids: dict[str, str] = {}

    @res.fallback(value=FALLBACK)
    async def cached_get(h: Any, key: str) -> Any:
        return await h.get(key)

    async def healthy() -> None:
        with tracer.start_as_current_span("request", attributes={"app.phase": "healthy"}) as span:
            ids["healthy"] = _hex_id(span)
            async with res.request() as h:
                assert await h.get("k") == b"v"
                assert await h.pipeline(transaction=False).get("k").get("missing").execute() == [b"v", None]

    async def outage() -> None:
        with tracer.start_as_current_span("request", attributes={"app.phase": "outage"}) as span:
            ids["outage"] = _hex_id(span)
            async with res.request() as h:
                for _ in range(10):
                    with pytest.raises(RedisUnavailable) as info:
                        await h.get("k")
                    assert info.value.reason == "retries_exhausted"
                    if res.breaker_state is BreakerState.OPEN:
                        break
                assert res.breaker_state is BreakerState.OPEN
                assert await cached_get(h, "k") == FALLBACK

    async def recovery() -> None:
        with tracer.start_as_current_span("request", attributes={"app.phase": "recovery"}) as span:
            ids["recovery"] = _hex_id(span)
            async with res.request() as h:
                for _ in range(10):
                    assert await h.get("k") is None
                    if res.breaker_state is BreakerState.CLOSED:
                        break

    loop.run_until_complete(healthy())
    server.kill()
    loop.run_until_complete(outage())
    _wait_open_gauge(runner, receiver)  # runs the loop, so the probe task keeps probing
    server.restart()
    assert runner.wait_for(lambda: res.breaker_state is not BreakerState.OPEN, timeout=10), (
        "the background probe never moved the breaker out of open after the restart"
    )
    assert res.breaker_state is BreakerState.HALF_OPEN
    loop.run_until_complete(recovery())
    assert res.breaker_state is BreakerState.CLOSED
    return ids


# ---------------------------------------------------------------------------------------
# what the receiver decoded
# ---------------------------------------------------------------------------------------
def _children(spans: list[SpanRecord], parent: SpanRecord) -> list[SpanRecord]:
    kids = [s for s in spans if s.parent_span_id == parent.span_id]
    return sorted(kids, key=lambda s: s.start_time_unix_nano)


def _check_spans(receiver: OTLPReceiver, ids: dict[str, str], port: int) -> SpanRecord:
    spans = receiver.spans()
    server_attrs = {
        "db.system.name": "redis",
        "db.namespace": "0",
        "server.address": "127.0.0.1",
        "server.port": port,
    }
    requests = {phase: receiver.span(span_id) for phase, span_id in ids.items()}
    for phase, req in requests.items():
        assert req.name == "request"
        assert req.parent_span_id is None
        assert req.attributes["app.phase"] == phase
    lib_spans = [s for s in spans if s.scope_name == SCOPE]
    assert lib_spans, "no span from the otel_redis_resilience tracer was received"
    # Every library span belongs to one of the requests: the background probe makes none.
    assert {s.parent_span_id for s in lib_spans} <= set(ids.values())
    for s in lib_spans:
        assert s.kind == "CLIENT", s
        assert s.name == s.attributes["db.operation.name"]
        for key, value in server_attrs.items():
            assert s.attributes.get(key) == value, (key, s)
        assert s.trace_id == receiver.span(s.parent_span_id or "").trace_id

    # 1. healthy: a GET and a pipeline of two, both ok on the first attempt.
    req = requests["healthy"]
    get, pipe = _children(spans, req)
    assert (get.name, pipe.name) == ("GET", "PIPELINE")
    for s in (get, pipe):
        assert s.attributes["redis.resilience.outcome"] == "ok"
        assert s.attributes["redis.resilience.attempts"] == 1
        assert s.attributes["redis.resilience.breaker.state"] == "closed"
        assert s.status == "UNSET"
        assert "error.type" not in s.attributes
        assert not s.events
    assert "db.operation.batch.size" not in get.attributes
    assert pipe.attributes["db.operation.batch.size"] == 2
    assert req.attributes["redis.resilience.operations"] == 2
    assert req.attributes["redis.resilience.fallbacks"] == 0
    assert req.attributes["redis.resilience.degraded"] is False

    # 2. outage: one GET fails all 3 attempts and trips the breaker; the next is rejected.
    req = requests["outage"]
    failed, rejected = _children(spans, req)
    assert failed.name == rejected.name == "GET"
    assert failed.attributes["redis.resilience.outcome"] == "failed"
    assert failed.attributes["redis.resilience.attempts"] == 3
    assert failed.attributes["redis.resilience.breaker.state"] == "closed"
    assert failed.attributes["error.type"] == CONNECTION_ERROR
    assert failed.status == "ERROR"
    retries = failed.events_named("redis.resilience.retry")
    assert [e.attributes["redis.resilience.attempt"] for e in retries] == [1, 2]
    for e in retries:
        assert e.attributes["error.type"] == CONNECTION_ERROR
        assert isinstance(e.attributes["redis.resilience.delay"], float)
        assert 0.0 <= e.attributes["redis.resilience.delay"] <= RETRY.backoff_cap
    [trip] = failed.events_named("redis.resilience.breaker.transition")
    assert trip.attributes == {
        "redis.resilience.breaker.previous_state": "closed",
        "redis.resilience.breaker.state": "open",
        "redis.resilience.reason": "consecutive_failures",
    }
    # The breaker opened on the third failure, after the last retry was scheduled.
    assert trip.time_unix_nano > retries[-1].time_unix_nano

    assert rejected.attributes["redis.resilience.outcome"] == "rejected"
    assert rejected.attributes["redis.resilience.attempts"] == 0
    assert rejected.attributes["redis.resilience.breaker.state"] == "open"
    assert rejected.attributes["error.type"] == UNAVAILABLE
    assert rejected.status == "ERROR"
    [rej] = rejected.events_named("redis.resilience.rejected")
    assert rej.attributes == {"redis.resilience.reason": "breaker_open"}
    assert not rejected.events_named("redis.resilience.retry")
    # The fallback is served by the app code, after the GET span ended: on the request span.
    [fb] = req.events_named("redis.resilience.fallback")
    assert fb.attributes["redis.resilience.reason"] == "breaker_open"
    assert fb.attributes["redis.resilience.fallback.kind"] == "value"
    assert req.attributes["redis.resilience.operations"] == 2
    assert req.attributes["redis.resilience.fallbacks"] == 1
    assert req.attributes["redis.resilience.degraded"] is True

    # 3. recovery: half_open_max_calls trial GETs succeed; the last one closes the breaker.
    req = requests["recovery"]
    trials = _children(spans, req)
    assert [s.name for s in trials] == ["GET"] * BREAKER.half_open_max_calls
    for s in trials:
        assert s.attributes["redis.resilience.outcome"] == "ok"
        assert s.attributes["redis.resilience.breaker.state"] == "half_open"
        assert s.status == "UNSET"
    assert [len(s.events_named("redis.resilience.breaker.transition")) for s in trials] == [0, 0, 1]
    [close] = trials[-1].events_named("redis.resilience.breaker.transition")
    assert close.attributes == {
        "redis.resilience.breaker.previous_state": "half_open",
        "redis.resilience.breaker.state": "closed",
        "redis.resilience.reason": "trial_calls_succeeded",
    }
    assert req.attributes["redis.resilience.operations"] == 3
    assert req.attributes["redis.resilience.degraded"] is False

    # Exactly those library spans: 2 + 2 + 3.
    assert len(lib_spans) == 7, [(s.name, s.attributes.get("redis.resilience.outcome")) for s in lib_spans]
    return requests["outage"]


def _one(points: list[MetricPoint], what: str) -> MetricPoint:
    assert len(points) == 1, f"{what}: expected one attribute set, got {[p.attributes for p in points]}"
    return points[0]


def _check_metrics(receiver: OTLPReceiver, port: int) -> None:
    server = {"server.address": "127.0.0.1", "server.port": port}
    lib_points = [p for p in receiver.points() if p.scope_name == SCOPE]
    names = {p.name for p in lib_points}
    assert {
        "redis.resilience.breaker.state",
        "redis.resilience.breaker.transitions",
        "redis.resilience.retries",
        "redis.resilience.rejections",
        "redis.resilience.fallbacks",
        "db.client.operation.duration",
    } <= names, names

    def latest(name: str, **attrs: Any) -> list[MetricPoint]:
        return [p for p in receiver.latest(name, **attrs) if p.scope_name == SCOPE]

    # Breaker transitions: closed -> open -> half_open (probe) -> closed, one each.
    moves = {
        (p.attributes["previous_state"], p.attributes["state"]): p
        for p in latest("redis.resilience.breaker.transitions")
    }
    assert set(moves) == {("closed", "open"), ("open", "half_open"), ("half_open", "closed")}
    for p in moves.values():
        assert p.type == "sum"
        assert p.is_monotonic is True
        assert p.value == 1
        assert set(p.attributes) == {"state", "previous_state", *server}
        assert {k: p.attributes[k] for k in server} == server

    rej = _one(latest("redis.resilience.rejections"), "rejections")
    assert rej.attributes == {"reason": "breaker_open", **server}
    assert rej.value == 1

    retry = _one(latest("redis.resilience.retries"), "retries")
    assert retry.attributes == {"db.operation.name": "GET", "error.type": CONNECTION_ERROR, **server}
    assert retry.value == 2

    fb = _one(latest("redis.resilience.fallbacks"), "fallbacks")
    assert fb.attributes["reason"] == "breaker_open"
    assert fb.attributes["kind"] == "value"
    assert fb.value == 1

    durations = {
        (p.attributes["db.operation.name"], p.attributes.get("error.type")): p
        for p in latest("db.client.operation.duration")
    }
    assert {k: p.count for k, p in durations.items()} == {
        ("GET", None): 1 + BREAKER.half_open_max_calls,
        ("PIPELINE", None): 1,
        ("GET", CONNECTION_ERROR): 1,
        ("GET", UNAVAILABLE): 1,
    }
    for p in durations.values():
        assert p.type == "histogram"
        assert p.unit == "s"
        assert p.explicit_bounds == DURATION_BUCKETS
        assert p.attributes["db.system.name"] == "redis"
        assert p.attributes["server.address"] == "127.0.0.1"
        assert p.attributes["server.port"] == port
        assert p.sum is not None
        assert 0 < p.sum < 10
    # Three attempts with backoff take longer than a rejection that never touched the network.
    failed, rejected = durations[("GET", CONNECTION_ERROR)], durations[("GET", UNAVAILABLE)]
    assert failed.sum is not None
    assert rejected.sum is not None
    assert failed.sum > rejected.sum

    # Breaker state gauge: open was exported while open; the last export says closed.
    gauge = [p for p in receiver.points("redis.resilience.breaker.state") if p.scope_name == SCOPE]
    assert all(p.type == "gauge" for p in gauge)
    assert all(p.attributes == {"state": p.attributes["state"], **server} for p in gauge)
    assert any(p.attributes["state"] == "open" and p.value == 1 for p in gauge)
    now = {p.attributes["state"]: p.value for p in latest("redis.resilience.breaker.state")}
    assert now == {"closed": 1, "open": 0, "half_open": 0}


def _check_tree(receiver: OTLPReceiver, outage: SpanRecord, mode: str) -> None:
    tree = format_trace_tree(receiver.trace(outage.trace_id), outage.span_id)
    print(f"\n--- trace of the degraded request ({mode} client) ---\n{tree}\n")
    expected = [
        r"^request \[INTERNAL\] \d+\.\d ms$",
        r"^  = app\.phase=outage redis\.resilience\.operations=2 redis\.resilience\.fallbacks=1 "
        r"redis\.resilience\.degraded=true$",
        r"^  \* @\+\d+\.\d ms redis\.resilience\.fallback redis\.resilience\.fallback\.kind=value "
        r"redis\.resilience\.reason=breaker_open$",
        r"^    GET \[CLIENT\] \d+\.\d ms status=ERROR$",
        r"^      = db\.operation\.name=GET redis\.resilience\.outcome=failed redis\.resilience\.attempts=3 "
        r"redis\.resilience\.breaker\.state=closed error\.type=redis\.exceptions\.ConnectionError$",
        r"^      \* @\+\d+\.\d ms redis\.resilience\.retry error\.type=redis\.exceptions\.ConnectionError "
        r"redis\.resilience\.attempt=1 redis\.resilience\.delay=\S+$",
        r"^      \* @\+\d+\.\d ms redis\.resilience\.retry error\.type=redis\.exceptions\.ConnectionError "
        r"redis\.resilience\.attempt=2 redis\.resilience\.delay=\S+$",
        r"^      \* @\+\d+\.\d ms redis\.resilience\.breaker\.transition "
        r"redis\.resilience\.breaker\.previous_state=closed redis\.resilience\.breaker\.state=open "
        r"redis\.resilience\.reason=consecutive_failures$",
        r"^      = db\.operation\.name=GET redis\.resilience\.outcome=rejected redis\.resilience\.attempts=0 "
        r"redis\.resilience\.breaker\.state=open error\.type=otel_redis_resilience\.RedisUnavailable$",
        r"^      \* @\+\d+\.\d ms redis\.resilience\.rejected redis\.resilience\.reason=breaker_open$",
    ]
    for pattern in expected:
        assert re.search(pattern, tree, re.MULTILINE), f"{pattern!r} not in the tree:\n{tree}"
    # Spans and events in order: the failed GET before the rejected one.
    lines = tree.splitlines()
    gets = [i for i, line in enumerate(lines) if line.startswith("    GET ")]
    assert len(gets) == 2
    assert "outcome=failed" in lines[gets[0] + 1]
    assert "outcome=rejected" in lines[gets[1] + 1]


# ---------------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------------
def _scenario(
    mode: str, redis_server: RedisServer, receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    # The library swallows telemetry failures and logs them (the DEBUG line is never rate-limited).
    caplog.set_level(logging.DEBUG, logger="otel_redis_resilience")
    redis_server.client().set("k", "v")
    tel = SdkPipeline(receiver, f"otlp-e2e-{mode}")
    runner: Runner | None = None
    try:
        runner = Runner(
            mode,
            redis_server.host,
            redis_server.port,
            breaker=BREAKER,
            retry=RETRY,
            tracer_provider=tel.tp,
            meter_provider=tel.mp,
        )
        run = _run_sync if mode == "sync" else _run_async
        ids = run(runner, redis_server, tel, receiver)
        tel.flush()
    finally:
        if runner is not None:
            runner.close()
        tel.shutdown()

    swallowed = [r for r in caplog.records if r.getMessage() in ("telemetry failure", "hook failure")]
    assert not swallowed, [(r.getMessage(), r.exc_text) for r in swallowed]
    assert not receiver.errors, receiver.errors
    signals = receiver.requests
    assert ("traces", "gzip") in signals
    assert ("metrics", "") in signals
    outage = _check_spans(receiver, ids, redis_server.port)
    _check_metrics(receiver, redis_server.port)
    _check_tree(receiver, outage, mode)


def test_sync_client_telemetry_over_otlp(
    redis_server: RedisServer, receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    _scenario("sync", redis_server, receiver, caplog)


def test_async_client_telemetry_over_otlp(
    redis_server: RedisServer, receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    _scenario("async", redis_server, receiver, caplog)
