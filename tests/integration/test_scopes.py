"""Request scopes and handle lifetimes, against a real redis-server.

A handle belongs to its scope: once the scope ended, every command and pipeline of
it raises ``ScopeClosedError`` (and records nothing), ``current_redis()`` raises
``NoActiveRequest``, and closing nested scopes in any order never leaves an ended
scope current. Also here: a ``Resilience`` closed and used again (a second test
session, a lifespan restart) re-opens cleanly.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.exceptions
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_redis_resilience
from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    ConfigurationError,
    Journaled,
    NoActiveRequest,
    RedisUnavailable,
    Resilience,
    ScopeClosedError,
    WriteBehindConfig,
    current_redis,
    current_scope,
)
from testbed import RedisServer
from tests.support import Recorder


class Observed:
    """A Resilience whose every span, metric point, hook event and log record is kept."""

    def __init__(self, client: Any, **kw: Any) -> None:
        self.spans = InMemorySpanExporter()
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.recorder = Recorder()
        self.res = Resilience(
            client,
            tracer_provider=tp,
            meter_provider=MeterProvider(metric_readers=[self.reader]),
            hooks=[self.recorder],
            **kw,
        )

    def metric_points(self) -> dict[str, float]:
        """Sum of every data point's value per metric name (histograms: their count)."""
        out: dict[str, float] = {}
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    if metric.name == "redis.resilience.breaker.state":
                        continue  # a gauge, observed whether or not anything happened
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = point.count
                        out[metric.name] = out.get(metric.name, 0) + value
        return {k: v for k, v in out.items() if v}

    def nothing_recorded_since(self, mark: tuple[int, dict[str, float], int]) -> None:
        spans, points, events = mark
        assert len(self.spans.get_finished_spans()) == spans
        assert self.metric_points() == points
        assert len(self.recorder.events) == events

    def mark(self) -> tuple[int, dict[str, float], int]:
        return len(self.spans.get_finished_spans()), self.metric_points(), len(self.recorder.events)


@pytest.fixture
def sync_client(clean_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    yield client
    client.close()


@pytest.fixture
async def async_client(clean_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    yield client
    await client.aclose()


def test_scope_closed_error_is_public_and_not_an_unavailability() -> None:
    assert ScopeClosedError.__module__ == "otel_redis_resilience"
    assert "ScopeClosedError" in otel_redis_resilience.__all__
    assert issubclass(ScopeClosedError, RuntimeError)
    # Fallbacks and `except redis.ConnectionError` must never swallow a programming error.
    assert not issubclass(ScopeClosedError, RedisUnavailable | redis.exceptions.ConnectionError)
    assert not issubclass(ScopeClosedError, redis.exceptions.RedisError)


# -- a handle used after its scope ended ----------------------------------------------


def test_sync_handle_after_its_scope_ended_raises_and_records_nothing(
    sync_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    obs = Observed(sync_client)
    res = obs.res
    with res.request(deadline=0.05) as h:
        h.set("k", "v")
        pipe = h.pipeline()
        pipe.get("k")
        watching = h.pipeline()
    mark = obs.mark()
    time.sleep(0.07)  # the scope's deadline is long spent too: still not deadline_exceeded
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="otel_redis_resilience"):
        for call in (
            lambda: h.get("k"),
            lambda: h.set("k", "w"),
            lambda: h.miss_on_outage().get("k"),  # a fallback view does not swallow it
            lambda: h.execute_command("PING"),
            pipe.execute,  # made inside the scope, executed after it
            lambda: h.pipeline().set("k", "x").execute(),
            lambda: watching.watch("k"),
        ):
            with pytest.raises(ScopeClosedError, match=r"request scope .* ended") as info:
                call()
            assert "res.request()" in str(info.value)

        @res.fallback(value="fallback")
        def read() -> Any:
            return h.get("k")

        with pytest.raises(ScopeClosedError):
            read()
    assert caplog.records == []
    obs.nothing_recorded_since(mark)
    assert sync_client.get("k") == b"v"  # nothing was sent
    assert res.breaker_state is BreakerState.CLOSED


async def test_async_handle_after_its_scope_ended_raises_and_records_nothing(
    async_client: redis.asyncio.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    obs = Observed(async_client)
    res = obs.res
    async with res.request(deadline=0.05) as h:
        await h.set("k", "v")
        pipe = h.pipeline()
        pipe.get("k")
        watching = h.pipeline()
    mark = obs.mark()
    await asyncio.sleep(0.07)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="otel_redis_resilience"):
        for call in (
            lambda: h.get("k"),
            lambda: h.set("k", "w"),
            lambda: h.miss_on_outage().get("k"),
            lambda: h.execute_command("PING"),
            pipe.execute,
            lambda: h.pipeline().set("k", "x").execute(),
            lambda: watching.watch("k"),
        ):
            with pytest.raises(ScopeClosedError, match=r"request scope .* ended"):
                await call()

        @res.fallback(value="fallback")
        async def read() -> Any:
            return await h.get("k")

        with pytest.raises(ScopeClosedError):
            await read()
    assert caplog.records == []
    obs.nothing_recorded_since(mark)
    assert await async_client.get("k") == b"v"
    res.close()


def test_handles_outside_any_scope_keep_working(sync_client: redis.Redis) -> None:
    res = Resilience(sync_client)
    h = res.handle()  # background jobs: no scope, never "ended"
    assert h.ping() is True
    with res.request() as scoped:
        pass
    assert h.set("k", "v") is True
    with pytest.raises(ScopeClosedError):
        scoped.get("k")


# -- current_redis() and nested scopes --------------------------------------------------


def test_current_redis_after_the_scope_ended_raises_no_active_request(sync_client: redis.Redis) -> None:
    res = Resilience(sync_client)
    with res.request() as h:
        # A context copied inside the scope (what a thread pool or a task does) keeps the scope...
        copied = contextvars.copy_context()
        assert copied.run(current_redis) is h
    # ...but once the scope ended, it is no longer current there either.
    with pytest.raises(NoActiveRequest, match="ended"):
        copied.run(current_redis)
    assert copied.run(current_scope) is None
    with pytest.raises(NoActiveRequest, match="no Redis request scope"):
        current_redis()


def test_sync_nested_scopes_closed_out_of_order(sync_client: redis.Redis) -> None:
    res = Resilience(sync_client)
    a, b, c = res.request(), res.request(), res.request()
    ha = a.__enter__()
    hb = b.__enter__()
    hc = c.__enter__()
    assert current_redis() is hc
    b.__exit__(None, None, None)  # the middle one first: the innermost stays current
    assert current_redis() is hc
    c.__exit__(None, None, None)  # then the innermost: the nearest open one is current again
    assert current_redis() is ha
    assert current_scope() is a.scope
    with pytest.raises(ScopeClosedError):
        hb.ping()
    a.__exit__(None, None, None)
    assert current_scope() is None
    with pytest.raises(NoActiveRequest):
        current_redis()

    outer, inner = res.request(), res.request()
    outer.__enter__()
    hi = inner.__enter__()
    outer.__exit__(None, None, None)  # the outer one first
    assert current_redis() is hi
    inner.__exit__(None, None, None)
    assert current_scope() is None  # never the closed outer scope
    with pytest.raises(NoActiveRequest):
        current_redis()


async def test_async_nested_scopes_closed_out_of_order(async_client: redis.asyncio.Redis) -> None:
    res = Resilience(async_client)
    outer, inner = res.request(), res.request()
    await outer.__aenter__()
    hi = await inner.__aenter__()
    await outer.__aexit__(None, None, None)
    assert current_redis() is hi
    assert await hi.ping() is True
    await inner.__aexit__(None, None, None)
    assert current_scope() is None
    with pytest.raises(NoActiveRequest):
        current_redis()

    async def in_a_task(ctx: Any) -> Any:
        async with ctx as h:
            return h, current_scope()

    # A scope opened and closed in a task leaves the caller's context alone.
    async with res.request() as mine:
        h, scope = await asyncio.create_task(in_a_task(res.request()))
        assert scope is not None
        assert scope.closed
        assert current_redis() is mine
        with pytest.raises(ScopeClosedError):
            await h.ping()


def test_scope_closed_from_another_thread_does_not_clobber_that_threads_scope(
    sync_client: redis.Redis,
) -> None:
    res = Resilience(sync_client)
    ctx = res.request()
    ctx.__enter__()
    seen: dict[str, Any] = {}

    def other() -> None:
        with res.request() as theirs:
            ctx.__exit__(None, None, None)  # closed from a context where it is not current
            seen["current"] = current_redis()
            seen["theirs"] = theirs

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["current"] is seen["theirs"]
    assert current_scope() is None  # here the ended scope is no longer current either


# -- write_behind().pipeline() --------------------------------------------------------


def test_write_behind_pipeline_is_refused_sync(sync_client: redis.Redis) -> None:
    with tempfile.TemporaryDirectory() as d:
        res = Resilience(sync_client, write_behind=WriteBehindConfig(d, fsync="off"))
        try:
            with res.request() as h:
                wb = h.write_behind()
                for make in (wb.pipeline, lambda: wb.pipeline(transaction=False)):
                    with pytest.raises(ConfigurationError, match=r"write_behind\(\).*pipeline.*single-key"):
                        make()
                with pytest.raises(ConfigurationError, match="single-key"):
                    wb.transaction(lambda p: None)
                assert h.pipeline().set("k", "v").execute() == [True]  # the plain handle's still work
        finally:
            res.close()


async def test_write_behind_pipeline_is_refused_async(async_client: redis.asyncio.Redis) -> None:
    with tempfile.TemporaryDirectory() as d:
        res = Resilience(async_client, write_behind=WriteBehindConfig(d, fsync="off"))
        try:
            async with res.request() as h:
                wb = h.write_behind()
                with pytest.raises(ConfigurationError, match=r"write_behind\(\).*pipeline.*single-key"):
                    wb.pipeline()
                assert await h.pipeline().set("k", "v").execute() == [True]
        finally:
            res.close()


# -- a closed Resilience used again ------------------------------------------------------


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_sync_resilience_closed_then_used_again_reopens(clean_redis: RedisServer) -> None:
    """close() at the end of one session (a test, an app's shutdown); the next session works."""
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    with tempfile.TemporaryDirectory() as d:
        res = Resilience(client, write_behind=WriteBehindConfig(d, fsync="off"))
        for session, value in enumerate(("one", "two", "three")):
            with res.request() as h:
                assert h.write_behind().set("k", f"{value}-direct") is True
            res.force_open()
            with res.request() as h:
                out = h.write_behind().set("k", value)
            assert isinstance(out, Journaled), session
            res.reset()
            with res.request():
                pass
            wait_for(lambda: res.write_behind_journal.pending_count() == 0)
            assert client.get("k") == value.encode()
            res.close()
            res.close()  # idempotent
        client.close()


def test_sync_probe_runs_again_after_close_and_reuse(redis_server: RedisServer) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=1.0)
    res = Resilience(
        client, breaker=BreakerPolicy(failure_threshold=1, reset_timeout=60, probe_interval=0.05)
    )
    redis_server.kill()
    with res.request() as h, pytest.raises(RedisUnavailable):
        h.get("k")
    assert res.breaker_state is BreakerState.OPEN  # and a probe thread is running
    res.close()  # the session ends during the outage
    redis_server.restart()
    with res.request() as h, pytest.raises(RedisUnavailable, match="breaker"):
        h.get("k")  # rejected: this starts a probe again
    wait_for(lambda: res.breaker_state is not BreakerState.OPEN)
    with res.request() as h:
        assert h.ping() is True
    res.close()
    client.close()
