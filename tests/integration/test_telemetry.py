"""Spans, span events and metrics, checked with the SDK's in-memory exporter and reader."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry import context as otel_context
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from otel_redis_resilience import BreakerPolicy, RedisUnavailable, Resilience, RetryPolicy, set_testing
from testbed import FaultProxy, RedisServer
from tests.support import Runner


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tp = TracerProvider()
        self.tp.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.mp = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tp.get_tracer("test")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        for p in m.data.data_points:
                            out.append((dict(p.attributes), p))
        return out


@pytest.fixture
def otel() -> Otel:
    return Otel()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def testing_mode() -> Iterator[None]:
    set_testing(True)
    yield
    set_testing(False)


def runner(mode: str, otel: Otel, host: str, port: int, **kw: Any) -> Runner:
    return Runner(mode, host, port, tracer_provider=otel.tp, meter_provider=otel.mp, **kw)


def events(span: ReadableSpan, name: str) -> list[dict[str, Any]]:
    return [dict(e.attributes or {}) for e in span.events if e.name == name]


def test_span_per_operation_with_db_conventions(mode: str, otel: Otel, clean_redis: RedisServer) -> None:
    r = runner(mode, otel, clean_redis.host, clean_redis.port, capture_statement=True)
    try:
        with otel.tracer.start_as_current_span("request") as parent:
            r.call("set", "secret-key", "secret-value")
            r.pipeline(lambda p: p.get("a").incr("b"), transaction=False)
            r.pipeline(lambda p: p.incr("b").incr("b"), transaction=True)
            with pytest.raises(redis.ResponseError):
                r.call("lpush", "secret-key", "x")
        (set_span,) = otel.spans("SET")
        assert set_span.kind is SpanKind.CLIENT
        assert set_span.parent is not None
        assert set_span.parent.span_id == parent.get_span_context().span_id
        a = dict(set_span.attributes or {})
        assert a["db.system.name"] == "redis"
        assert a["db.operation.name"] == "SET"
        assert a["db.namespace"] == "0"
        assert a["server.address"] == clean_redis.host
        assert a["server.port"] == clean_redis.port
        assert a["redis.resilience.attempts"] == 1
        assert a["redis.resilience.outcome"] == "ok"
        assert a["redis.resilience.breaker.state"] == "closed"
        assert a["db.query.text"] == "SET ? ?"  # opted in, and sanitised
        (pipe,) = otel.spans("PIPELINE")
        assert pipe.attributes is not None
        assert pipe.attributes["db.operation.batch.size"] == 2
        assert pipe.attributes["db.query.text"] == "GET ?; INCRBY ? ?"
        (multi,) = otel.spans("MULTI")
        assert multi.attributes is not None
        assert multi.attributes["db.operation.batch.size"] == 2
        (bad,) = otel.spans("LPUSH")
        assert bad.status.status_code is StatusCode.ERROR
        assert bad.attributes is not None
        assert bad.attributes["error.type"] == "WRONGTYPE"
        assert bad.attributes["db.response.status_code"] == "WRONGTYPE"
        assert bad.attributes["redis.resilience.outcome"] == "error"
        # Never a key or a value anywhere.
        for span in otel.spans():
            text = repr(span.attributes) + repr([e.attributes for e in span.events])
            assert "secret" not in text
        # The request summary landed on the parent ("server") span. Each r.call()
        # is its own scope here, so it describes the last one: the LPUSH.
        (req,) = otel.spans("request")
        assert req.attributes is not None
        assert req.attributes["redis.resilience.operations"] == 1
        assert req.attributes["redis.resilience.degraded"] is False
    finally:
        r.close()


def test_no_statement_unless_opted_in(otel: Otel, clean_redis: RedisServer) -> None:
    r = runner("sync", otel, clean_redis.host, clean_redis.port)
    try:
        r.call("get", "k")
        (span,) = otel.spans("GET")
        assert "db.query.text" not in (span.attributes or {})
    finally:
        r.close()


def test_retries_transitions_rejections_and_metrics(
    mode: str, otel: Otel, redis_server: RedisServer, proxy: FaultProxy, testing_mode: None
) -> None:
    r = runner(
        mode,
        otel,
        proxy.host,
        proxy.port,
        retry=RetryPolicy(attempt_timeout=0.1, max_attempts=2),
        breaker=BreakerPolicy(failure_threshold=3, probe_interval=0.05, half_open_max_calls=1),
    )
    try:
        r.call("get", "k")
        redis_server.kill()
        with otel.tracer.start_as_current_span("request"):
            with pytest.raises(RedisUnavailable):
                r.call("get", "k")  # 2 failed attempts, 1 retry
            with pytest.raises(RedisUnavailable):
                r.call("get", "k")  # 3rd failure opens the breaker
            with pytest.raises(RedisUnavailable):
                r.call("get", "k")  # rejected
        failed, opened, rejected = otel.spans("GET")[1:4]
        assert failed.attributes is not None
        assert failed.attributes["redis.resilience.outcome"] == "failed"
        assert failed.attributes["redis.resilience.attempts"] == 2
        assert failed.status.status_code is StatusCode.ERROR
        (retry,) = events(failed, "redis.resilience.retry")
        assert retry["redis.resilience.attempt"] == 1
        assert retry["redis.resilience.delay"] == 0.0  # testing mode
        assert retry["error.type"].endswith("ConnectionError")
        (moved,) = events(opened, "redis.resilience.breaker.transition")
        assert moved == {
            "redis.resilience.breaker.previous_state": "closed",
            "redis.resilience.breaker.state": "open",
            "redis.resilience.reason": "consecutive_failures",
        }
        assert rejected.attributes is not None
        assert rejected.attributes["redis.resilience.outcome"] == "rejected"
        assert rejected.attributes["redis.resilience.attempts"] == 0
        assert rejected.attributes["redis.resilience.breaker.state"] == "open"
        assert events(rejected, "redis.resilience.rejected") == [{"redis.resilience.reason": "breaker_open"}]
        (req,) = otel.spans("request")
        assert req.attributes is not None
        assert req.attributes["redis.resilience.degraded"] is True

        redis_server.restart()
        assert r.wait_for(lambda: r.res.breaker_state.value == "half_open", 5.0)
        r.call("get", "k")
        assert r.res.breaker_state.value == "closed"

        server = {"server.address": proxy.host, "server.port": proxy.port}
        states = {a["state"]: p.value for a, p in otel.points("redis.resilience.breaker.state")}
        assert states == {"closed": 1, "open": 0, "half_open": 0}
        trans = {
            (a["previous_state"], a["state"]): p.value
            for a, p in otel.points("redis.resilience.breaker.transitions")
        }
        assert trans == {("closed", "open"): 1, ("open", "half_open"): 1, ("half_open", "closed"): 1}
        (rej,) = otel.points("redis.resilience.rejections")
        assert rej[0] == {"reason": "breaker_open", **server}
        retries = otel.points("redis.resilience.retries")
        assert retries[0][0]["db.operation.name"] == "GET"
        assert retries[0][0]["error.type"].endswith("ConnectionError")
        durations = otel.points("db.client.operation.duration")
        ok = [p for a, p in durations if "error.type" not in a]
        bad = [a for a, p in durations if "error.type" in a]
        assert sum(p.count for p in ok) == 2
        assert all(a["db.system.name"] == "redis" and a["db.operation.name"] == "GET" for a in bad)
        assert ok[0].explicit_bounds[:3] == (0.001, 0.005, 0.01)
    finally:
        r.close()


def test_fallback_event_and_metric(mode: str, otel: Otel, redis_server: RedisServer) -> None:
    r = runner(mode, otel, redis_server.host, redis_server.port)
    try:
        redis_server.kill()
        with otel.tracer.start_as_current_span("request"):
            if r.loop is None:
                with r.res.request() as h:
                    assert h.miss_on_outage().get("k") is None
            else:

                async def go() -> None:
                    async with r.res.request() as h:
                        assert await h.miss_on_outage().get("k") is None

                r.loop.run_until_complete(go())
        (req,) = otel.spans("request")
        assert events(req, "redis.resilience.fallback") == [
            {"redis.resilience.fallback.kind": "miss", "redis.resilience.reason": "retries_exhausted"}
        ]
        assert req.attributes is not None
        assert req.attributes["redis.resilience.fallbacks"] == 1
        assert req.attributes["redis.resilience.degraded"] is True
        ((attrs, point),) = otel.points("redis.resilience.fallbacks")
        assert attrs["kind"] == "miss"
        assert attrs["reason"] == "retries_exhausted"
        assert point.value == 1
    finally:
        r.close()


def test_suppress_instrumentation_is_respected(otel: Otel, clean_redis: RedisServer) -> None:
    r = runner("sync", otel, clean_redis.host, clean_redis.port)
    try:
        token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
        try:
            r.call("get", "k")
        finally:
            otel_context.detach(token)
        assert otel.spans("GET") == []
    finally:
        r.close()


def test_exporter_failure_never_breaks_a_call(clean_redis: RedisServer) -> None:
    class Exploding(InMemorySpanExporter):
        def export(self, spans: Any) -> Any:
            raise RuntimeError("collector down")

    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(Exploding()))
    res = Resilience(redis.Redis(host=clean_redis.host, port=clean_redis.port), tracer_provider=tp)
    with res.request() as h:
        assert h.set("k", "v") is True
        assert h.get("k") == b"v"


def test_nests_with_contrib_redis_instrumentor(otel: Otel, clean_redis: RedisServer) -> None:
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    instrumentor = RedisInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tp)
    try:
        res = Resilience(redis.Redis(host=clean_redis.host, port=clean_redis.port), tracer_provider=otel.tp)
        with res.request() as h:
            h.get("k")
    finally:
        instrumentor.uninstrument()
    ours = [
        s
        for s in otel.spans()
        if s.instrumentation_scope and s.instrumentation_scope.name == "otel_redis_resilience"
    ]
    # Only contrib spans of this trace: RedisInstrumentor patches redis-py globally, so a
    # background probe left running by another test may add unrelated spans meanwhile.
    theirs = [s for s in otel.spans() if s not in ours and s.context.trace_id == ours[0].context.trace_id]
    assert len(ours) == 1
    assert len(theirs) == 1  # one attempt, one contrib span, nested under our logical operation
    assert theirs[0].parent is not None
    assert theirs[0].parent.span_id == ours[0].context.span_id


def test_state_gauge_reports_the_worst_breaker_of_an_endpoint(otel: Otel, clean_redis: RedisServer) -> None:
    a = Resilience(redis.Redis(host=clean_redis.host, port=clean_redis.port), meter_provider=otel.mp)
    b = Resilience(redis.Redis(host=clean_redis.host, port=clean_redis.port, db=1), meter_provider=otel.mp)
    for opened in (b, a):
        opened.force_open()
        states = {attrs["state"]: p.value for attrs, p in otel.points("redis.resilience.breaker.state")}
        assert states == {"closed": 0, "open": 1, "half_open": 0}
        opened.reset()
    assert a.breaker_state is b.breaker_state


def test_write_behind_metrics_and_replay_span(otel: Otel, redis_server: RedisServer, tmp_path: Any) -> None:
    import contextlib

    from otel_redis_resilience import Journaled, JournalFullError, WriteBehindConfig

    res = Resilience(
        redis.Redis(host=redis_server.host, port=redis_server.port),
        retry=RetryPolicy(attempt_timeout=0.2, max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=1, probe_interval=0.05, half_open_max_calls=1),
        tracer_provider=otel.tp,
        meter_provider=otel.mp,
        write_behind=WriteBehindConfig(tmp_path / "j", max_entries=3, fsync="off"),
    )
    redis_server.kill()
    with res.request() as h:
        for i in range(3):
            assert isinstance(h.write_behind().rpush("l", str(i)), Journaled)
        with pytest.raises(JournalFullError):
            h.write_behind().rpush("l", "3")
    server = {"server.address": redis_server.host, "server.port": redis_server.port}
    assert [(a, p.value) for a, p in otel.points("redis.resilience.writebehind.queue_size")] == [(server, 3)]
    ((attrs, point),) = otel.points("redis.resilience.writebehind.rejected")
    assert attrs == {"reason": "journal_full", **server}
    assert point.value == 1
    kinds = {a["kind"] for a, _ in otel.points("redis.resilience.fallbacks")}
    assert kinds == {"write_behind"}
    redis_server.restart()
    end = time.monotonic() + 20
    while res.write_behind_journal.pending_count() and time.monotonic() < end:
        with contextlib.suppress(RedisUnavailable), res.request() as h:
            h.ping()
        time.sleep(0.05)
    assert res.write_behind_journal.pending_count() == 0
    assert sum(p.value for _, p in otel.points("redis.resilience.writebehind.replayed")) == 3
    replay_spans = otel.spans("redis.resilience.writebehind.replay")
    assert replay_spans
    assert sum((s.attributes or {})["redis.resilience.writebehind.applied"] for s in replay_spans) == 3
    for span in replay_spans:
        # Each span covers its run (a batch round trip at least), not a zero-length marker.
        assert span.end_time is not None
        assert span.start_time is not None
        # A run reads the journal, round-trips to Redis and acknowledges: far more than the
        # few µs between two back-to-back clock reads of a span started at its end.
        assert span.end_time - span.start_time >= 50_000
        assert (span.attributes or {})["server.port"] == redis_server.port
    res.close()


def test_replay_failures_are_logged_rate_limited_and_traced(
    otel: Otel, clean_redis: RedisServer, tmp_path: Any, caplog: pytest.LogCaptureFixture, monkeypatch: Any
) -> None:
    # Redis is healthy; replay itself raises (as a broken journal or a bug would). The
    # replayer thread must survive, back off, trace every run and log once per 10 s.
    import otel_redis_resilience._observe.telemetry as telemetry_module
    import otel_redis_resilience._writebehind.writebehind as writebehind_module
    from otel_redis_resilience import Journaled, WriteBehindConfig

    def broken_replay(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret-key-name")

    monkeypatch.setattr(writebehind_module, "replay_all_sync", broken_replay)
    monkeypatch.setattr(telemetry_module, "_ratelimited", telemetry_module._RateLimitedLog())
    caplog.set_level(logging.DEBUG, logger="otel_redis_resilience")
    res = Resilience(
        redis.Redis(host=clean_redis.host, port=clean_redis.port),
        tracer_provider=otel.tp,
        meter_provider=otel.mp,
        write_behind=WriteBehindConfig(tmp_path / "j", fsync="off"),
    )
    try:
        res.force_open()
        with res.request() as h:
            assert isinstance(h.write_behind().set("k", "v"), Journaled)
        res.reset()  # leaves open: the replayer runs, and fails, and retries with backoff
        end = time.monotonic() + 10
        while len(otel.spans("redis.resilience.writebehind.replay")) < 4 and time.monotonic() < end:
            time.sleep(0.05)
        runs = otel.spans("redis.resilience.writebehind.replay")
        assert len(runs) >= 4
        assert res.write_behind_journal.pending_count() == 1  # nothing lost
    finally:
        res.close()
    failed = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failed) == 1
    assert "write-behind replay failed (RuntimeError)" in failed[0].getMessage()
    assert all("secret-key-name" not in r.getMessage() for r in caplog.records)
    assert all(s.status.status_code is StatusCode.ERROR for s in runs)
    assert all((s.attributes or {})["error.type"] == "RuntimeError" for s in runs)


def test_outage_logs_are_rate_limited_and_transitions_logged(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="otel_redis_resilience")
    res = Resilience(
        redis.Redis(host=redis_server.host, port=redis_server.port),
        retry=RetryPolicy(attempt_timeout=0.2, max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=2, probe_interval=0.05, half_open_max_calls=1),
    )
    redis_server.kill()
    for _ in range(300):
        with pytest.raises(RedisUnavailable), res.request() as h:
            h.get("secret-key-123")
    redis_server.restart()
    end = time.monotonic() + 10
    while res.breaker_state.value != "closed" and time.monotonic() < end:
        with contextlib.suppress(RedisUnavailable), res.request() as h:
            h.get("secret-key-123")
        time.sleep(0.02)
    records = [r for r in caplog.records if r.name == "otel_redis_resilience"]
    opened = [r for r in records if "closed -> open" in r.getMessage()]
    closed = [r for r in records if "-> closed" in r.getMessage()]
    assert [r.levelno for r in opened] == [logging.WARNING]
    assert closed
    assert all(r.levelno == logging.INFO for r in closed)
    # 300 failed calls, a handful of lines: never one per call.
    assert len(records) < 15, [r.getMessage() for r in records]
    assert not any(redis_server.host in r.getMessage() and r.getMessage().split()[-1] == "k" for r in records)
    res.close()


_NO_SDK_SCRIPT = r"""
import asyncio, importlib.abc, json, logging, sys

class NoSdk(importlib.abc.MetaPathFinder):
    # Behaves as if opentelemetry-sdk were not installed.
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry.sdk" or name.startswith("opentelemetry.sdk."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, NoSdk())
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
import redis, redis.asyncio
from otel_redis_resilience import BreakerState, RedisUnavailable, Resilience

host, port = sys.argv[1], int(sys.argv[2])
events = []
res = Resilience(redis.Redis(host=host, port=port), hooks=[lambda e: events.append(type(e).__name__)])
with res.request() as h:
    h.set("nosdk", "1")
    got = h.get("nosdk")
    pipe = h.pipeline(transaction=False)
    pipe.incr("nosdk")
    pipe.get("nosdk")
    piped = pipe.execute()
res.force_open()
with res.request() as h:
    missed = h.miss_on_outage().get("nosdk")
    try:
        h.get("nosdk")
        rejected = None
    except RedisUnavailable as exc:
        rejected = exc.reason
res.reset()

async def main():
    ares = Resilience(redis.asyncio.Redis(host=host, port=port))
    async with ares.request() as h:
        value = await h.get("nosdk")
    ares.close()
    await ares.client.aclose()
    return value

avalue = asyncio.run(main())
print(json.dumps({
    "got": got.decode(), "piped": [piped[0], piped[1].decode()], "missed": missed, "rejected": rejected,
    "async": avalue.decode(), "state": res.breaker_state.value, "events": sorted(set(events)),
    "sdk_loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk")),
}))
"""


def test_works_and_reports_to_hooks_with_no_sdk_installed(clean_redis: RedisServer) -> None:
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _NO_SDK_SCRIPT, clean_redis.host, str(clean_redis.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["sdk_loaded"] == []
    assert out["got"] == "1"
    assert out["piped"] == [2, "2"]
    assert out["async"] == "2"
    assert out["missed"] is None
    assert out["rejected"] == "breaker_open"
    assert out["state"] == "closed"
    assert {"OperationFinished", "BreakerTransitioned", "CallRejected", "FallbackUsed"} <= set(out["events"])
    # Logging does not need the SDK either: transitions are logged, WARNING on open and INFO on close.
    assert "WARNING Redis " in proc.stdout
    assert "closed -> open (forced_open)" in proc.stdout
    assert "INFO Redis " in proc.stdout
    assert "open -> closed (reset)" in proc.stdout


async def test_async_background_work_does_not_inherit_the_requests_trace(
    otel: Otel, redis_server: RedisServer, tmp_path: Any
) -> None:
    # The replayer and the probe are long-lived tasks started from inside a request;
    # their spans must not land in that request's trace. The probe's PINGs are seen
    # through contrib's RedisInstrumentor, as a user debugging with it would see them.
    import redis.asyncio
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    from otel_redis_resilience import Journaled, WriteBehindConfig

    instrumentor = RedisInstrumentor()
    instrumentor.instrument(tracer_provider=otel.tp)
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port)
    res = Resilience(
        client,
        retry=RetryPolicy(attempt_timeout=0.2, max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=1, probe_interval=0.05, half_open_max_calls=1),
        tracer_provider=otel.tp,
        meter_provider=otel.mp,
        write_behind=WriteBehindConfig(tmp_path / "j", fsync="off"),
    )
    try:
        redis_server.kill()
        with otel.tracer.start_as_current_span("request") as request_span:
            async with res.request() as h:
                with contextlib.suppress(RedisUnavailable):
                    await h.get("k")  # opens the breaker: the probe task starts here
                assert isinstance(await h.write_behind().rpush("l", "x"), Journaled)
        await asyncio.sleep(0.3)  # a few failing probe PINGs while Redis is down
        redis_server.restart()
        end = time.monotonic() + 20
        # No request traffic: the probe moves the breaker to half-open and the replayer drains.
        while res.write_behind_journal.pending_count() and time.monotonic() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        pending, state = res.write_behind_journal.pending_count(), res.breaker_state.value
    finally:
        instrumentor.uninstrument()
        res.close()
        await client.aclose()
    assert pending == 0
    # The probe left open; a successful replay is evidence too, and may then close it.
    assert state in ("half_open", "closed")
    request_trace = request_span.get_span_context().trace_id
    replays = otel.spans("redis.resilience.writebehind.replay")
    assert replays
    assert all(s.parent is None for s in replays)
    pings = [
        s for s in otel.spans("PING") if s.instrumentation_scope and "redis" in s.instrumentation_scope.name
    ]
    assert pings  # the probe ran, and contrib saw it
    in_request = [s for s in otel.spans() if s.context.trace_id == request_trace]
    # Ours and contrib's GET, our journaled RPUSH, the request: nothing from the background.
    assert sorted(s.name for s in in_request) == ["GET", "GET", "RPUSH", "request"]
