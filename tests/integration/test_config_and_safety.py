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
    LastKnownGoodPolicy,
    NoActiveRequest,
    RedisUnavailable,
    Resilience,
    RetryPolicy,
    current_redis,
    validate_deadline,
)
from otel_redis_resilience._decide.commands import block_seconds, is_idempotent, with_block
from testbed import RedisServer


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


# Every wrong value a user can plausibly pass (a string from an env var, None, a single
# item instead of a collection, a duration too small to ever succeed) fails at
# construction with a ConfigurationError naming the field and the value.
@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (
            lambda: RetryPolicy(attempt_timeout=1e-9),
            r"RetryPolicy.attempt_timeout must be >= 0.005 s, got 1e-09",
        ),
        (lambda: RetryPolicy(attempt_timeout=0.004), r"attempt_timeout must be >= 0.005 s, got 0.004"),
        (
            lambda: RetryPolicy(attempt_timeout="0.5"),
            r"RetryPolicy.attempt_timeout must be a number, got '0.5'",
        ),
        (lambda: RetryPolicy(max_attempts=True), r"RetryPolicy.max_attempts must be an integer, got True"),
        (lambda: RetryPolicy(max_attempts="3"), r"RetryPolicy.max_attempts must be an integer, got '3'"),
        (lambda: RetryPolicy(max_attempts=None), r"RetryPolicy.max_attempts must be an integer, got None"),
        (lambda: RetryPolicy(backoff_base="0.1"), r"RetryPolicy.backoff_base must be a number, got '0.1'"),
        (lambda: RetryPolicy(backoff_cap=None), r"RetryPolicy.backoff_cap must be a number, got None"),
        (
            lambda: RetryPolicy(budget_ratio=float("nan")),
            r"RetryPolicy.budget_ratio must be a number, got nan",
        ),
        (lambda: RetryPolicy(budget_min_per_second=float("inf")), r"budget_min_per_second must be finite"),
        (lambda: RetryPolicy(budget_window=0), r"RetryPolicy.budget_window must be > 0, got 0"),
        (
            lambda: RetryPolicy(idempotent_commands=None),
            r"RetryPolicy.idempotent_commands must be a collection of command names, got None",
        ),
        (lambda: RetryPolicy(idempotent_commands=5), r"idempotent_commands must be a collection .*, got 5"),
        (lambda: RetryPolicy(idempotent_commands=b"INCR"), r"idempotent_commands .* not a single string"),
        (lambda: RetryPolicy(idempotent_commands=[5]), r"idempotent_commands has an invalid entry 5"),
        (lambda: RetryPolicy(idempotent_commands=[" "]), r"idempotent_commands has an invalid entry ' '"),
        (
            lambda: RetryPolicy(idempotent_scripts=[b"\xff"]),
            r"RetryPolicy.idempotent_scripts has an invalid entry b'\\xff' \(bytes that are not UTF-8",
        ),
        (
            lambda: RetryPolicy(idempotent_scripts=None),
            r"idempotent_scripts must be a collection .*, got None",
        ),
        (lambda: RetryPolicy(idempotent_scripts=3.5), r"idempotent_scripts must be a collection .*, got 3.5"),
        (lambda: RetryPolicy(idempotent_scripts=[None]), r"idempotent_scripts has an invalid entry None"),
        (lambda: RetryPolicy(idempotent_scripts=[""]), r"idempotent_scripts has an invalid entry ''"),
        (lambda: RetryPolicy(idempotent_scripts="return 1"), r"idempotent_scripts .* not a single one"),
        (
            lambda: BreakerPolicy(probe_interval=0.5, probe_timeout=1.0),
            r"BreakerPolicy.probe_timeout \(1.0\) must be <= probe_interval \(0.5\)",
        ),
        (
            lambda: BreakerPolicy(probe_timeout=1e-9),
            r"BreakerPolicy.probe_timeout must be >= 0.005 s, got 1e-09",
        ),
        (
            lambda: BreakerPolicy(probe_timeout="0.25"),
            r"BreakerPolicy.probe_timeout must be a number, got '0.25'",
        ),
        (
            lambda: BreakerPolicy(probe_interval="0.5"),
            r"BreakerPolicy.probe_interval must be a number, got '0.5'",
        ),
        (
            lambda: BreakerPolicy(slow_call_threshold=1e-6),
            r"slow_call_threshold must be >= 0.005 s, got 1e-06",
        ),
        (lambda: BreakerPolicy(slow_call_threshold="1"), r"slow_call_threshold must be a number, got '1'"),
        (lambda: BreakerPolicy(failure_threshold=True), r"failure_threshold must be an integer, got True"),
        (lambda: BreakerPolicy(minimum_calls=None), r"minimum_calls must be an integer, got None"),
        (lambda: BreakerPolicy(window="10"), r"BreakerPolicy.window must be a number, got '10'"),
        (
            lambda: BreakerPolicy(reset_timeout=None),
            r"BreakerPolicy.reset_timeout must be a number, got None",
        ),
        (
            lambda: BreakerPolicy(failure_rate_threshold="0.5"),
            r"failure_rate_threshold must be a number, got '0.5'",
        ),
        (lambda: BreakerPolicy(half_open_max_calls=1.0), r"half_open_max_calls must be an integer, got 1.0"),
        (lambda: LastKnownGoodPolicy(max_entries=0), r"LastKnownGoodPolicy.max_entries must be >= 1, got 0"),
        (lambda: LastKnownGoodPolicy(max_entries="10"), r"max_entries must be an integer, got '10'"),
        (
            lambda: LastKnownGoodPolicy(max_bytes=1.5),
            r"LastKnownGoodPolicy.max_bytes must be an integer, got 1.5",
        ),
        (lambda: LastKnownGoodPolicy(max_entry_bytes=None), r"max_entry_bytes must be an integer, got None"),
        (
            lambda: LastKnownGoodPolicy(max_bytes=10, max_entry_bytes=20),
            r"max_entry_bytes must be <= max_bytes",
        ),
        (lambda: validate_deadline("request", "0.5"), r"request.deadline must be a number, got '0.5'"),
        (lambda: validate_deadline("request", 1e-9), r"request.deadline must be >= 0.005 s, got 1e-09"),
        (lambda: validate_deadline("request", True), r"request.deadline must be a number, got True"),
        (lambda: validate_deadline("request", float("inf")), r"request.deadline must be finite, got inf"),
    ],
)
def test_wrong_values_are_configuration_errors_naming_field_and_value(factory: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        factory()


def test_smallest_accepted_durations() -> None:
    RetryPolicy(attempt_timeout=0.005)
    BreakerPolicy(probe_interval=0.005, probe_timeout=0.005, slow_call_threshold=0.005)
    BreakerPolicy(probe_interval=None, probe_timeout=5.0)  # no probes: nothing to compare with
    # Not given, the probe timeout is 0.25 s, or the interval if that is shorter.
    assert BreakerPolicy().probe_timeout == 0.25
    assert BreakerPolicy(probe_interval=0.05).probe_timeout == 0.05
    assert BreakerPolicy(probe_interval=None).probe_timeout == 0.25
    validate_deadline("request", 0.005)
    RetryPolicy(idempotent_scripts=[b"return 1", "return 2", b"0" * 40], idempotent_commands=("incr",))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"hooks": print},
            r"Resilience\(hooks=...\) must be a sequence of callables, got <built-in function print>",
        ),
        ({"hooks": None}, r"Resilience\(hooks=...\) must be a sequence of callables, got None"),
        ({"hooks": "print"}, r"Resilience\(hooks=...\) must be a sequence of callables, got 'print'"),
        ({"hooks": [print, 42]}, r"Resilience\(hooks=...\) entries must be callable, got 42"),
        ({"deadline": "0.5"}, r"Resilience.deadline must be a number, got '0.5'"),
        ({"deadline": 1e-9}, r"Resilience.deadline must be >= 0.005 s"),
        (
            {"retry": None, "breaker": "fast"},
            r"Resilience\(breaker=...\) must be a BreakerPolicy, got 'fast'",
        ),
        (
            {"retry": {"max_attempts": 2}},
            r"Resilience\(retry=...\) must be a RetryPolicy, got \{'max_attempts': 2\}",
        ),
        (
            {"capture_statement": "yes"},
            r"Resilience\(capture_statement=...\) must be True or False, got 'yes'",
        ),
        (
            {"tracer_provider": "otlp"},
            r"Resilience\(tracer_provider=...\) must be a TracerProvider, got 'otlp'",
        ),
        ({"meter_provider": object}, r"Resilience\(meter_provider=...\) must be a MeterProvider, got <class"),
        (
            {"last_known_good": True},
            r"Resilience\(last_known_good=...\) must be a LastKnownGoodPolicy, got True",
        ),
        (
            {"write_behind": "/tmp/x"},
            r"Resilience\(write_behind=...\) must be a WriteBehindConfig, got '/tmp/x'",
        ),
    ],
)
def test_wrong_resilience_arguments(clean_redis: RedisServer, kwargs: dict[str, Any], match: str) -> None:
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port)
    with pytest.raises(ConfigurationError, match=match):
        Resilience(client, **kwargs)
    client.close()


@pytest.mark.parametrize("deadline", ["0.5", -1, 0, float("nan"), float("inf"), True, [1]])
def test_wrong_request_deadlines(clean_redis: RedisServer, deadline: Any) -> None:
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port)
    res = Resilience(client)
    with pytest.raises(ConfigurationError, match=r"request.deadline must be"):
        res.request(deadline=deadline)
    with res.request() as h:
        scope = h._orr_scope
        with pytest.raises(ConfigurationError, match=r"RequestScope.set_deadline.deadline must be"):
            scope.set_deadline(deadline)
    client.close()


def test_a_tiny_request_deadline_gives_up_at_once_instead_of_failing_the_request(
    clean_redis: RedisServer,
) -> None:
    # Run-time deadlines are often what the HTTP budget has left: no floor, just deadline_exceeded.
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port)
    res = Resilience(client)
    with res.request(deadline=1e-9) as h, pytest.raises(RedisUnavailable) as info:
        h.get("k")
    assert info.value.reason == "deadline_exceeded"
    assert info.value.attempts == 0
    client.close()


def test_invalid_resilience_arguments(clean_redis: RedisServer) -> None:
    client = redis.Redis(host=clean_redis.host, port=clean_redis.port)
    with pytest.raises(
        ConfigurationError, match=r"needs a redis\.Redis, a redis\.asyncio\.Redis or a RedisCl"
    ):
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
        (("SET", "k", "v", "IFEQ", "old"), False),  # a compare-and-set that succeeded fails the 2nd time
        (("SET", "k", "v", "IFDNE", "abcd"), False),
        (("OBJECT", "ENCODING", "k"), True),  # redis-py sends the subcommand as an argument
        (("OBJECT", "HELP"), False),
        (("CLIENT", "KILL", "ID", 1), False),
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


@pytest.mark.parametrize(
    ("args", "block"),
    [
        (("BLPOP", "a", "b", 5), 5.0),
        (("BLMPOP", 2, 1, "q", "LEFT"), 2.0),
        (("WAIT", 1, 1500), 1.5),
        (("XREAD", "COUNT", 5, "BLOCK", 100, "STREAMS", "s", "0"), 0.1),
        (("XREAD", "STREAMS", "block", "0"), None),  # a stream named "block"
        (("XREAD", "COUNT", "BLOCK", "STREAMS", "s", "0"), None),  # "BLOCK" is COUNT's value here
        (("XREADGROUP", "GROUP", "block", "0", "STREAMS", "s", ">"), None),  # group "block", consumer "0"
        (("XREADGROUP", "GROUP", "g", "block", "BLOCK", 0, "STREAMS", "s", ">"), 0.0),
        (("GET", "block"), None),
    ],
)
def test_block_time_is_found_only_where_the_command_puts_it(
    args: tuple[Any, ...], block: float | None
) -> None:
    assert block_seconds(str(args[0]), args) == block
    if block is not None:
        rewritten = with_block(str(args[0]), args, 0.25)
        assert block_seconds(str(args[0]), rewritten) == 0.25
        assert len(rewritten) == len(args)
    else:
        assert with_block(str(args[0]), args, 0.25) == args
