"""No key, value or password reaches our telemetry, on every path that could carry one.

Each case drives a path whose raw redis-py exception message (or our own log line, or a
hook event) would carry a canary string, asserts that the raw message really does carry it
(so the case is not vacuous), then asserts on what was emitted while it ran: no canary in
any span, span event, metric point, log line or hook event, and the things that must be
there (the ``exception`` event with the error code) are there. ``tests/canary.py`` scans the
whole session the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_redis_resilience import (
    BreakerPolicy,
    Journaled,
    OperationFinished,
    RedisUnavailable,
    RetryPolicy,
    WriteBehindConfig,
    set_testing,
)
from testbed import FaultProxy, RedisServer
from tests.canary import (
    CANARIES,
    CANARY_KEY,
    CANARY_PASSWORD,
    CANARY_USER,
    CANARY_VALUE,
    SELFTEST_LOGGER,
    Capture,
    capture,
    leaks,
)
from tests.support import Runner

# The server's real password is a secret too.
SERVER_PASSWORD = "canary-pass-1d4e-server"
assert CANARY_PASSWORD in SERVER_PASSWORD  # so the session scan covers it


class Tel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tp = TracerProvider()
        self.tp.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.mp = MeterProvider(metric_readers=[self.reader])
        # Fallback events go on the span current when the fallback is served: a server span.
        self.request = self.tp.get_tracer("test").start_as_current_span

    def texts(self) -> list[str]:
        out = []
        for s in self.exporter.get_finished_spans():
            out.append(f"{s.name} {s.attributes!r} {s.status.description!r}")
            out.extend(f"{e.name} {e.attributes!r}" for e in s.events)
        data = self.reader.get_metrics_data()
        for rm in data.resource_metrics if data else ():
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    out.extend(f"{m.name} {dict(p.attributes or {})!r}" for p in m.data.data_points)
        return out

    def exceptions(self) -> list[dict[str, Any]]:
        return [
            dict(e.attributes or {})
            for s in self.exporter.get_finished_spans()
            if s.instrumentation_scope and s.instrumentation_scope.name == "otel_redis_resilience"
            for e in s.events
            if e.name == "exception"
        ]


@pytest.fixture
def tel() -> Tel:
    return Tel()


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def fresh_log_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rate-limited lines held back by an earlier test would make a case pass vacuously.
    import otel_redis_resilience._observe.telemetry as telemetry_module

    monkeypatch.setattr(telemetry_module, "_ratelimited", telemetry_module._RateLimitedLog())


@pytest.fixture
def fast_retries() -> Iterator[None]:
    set_testing(True)
    yield
    set_testing(False)


def make(mode: str, tel: Tel, server: Any, **kw: Any) -> Runner:
    kw.setdefault("capture_statement", True)
    return Runner(mode, server.host, server.port, tracer_provider=tel.tp, meter_provider=tel.mp, **kw)


def assert_clean(cap: Capture, tel: Tel, runner: Runner | None = None) -> None:
    """Nothing emitted while the case ran carries a canary, seen through every channel."""
    cap.assert_clean()
    direct = [t for t in tel.texts() if leaks(t)]
    assert not direct, direct
    if runner is not None:
        hooked = [repr(e) for e in runner.recorder.events if leaks(repr(e))]
        assert not hooked, hooked
    # The tap really saw this case's telemetry: the scan above is not of an empty list.
    assert cap.our_spans()


def raises_with_canary(exc_type: type[BaseException], fn: Callable[[], Any]) -> BaseException:
    with pytest.raises(exc_type) as info:
        fn()
    raw = str(info.value)
    assert any(c in raw for c in CANARIES), f"the raw message should carry a canary: {raw!r}"
    return info.value


def only_exception(tel: Tel) -> dict[str, Any]:
    (exc,) = tel.exceptions()
    assert set(exc) <= {"exception.type", "exception.message", "exception.stacktrace"}
    return exc


# -- error replies that quote the command's arguments --------------------------------------


def test_unknown_command(mode: str, tel: Tel, clean_redis: RedisServer) -> None:
    r = make(mode, tel, clean_redis)
    try:
        with capture() as cap:
            raises_with_canary(
                redis.ResponseError, lambda: r.call("execute_command", "NOSUCHCMD", CANARY_KEY, CANARY_VALUE)
            )
        assert_clean(cap, tel, r)
        exc = only_exception(tel)
        assert exc["exception.type"] == "redis.exceptions.ResponseError"
        assert exc["exception.message"] == "ERR unknown command"
        assert "ERR unknown command" in exc["exception.stacktrace"]
        (span,) = cap.our_spans()
        assert span.attributes["db.query.text"] == "NOSUCHCMD ? ?"
        (finished,) = r.recorder.of(OperationFinished)
        assert finished.error_message == "ERR unknown command"
    finally:
        r.close()


def test_module_command_without_the_module(mode: str, tel: Tel, clean_redis: RedisServer) -> None:
    r = make(mode, tel, clean_redis)
    try:
        with capture() as cap:
            raises_with_canary(
                redis.ResponseError,
                lambda: r.call("execute_command", "JSON.SET", CANARY_KEY, "$", f'"{CANARY_VALUE}"'),
            )
        assert_clean(cap, tel, r)
        assert only_exception(tel)["exception.message"] == "ERR unknown command"
    finally:
        r.close()


def test_wrongtype(mode: str, tel: Tel, clean_redis: RedisServer) -> None:
    clean_redis.client().set(CANARY_KEY, CANARY_VALUE)
    r = make(mode, tel, clean_redis)
    try:
        with capture() as cap, pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            r.call("lpush", CANARY_KEY, CANARY_VALUE)
        assert_clean(cap, tel, r)
        exc = only_exception(tel)
        assert exc["exception.message"] == "WRONGTYPE Operation against a key holding the wrong kind of value"
        (span,) = cap.our_spans()
        assert span.attributes["error.type"] == "WRONGTYPE"
    finally:
        r.close()


@pytest.mark.parametrize("transaction", [False, True])
def test_pipeline_whose_second_command_fails(
    mode: str, transaction: bool, tel: Tel, clean_redis: RedisServer
) -> None:
    clean_redis.client().set(CANARY_KEY, CANARY_VALUE)
    r = make(mode, tel, clean_redis)

    def build(p: Any) -> None:
        p.get(f"{CANARY_KEY}-other")
        p.lpush(CANARY_KEY, CANARY_VALUE)

    try:
        with capture() as cap:
            raises_with_canary(redis.ResponseError, lambda: r.pipeline(build, transaction=transaction))
        assert_clean(cap, tel, r)
        msg = only_exception(tel)["exception.message"]
        assert msg == (
            "Command # 2 of pipeline caused error: "
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        )
        (span,) = cap.our_spans()
        assert span.attributes["db.query.text"] == "GET ?; LPUSH ? ?"
    finally:
        r.close()


# -- credentials ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_server() -> Iterator[RedisServer]:
    # Set after start: the launcher's readiness PING does not authenticate.
    with RedisServer() as server:
        server.client().config_set("requirepass", SERVER_PASSWORD)
        yield server


@pytest.mark.parametrize(
    ("client_kw", "code"),
    [
        ({"password": CANARY_PASSWORD}, "WRONGPASS"),
        ({"username": CANARY_USER, "password": SERVER_PASSWORD}, "WRONGPASS"),
        ({}, "NOAUTH"),
    ],
    ids=["wrong-password", "wrong-user", "no-password"],
)
def test_authentication_failures(
    mode: str, client_kw: dict[str, Any], code: str, tel: Tel, locked_server: RedisServer
) -> None:
    r = make(mode, tel, locked_server, client_kw=client_kw)
    try:
        with capture() as cap, pytest.raises(redis.AuthenticationError):
            r.call("set", CANARY_KEY, CANARY_VALUE)
        assert_clean(cap, tel, r)
        exc = only_exception(tel)
        assert exc["exception.type"] == "redis.exceptions.AuthenticationError"
        assert exc["exception.message"].startswith(code + " ")
    finally:
        r.close()


# -- outages: retries, breaker, fallbacks -----------------------------------------------


def test_retry_after_a_dropped_reply(
    mode: str, tel: Tel, redis_server: RedisServer, proxy: FaultProxy, fast_retries: None
) -> None:
    r = make(mode, tel, proxy, retry=RetryPolicy(attempt_timeout=0.3))
    try:
        r.call("set", CANARY_KEY, CANARY_VALUE)
        proxy.set_mode("drop_replies", count=1)
        with capture() as cap:
            assert r.call("get", CANARY_KEY) == CANARY_VALUE.encode()
        assert_clean(cap, tel, r)
        assert cap.events("redis.resilience.retry")
        (span,) = cap.our_spans()
        assert span.attributes["redis.resilience.outcome"] == "retried"
    finally:
        r.close()


def test_blackhole_then_breaker_open_and_fallbacks(
    mode: str, tel: Tel, redis_server: RedisServer, proxy: FaultProxy, fast_retries: None
) -> None:
    r = make(
        mode,
        tel,
        proxy,
        retry=RetryPolicy(attempt_timeout=0.2, max_attempts=2),
        breaker=BreakerPolicy(failure_threshold=2, probe_interval=10.0),
    )
    try:
        r.call("set", CANARY_KEY, CANARY_VALUE)
        proxy.set_mode("blackhole")
        with capture() as cap, tel.request("request"):
            with pytest.raises(RedisUnavailable):
                r.call("get", CANARY_KEY)
            with pytest.raises(RedisUnavailable) as info:
                r.call("set", CANARY_KEY, CANARY_VALUE)  # rejected: the breaker opened
            assert info.value.reason == "breaker_open"
            if mode == "sync":
                with r.res.request() as h:
                    assert h.miss_on_outage().get(CANARY_KEY) is None

                @r.res.fallback(value=CANARY_VALUE)
                def read(key: str) -> Any:
                    with r.res.request() as h:
                        return h.get(key)

                assert read(CANARY_KEY) == CANARY_VALUE
            else:

                async def go() -> Any:
                    async with r.res.request() as h:
                        missed = await h.miss_on_outage().get(CANARY_KEY)

                    @r.res.fallback(func=lambda key: CANARY_VALUE)
                    async def read(key: str) -> Any:
                        async with r.res.request() as h:
                            return await h.get(key)

                    return missed, await read(CANARY_KEY)

                assert r._run(go()) == (None, CANARY_VALUE)
        assert_clean(cap, tel, r)
        exc = only_exception(tel)  # the failed GET; the rejected SET records none
        assert exc["exception.type"] == "otel_redis_resilience.RedisUnavailable"
        assert exc["exception.message"].startswith("Redis unavailable (")
        assert cap.events("redis.resilience.rejected")
        kinds = {e["redis.resilience.fallback.kind"] for e in cap.events("redis.resilience.fallback")}
        assert kinds == {"miss", "value" if mode == "sync" else "function"}
        assert any("unavailable" in line for line in cap.logs())
    finally:
        r.close()


def test_write_behind_journal_and_replay(
    mode: str, tel: Tel, clean_redis: RedisServer, tmp_path: Path
) -> None:
    r = make(mode, tel, clean_redis, write_behind=WriteBehindConfig(tmp_path / "j", fsync="off"))

    async def journal_async() -> Any:
        async with r.res.request() as h:
            return await h.write_behind().hset(CANARY_KEY, CANARY_VALUE, CANARY_VALUE)

    def journal() -> Any:
        if r.loop is not None:
            return r._run(journal_async())
        with r.res.request() as h:
            return h.write_behind().hset(CANARY_KEY, CANARY_VALUE, CANARY_VALUE)

    try:
        with capture() as cap:
            r.res.force_open()
            with tel.request("request"):
                assert isinstance(journal(), Journaled)
            r.res.reset()
            assert r.wait_for(lambda: r.res.write_behind_journal.pending_count() == 0, 20)
            r.wait_for(lambda: any(s.name.endswith("replay") for s in cap.spans), 5)
        assert clean_redis.client().hget(CANARY_KEY, CANARY_VALUE) == CANARY_VALUE.encode()
        cap.assert_clean()
        assert not [t for t in tel.texts() if leaks(t)]
        assert any(s.name == "redis.resilience.writebehind.replay" for s in cap.our_spans()), [
            (s.name, s.instrumentation_scope) for s in tel.exporter.get_finished_spans()
        ]
        assert any(
            e["redis.resilience.fallback.kind"] == "write_behind"
            for e in cap.events("redis.resilience.fallback")
        )
    finally:
        r.close()


# -- our own log lines ------------------------------------------------------------------


def test_a_failing_hook_is_logged_without_its_message(tel: Tel, clean_redis: RedisServer) -> None:
    def bad_hook(event: object) -> None:
        raise ValueError(f"hook saw {CANARY_KEY}={CANARY_VALUE}")

    r = make("sync", tel, clean_redis, hooks=[bad_hook])
    try:
        with capture() as cap:
            r.call("get", CANARY_KEY)
        assert_clean(cap, tel)
        logs = cap.logs()
        assert any("hook" in line and "raised" in line for line in logs)
        tracebacks = [line for line in logs if "Traceback" in line]
        assert tracebacks  # the traceback is still at DEBUG, frames and exception type
        assert all("ValueError" in t for t in tracebacks)
    finally:
        r.close()


def test_a_failing_replay_run_is_logged_without_its_message(
    tel: Tel, clean_redis: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import otel_redis_resilience._writebehind.writebehind as writebehind_module

    def broken_replay(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"replay of {CANARY_KEY} failed")

    monkeypatch.setattr(writebehind_module, "replay_all_sync", broken_replay)
    r = make("sync", tel, clean_redis, write_behind=WriteBehindConfig(tmp_path / "j", fsync="off"))
    try:
        with capture() as cap:
            r.res.force_open()
            with r.res.request() as h:
                assert isinstance(h.write_behind().set(CANARY_KEY, CANARY_VALUE), Journaled)
            r.res.reset()
            end = time.monotonic() + 10
            while not any("replay failed" in line for line in cap.logs()) and time.monotonic() < end:
                time.sleep(0.05)
            while not any("Traceback" in line for line in cap.logs()) and time.monotonic() < end:
                time.sleep(0.05)
        assert_clean(cap, tel)
        assert any("write-behind replay failed (RuntimeError)" in line for line in cap.logs())
        assert any("Traceback" in line and "RuntimeError" in line for line in cap.logs())
    finally:
        r.close()


def test_the_canary_scan_itself_finds_a_leak() -> None:
    # Guards the guard: a leaking emission is seen by a capture and by leaks().
    import logging

    with capture() as cap:
        logging.getLogger(SELFTEST_LOGGER).debug("x %s", CANARY_KEY.upper())
    assert cap.leaked()
    assert leaks(f"v={CANARY_VALUE}") == [CANARY_VALUE]


# -- text crafted to get through ----------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        # A script's error reply is free text: nothing of it but the code is believed.
        (lambda p: p.eval("return redis.error_reply(ARGV[1])", 0, f"ERR key {CANARY_KEY} not found"), "ERR"),
        # A code the server never sends is the script's text too, and may be a key: dropped.
        (lambda p: p.eval("return redis.error_reply(ARGV[1])", 0, f"MYCODE {CANARY_VALUE}"), ""),
        # A value shaped like redis-py's pipeline wording, echoed back by the server.
        (
            lambda p: p.execute_command(
                "NOSUCHCMD", f"a) of pipeline caused error: WRONGTYPE {CANARY_VALUE}"
            ),
            "Command # 1 of pipeline caused error: ERR",
        ),
    ],
    ids=["script-err", "script-code", "pipeline-wording"],
)
def test_crafted_error_text(
    mode: str, build: Callable[[Any], Any], expected: str, tel: Tel, clean_redis: RedisServer
) -> None:
    r = make(mode, tel, clean_redis)
    try:
        with capture() as cap:
            if expected.startswith("Command"):
                raises_with_canary(redis.ResponseError, lambda: r.pipeline(build, transaction=False))
            else:
                raises_with_canary(redis.ResponseError, lambda: build(_Direct(r)))
        assert_clean(cap, tel, r)
        assert only_exception(tel).get("exception.message", "") == expected
    finally:
        r.close()


class _Direct:
    """``p.eval(...)`` on a runner, for the cases written against a pipeline."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    def eval(self, *args: Any) -> Any:
        return self.runner.call("eval", *args)
