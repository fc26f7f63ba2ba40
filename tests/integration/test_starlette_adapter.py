"""The ASGI middleware (integrations/starlette) with Starlette, FastAPI and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
import redis
import redis.asyncio
from fastapi import Depends, FastAPI
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.starlette import StarletteInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    ConfigurationError,
    Journaled,
    NoActiveRequest,
    RedisUnavailable,
    RequestScope,
    Resilience,
    WriteBehindConfig,
    current_redis,
    current_scope,
)
from otel_redis_resilience_starlette import SCOPE_KEY, ResilienceMiddleware, get_redis, redis_deadline
from testbed import RedisServer


@pytest.fixture
async def res(clean_redis: RedisServer) -> AsyncIterator[Resilience]:
    client = redis.asyncio.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    r = Resilience(client)
    yield r
    r.close()
    await client.aclose()


def http(app: Any, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, **kw), base_url="http://test")


def left() -> float | None:
    scope = current_scope()
    assert scope is not None
    return scope.remaining(time.monotonic())


async def test_handle_on_request_state_scope_and_current_redis(res: Resilience) -> None:
    seen: dict[str, Any] = {}

    async def put(request: Request) -> JSONResponse:
        h = request.state.redis
        seen.update(state=h, scope_key=request.scope[SCOPE_KEY], current=current_redis())
        seen["scope"] = current_scope()
        await h.set("item:a", "v1")
        return JSONResponse({"value": (await current_redis().get("item:a")).decode()})

    app = Starlette(
        routes=[Route("/items", put, methods=["POST"])],
        middleware=[Middleware(ResilienceMiddleware, resilience=res)],
    )
    async with http(app) as c:
        resp = await c.post("/items")
    assert resp.json() == {"value": "v1"}
    assert seen["state"] is seen["scope_key"] is seen["current"] is seen["scope"].handle
    assert isinstance(seen["state"], redis.asyncio.Redis)
    assert await res.client.get("item:a") == b"v1"  # type: ignore[misc]
    assert current_scope() is None
    assert seen["scope"].token is None


async def test_fastapi_dependencies(res: Resilience) -> None:
    app = FastAPI()
    app.add_middleware(ResilienceMiddleware, resilience=res, deadline=0.8)
    seen: dict[str, Any] = {}

    @app.get("/items/{name}")
    async def item(name: str, r: Annotated[Any, Depends(get_redis)]) -> dict[str, Any]:
        seen.update(dep=r, current=current_redis(), left=left())
        await r.set(f"item:{name}", name)
        return {"value": (await r.get(f"item:{name}")).decode()}

    @app.get("/fast", dependencies=[Depends(redis_deadline(0.05))])
    async def fast() -> dict[str, Any]:
        return {"left": left()}

    @app.get("/unbounded", dependencies=[Depends(redis_deadline(None))])
    def unbounded_sync_endpoint() -> dict[str, Any]:  # run in a thread: the scope is still found
        return {"left": left()}

    async with http(app) as c:
        assert (await c.get("/items/x")).json() == {"value": "x"}
        assert 0 < (await c.get("/fast")).json()["left"] <= 0.05
        assert (await c.get("/unbounded")).json() == {"left": None}
    assert seen["dep"] is seen["current"]
    assert 0.7 < seen["left"] <= 0.8

    bare = FastAPI()  # no middleware: the dependency says so

    @bare.get("/x")
    async def x(r: Annotated[Any, Depends(get_redis)]) -> str:
        return "never"

    async with http(bare, raise_app_exceptions=True) as c:
        with pytest.raises(NoActiveRequest, match="ResilienceMiddleware"):
            await c.get("/x")


async def test_scope_closed_also_when_the_endpoint_raises(res: Resilience) -> None:
    scopes: list[RequestScope] = []

    async def boom(request: Request) -> None:
        await request.state.redis.ping()
        scopes.append(current_scope())  # type: ignore[arg-type]
        raise RuntimeError("endpoint failed")

    app = Starlette(routes=[Route("/boom", boom)])
    app.add_middleware(ResilienceMiddleware, resilience=res)
    async with http(app, raise_app_exceptions=False) as c:
        assert (await c.get("/boom")).status_code == 500
    async with http(app) as c:
        with pytest.raises(RuntimeError, match="endpoint failed"):
            await c.get("/boom")
    assert len(scopes) == 2
    assert scopes[0] is not scopes[1]
    assert all(s.token is None for s in scopes)
    assert current_scope() is None


async def test_concurrent_requests_never_share_a_handle(res: Resilience) -> None:
    n = 32
    arrived = 0
    all_in = asyncio.Event()
    seen: list[tuple[Any, RequestScope]] = []

    async def view(request: Request) -> PlainTextResponse:
        nonlocal arrived
        h = request.state.redis
        i = request.path_params["i"]
        arrived += 1
        if arrived == n:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 10)  # every request is in flight at once
        await h.set(f"n:{i}", i)
        assert int(await h.get(f"n:{i}")) == i
        assert current_redis() is h
        seen.append((h, current_scope()))  # type: ignore[arg-type]
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/n/{i:int}", view)], middleware=[Middleware(ResilienceMiddleware, resilience=res)]
    )
    async with http(app) as c:
        resps = await asyncio.gather(*(c.get(f"/n/{i}") for i in range(n)))
    assert [r.status_code for r in resps] == [200] * n
    # All kept alive in `seen`, so distinct ids mean distinct objects.
    assert len({id(h) for h, _ in seen}) == n
    assert len({id(s) for _, s in seen}) == n
    assert all(s.token is None for _, s in seen)


async def test_route_deadlines(res: Resilience) -> None:
    async def report(request: Request) -> JSONResponse:
        return JSONResponse({"left": left()})

    app = Starlette(
        routes=[Route("/default", report), Route("/health", report), Route("/items/{id:int}", report)],
        middleware=[
            Middleware(
                ResilienceMiddleware,
                resilience=res,
                deadline=0.6,
                route_deadlines={"/health": None, "/items/{id:int}": 0.1},
            )
        ],
    )
    # Deprecated (the middleware asks the app's routes which one matches): still works, and warns
    # when Starlette builds the middleware, i.e. at the app's first call.
    async with http(app) as c:
        with pytest.warns(
            DeprecationWarning, match=r"route_deadlines=\.\.\.\) is deprecated.*@redis_deadline"
        ):
            first = await c.get("/default")
        assert 0.5 < first.json()["left"] <= 0.6
        assert (await c.get("/health")).json()["left"] is None
        assert 0 < (await c.get("/items/7")).json()["left"] <= 0.1
        assert (await c.get("/items/x")).status_code == 404
    async with http(app, root_path="/api") as c:  # mounted behind a prefix
        assert 0 < (await c.get("/api/items/7")).json()["left"] <= 0.1

    with pytest.raises(ConfigurationError):
        ResilienceMiddleware(app, resilience=res, route_deadlines={"/x": -1})


async def test_deadline_applies_to_redis_calls(redis_server: RedisServer) -> None:
    from testbed import FaultProxy

    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        client = redis.asyncio.Redis(host=proxy.host, port=proxy.port)
        res = Resilience(client)
        outcome: dict[str, Any] = {}

        @redis_deadline(0.15)
        async def view(request: Request) -> PlainTextResponse:
            t0 = time.monotonic()
            try:
                await request.state.redis.get("k")
            except RedisUnavailable as e:
                outcome.update(reason=e.reason, took=time.monotonic() - t0)
            return PlainTextResponse("ok")

        app = Starlette(routes=[Route("/k", view)])
        app.add_middleware(ResilienceMiddleware, resilience=res, deadline=5)
        try:
            async with http(app) as c:
                await c.get("/k")
                proxy.set_mode("blackhole")
                assert (await c.get("/k")).status_code == 200
        finally:
            res.close()
            await client.aclose()
    assert outcome["reason"] == "deadline_exceeded"
    assert outcome["took"] < 0.6


async def test_non_http_scopes_pass_through(res: Resilience) -> None:
    seen: list[dict[str, Any]] = []

    async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append({"type": scope["type"], "has_handle": SCOPE_KEY in scope, "scope": current_scope()})

    mw = ResilienceMiddleware(inner, resilience=res)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    await mw({"type": "websocket", "path": "/ws"}, receive, send)
    await mw({"type": "some.extension"}, receive, send)
    assert seen == [
        {"type": "websocket", "has_handle": False, "scope": None},
        {"type": "some.extension", "has_handle": False, "scope": None},
    ]


async def test_websocket_route_through_a_real_app(res: Resilience) -> None:
    """A websocket endpoint has no request scope; it opens one per message itself."""

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        no_scope = current_scope() is None and SCOPE_KEY not in websocket.scope
        async with res.request(deadline=0.5) as h:
            await h.set("ws", "hi")
            value = (await h.get("ws")).decode()
        await websocket.send_json({"no_scope": no_scope, "value": value})
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", ws)])
    app.add_middleware(ResilienceMiddleware, resilience=res)
    incoming = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/ws", "raw_path": b"/ws", "query_string": b"", "headers": []}
    scope.update(root_path="", scheme="ws", server=("test", 80), client=("test", 1), subprotocols=[])
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == {"no_scope": True, "value": "hi"}


def connected_clients(server: RedisServer, name: str) -> int:
    with redis.Redis(host=server.host, port=server.port) as admin:
        return sum(1 for c in admin.client_list() if c.get("name") == name)


async def run_lifespan(server: RedisServer, **options: Any) -> tuple[list[str], Resilience]:
    """One lifespan (startup, shutdown) of an app whose own shutdown still uses Redis."""
    client = redis.asyncio.Redis(host=server.host, port=server.port, client_name="lifespan-test")
    res = Resilience(client)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with res.request() as h:
            await h.ping()
        events.append("started")
        yield
        async with res.request() as h:  # the client still works during the app's own shutdown
            events.append(f"shutdown ping {await h.ping()}")

    app = Starlette(
        lifespan=lifespan, middleware=[Middleware(ResilienceMiddleware, resilience=res, **options)]
    )
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        from_app.append(message["type"])
        if message["type"] == "lifespan.shutdown.complete":
            events.append(f"complete, connected={connected_clients(server, 'lifespan-test')}")

    await to_app.put({"type": "lifespan.startup"})
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, send))
    for _ in range(200):
        if "lifespan.startup.complete" in from_app:
            break
        await asyncio.sleep(0.01)
    assert connected_clients(server, "lifespan-test") == 1
    await to_app.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(task, 5)
    assert from_app == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    return events, res


async def test_lifespan_shutdown_closes_the_client_after_the_app_shutdown(clean_redis: RedisServer) -> None:
    events, res = await run_lifespan(clean_redis, close_client=True)  # asked for
    assert events == ["started", "shutdown ping True", "complete, connected=0"]
    res.close()


@pytest.mark.parametrize("close_on_shutdown", [True, False])
async def test_lifespan_shutdown_leaves_the_client_open_by_default(
    clean_redis: RedisServer, close_on_shutdown: bool
) -> None:
    """The client is the user's: closed only with close_client=True; res.close() is only background work."""
    events, res = await run_lifespan(clean_redis, close_on_shutdown=close_on_shutdown)
    try:
        assert events == ["started", "shutdown ping True", "complete, connected=1"]
        assert await res.client.ping() is True  # type: ignore[misc]
        async with res.request() as h:  # and the Resilience works on (close() re-opens on use)
            assert await h.ping() is True
    finally:
        res.close()
        await res.client.aclose()  # type: ignore[union-attr]


async def test_redis_deadline_decorator_on_plain_starlette(res: Resilience) -> None:
    """@redis_deadline on the endpoint: Starlette routes, the endpoint sets its own deadline."""
    threads: dict[str, int] = {}

    @redis_deadline(0.1)
    async def fast(request: Request) -> JSONResponse:
        await request.state.redis.set("k", request.path_params["id"])
        return JSONResponse({"left": left(), "id": request.path_params["id"]})

    @redis_deadline(None)
    def unbounded_sync(request: Request) -> JSONResponse:  # in the thread pool: the scope is found
        threads["sync"] = threading.get_ident()
        return JSONResponse({"left": left()})

    @redis_deadline(0.2)
    class ClassEndpoint(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            return JSONResponse({"left": left(), "name": type(self).__name__})

    async def default(request: Request) -> JSONResponse:
        return JSONResponse({"left": left()})

    app = Starlette(
        routes=[
            Route("/items/{id:int}", fast),
            Route("/unbounded", unbounded_sync),
            Route("/class", ClassEndpoint),
            Route("/default", default),
        ],
        middleware=[Middleware(ResilienceMiddleware, resilience=res, deadline=0.6)],
    )
    async with http(app) as c:
        body = (await c.get("/items/7")).json()
        assert 0 < body["left"] <= 0.1
        assert body["id"] == 7
        assert (await c.get("/unbounded")).json() == {"left": None}
        body = (await c.get("/class")).json()
        assert 0.1 < body["left"] <= 0.2
        assert body["name"] == "ClassEndpoint"
        assert 0.5 < (await c.get("/default")).json()["left"] <= 0.6
    assert threads["sync"] != threading.get_ident()
    assert await res.client.get("k") == b"7"  # type: ignore[misc]
    # The decorator keeps the endpoint's name and kind; Starlette's routing is untouched.
    assert fast.__name__ == "fast"
    assert asyncio.iscoroutinefunction(fast)
    assert not asyncio.iscoroutinefunction(unbounded_sync)
    assert issubclass(ClassEndpoint, HTTPEndpoint)

    bare = Starlette(routes=[Route("/items/{id:int}", fast)])  # no middleware: said so
    async with http(bare) as c:
        with pytest.raises(NoActiveRequest, match="ResilienceMiddleware"):
            await c.get("/items/1")
    with pytest.raises(ConfigurationError, match="decorates an endpoint"):
        redis_deadline(0.1)(42)


async def test_redis_deadline_decorator_on_fastapi_and_as_a_dependency(res: Resilience) -> None:
    app = FastAPI()
    app.add_middleware(ResilienceMiddleware, resilience=res, deadline=0.8)
    per_router = redis_deadline(0.3)

    @app.get("/items/{item_id}")
    @redis_deadline(0.1)  # below the route decorator: FastAPI still sees the endpoint's parameters
    async def item(item_id: int, r: Annotated[Any, Depends(get_redis)], q: str = "x") -> dict[str, Any]:
        return {"left": left(), "item_id": item_id, "q": q, "same": r is current_redis()}

    @app.get("/dep", dependencies=[Depends(per_router)])
    async def dep() -> dict[str, Any]:
        return {"left": left()}

    async with http(app) as c:
        body = (await c.get("/items/3", params={"q": "y"})).json()
        assert 0 < body.pop("left") <= 0.1
        assert body == {"item_id": 3, "q": "y", "same": True}
        assert (await c.get("/items/nope")).status_code == 422  # validation still FastAPI's
        assert 0.2 < (await c.get("/dep")).json()["left"] <= 0.3
    # The dependency adds no parameter of its own to the API.
    params = app.openapi()["paths"]["/dep"]["get"].get("parameters", [])
    assert params == []


def test_the_middleware_does_not_route() -> None:
    """No route matching of our own: Starlette's router routes, the endpoint sets its deadline."""
    import otel_redis_resilience_starlette as adapter

    source = "\n".join(p.read_text() for p in Path(adapter.__file__).parent.glob("*.py"))
    assert "compile_path" not in source
    assert "re.compile" not in source
    assert "import re\n" not in source


async def test_middleware_configuration_errors(clean_redis: RedisServer) -> None:
    sync_client = redis.Redis(host=clean_redis.host, port=clean_redis.port)
    with pytest.raises(ConfigurationError, match="asyncio"):
        ResilienceMiddleware(Starlette(), resilience=Resilience(sync_client))
    with pytest.raises(ConfigurationError):
        ResilienceMiddleware(Starlette(), resilience=None)  # type: ignore[arg-type]
    with pytest.raises(NoActiveRequest):
        current_redis()
    sync_client.close()


@pytest.mark.parametrize(
    "setup", ["instrumentor_first", "instrumentor_last", "asgi_middleware_outer", "asgi_middleware_inner"]
)
async def test_composes_with_opentelemetry_middleware(clean_redis: RedisServer, setup: str) -> None:
    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    client = redis.asyncio.Redis(host=clean_redis.host, port=clean_redis.port)
    res = Resilience(client, tracer_provider=tp)

    async def item(request: Request) -> JSONResponse:
        h = request.state.redis
        key = f"item:{request.path_params['name']}"
        value = await h.miss_on_outage().get(key)  # cache-aside read
        if value is None:
            value = b"from-db"
            with suppress(RedisUnavailable):
                await h.set(key, value)
        return JSONResponse({"value": value.decode()})

    routes = [Route("/items/{name}", item)]
    ours = Middleware(ResilienceMiddleware, resilience=res)
    otel = Middleware(OpenTelemetryMiddleware, tracer_provider=tp)
    if setup == "asgi_middleware_outer":
        app = Starlette(routes=routes, middleware=[otel, ours])
    elif setup == "asgi_middleware_inner":
        app = Starlette(routes=routes, middleware=[ours, otel])
    elif setup == "instrumentor_first":
        app = Starlette(routes=routes)
        StarletteInstrumentor.instrument_app(app, tracer_provider=tp)
        app.add_middleware(ResilienceMiddleware, resilience=res)  # ends up outermost
    else:
        app = Starlette(routes=routes)
        app.add_middleware(ResilienceMiddleware, resilience=res)
        StarletteInstrumentor.instrument_app(app, tracer_provider=tp)  # ends up outermost

    try:
        async with http(app) as c:
            assert (await c.get("/items/a")).json() == {"value": "from-db"}  # GET (miss), SET
            res.force_open()  # an outage: the read falls back to a miss, the write is rejected
            assert (await c.get("/items/a")).json() == {"value": "from-db"}
            res.reset()
            assert (await c.get("/items/a")).json() == {"value": "from-db"}  # GET (hit)
    finally:
        res.close()
        await client.aclose()

    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind == SpanKind.SERVER]
    assert len(servers) == 3
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


def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def write_app(framework: str, res: Resilience, closer: str = "middleware") -> Any:
    """An app whose POST /w?v=... writes behind, as Starlette or as FastAPI.

    The client is closed at lifespan shutdown by ``closer``: the middleware when asked
    (``close_client=True``), the app's own lifespan (it owns the client), or nobody.
    redis.asyncio's connections belong to the event loop that opened them, and each
    TestClient session runs its own loop: the handle replaces a pooled connection of another
    loop before an attempt uses it.
    """

    async def write(request: Request) -> JSONResponse:
        out = await request.state.redis.write_behind().set("k", request.query_params["v"])
        return JSONResponse({"journaled": isinstance(out, Journaled)})

    async def read(request: Request) -> JSONResponse:
        try:
            value = await request.state.redis.get("k")
        except RedisUnavailable as e:
            return JSONResponse({"unavailable": e.reason})
        return JSONResponse({"value": None if value is None else value.decode()})

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if closer == "app":
            await res.client.aclose()  # type: ignore[union-attr]

    options = {"resilience": res, "close_client": closer == "middleware"}
    if framework == "starlette":
        return Starlette(
            routes=[Route("/w", write, methods=["POST"]), Route("/r", read)],
            middleware=[Middleware(ResilienceMiddleware, **options)],
            lifespan=lifespan,
        )
    app = FastAPI(lifespan=lifespan)
    app.add_middleware(ResilienceMiddleware, **options)
    app.add_api_route("/w", write, methods=["POST"])
    app.add_api_route("/r", read)
    return app


@pytest.mark.parametrize("closer", ["middleware", "app", "nobody"])
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_two_testclient_sessions_in_a_row_with_write_behind_and_an_outage(
    clean_redis: RedisServer, framework: str, closer: str
) -> None:
    """Every pytest suite does this: the lifespan shutdown of one session must not break the next."""
    client = redis.asyncio.Redis(host=clean_redis.host, port=clean_redis.port, socket_timeout=5.0)
    with tempfile.TemporaryDirectory() as d:
        res = Resilience(client, write_behind=WriteBehindConfig(d, fsync="off"))
        app = write_app(framework, res, closer)
        for session in range(3):
            with TestClient(app, raise_server_exceptions=False) as c:
                resp = c.post("/w", params={"v": f"direct-{session}"})
                assert (resp.status_code, resp.json()) == (200, {"journaled": False}), session
                res.force_open()
                resp = c.post("/w", params={"v": f"behind-{session}"})
                assert (resp.status_code, resp.json()) == (200, {"journaled": True}), session
                res.reset()
                assert c.get("/r").json() in ({"value": f"behind-{session}"}, {"value": f"direct-{session}"})
                wait_for(lambda: res.write_behind_journal.pending_count() == 0)
                assert c.get("/r").json() == {"value": f"behind-{session}"}
        res.close()


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
def test_probe_runs_again_in_the_next_lifespan(redis_server: RedisServer, framework: str) -> None:
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=1.0)
    res = Resilience(
        client, breaker=BreakerPolicy(failure_threshold=1, reset_timeout=60, probe_interval=0.05)
    )
    app = write_app(framework, res)
    with TestClient(app) as c:
        assert c.get("/r").json() == {"value": None}
        redis_server.kill()
        assert "unavailable" in c.get("/r").json()
        assert res.breaker_state is BreakerState.OPEN  # a probe task runs on this session's loop
    redis_server.restart()
    with TestClient(app) as c:
        assert c.get("/r").json() == {"unavailable": "breaker_open"}  # this starts a probe again
        wait_for(lambda: res.breaker_state is not BreakerState.OPEN)
        assert c.get("/r").json() == {"value": None}
    res.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"deadline": "0.5"}, r"ResilienceMiddleware.deadline must be a number, got '0.5'"),
        ({"deadline": 1e-9}, r"ResilienceMiddleware.deadline must be >= 0.005 s, got 1e-09"),
        ({"deadline": True}, r"ResilienceMiddleware.deadline must be a number, got True"),
        ({"route_deadlines": [("/x", 0.1)]}, r"route_deadlines must be a mapping \{path: seconds\}, got \["),
        ({"route_deadlines": {"/x": "0.1"}}, r"route_deadlines\['/x'\].deadline must be a number, got '0.1'"),
        ({"route_deadlines": {"/x": 0}}, r"route_deadlines\['/x'\].deadline must be > 0, got 0"),
        (
            {"route_deadlines": {"items/{id}": 0.1}},
            r"keys must be paths starting with '/'.*got 'items/\{id\}'",
        ),
        ({"route_deadlines": {5: 0.1}}, r"keys must be paths starting with '/'.*got 5"),
        ({"close_on_shutdown": "no"}, r"close_on_shutdown must be True or False, got 'no'"),
        ({"close_client": 1}, r"close_client must be True or False, got 1"),
        ({"resilience": "redis://localhost"}, r"needs resilience=Resilience\(redis.asyncio.Redis"),
    ],
)
async def test_wrong_middleware_options(res: Resilience, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ResilienceMiddleware(Starlette(), **{"resilience": res, **kwargs})


@pytest.mark.parametrize("seconds", ["0.2", 0, -1, 1e-9, float("nan"), True])
def test_wrong_route_dependency_deadline(seconds: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"redis_deadline.deadline must be"):
        redis_deadline(seconds)
