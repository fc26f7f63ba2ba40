"""What a give-up says: one reason per thing that happened, whatever the timing.

An INCR that was sent and got no reply must always say so (``unsafe_to_retry``,
``outcome_unknown``), whether its deadline, its attempts or the breaker ended the
call. A failure that opened the breaker is a failure, not a rejection. A timeout
has one name in sync and asyncio. Public exceptions print with the public path.
"""

from __future__ import annotations

import pickle

import pytest

from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    CallRejected,
    ConfigurationError,
    OperationFinished,
    RedisUnavailable,
    RetryPolicy,
    RetryScheduled,
)
from testbed import FaultProxy, RedisServer
from tests.support import Runner


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(
    ("retry", "breaker", "deadline"),
    [
        # the attempts run out first
        (RetryPolicy(max_attempts=1, attempt_timeout=0.1), BreakerPolicy(), 2.0),
        # the deadline runs out first
        (RetryPolicy(attempt_timeout=1.0), BreakerPolicy(), 0.15),
        # this very failure opens the breaker
        (RetryPolicy(attempt_timeout=0.1), BreakerPolicy(failure_threshold=1), 2.0),
    ],
    ids=["attempts", "deadline", "breaker"],
)
def test_a_sent_incr_without_reply_always_says_unsafe_to_retry(
    mode: str,
    redis_server: RedisServer,
    proxy: FaultProxy,
    retry: RetryPolicy,
    breaker: BreakerPolicy,
    deadline: float,
) -> None:
    run = Runner(mode, proxy.host, proxy.port, retry=retry, breaker=breaker)
    try:
        run.call("ping", deadline=1.0)  # a warm connection: the INCR is really sent
        proxy.set_mode("drop_replies")  # the INCR runs; its reply never comes back
        _, out = run.timed("incr", "n", deadline=deadline)
        assert isinstance(out, RedisUnavailable), out
        assert out.reason == "unsafe_to_retry", out
        assert out.outcome_unknown
        assert out.attempts == 1
    finally:
        proxy.set_mode("pass")
        run.close()
    assert redis_server.client().get("n") == b"1"  # it did run, once


def test_a_failure_that_opens_the_breaker_is_not_a_rejection(
    mode: str, redis_server: RedisServer, proxy: FaultProxy
) -> None:
    run = Runner(
        mode,
        proxy.host,
        proxy.port,
        retry=RetryPolicy(attempt_timeout=0.1),
        breaker=BreakerPolicy(failure_threshold=1, probe_interval=None),
    )
    try:
        run.call("ping", deadline=1.0)
        proxy.set_mode("blackhole")
        _, out = run.timed("get", "k", deadline=2.0)
        assert isinstance(out, RedisUnavailable)
        assert out.reason == "breaker_opened"
        assert not out.outcome_unknown  # a GET: nothing to apply
        assert run.res.breaker_state is BreakerState.OPEN
        assert run.recorder.of(CallRejected) == []
        finished = run.recorder.of(OperationFinished)
        assert [f.outcome for f in finished[-1:]] == ["failed"]
        # The next call is a real rejection, and is counted as one.
        _, out = run.timed("get", "k", deadline=2.0)
        assert isinstance(out, RedisUnavailable)
        assert out.reason == "breaker_open"
        assert out.attempts == 0
        assert [r.reason for r in run.recorder.of(CallRejected)] == ["breaker_open"]
    finally:
        proxy.set_mode("pass")
        run.close()


def test_a_timeout_has_one_error_type_in_sync_and_async(redis_server: RedisServer, proxy: FaultProxy) -> None:
    types = {}
    for mode in ("sync", "async"):
        run = Runner(mode, proxy.host, proxy.port, retry=RetryPolicy(attempt_timeout=0.1, max_attempts=2))
        try:
            run.call("ping", deadline=1.0)
            proxy.set_mode("blackhole")
            run.timed("get", "k", deadline=2.0)
            retries = run.recorder.of(RetryScheduled)
            finished = run.recorder.of(OperationFinished)
            types[mode] = ({r.error_type for r in retries}, finished[-1].error_type)
        finally:
            proxy.set_mode("pass")
            run.close()
    assert types["sync"] == types["async"], types
    assert types["sync"][0] == {"redis.exceptions.TimeoutError"}, types


def test_miss_on_outage_type_follows_decode_responses(mode: str, redis_server: RedisServer) -> None:
    for decode, none in ((True, "none"), (False, b"none")):
        run = Runner(mode, redis_server.host, redis_server.port, client_kw={"decode_responses": decode})
        try:
            run.res.force_open()
            if mode == "sync":
                with run.res.request() as h:
                    got = h.miss_on_outage().type("k")
            else:

                async def go(res: object = run.res) -> object:
                    async with res.request() as h:  # type: ignore[attr-defined]
                        return await h.miss_on_outage().type("k")

                assert run.loop is not None
                got = run.loop.run_until_complete(go())
            assert got == none
            assert type(got) is type(none)
        finally:
            run.close()


def test_public_exceptions_print_and_pickle_with_the_public_path() -> None:
    for cls in (RedisUnavailable, ConfigurationError):
        assert cls.__module__ == "otel_redis_resilience"
    err = RedisUnavailable("write_refused", operation="SET", attempts=1, error_code="READONLY")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.error_code, str(back)) == ("write_refused", "READONLY", str(err))


@pytest.mark.parametrize(
    ("method", "args", "kwargs", "single_run"),
    [
        ("pexpire", ("k", 150), {}, True),
        ("getex", ("k",), {"px": 150}, b"v"),
        ("expire", ("k", 1), {}, True),
    ],
    ids=["PEXPIRE", "GETEX-PX", "EXPIRE"],
)
def test_a_short_ttl_is_not_resent_once_it_may_have_run_out(
    mode: str,
    redis_server: RedisServer,
    proxy: FaultProxy,
    method: str,
    args: tuple[object, ...],
    kwargs: dict[str, object],
    single_run: object,
) -> None:
    """The retry of EXPIRE k 1 sent after the first run's second found the key gone and answered 0."""
    redis_server.client().set("k", "v")
    run = Runner(mode, proxy.host, proxy.port, retry=RetryPolicy(attempt_timeout=0.2))
    try:
        run.call("ping", deadline=1.0)
        proxy.set_mode("drop_replies", count=1)
        _, out = run.timed_kw(method, *args, deadline=2.0, **kwargs)
        if isinstance(out, RedisUnavailable):
            assert out.outcome_unknown
            assert out.reason == "unsafe_to_retry"
        else:
            assert out == single_run
    finally:
        proxy.set_mode("pass")
        run.close()


def test_an_earlier_attempt_that_may_have_applied_stays_outcome_unknown(
    mode: str, redis_server: RedisServer, proxy: FaultProxy
) -> None:
    """A SET sent and timed out, then its retry rejected by the breaker: it may still have applied."""
    holder: list[object] = []

    def open_breaker_before_the_retry(event: object) -> None:
        if isinstance(event, RetryScheduled):
            holder[0].force_open()  # type: ignore[attr-defined]

    run = Runner(
        mode,
        proxy.host,
        proxy.port,
        retry=RetryPolicy(attempt_timeout=0.1),
        hooks=[open_breaker_before_the_retry],
    )
    holder.append(run.res)
    try:
        run.call("ping", deadline=1.0)
        proxy.set_mode("drop_replies", count=1)
        _, out = run.timed("set", "k", "v", deadline=2.0)
        assert isinstance(out, RedisUnavailable), out
        assert out.reason == "breaker_open"
        assert out.attempts == 1
        assert out.outcome_unknown
    finally:
        proxy.set_mode("pass")
        run.close()
    assert redis_server.client().get("k") == b"v"  # it did apply
