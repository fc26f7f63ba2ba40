"""The Flask extension (integrations/flask) with Flask's test client and a real redis-server."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from flask import Flask, g, jsonify
from flask.views import MethodView
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otel_redis_resilience import (
    ConfigurationError,
    Journaled,
    NoActiveRequest,
    RedisUnavailable,
    RequestScope,
    Resilience,
    RetryPolicy,
    WriteBehindConfig,
    current_redis,
    current_scope,
)
from otel_redis_resilience_flask import (
    CONFIG_DEADLINE,
    EXTENSION_KEY,
    RedisResilience,
    get_redis,
    redis_deadline,
)
from testbed import FaultProxy, RedisServer


@pytest.fixture
def res(clean_redis: RedisServer) -> Iterator[Resilience]:
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    r = Resilience(client)
    yield r
    r.close()
    client.close()


def make_app(res: Resilience, **kw: Any) -> Flask:
    app = Flask(__name__)
    RedisResilience(app, resilience=res, **kw)
    return app


def assert_closed(scope: RequestScope) -> None:
    """The scope left its context: no current scope, and the scope's context token is gone."""
    assert current_scope() is None
    assert scope.token is None


def test_handle_on_g_accessor_and_current_redis_are_the_same(res: Resilience) -> None:
    app = make_app(res)
    seen: dict[str, Any] = {}

    @app.post("/items/<name>")
    def put(name: str) -> Any:
        seen.update(g=g.redis, accessor=get_redis(), current=current_redis(), scope=current_scope())
        g.redis.set(f"item:{name}", "v1")
        return jsonify(value=get_redis().get(f"item:{name}").decode())

    resp = app.test_client().post("/items/a")
    assert resp.status_code == 200
    assert resp.json == {"value": "v1"}
    assert seen["g"] is seen["accessor"] is seen["current"]
    assert seen["g"] is seen["scope"].handle
    assert isinstance(seen["g"], redis.Redis)
    assert app.extensions[EXTENSION_KEY].resilience is res
    assert res.client.get("item:a") == b"v1"  # really written to Redis
    assert_closed(seen["scope"])


def test_scope_closed_also_when_the_view_raises(res: Resilience) -> None:
    app = make_app(res)
    scopes: list[RequestScope] = []

    @app.get("/boom")
    def boom() -> Any:
        g.redis.ping()
        scopes.append(current_scope())  # type: ignore[arg-type]
        raise RuntimeError("view failed")

    resp = app.test_client().get("/boom")  # not in testing mode: a 500 page
    assert resp.status_code == 500
    assert_closed(scopes[0])

    app.testing = True  # now the exception propagates out of the test client
    with pytest.raises(RuntimeError, match="view failed"):
        app.test_client().get("/boom")
    assert_closed(scopes[1])
    assert scopes[0] is not scopes[1]


def test_concurrent_requests_never_share_a_handle(res: Resilience) -> None:
    app = make_app(res)
    n_threads, per_thread = 8, 5
    barrier = threading.Barrier(n_threads, timeout=10)
    seen: list[tuple[Any, Any]] = []
    lock = threading.Lock()

    @app.get("/n/<int:i>")
    def view(i: int) -> Any:
        if i == 0:
            barrier.wait()  # the first request of every thread runs all at the same time
        h = get_redis()
        h.set(f"n:{id(h)}", i)
        time.sleep(0.002)
        assert int(h.get(f"n:{id(h)}")) == i
        with lock:
            seen.append((h, current_scope()))
        assert current_redis() is h
        return "ok"

    errors: list[BaseException] = []

    def worker() -> None:
        client = app.test_client()
        try:
            for i in range(per_thread):
                assert client.get(f"/n/{i}").status_code == 200
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(seen) == n_threads * per_thread
    # All kept alive in `seen`, so distinct ids mean distinct objects.
    assert len({id(h) for h, _ in seen}) == len(seen)
    assert len({id(s) for _, s in seen}) == len(seen)
    for _, scope in seen:
        assert scope.token is None


def test_deadline_from_config_and_per_route(res: Resilience) -> None:
    app = make_app(res, deadline=0.75)
    remaining: dict[str, float | None] = {}

    def left() -> float | None:
        scope = current_scope()
        assert scope is not None
        return scope.remaining(time.monotonic())

    @app.get("/default")
    def default() -> str:
        remaining["default"] = left()
        return "ok"

    @app.get("/fast")
    @redis_deadline(0.05)
    def fast() -> str:
        remaining["fast"] = left()
        return "ok"

    @redis_deadline(None)  # above @app.route works too; None: no deadline
    @app.get("/unbounded")
    def unbounded() -> str:
        remaining["unbounded"] = left()
        return "ok"

    class ClassView(MethodView):
        redis_deadline = 0.2

        def get(self) -> str:
            remaining["class"] = left()
            return "ok"

    app.add_url_rule("/class", view_func=ClassView.as_view("class_view"))
    client = app.test_client()
    for path in ("/default", "/fast", "/unbounded", "/class"):
        assert client.get(path).status_code == 200
    assert 0.6 < remaining["default"] <= 0.75  # type: ignore[operator]
    assert 0 < remaining["fast"] <= 0.05  # type: ignore[operator]
    assert remaining["unbounded"] is None
    assert 0.1 < remaining["class"] <= 0.2  # type: ignore[operator]

    app.config[CONFIG_DEADLINE] = 0.3  # the app config wins over the constructor
    client.get("/default")
    assert 0.2 < remaining["default"] <= 0.3  # type: ignore[operator]

    with pytest.raises(ConfigurationError):
        redis_deadline(-1)


def test_per_route_deadline_bounds_a_hung_redis(proxy: FaultProxy) -> None:
    client = redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=5.0)
    res = Resilience(client, retry=RetryPolicy(attempt_timeout=2.0))
    app = make_app(res, deadline=5.0)
    outcome: dict[str, Any] = {}

    @app.get("/fast")
    @redis_deadline(0.15)
    def fast() -> Any:
        t0 = time.monotonic()
        try:
            g.redis.get("k")
        except RedisUnavailable as e:
            outcome.update(reason=e.reason, took=time.monotonic() - t0)
        return "ok"

    try:
        app.test_client().get("/fast")  # warm the connection
        proxy.set_mode("blackhole")
        assert app.test_client().get("/fast").status_code == 200
        assert outcome["reason"] == "deadline_exceeded"
        assert outcome["took"] < 0.6
    finally:
        res.close()
        client.close()


def test_async_view_gets_the_handle_and_the_scope_closes(res: Resilience) -> None:
    app = make_app(res)
    seen: dict[str, Any] = {}

    @app.get("/async")
    async def view() -> Any:
        h = get_redis()
        seen.update(g=g.redis, current=current_redis(), scope=current_scope())
        h.set("async-key", "x")  # the sync handle is fine in Flask's async views
        return jsonify(value=h.get("async-key").decode())

    resp = app.test_client().get("/async")
    assert resp.status_code == 200
    assert resp.json == {"value": "x"}
    assert seen["g"] is seen["current"] is seen["scope"].handle
    assert_closed(seen["scope"])


def test_accessors_outside_a_request(res: Resilience) -> None:
    app = make_app(res)
    with pytest.raises(NoActiveRequest):
        get_redis()
    with app.app_context(), pytest.raises(NoActiveRequest):
        get_redis()
    with pytest.raises(NoActiveRequest):
        current_redis()
    # A hand-opened scope outside Flask is found too (background jobs, CLI commands).
    with res.request() as h:
        assert get_redis() is h


def test_app_factory_and_configuration_errors(res: Resilience, clean_redis: RedisServer) -> None:
    ext = RedisResilience(deadline=0.3)
    apps = [Flask("a"), Flask("b")]
    for app in apps:
        ext.init_app(app, resilience=res)

        @app.get("/")
        def index() -> str:
            return str(g.redis.ping())

        assert app.test_client().get("/").text == "True"
        assert app.config[CONFIG_DEADLINE] == 0.3
    with pytest.raises(ConfigurationError, match="init_app"):  # again: a clear error, nothing doubled
        ext.init_app(apps[0], resilience=res)
    assert len(apps[0].before_request_funcs[None]) == 1
    assert len(apps[0].teardown_request_funcs[None]) == 1

    with pytest.raises(ConfigurationError):
        RedisResilience(Flask("c"))  # no Resilience
    aclient = redis.asyncio.Redis(host=clean_redis.host, port=clean_redis.port)
    with pytest.raises(ConfigurationError, match="sync"):
        RedisResilience(Flask("d"), resilience=Resilience(aclient))
    with pytest.raises(ConfigurationError):
        RedisResilience(resilience=res, deadline=0)


@pytest.mark.parametrize("order", ["instrument_first", "extension_first"])
def test_composes_with_flask_instrumentor(clean_redis: RedisServer, order: str) -> None:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    res = Resilience(client, tracer_provider=tp)
    app = Flask(__name__)
    if order == "instrument_first":
        FlaskInstrumentor().instrument_app(app, tracer_provider=tp)
        RedisResilience(app, resilience=res)
    else:
        RedisResilience(app, resilience=res)
        FlaskInstrumentor().instrument_app(app, tracer_provider=tp)

    @app.get("/items/<name>")
    def item(name: str) -> Any:
        value = g.redis.miss_on_outage().get(f"item:{name}")  # cache-aside read
        if value is None:
            value = b"from-db"
            with suppress(RedisUnavailable):
                g.redis.set(f"item:{name}", value)
        return jsonify(value=value.decode())

    try:
        http = app.test_client()
        assert http.get("/items/a").json == {"value": "from-db"}  # GET (miss), SET
        res.force_open()  # an outage: the read falls back to a miss, the write is rejected
        assert http.get("/items/a").json == {"value": "from-db"}
        res.reset()
        assert http.get("/items/a").json == {"value": "from-db"}  # GET (hit)
    finally:
        FlaskInstrumentor().uninstrument_app(app)
        res.close()
        client.close()

    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert [s.attributes["http.route"] for s in servers] == ["/items/<name>"] * 3  # type: ignore[index]
    redis_spans = [s for s in spans if s.kind == SpanKind.CLIENT]
    for server, names in zip(servers, (["GET", "SET"], ["GET", "SET"], ["GET"]), strict=True):
        children = [s for s in redis_spans if s.parent and s.parent.span_id == server.context.span_id]
        assert [c.name for c in children] == names
    assert len(redis_spans) == 5  # no orphan Redis span; rejected calls get spans too
    ok, degraded, recovered = (dict(s.attributes or {}) for s in servers)
    assert ok["redis.resilience.operations"] == 2
    assert ok["redis.resilience.fallbacks"] == 0
    assert ok["redis.resilience.degraded"] is False
    assert degraded["redis.resilience.fallbacks"] == 1
    assert degraded["redis.resilience.degraded"] is True
    assert recovered["redis.resilience.operations"] == 1
    assert recovered["redis.resilience.degraded"] is False


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ("0.5", r"REDIS_RESILIENCE_DEADLINE.*must be a number, got '0\.5'"),
        (0, r"REDIS_RESILIENCE_DEADLINE.*must be > 0, got 0"),
        (-1.0, r"REDIS_RESILIENCE_DEADLINE.*must be > 0"),
        (True, r"REDIS_RESILIENCE_DEADLINE.*must be a number, got True"),
        (float("nan"), r"REDIS_RESILIENCE_DEADLINE.*must be a number"),
        (float("inf"), r"REDIS_RESILIENCE_DEADLINE.*must be finite"),
        ([0.5], r"REDIS_RESILIENCE_DEADLINE.*must be a number, got \[0\.5\]"),
    ],
)
def test_invalid_config_deadline_is_rejected_at_init_app(res: Resilience, config: Any, match: str) -> None:
    app = Flask(__name__)
    app.config[CONFIG_DEADLINE] = config
    with pytest.raises(ConfigurationError, match=match):
        RedisResilience(app, resilience=res)
    with pytest.raises(ConfigurationError, match=match):
        RedisResilience().init_app(app, resilience=res)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"deadline": "0.5"}, r"RedisResilience.deadline must be a number, got '0\.5'"),
        ({"deadline": -1}, r"RedisResilience.deadline must be > 0"),
        ({"deadline": float("nan")}, r"RedisResilience.deadline must be a number"),
        ({"resilience": "redis://localhost"}, r"needs resilience=Resilience"),
    ],
)
def test_invalid_extension_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RedisResilience(Flask(__name__), **kwargs)


@pytest.mark.parametrize("seconds", ["0.2", 0, -0.1, True, float("inf")])
def test_invalid_route_deadline(seconds: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"redis_deadline.deadline must be"):
        redis_deadline(seconds)


def test_invalid_class_based_view_deadline_is_a_configuration_error(res: Resilience) -> None:
    app = make_app(res)

    class Bad(MethodView):
        redis_deadline = "0.2"

        def get(self) -> str:
            return "never"

    app.add_url_rule("/bad", view_func=Bad.as_view("bad"))
    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(ConfigurationError, match=r"must be a number, got '0\.2'"):
        app.test_client().get("/bad")


def test_two_test_client_sessions_with_a_close_between(clean_redis: RedisServer) -> None:
    """Flask has no shutdown hook; a suite that closes the Resilience between tests can use it again."""
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    with tempfile.TemporaryDirectory() as d:
        res = Resilience(client, write_behind=WriteBehindConfig(d, fsync="off"))
        app = make_app(res)

        @app.post("/w/<value>")
        def write(value: str) -> Any:
            return jsonify(journaled=isinstance(g.redis.write_behind().set("k", value), Journaled))

        for session in range(2):
            with app.test_client() as c:
                assert c.post(f"/w/direct-{session}").json == {"journaled": False}
                res.force_open()
                assert c.post(f"/w/behind-{session}").json == {"journaled": True}
                res.reset()
                deadline = time.monotonic() + 5
                while res.write_behind_journal.pending_count() and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert client.get("k") == f"behind-{session}".encode()
            res.close()  # e.g. a fixture's teardown
        client.close()


def test_extension_state_in_app_extensions(res: Resilience) -> None:
    ext = RedisResilience()
    app = Flask(__name__)
    ext.init_app(app, resilience=res)
    state = app.extensions[EXTENSION_KEY]
    assert EXTENSION_KEY == "otel_redis_resilience"
    assert state.extension is ext
    assert state.resilience is res


def test_second_init_app_on_the_same_app_raises(res: Resilience, clean_redis: RedisServer) -> None:
    other_client = redis.Redis(host=clean_redis.host, port=clean_redis.port, db=1)
    other = Resilience(other_client)
    app = Flask("twice")
    ext = RedisResilience(app, resilience=res)
    message = r"init_app\(\) called twice for the Flask app 'twice'.*once per app"
    with pytest.raises(ConfigurationError, match=message):
        ext.init_app(app, resilience=other)  # the same extension
    with pytest.raises(ConfigurationError, match=message):
        RedisResilience(app, resilience=other)  # another extension on the same app
    assert app.extensions[EXTENSION_KEY].resilience is res  # not swapped
    assert app.extensions[EXTENSION_KEY].extension is ext
    assert len(app.before_request_funcs[None]) == 1
    assert len(app.teardown_request_funcs[None]) == 1

    @app.get("/")
    def index() -> str:
        g.redis.set("k", "v")
        return "ok"

    assert app.test_client().get("/").text == "ok"
    assert res.client.get("k") == b"v"
    assert other_client.get("k") is None
    other.close()
    other_client.close()


def test_one_extension_serves_two_apps_each_with_its_own_resilience(
    res: Resilience, clean_redis: RedisServer
) -> None:
    second_client = redis.Redis(host=clean_redis.host, port=clean_redis.port, db=1, socket_timeout=5.0)
    second = Resilience(second_client)
    ext = RedisResilience(deadline=0.4)
    app1, app2 = Flask("one"), Flask("two")
    ext.init_app(app1, resilience=res)
    ext.init_app(app2, resilience=second)
    app2.config[CONFIG_DEADLINE] = 0.2  # each app its own config
    for app in (app1, app2):

        @app.post("/w/<value>")
        def write(value: str) -> Any:
            scope = current_scope()
            assert scope is not None
            g.redis.set("k", value)
            return jsonify(left=scope.remaining(time.monotonic()))

    try:
        left1 = app1.test_client().post("/w/one").json["left"]
        left2 = app2.test_client().post("/w/two").json["left"]
        assert 0.3 < left1 <= 0.4
        assert 0.1 < left2 <= 0.2
        assert res.client.get("k") == b"one"  # db 0
        assert second_client.get("k") == b"two"  # db 1
        assert app1.extensions[EXTENSION_KEY].extension is app2.extensions[EXTENSION_KEY].extension is ext
    finally:
        second.close()
        second_client.close()


def test_hooks_are_registered_through_flask_public_api(res: Resilience) -> None:
    """In registration order: a before_request hook added after init_app can use Redis."""
    import otel_redis_resilience_flask as adapter

    source = Path(adapter.__file__).read_text()
    assert "before_request_funcs" not in source
    assert "teardown_request_funcs" not in source

    app = Flask(__name__)
    seen: list[Any] = []

    @app.before_request
    def earlier() -> None:  # registered before init_app: runs before the scope opens
        seen.append(current_scope())

    RedisResilience(app, resilience=res)

    @app.before_request
    def later() -> None:
        seen.append(g.redis.ping())

    @app.get("/")
    def index() -> str:
        return "ok"

    assert app.test_client().get("/").text == "ok"
    assert seen == [None, True]
