"""The resilient handle against a real redis-server: each test runs sync and async."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    BreakerTransitioned,
    CallRejected,
    RedisUnavailable,
    Resilience,
    RetryPolicy,
    RetryScheduled,
    set_testing,
)
from testbed import FaultProxy, RedisServer
from tests.support import Runner


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def runners() -> Iterator[list[Runner]]:
    made: list[Runner] = []
    yield made
    for r in made:
        r.close()


def make(runners: list[Runner], mode: str, host: str, port: int, **kw: Any) -> Runner:
    r = Runner(mode, host, port, **kw)
    runners.append(r)
    return r


# No handshake commands on connect (RESP2 without HELLO, no CLIENT SETINFO): with drop_replies,
# every reply the proxy drops is then the command's own, never a handshake's.
BARE = {"protocol": 2, "driver_info": None}

FAST_BREAKER = BreakerPolicy(failure_threshold=3, probe_interval=0.05, reset_timeout=30.0)


def test_commands_pipelines_and_transactions_work(
    mode: str, clean_redis: RedisServer, runners: list[Runner]
) -> None:
    r = make(runners, mode, clean_redis.host, clean_redis.port)
    assert r.call("set", "k", "v") is True
    assert r.call("get", "k") == b"v"
    assert r.call("incr", "n") == 1
    assert r.call("mget", "k", "n") == [b"v", b"1"]
    assert r.call("hset", "h", mapping={"a": "1", "b": "2"}) == 2
    assert r.call("hgetall", "h") == {b"a": b"1", b"b": b"2"}
    assert r.pipeline(lambda p: p.set("x", 1).get("x").incr("n"), transaction=False) == [True, b"1", 2]
    assert r.pipeline(lambda p: p.incr("n").incr("n"), transaction=True) == [3, 4]
    assert r.res.breaker_state is BreakerState.CLOSED


def test_caller_errors_are_raised_unchanged_never_retried_never_counted(
    mode: str, clean_redis: RedisServer, runners: list[Runner]
) -> None:
    r = make(runners, mode, clean_redis.host, clean_redis.port, breaker=BreakerPolicy(failure_threshold=2))
    r.call("set", "s", "string")
    for _ in range(10):
        with pytest.raises(redis.ResponseError, match="WRONGTYPE") as info:
            r.call("lpush", "s", "x")
        assert not isinstance(info.value, RedisUnavailable)
    assert clean_redis.command_count("lpush") == 10
    assert r.res.breaker_state is BreakerState.CLOSED
    assert not r.recorder.of(RetryScheduled)


@pytest.mark.parametrize("fault", ["kill", "sigstop", "blackhole", "refuse"])
def test_breaker_opens_and_recovers(
    mode: str, fault: str, redis_server: RedisServer, proxy: FaultProxy, runners: list[Runner]
) -> None:
    r = make(
        runners,
        mode,
        proxy.host,
        proxy.port,
        retry=RetryPolicy(attempt_timeout=0.2),
        breaker=FAST_BREAKER,
    )
    assert r.call("set", "k", "v") is True
    if fault == "kill":
        redis_server.kill()
    elif fault == "sigstop":
        redis_server.pause()
    else:
        proxy.set_mode(fault)
    first: list[float] = []
    for _ in range(10):
        took, out = r.timed("get", "k", deadline=1.0)
        assert isinstance(out, RedisUnavailable)
        first.append(took)
    assert r.res.breaker_state is BreakerState.OPEN
    # Once open, a call costs no network time at all.
    assert max(first[-5:]) < 0.05
    assert all(t < 1.2 for t in first)  # never past the deadline (plus slack for the loop)
    # Redis comes back: the background probe moves to half-open, a real call closes.
    if fault == "kill":
        redis_server.restart()
    elif fault == "sigstop":
        redis_server.resume()
    else:
        proxy.set_mode("pass")
    back = time.monotonic()

    def served() -> bool:
        try:
            return bool(r.call("get", "k", deadline=1.0) == (None if fault == "kill" else b"v"))
        except RedisUnavailable:
            return False

    assert r.wait_for(served, timeout=10.0)
    assert time.monotonic() - back < 3.0
    # half_open_max_calls (3) successful trial calls close it.
    for _ in range(FAST_BREAKER.half_open_max_calls):
        r.call("get", "k")
    assert r.res.breaker_state is BreakerState.CLOSED
    moves = [(e.previous, e.new) for e in r.recorder.of(BreakerTransitioned)]
    assert moves[0] == (BreakerState.CLOSED, BreakerState.OPEN)
    assert (BreakerState.OPEN, BreakerState.HALF_OPEN) in moves
    assert moves[-1] == (BreakerState.HALF_OPEN, BreakerState.CLOSED)


def test_get_on_blackholed_server_returns_within_deadline(
    mode: str, proxy: FaultProxy, runners: list[Runner]
) -> None:
    # No attempt timeout: only the scope deadline bounds the call. The client's
    # own socket timeout is 5 s, so anything that ignored the deadline would show.
    r = make(runners, mode, proxy.host, proxy.port, retry=RetryPolicy(attempt_timeout=None))
    proxy.set_mode("blackhole")
    for _ in range(3):
        # A fresh connection each time: connect + handshake must honour the deadline too.
        took, out = r.timed("get", "k", deadline=0.3)
        assert isinstance(out, RedisUnavailable)
        assert out.reason == "deadline_exceeded"
        assert 0.25 < took < 0.3 + 0.1


def test_attempt_timeout_none_leaves_the_clients_socket_timeout_in_charge(
    mode: str, proxy: FaultProxy, runners: list[Runner]
) -> None:
    # asyncio clients have their socket_timeout moved from redis-py's reads to the
    # attempt watchdog; it must still bound the attempt. The 5 s scope deadline only
    # guards against a hang: an unbounded attempt would end there instead.
    r = make(
        runners,
        mode,
        proxy.host,
        proxy.port,
        client_kw={"socket_timeout": 0.3},
        retry=RetryPolicy(attempt_timeout=None, max_attempts=1),
    )
    proxy.set_mode("blackhole")
    took, out = r.timed("get", "k", deadline=5.0)
    assert isinstance(out, RedisUnavailable)
    assert out.reason == "retries_exhausted"
    assert 0.25 < took < 0.3 + 0.5


async def test_socket_timeout_bound_survives_a_second_resilience_on_one_client(proxy: FaultProxy) -> None:
    # The first Resilience moves the asyncio client's socket_timeout to its watchdog; a
    # second one (another config, an app reload) must still find it as its bound.
    client = redis.asyncio.Redis(host=proxy.host, port=proxy.port, socket_timeout=0.3)
    policy = RetryPolicy(attempt_timeout=None, max_attempts=1)
    first = Resilience(client, retry=policy)
    second = Resilience(client, retry=policy)
    proxy.set_mode("blackhole")
    try:
        for res in (first, second):
            started = time.monotonic()
            with pytest.raises(RedisUnavailable) as info:
                async with res.request(deadline=5.0) as h:  # the deadline only guards a hang
                    await h.get("k")
            assert info.value.reason == "retries_exhausted"
            assert time.monotonic() - started < 0.3 + 0.5
    finally:
        first.close()
        second.close()
        await client.aclose()


def test_incr_with_lost_reply_is_applied_once_set_is_retried(
    mode: str, redis_server: RedisServer, proxy: FaultProxy, runners: list[Runner]
) -> None:
    r = make(
        runners,
        mode,
        proxy.host,
        proxy.port,
        client_kw=BARE,
        retry=RetryPolicy(attempt_timeout=0.2, max_attempts=3),
    )
    assert r.call("incr", "n") == 1
    proxy.set_mode("drop_replies", count=1)
    with pytest.raises(RedisUnavailable) as info:
        r.call("incr", "n")
    assert info.value.reason == "unsafe_to_retry"
    assert info.value.outcome_unknown is True
    assert isinstance(info.value.__cause__, redis.TimeoutError | TimeoutError)
    direct = redis_server.client()
    assert direct.get("n") == b"2"  # applied exactly once, never re-sent
    assert redis_server.command_count("incrby") == 2

    proxy.set_mode("drop_replies", count=1)
    assert r.call("set", "k", "v") is True  # idempotent: retried and succeeds
    assert redis_server.command_count("set") == 2
    assert direct.get("k") == b"v"


def test_max_attempts_is_exact(
    mode: str, redis_server: RedisServer, proxy: FaultProxy, runners: list[Runner]
) -> None:
    set_testing(True)
    try:
        r = make(
            runners,
            mode,
            proxy.host,
            proxy.port,
            client_kw=BARE,
            retry=RetryPolicy(attempt_timeout=0.1, max_attempts=4),
            breaker=BreakerPolicy(failure_threshold=100),
        )
        r.call("ping")
        proxy.set_mode("drop_replies")
        with pytest.raises(RedisUnavailable) as info:
            r.call("get", "k")
        assert info.value.reason == "retries_exhausted"
        assert info.value.attempts == 4
        assert redis_server.command_count("get") == 4
        assert len(r.recorder.of(RetryScheduled)) == 3
    finally:
        set_testing(False)


def test_retry_budget_caps_retries_during_outage(
    mode: str, redis_server: RedisServer, runners: list[Runner]
) -> None:
    set_testing(True)
    try:
        r = make(
            runners,
            mode,
            redis_server.host,
            redis_server.port,
            retry=RetryPolicy(
                max_attempts=5, budget_ratio=0.1, budget_min_per_second=0.5, budget_window=10.0
            ),
            # Keep the breaker out of the way: this is about the budget alone.
            breaker=BreakerPolicy(failure_threshold=10_000, minimum_calls=10_000),
        )
        redis_server.kill()
        calls = 100
        for _ in range(calls):
            with pytest.raises(RedisUnavailable):
                r.call("get", "k")
        retries = len(r.recorder.of(RetryScheduled))
        # Without a budget: 100 x 4 = 400 retries. With it: 10% of calls + the floor (5).
        assert retries <= 0.1 * calls + 5
        rejected = [e for e in r.recorder.of(CallRejected) if e.reason == "budget_exhausted"]
        assert rejected
    finally:
        set_testing(False)


def test_pipeline_retry_rules(
    mode: str, redis_server: RedisServer, proxy: FaultProxy, runners: list[Runner]
) -> None:
    r = make(runners, mode, proxy.host, proxy.port, client_kw=BARE, retry=RetryPolicy(attempt_timeout=0.2))
    r.call("ping")
    direct = redis_server.client()
    # All idempotent: retried, succeeds.
    proxy.set_mode("drop_replies", count=1)
    assert r.pipeline(lambda p: p.set("a", 1).get("a"), transaction=False) == [True, b"1"]
    # One INCR in it: not retried once sent.
    proxy.set_mode("drop_replies", count=1)
    with pytest.raises(RedisUnavailable) as info:
        r.pipeline(lambda p: p.set("a", 1).incr("c"), transaction=False)
    assert info.value.reason == "unsafe_to_retry"
    assert direct.get("c") == b"1"
    # A transaction, even of idempotent commands, is never sent twice.
    proxy.set_mode("drop_replies", count=1)
    with pytest.raises(RedisUnavailable) as info:
        r.pipeline(lambda p: p.set("a", 2).set("b", 2), transaction=True)
    assert info.value.reason == "unsafe_to_retry"
    assert redis_server.command_count("exec") == 1


def test_force_open_and_reset(mode: str, clean_redis: RedisServer, runners: list[Runner]) -> None:
    r = make(runners, mode, clean_redis.host, clean_redis.port, breaker=FAST_BREAKER)
    r.res.force_open()
    assert r.res.breaker_state is BreakerState.OPEN
    took, out = r.timed("get", "k")
    assert isinstance(out, RedisUnavailable)
    assert out.reason == "breaker_open"
    assert took < 0.05
    assert out.__cause__ is None
    r.sleep(0.3)  # a forced-open breaker is not probed back to half-open
    assert r.res.breaker_state is BreakerState.OPEN
    r.res.reset()
    assert r.call("get", "k") is None


def test_hook_that_raises_never_breaks_a_call(
    mode: str, clean_redis: RedisServer, runners: list[Runner]
) -> None:
    def bad(event: object) -> None:
        raise RuntimeError("hook bug")

    r = make(runners, mode, clean_redis.host, clean_redis.port, hooks=[bad])
    assert r.call("set", "k", "v") is True
    assert r.call("get", "k") == b"v"


def test_deadline_is_shared_by_the_whole_scope(mode: str, proxy: FaultProxy, runners: list[Runner]) -> None:
    r = make(runners, mode, proxy.host, proxy.port, retry=RetryPolicy(attempt_timeout=None))
    r.call("ping")
    proxy.set_mode("latency", latency=0.05)  # ~100 ms per round trip

    def many_gets() -> None:
        if r.loop is None:
            with r.res.request(deadline=0.25) as h:
                for _ in range(10):
                    h.get("k")
            return

        async def go() -> None:
            async with r.res.request(deadline=0.25) as h:
                for _ in range(10):
                    await h.get("k")

        r.loop.run_until_complete(go())

    t0 = time.monotonic()
    with pytest.raises(RedisUnavailable) as info:
        many_gets()
    assert info.value.reason == "deadline_exceeded"
    assert time.monotonic() - t0 < 0.25 + 0.1
