"""Fallbacks: the decorator, outage-as-miss reads and last-known-good reads (real redis-server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import (
    ConfigurationError,
    FallbackUsed,
    LastKnownGoodPolicy,
    RedisUnavailable,
    Resilience,
)
from testbed import RedisServer
from tests.support import Recorder


def test_decorator_value_and_function_forms_sync(redis_server: RedisServer) -> None:
    rec = Recorder()
    res = Resilience(redis.Redis(host=redis_server.host, port=redis_server.port), hooks=[rec])

    @res.fallback(value="default")
    def read_value(key: str) -> Any:
        with res.request(deadline=0.5) as h:
            return h.get(key)

    @res.fallback(func=lambda key: f"computed-{key}")
    def read_func(key: str) -> Any:
        with res.request(deadline=0.5) as h:
            return h.get(key)

    @res.fallback(value=None)
    def wrong_type() -> Any:
        with res.request() as h:
            h.set("s", "x")
            return h.lpush("s", 1)

    assert read_value("k") is None  # healthy: the real reply
    with pytest.raises(redis.ResponseError):
        wrong_type()  # an error reply is the caller's bug, never a fallback
    redis_server.kill()
    assert read_value("k") == "default"
    assert read_func("k") == "computed-k"
    kinds = [(e.kind, e.reason) for e in rec.of(FallbackUsed)]
    assert ("value", "retries_exhausted") in kinds or ("value", "breaker_open") in kinds
    assert any(k == "function" for k, _ in kinds)


async def test_decorator_value_and_function_forms_async(redis_server: RedisServer) -> None:
    rec = Recorder()
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port)
    res = Resilience(client, hooks=[rec])

    async def compute(key: str) -> str:
        await asyncio.sleep(0)
        return f"computed-{key}"

    @res.fallback(value="default")
    async def read_value(key: str) -> Any:
        async with res.request(deadline=0.5) as h:
            return await h.get(key)

    @res.fallback(func=compute)
    async def read_func(key: str) -> Any:
        async with res.request(deadline=0.5) as h:
            return await h.get(key)

    @res.fallback(value=None)
    async def not_redis() -> Any:
        raise KeyError("mine")

    assert await read_value("k") is None
    with pytest.raises(KeyError):
        await not_redis()
    redis_server.kill()
    assert await read_value("k") == "default"
    assert await read_func("k") == "computed-k"
    assert {e.kind for e in rec.of(FallbackUsed)} == {"value", "function"}
    res.close()
    await client.aclose()


def test_decorator_config_errors(clean_redis: RedisServer) -> None:
    res = Resilience(redis.Redis(host=clean_redis.host, port=clean_redis.port))
    with pytest.raises(ConfigurationError, match="exactly one"):
        res.fallback()
    with pytest.raises(ConfigurationError, match="exactly one"):
        res.fallback(value=1, func=lambda: 1)

    async def coro() -> int:
        return 1

    with pytest.raises(ConfigurationError, match="coroutine"):
        res.fallback(func=coro)(lambda: 2)


def test_miss_on_outage_reads_as_cache_miss(redis_server: RedisServer) -> None:
    res = Resilience(redis.Redis(host=redis_server.host, port=redis_server.port))
    with res.request() as h:
        h.set("k", "v")
        h.rpush("l", "a")
    redis_server.kill()
    with res.request(deadline=0.5) as h:
        m = h.miss_on_outage()
        assert m.get("k") is None
        assert m.mget("a", "b", "c") == [None, None, None]
        assert m.hgetall("h") == {}
        assert m.lrange("l", 0, -1) == []
        assert m.exists("k") == 0
        with pytest.raises(RedisUnavailable):
            m.set("k", "v")  # writes are never silently dropped
        with pytest.raises(RedisUnavailable):
            h.get("k")  # the plain handle still raises
    assert res.client.connection_pool is not None


def test_last_known_good_serves_stale_then_bounds_hold(redis_server: RedisServer) -> None:
    rec = Recorder()
    policy = LastKnownGoodPolicy(max_entries=50, max_bytes=64 * 1024, max_entry_bytes=16 * 1024)
    res = Resilience(
        redis.Redis(host=redis_server.host, port=redis_server.port), hooks=[rec], last_known_good=policy
    )
    with res.request() as h:
        h.set("k", "v1")
        lkg = h.last_known_good()
        assert lkg.get("k") == b"v1"
        # A stream of large values: the store never grows past its bounds.
        for i in range(500):
            h.set(f"big{i}", b"x" * (i * 37 % 15000))
            lkg.get(f"big{i}")
            store = res._core.lkg
            assert store is not None
            assert len(store) <= policy.max_entries
            assert store.nbytes <= policy.max_bytes
        h.set("fresh", "f")
        assert lkg.get("fresh") == b"f"
        h.set("huge", b"y" * 20000)
        assert lkg.get("huge") == b"y" * 20000  # served, but too big to keep
    redis_server.kill()
    with res.request(deadline=0.5) as h:
        lkg = h.last_known_good()
        assert lkg.get("fresh") == b"f"  # stale but useful
        assert lkg.get("huge") is None  # never kept: a miss
    kinds = [e.kind for e in rec.of(FallbackUsed)]
    assert "last_known_good" in kinds
    assert "miss" in kinds


def test_last_known_good_needs_opt_in(clean_redis: RedisServer) -> None:
    res = Resilience(redis.Redis(host=clean_redis.host, port=clean_redis.port))
    with res.request() as h, pytest.raises(ConfigurationError, match="LastKnownGoodPolicy"):
        h.last_known_good()
    with pytest.raises(ConfigurationError, match="max_entries"):
        LastKnownGoodPolicy(max_entries=0)
