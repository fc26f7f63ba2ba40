"""What Resilience's connection hooks do to a client's connections, against real servers.

- Connections used outside a handle keep the client's own ``socket_timeout``
  (issue 9, point 4): wrapping a client must not make direct calls hang.
- Idle pooled connections that the server closed while Redis was away are
  replaced before a command is written on them (issue 9, point 12): a connection
  dead before the command left is no evidence against Redis, and the command
  did not run.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    BreakerTransitioned,
    OperationFinished,
    RedisUnavailable,
    Resilience,
    RetryPolicy,
    RetryScheduled,
)
from testbed import FaultProxy, RedisServer
from tests.support import Recorder

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


# -- point 12: connections closed while idle are not failed attempts ---------------------------


def _assert_clean_run(res: Resilience, recorder: Recorder, results: list[Any], burst: int) -> None:
    assert results == [b"v"] * burst
    assert not recorder.of(RetryScheduled)
    assert not recorder.of(BreakerTransitioned)
    finished = recorder.of(OperationFinished)
    assert len(finished) == burst
    assert {(e.outcome, e.attempts) for e in finished} == {("ok", 1)}
    assert res.breaker_state is BreakerState.CLOSED


async def _outage_then_burst_async(client: Any, server: RedisServer, fault: Callable[[], Any]) -> None:
    recorder = Recorder()
    res = Resilience(client, breaker=TOUCHY, hooks=[recorder])
    try:

        async def one() -> Any:
            async with res.request(deadline=2.0) as h:
                return await h.get("k")

        await client.set("k", "v")
        await asyncio.gather(*(one() for _ in range(POOL)))
        assert len(client.connection_pool._available_connections) == POOL
        await fault()
        server.client().set("k", "v")  # a restart loses the data; straight to the server, not the pool
        recorder.events.clear()
        burst = 3 * POOL
        results = list(await asyncio.gather(*(one() for _ in range(burst))))
        _assert_clean_run(res, recorder, results, burst)
    finally:
        res.close()
        await client.aclose()


async def test_async_idle_connections_closed_by_a_restart_are_replaced_quietly(
    redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=5.0)

    async def restart() -> None:
        # In a thread: the event loop keeps running, as in an app, and sees the closes.
        await asyncio.to_thread(redis_server.restart)
        await asyncio.sleep(0.05)

    await _outage_then_burst_async(client, redis_server, restart)


async def test_async_idle_connections_reset_during_an_outage_are_replaced_quietly(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, socket_timeout=5.0)

    async def outage() -> None:
        await asyncio.to_thread(proxy.set_mode, "refuse")  # existing connections are reset
        await asyncio.sleep(0.2)
        await asyncio.to_thread(proxy.set_mode, "pass")
        await asyncio.sleep(0.05)

    await _outage_then_burst_async(client, redis_server, outage)


@pytest.mark.parametrize("fault", ["restart", "refuse"])
def test_sync_idle_connections_closed_during_an_outage_are_replaced_quietly(
    fault: str, redis_server: RedisServer, proxy: FaultProxy
) -> None:
    client = redis.Redis(host=proxy.host, port=proxy.port, socket_timeout=5.0, max_connections=4 * POOL)
    recorder = Recorder()
    res = Resilience(client, breaker=TOUCHY, hooks=[recorder])

    def one() -> Any:
        with res.request(deadline=2.0) as h:
            return h.get("k")

    try:
        client.set("k", "v")
        pool = client.connection_pool
        # POOL connections at once, then all idle in the pool.
        held = [pool.get_connection() for _ in range(POOL)]
        for conn in held:
            pool.release(conn)
        assert len(pool._available_connections) == POOL
        if fault == "restart":
            redis_server.restart()
        else:
            proxy.set_mode("refuse")
            time.sleep(0.2)
            proxy.set_mode("pass")
        redis_server.client().set("k", "v")  # a restart loses the data
        recorder.events.clear()
        burst = 3 * POOL
        with ThreadPoolExecutor(POOL) as ex:
            results = list(ex.map(lambda _: one(), range(burst)))
        _assert_clean_run(res, recorder, results, burst)
    finally:
        res.close()
        client.close()


async def test_replacing_a_dead_connection_is_bounded_by_the_attempt_deadline(proxy: FaultProxy) -> None:
    # The idle connection is reset, then Redis hangs: the replacement connects (into the
    # proxy) and its handshake never returns. The attempt must still end at its deadline,
    # and nothing was sent, so a non-idempotent command is not reported as maybe applied.
    client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, socket_timeout=5.0)
    res = Resilience(client, retry=RetryPolicy(attempt_timeout=0.2, max_attempts=1))
    try:
        async with res.request() as h:
            await h.set("n", 1)
        await asyncio.to_thread(proxy.set_mode, "refuse")
        await asyncio.to_thread(proxy.set_mode, "blackhole")
        await asyncio.sleep(0.05)
        async with res.request() as h:
            took, out = await _timed(h.incr("n"))
        assert isinstance(out, RedisUnavailable), out
        assert not out.outcome_unknown
        assert 0.15 < took < 0.2 + 0.3
    finally:
        res.close()
        await client.aclose()
