"""The breaker counts only evidence against Redis.

A caller whose own deadline left too little time, or a blocking command doing the
waiting it was asked to do, must never open the process-wide breaker on a healthy
Redis (and so reject everyone else). A hung Redis must still open it as fast as before.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    RedisUnavailable,
    Resilience,
    RetryPolicy,
    RetryScheduled,
)
from testbed import FaultProxy, RedisServer
from tests.support import Recorder, Runner

SHORT = (0.001, 0.03)  # seconds: deadlines far below what a 10 ms round trip needs
LONG = 0.2


def test_short_deadlines_beside_long_ones_never_open_the_breaker_sync(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    redis_server.client().set("k", "v")
    proxy.set_mode("latency", latency=0.005)  # 10 ms round trip: healthy, but not instant
    client = redis.Redis(host=proxy.host, port=proxy.port, max_connections=64)
    rec = Recorder()
    res = Resilience(client, breaker=BreakerPolicy(failure_threshold=5, minimum_calls=10), hooks=[rec])
    stop = time.monotonic() + 3.0
    short_done, long_ok, long_bad = [0], [0], []
    reasons: set[str] = set()
    lock = threading.Lock()

    def short_worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop:
            try:
                with res.request(deadline=rnd.uniform(*SHORT)) as h:
                    h.get("k")
            except RedisUnavailable as e:
                reasons.add(e.reason)
            with lock:
                short_done[0] += 1

    def long_worker() -> None:
        while time.monotonic() < stop:
            try:
                with res.request(deadline=LONG) as h:
                    got = h.get("k")
            except RedisUnavailable as e:
                with lock:
                    long_bad.append(e.reason)
                continue
            assert got == b"v"
            with lock:
                long_ok[0] += 1

    threads = [threading.Thread(target=short_worker, args=(n,)) for n in range(6)]
    threads += [threading.Thread(target=long_worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    res.close()
    assert short_done[0] > 200, short_done
    assert reasons <= {"deadline_exceeded"}, reasons
    assert long_ok[0] > 50, long_ok
    assert long_bad == []
    assert res.breaker_state is BreakerState.CLOSED
    assert not [e for e in rec.events if type(e).__name__ == "BreakerTransitioned"]


async def test_short_deadlines_beside_long_ones_never_open_the_breaker_async(
    redis_server: RedisServer, proxy: FaultProxy
) -> None:
    redis_server.client().set("k", "v")
    proxy.set_mode("latency", latency=0.005)
    client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, max_connections=64)
    rec = Recorder()
    res = Resilience(client, breaker=BreakerPolicy(failure_threshold=5, minimum_calls=10), hooks=[rec])
    stop = time.monotonic() + 3.0
    counts = {"short": 0, "long_ok": 0}
    long_bad: list[str] = []
    reasons: set[str] = set()

    async def short_worker(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop:
            try:
                async with res.request(deadline=rnd.uniform(*SHORT)) as h:
                    await h.get("k")
            except RedisUnavailable as e:
                reasons.add(e.reason)
            counts["short"] += 1
            await asyncio.sleep(0)

    async def long_worker() -> None:
        while time.monotonic() < stop:
            try:
                async with res.request(deadline=LONG) as h:
                    got = await h.get("k")
            except RedisUnavailable as e:
                long_bad.append(e.reason)
                continue
            assert got == b"v"
            counts["long_ok"] += 1

    await asyncio.wait_for(
        asyncio.gather(*[short_worker(n) for n in range(20)], *[long_worker() for _ in range(2)]), 30
    )
    res.close()
    await client.aclose()
    assert counts["short"] > 200, counts
    assert reasons <= {"deadline_exceeded"}, reasons
    assert counts["long_ok"] > 50, counts
    assert long_bad == []
    assert res.breaker_state is BreakerState.CLOSED
    assert not [e for e in rec.events if type(e).__name__ == "BreakerTransitioned"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_blackhole_still_opens_the_breaker_within_five_deadlines(
    mode: str, redis_server: RedisServer, proxy: FaultProxy
) -> None:
    breaker = BreakerPolicy(failure_threshold=5, probe_interval=None)
    run = Runner(mode, proxy.host, proxy.port, breaker=breaker)
    try:
        assert run.call("set", "k", "v", deadline=1) is True
        proxy.set_mode("blackhole")
        t0 = time.monotonic()
        calls = 0
        while run.res.breaker_state is not BreakerState.OPEN and calls < 20:
            run.timed("get", "k", deadline=LONG)
            calls += 1
        took = time.monotonic() - t0
        assert run.res.breaker_state is BreakerState.OPEN
        assert calls <= 5, calls
        assert took < 5 * LONG + 0.5, took
    finally:
        proxy.set_mode("pass")
        run.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_big_read_at_the_end_of_a_spent_deadline_is_not_evidence(
    mode: str, redis_server: RedisServer, proxy: FaultProxy
) -> None:
    """A view that spent 97 of its 100 ms elsewhere and then reads a 3 MB value."""
    redis_server.client().set("big", b"x" * 3_000_000)
    proxy.set_mode("latency", latency=0.002)
    run = Runner(mode, proxy.host, proxy.port, breaker=BreakerPolicy(failure_threshold=5))
    try:
        failures = 0
        for _ in range(8):
            if mode == "sync":
                with run.res.request(deadline=0.1) as h:
                    time.sleep(0.097)
                    try:
                        h.get("big")
                    except RedisUnavailable:
                        failures += 1
            else:

                async def go() -> bool:
                    async with run.res.request(deadline=0.1) as h:
                        await asyncio.sleep(0.097)
                        try:
                            await h.get("big")
                        except RedisUnavailable:
                            return True
                    return False

                assert run.loop is not None
                failures += run.loop.run_until_complete(go())
        assert failures >= 5, failures  # the scenario really ran out of time
        assert run.res.breaker_state is BreakerState.CLOSED
        assert len(run.call("get", "big", deadline=2.0)) == 3_000_000
    finally:
        run.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_block_longer_than_the_deadline_is_shortened_and_answered_by_the_server(
    mode: str, redis_server: RedisServer
) -> None:
    run = Runner(mode, redis_server.host, redis_server.port, breaker=BreakerPolicy(failure_threshold=2))
    try:
        for _ in range(6):
            took, out = run.timed("blpop", ["q"], 1, deadline=0.2)
            assert out is None, out  # the server's own "nothing came" reply, not a timeout
            assert took < 0.2, took
        took, out = run.timed("blpop", ["q"], 0, deadline=0.2)  # 0: block forever
        assert out is None
        assert took < 0.2, took
        assert run.res.breaker_state is BreakerState.CLOSED
        assert run.recorder.of(RetryScheduled) == []
        # The connection stayed in sync: the next pop gets the next element.
        redis_server.client().rpush("q", "a")
        assert run.call("blpop", ["q"], 1, deadline=0.5) == (b"q", b"a")
        # A block that fits inside the deadline is left alone.
        redis_server.client().rpush("q", "b")
        assert run.call("brpop", ["q"], 0.05, deadline=1.0) == (b"q", b"b")
        assert run.call("xread", {"s": "0-0"}, block=1000, deadline=0.2) == []
    finally:
        run.close()


def test_a_background_block_forever_timing_out_at_socket_timeout_is_not_evidence(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=0.2)
    res = Resilience(
        client, retry=RetryPolicy(attempt_timeout=None), breaker=BreakerPolicy(failure_threshold=2)
    )
    try:
        h = res.handle()
        for _ in range(5):
            with pytest.raises(RedisUnavailable) as info:
                h.blpop(["idle-queue"], 0)
            # A pop that timed out client-side may have popped: never re-sent.
            assert info.value.outcome_unknown
        assert res.breaker_state is BreakerState.CLOSED
        assert h.set("k", "v") is True
    finally:
        res.close()
        client.close()


async def test_an_async_background_block_forever_stops_at_socket_timeout_and_is_not_evidence(
    redis_server: RedisServer,
) -> None:
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port, socket_timeout=0.2)
    res = Resilience(client, breaker=BreakerPolicy(failure_threshold=2))
    try:
        h = res.handle()
        for _ in range(5):
            t0 = time.monotonic()
            with pytest.raises(RedisUnavailable) as info:
                await asyncio.wait_for(h.blpop(["idle-queue"], 0), 10)
            assert time.monotonic() - t0 < 1.0  # the client's socket_timeout, as plain redis-py
            assert info.value.outcome_unknown
        assert res.breaker_state is BreakerState.CLOSED
        assert await h.set("k", "v") is True
    finally:
        res.close()
        await client.aclose()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_blocking_command_under_a_short_deadline_gets_the_servers_own_answer(
    mode: str, redis_server: RedisServer
) -> None:
    """Redis answers a block's timeout up to 1/hz late (100 ms at hz 10): the shortened block leaves room."""
    run = Runner(mode, redis_server.host, redis_server.port, breaker=BreakerPolicy(failure_threshold=2))
    try:
        calls: list[tuple[str, tuple[object, ...], dict[str, object], object]] = [
            ("blpop", (["q"], 5), {}, None),
            ("brpop", (["q"], 0), {}, None),
            ("brpoplpush", ("q", "dst", 5), {}, None),
            ("blmove", ("q", "dst", 5, "LEFT", "RIGHT"), {}, None),
            ("bzpopmin", (["z"], 5), {}, None),
            ("bzpopmax", (["z"], 0), {}, None),
            ("blmpop", (5, 1, "q"), {"direction": "LEFT"}, None),
            ("bzmpop", (5, 1, ["z"]), {"min": True}, None),
            ("wait", (1, 5000), {}, 0),
            ("xread", ({"s": "$"},), {"block": 0}, []),
        ]
        for method, args, kwargs, nothing in calls:
            took, out = run.timed_kw(method, *args, deadline=0.3, **kwargs)
            assert out == nothing, (method, out)
            assert took < 0.3, (method, took)
        assert run.res.breaker_state is BreakerState.CLOSED
        assert run.recorder.of(RetryScheduled) == []
    finally:
        run.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_stream_or_group_named_block_is_not_taken_for_the_block_option(
    mode: str, redis_server: RedisServer
) -> None:
    direct = redis_server.client()
    direct.xadd("block", {"f": "1"}, id="1-0")
    direct.xadd("block", {"f": "2"}, id="5000-0")
    direct.xgroup_create("block", "block", id="0")
    run = Runner(mode, redis_server.host, redis_server.port)
    try:
        got = run.call("xread", {"block": "0"}, deadline=1.0)
        assert [entry_id for entry_id, _ in got[0][1]] == [b"1-0", b"5000-0"]
        got = run.call("xreadgroup", "block", "0", {"block": ">"}, count=1, deadline=1.0)
        assert [entry_id for entry_id, _ in got[0][1]] == [b"1-0"]
        consumers = [c["name"] for c in direct.xinfo_consumers("block", "block")]
        assert consumers == [b"0"]
    finally:
        run.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_socket_timeout_shorter_than_the_block_neither_cuts_it_nor_opens_the_breaker(
    mode: str, redis_server: RedisServer
) -> None:
    """Inside an attempt its own bound (block + attempt_timeout, within the deadline) governs."""
    run = Runner(
        mode,
        redis_server.host,
        redis_server.port,
        client_kw={"socket_timeout": 0.3},
        breaker=BreakerPolicy(failure_threshold=2),
    )
    try:
        for _ in range(3):
            took, out = run.timed("blpop", ["q"], 0.8, deadline=3.0)
            assert out is None, out
            assert 0.7 < took < 1.5, took
        assert run.res.breaker_state is BreakerState.CLOSED
    finally:
        run.close()
