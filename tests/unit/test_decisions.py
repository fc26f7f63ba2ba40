"""The attempt walk, tested directly: fake time, a recording observer, no Redis, no threads.

The decisions get a sorted error (an ``ErrorKind`` and a code) and the time, and
answer a timeout, a backoff delay or a ``GiveUp`` verdict.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from otel_redis_resilience import BreakerPolicy, BreakerState, RetryPolicy, set_testing
from otel_redis_resilience._decide.breaker import Transition
from otel_redis_resilience._decide.commands import command_name, miss_reply
from otel_redis_resilience._decide.errors import ErrorKind
from otel_redis_resilience._decide.operation import RERAISE, GiveUp, Operation
from otel_redis_resilience._decide.shared import Shared

T0 = 1000.0
ERR = RuntimeError("the driver's exception: opaque to the decisions")


@dataclass
class Recorder:
    """An Observer that writes down what it is told."""

    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def on_start(self, op: Operation) -> None:
        self.calls.append(("start", op.name))

    def on_retry(self, op: Operation, delay: float, error: BaseException) -> None:
        self.calls.append(("retry", op.attempts, delay))

    def on_rejected(self, op: Operation, reason: str) -> None:
        self.calls.append(("rejected", reason))

    def on_finish(self, op: Operation, outcome: str, error: BaseException | None, now: float) -> None:
        self.calls.append(("finish", outcome))

    def on_transitions(self, moved: Sequence[Transition]) -> None:
        self.calls += [("transition", t.new, t.reason) for t in moved]


@dataclass
class Scope:
    deadline_at: float | None = None
    operations: int = 0
    failures: int = 0
    rejections: int = 0
    fallbacks: int = 0
    summary_span: Any = None

    @property
    def degraded(self) -> bool:
        return bool(self.failures or self.rejections or self.fallbacks)


class CountingLock:
    """Stands in for threading.Lock: counts how often the decisions take it."""

    def __init__(self) -> None:
        self.taken = 0

    def __enter__(self) -> None:
        self.taken += 1

    def __exit__(self, *exc: object) -> None:
        pass


@pytest.fixture(autouse=True)
def no_backoff() -> Iterator[None]:
    set_testing(True)
    yield
    set_testing(False)


def shared(
    retry: RetryPolicy | None = None, breaker: BreakerPolicy | None = None
) -> tuple[Shared, Recorder, list[str]]:
    observer = Recorder()
    probes: list[str] = []
    core = Shared(
        retry=retry or RetryPolicy(attempt_timeout=0.5),
        breaker=breaker or BreakerPolicy(),
        observer=observer,
        lock=CountingLock(),
        start_probe=lambda: probes.append("probe"),
    )
    return core, observer, probes


def test_a_success_permits_one_attempt_with_its_timeout_and_reports_ok() -> None:
    core, seen, _ = shared()
    op = Operation(core, None, "GET", ("GET", "k"))
    assert op.start(T0) == 0.5
    op.succeeded(T0 + 0.01)
    assert seen.calls == [("start", "GET"), ("finish", "ok")]
    assert isinstance(core.lock, CountingLock)
    assert core.lock.taken == 2


def test_the_deadline_bounds_the_attempt_and_a_spent_one_is_a_rejection() -> None:
    core, seen, _ = shared()
    scope = Scope(deadline_at=T0 + 0.2)
    assert Operation(core, scope, "GET", ("GET", "k")).start(T0) == pytest.approx(0.2)
    op = Operation(core, scope, "GET", ("GET", "k"))
    verdict = op.start(T0 + 0.199)
    assert verdict == GiveUp("deadline_exceeded", outcome_unknown=False, rejected=True)
    assert isinstance(verdict, GiveUp)
    op.gave_up(verdict, ERR, T0 + 0.199)
    assert seen.calls[-2:] == [("rejected", "deadline_exceeded"), ("finish", "rejected")]
    assert scope.failures == 0


def test_a_read_that_timed_out_after_it_was_sent_is_retried() -> None:
    core, seen, _ = shared()
    op = Operation(core, None, "GET", ("GET", "k"))
    op.start(T0)
    assert op.failed(ErrorKind.TIMEOUT, None, ERR, True, T0 + 0.5) == 0.0
    assert ("retry", 1, 0.0) in seen.calls
    assert op.next_attempt(T0 + 0.5) == 0.5


def test_a_write_whose_reply_was_lost_is_unsafe_to_retry() -> None:
    core, _, _ = shared()
    scope = Scope()
    op = Operation(core, scope, "INCR", ("INCR", "k"))
    op.start(T0)
    verdict = op.failed(ErrorKind.CONNECTION, None, ERR, True, T0 + 0.1)
    assert verdict == GiveUp("unsafe_to_retry", outcome_unknown=True)
    assert isinstance(verdict, GiveUp)
    op.gave_up(verdict, ERR, T0 + 0.1)
    assert scope.failures == 1


def test_a_write_never_sent_may_be_retried_and_reply_unstable_ones_are_not() -> None:
    core, _, _ = shared()
    op = Operation(core, None, "INCR", ("INCR", "k"))
    op.start(T0)
    assert op.failed(ErrorKind.CONNECTION, None, ERR, False, T0 + 0.1) == 0.0
    sadd = Operation(core, None, "SADD", ("SADD", "s", "m"))
    sadd.start(T0)
    assert sadd.failed(ErrorKind.TIMEOUT, None, ERR, True, T0 + 0.5) == GiveUp("unsafe_to_retry", True)


def test_a_refused_write_gives_up_citing_its_code_and_is_no_evidence() -> None:
    core, _, _ = shared(breaker=BreakerPolicy(failure_threshold=1))
    op = Operation(core, None, "SET", ("SET", "k", "v"))
    op.start(T0)
    verdict = op.failed(ErrorKind.WRITE_REFUSED, "READONLY", ERR, True, T0 + 0.01)
    assert verdict == GiveUp("write_refused", error_code="READONLY")
    assert core.breaker.state is BreakerState.CLOSED


def test_a_caller_error_is_reraised_unchanged() -> None:
    core, seen, _ = shared(breaker=BreakerPolicy(failure_threshold=1))
    op = Operation(core, None, "GET", ("GET", "k"))
    op.start(T0)
    assert op.failed(ErrorKind.CALLER, "WRONGTYPE", ERR, True, T0 + 0.01) == RERAISE
    assert seen.calls[-1] == ("finish", "error")
    assert core.breaker.state is BreakerState.CLOSED


def test_retries_stop_at_max_attempts() -> None:
    core, _, _ = shared(retry=RetryPolicy(attempt_timeout=0.5, max_attempts=2))
    op = Operation(core, None, "GET", ("GET", "k"))
    op.start(T0)
    assert op.failed(ErrorKind.TIMEOUT, None, ERR, True, T0 + 0.5) == 0.0
    op.next_attempt(T0 + 0.5)
    assert op.failed(ErrorKind.TIMEOUT, None, ERR, True, T0 + 1.0) == GiveUp("retries_exhausted")


def test_a_spent_retry_budget_is_a_rejection() -> None:
    core, _, _ = shared(retry=RetryPolicy(attempt_timeout=0.5, budget_ratio=0.0, budget_min_per_second=0.0))
    op = Operation(core, None, "GET", ("GET", "k"))
    op.start(T0)
    assert op.failed(ErrorKind.TIMEOUT, None, ERR, True, T0 + 0.5) == GiveUp(
        "budget_exhausted", rejected=True
    )


def test_failures_open_the_breaker_start_a_probe_and_later_calls_are_rejected() -> None:
    core, seen, probes = shared(breaker=BreakerPolicy(failure_threshold=2, reset_timeout=10.0))
    for i in range(2):
        op = Operation(core, None, "GET", ("GET", "k"))
        op.start(T0 + i)
        verdict = op.failed(ErrorKind.CONNECTION, None, ERR, False, T0 + i)
    assert verdict == GiveUp("breaker_opened")
    assert core.breaker.state is BreakerState.OPEN
    assert ("transition", BreakerState.OPEN, "consecutive_failures") in seen.calls
    assert probes == ["probe"]
    later = Operation(core, None, "GET", ("GET", "k"))
    assert later.start(T0 + 5) == GiveUp("breaker_open", rejected=True)
    core.probe_succeeded(T0 + 6)
    assert core.state() is BreakerState.HALF_OPEN


def test_transient_replies_are_retried_but_no_evidence() -> None:
    core, _, _ = shared(breaker=BreakerPolicy(failure_threshold=1))
    op = Operation(core, None, "GET", ("GET", "k"))
    op.start(T0)
    assert op.failed(ErrorKind.TRANSIENT, "TRYAGAIN", ERR, True, T0 + 0.01) == 0.0
    assert core.breaker.state is BreakerState.CLOSED


def test_force_open_and_reset_take_the_time_in() -> None:
    core, seen, probes = shared()
    core.force_open(T0)
    assert core.breaker.state is BreakerState.OPEN
    assert probes == []  # forced open: no probe
    core.reset(T0 + 1)
    assert core.state() is BreakerState.CLOSED
    assert [c for c in seen.calls if c[0] == "transition"] == [
        ("transition", BreakerState.OPEN, "forced_open"),
        ("transition", BreakerState.CLOSED, "reset"),
    ]


def test_one_command_name_parser() -> None:
    assert command_name(("get", "k")) == "GET"
    assert command_name((b"hset", "k")) == "HSET"
    assert command_name(("CONFIG GET", "x")) == "CONFIG GET"


@pytest.mark.parametrize(
    ("args", "decode", "reply"),
    [
        (("GET", "k"), False, None),
        (("MGET", "a", "b"), False, [None, None]),
        (("HMGET", "h", "f", "g"), False, [None, None]),
        (("SMISMEMBER", "s", "a", "b"), False, [0, 0]),
        (("HGETALL", "h"), False, {}),
        (("SMEMBERS", "s"), False, set()),
        (("LRANGE", "l", 0, -1), False, []),
        (("EXISTS", "k"), False, 0),
        (("TTL", "k"), False, -2),
        (("TYPE", "k"), False, b"none"),
        (("TYPE", "k"), True, "none"),
    ],
)
def test_a_miss_answers_what_redis_answers_for_a_missing_key(
    args: tuple[Any, ...], decode: bool, reply: Any
) -> None:
    assert miss_reply(command_name(args), args, decode=decode) == reply


def test_a_lock_stand_in_is_enough() -> None:
    # The decisions need only a context manager: nothing of threading.
    core = Shared(
        retry=RetryPolicy(), breaker=BreakerPolicy(), observer=Recorder(), lock=contextlib.nullcontext()
    )
    assert core.state() is BreakerState.CLOSED
