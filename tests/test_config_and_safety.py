"""Config validation at construction, and the command-safety table."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import (
    BreakerPolicy,
    ConfigurationError,
    NoActiveRequest,
    Resilience,
    RetryPolicy,
    current_redis,
)
from otel_redis_resilience._safety import block_seconds, is_idempotent
from tests.infra import RedisServer


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: RetryPolicy(max_attempts=0), "RetryPolicy.max_attempts must be >= 1"),
        (lambda: RetryPolicy(max_attempts=2.5), "max_attempts must be an integer"),
        (lambda: RetryPolicy(backoff_base=-1), "backoff_base must be >= 0"),
        (lambda: RetryPolicy(backoff_base=1.0, backoff_cap=0.5), "backoff_cap"),
        (lambda: RetryPolicy(attempt_timeout=0), "attempt_timeout must be > 0"),
        (lambda: RetryPolicy(attempt_timeout=float("nan")), "attempt_timeout must be a number"),
        (lambda: RetryPolicy(budget_ratio=-0.1), "budget_ratio"),
        (lambda: RetryPolicy(idempotent_commands="GET"), "not a single string"),
        (lambda: BreakerPolicy(failure_threshold=0), "failure_threshold must be >= 1"),
        (lambda: BreakerPolicy(failure_rate_threshold=1.5), "failure_rate_threshold must be a fraction"),
        (lambda: BreakerPolicy(failure_rate_threshold=0), "failure_rate_threshold must be > 0"),
        (lambda: BreakerPolicy(reset_timeout=-5), "reset_timeout must be > 0"),
        (lambda: BreakerPolicy(window=float("inf")), "window must be finite"),
        (lambda: BreakerPolicy(half_open_max_calls=0), "half_open_max_calls"),
        (lambda: BreakerPolicy(probe_interval=0), "probe_interval must be > 0"),
        (lambda: BreakerPolicy(slow_call_threshold=-1), "slow_call_threshold"),
    ],
)
def test_invalid_policies_fail_at_construction(factory: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        factory()


def test_invalid_resilience_arguments(clean_redis: RedisServer) -> None:
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port)
    with pytest.raises(ConfigurationError, match=r"needs a redis\.Redis or a redis\.asyncio\.Redis"):
        Resilience(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="deadline must be > 0"):
        Resilience(client, deadline=-1)
    with pytest.raises(ConfigurationError, match="must be a RetryPolicy"):
        Resilience(client, retry=BreakerPolicy())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="hooks"):
        Resilience(client, hooks=[42])  # type: ignore[list-item]
    res = Resilience(client)
    with pytest.raises(ConfigurationError, match="deadline"):
        res.request(deadline=0)


async def test_sync_scope_on_async_client_is_a_clear_error(clean_redis: RedisServer) -> None:
    client = redis.asyncio.Redis(host=clean_redis.host, port=clean_redis.port)
    res = Resilience(client)
    with pytest.raises(TypeError, match="async with"), res.request():
        pass
    async with res.request() as h:
        assert current_redis() is h
        assert await h.ping() is True
    with pytest.raises(NoActiveRequest, match="no Redis request scope"):
        current_redis()
    await client.aclose()


def test_wrapped_client_retries_are_switched_off(clean_redis: RedisServer) -> None:
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port)
    Resilience(client)
    retry = client.connection_pool.connection_kwargs["retry"]
    assert retry.get_retries() == 0


@pytest.mark.parametrize(
    ("args", "safe"),
    [
        (("GET", "k"), True),
        (("MGET", "a", "b"), True),
        (("HGETALL", "h"), True),
        (("SET", "k", "v"), True),
        (("SET", "k", "v", "EX", 10), True),
        (("SET", "k", "GET", "XX"), True),  # "GET" here is the value, XX an option
        (("SET", "k", "v", "GET"), False),
        (("SET", "k", "v", "NX"), False),
        # Same effect twice, but not the same reply: 1 then 0 (a count, a flag, the old bit).
        (("DEL", "k"), False),
        (("HSET", "h", "f", "v"), False),
        (("SADD", "s", "m"), False),
        (("ZADD", "z", 1, "m"), False),
        (("PERSIST", "k"), False),
        (("SETBIT", "b", 7, 1), False),
        (("EXPIREAT", "k", 1), False),  # a time in the past deletes: 1, then 0
        (("EXPIRE", "k", 10), True),
        (("EXPIRE", "k", 0), False),  # deletes the key
        (("EXPIRE", "k", 10, "NX"), False),
        (("EXPIRE", "k", 10, "GT"), False),
        (("PEXPIRE", "k", 100, "LT"), False),
        (("GETEX", "k", "EX", 10), True),
        (("GETEX", "k", "PXAT", 1), False),
        (("HMSET", "h", "f", "v"), True),
        (("SETRANGE", "k", 0, "v"), True),
        (("LSET", "l", 0, "v"), True),
        (("ZADD", "z", "INCR", 1, "m"), False),
        (("INCR", "k"), False),
        (("INCRBY", "k", 5), False),
        (("LPUSH", "l", "x"), False),
        (("RPUSH", "l", "x"), False),
        (("APPEND", "k", "x"), False),
        (("LPOP", "l"), False),
        (("XADD", "s", "*", "f", "v"), False),
        (("EVAL", "return 1", 0), False),
        (("EVALSHA", "abc", 0), False),
        (("SOMETHINGNEW", "k"), False),
        (("CONFIG GET", "maxmemory"), True),
    ],
)
def test_command_safety_table(args: tuple[Any, ...], safe: bool) -> None:
    assert is_idempotent(str(args[0]), args) is safe


def test_user_declared_commands_and_scripts_are_retryable() -> None:
    script = "return redis.call('SET', KEYS[1], ARGV[1])"
    policy = RetryPolicy(idempotent_commands={"incr"}, idempotent_scripts={script})
    sha = hashlib.sha1(script.encode()).hexdigest()
    assert is_idempotent("INCR", ("INCR", "k"), policy.idempotent_commands)
    assert is_idempotent("EVAL", ("EVAL", script, 1, "k", "v"), frozenset(), policy.idempotent_scripts)
    assert is_idempotent("EVALSHA", ("EVALSHA", sha.upper(), 1, "k"), frozenset(), policy.idempotent_scripts)
    assert not is_idempotent("EVALSHA", ("EVALSHA", "0" * 40, 1, "k"), frozenset(), policy.idempotent_scripts)


def test_blocking_commands_declare_their_block_time() -> None:
    assert block_seconds("BLPOP", ("BLPOP", "a", "b", 5)) == 5.0
    assert block_seconds("BLMPOP", ("BLMPOP", 2.5, 1, "a", "LEFT")) == 2.5
    assert block_seconds("XREAD", ("XREAD", "BLOCK", 1500, "STREAMS", "s", "$")) == 1.5
    assert block_seconds("WAIT", ("WAIT", 1, 200)) == 0.2
    assert block_seconds("GET", ("GET", "k")) is None
