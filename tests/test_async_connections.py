"""What Resilience's connection hooks do to a client's connections, against real servers.

- Connections used outside a handle keep the client's own ``socket_timeout``
  (issue 9, point 4): wrapping a client must not make direct calls hang.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import (
    BreakerPolicy,
    RedisUnavailable,
    Resilience,
    RetryPolicy,
)
from tests.infra import RedisServer

# A paused server answers nothing: a call that ignored socket_timeout would run into this
# guard instead of hanging the suite.
GUARD = 10.0
# A breaker that three failed attempts open: any stale connection counted against Redis shows.
TOUCHY = BreakerPolicy(failure_threshold=3, probe_interval=0.05)
POOL = 8


def _in_thread(fn: Callable[[], Any], guard: float = GUARD) -> tuple[float, Any]:
    """(seconds, result or exception) of ``fn()``, run in a thread so a hang cannot stall the test."""
    out: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            result: Any = fn()
        except Exception as exc:
            result = exc
        out.append((time.monotonic() - started, result))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(guard)
    assert out, f"the call was still running after {guard} s"
    return out[0]  # type: ignore[no-any-return]


async def _timed(coro: Any, guard: float = GUARD) -> tuple[float, Any]:
    started = time.monotonic()
    try:
        async with asyncio.timeout(guard):
            result: Any = await coro
    except TimeoutError:
        pytest.fail(f"the call was still running after {guard} s")
    except Exception as exc:
        result = exc
    return time.monotonic() - started, result


# -- point 4: direct use keeps socket_timeout -------------------------------------------------


async def test_direct_async_calls_keep_the_clients_socket_timeout(redis_server: RedisServer) -> None:
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=1.0)
    res = Resilience(client, retry=RetryPolicy(attempt_timeout=0.2, max_attempts=1))
    try:
        async with res.request() as h:
            await h.set("k", "v")  # a pooled connection made inside an attempt
        assert await client.get("k") == b"v"
        redis_server.pause()
        try:
            # The pooled connection (a read that never returns) and a fresh one (connect
            # succeeds into the backlog, the handshake never returns) at once.
            took, outs = await _timed(
                asyncio.gather(client.get("k"), client.get("k"), return_exceptions=True)
            )
            assert all(isinstance(o, redis.exceptions.TimeoutError) for o in outs), outs
            assert 0.9 < took < 1.0 + 0.5
            # Through the handle, the attempt's own bound still holds (not socket_timeout's 1 s).
            async with res.request() as h:
                took, out = await _timed(h.get("k"))
            assert isinstance(out, RedisUnavailable)
            assert took < 0.2 + 0.3
        finally:
            redis_server.resume()
    finally:
        res.close()
        await client.aclose()


async def test_direct_calls_on_a_single_connection_client_keep_socket_timeout(
    redis_server: RedisServer,
) -> None:
    # The single connection exists before Resilience: its class is swapped in place.
    client = redis.asyncio.Redis(
        host=redis_server.host, port=redis_server.port, socket_timeout=1.0, single_connection_client=True
    )
    await client.initialize()
    assert await client.ping()
    res = Resilience(client)
    try:
        redis_server.pause()
        try:
            took, out = await _timed(client.get("k"))
            assert isinstance(out, redis.exceptions.TimeoutError), out
            assert took < 1.0 + 0.5
        finally:
            redis_server.resume()
    finally:
        res.close()
        await client.aclose()


def test_direct_sync_calls_keep_the_clients_socket_timeout(redis_server: RedisServer) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=1.0)
    res = Resilience(client, retry=RetryPolicy(attempt_timeout=0.2, max_attempts=1))
    try:
        with res.request() as h:
            h.set("k", "v")
        assert client.get("k") == b"v"
        redis_server.pause()
        try:
            took, out = _in_thread(lambda: client.get("k"))
            assert isinstance(out, redis.exceptions.TimeoutError), out
            assert 0.9 < took < 1.0 + 0.5

            def through_handle() -> Any:
                with res.request() as h:
                    return h.get("k")

            took, out = _in_thread(through_handle)
            assert isinstance(out, RedisUnavailable)
            assert took < 0.2 + 0.3
        finally:
            redis_server.resume()
    finally:
        res.close()
        client.close()
