"""The cluster decisions with fake time: node registry, refresh gate, redirects. No Redis, no clock."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from otel_redis_resilience import BreakerPolicy, BreakerState, RedisUnavailable, RetryPolicy
from otel_redis_resilience._decide.breaker import Transition
from otel_redis_resilience._decide.errors import ErrorKind
from otel_redis_resilience._decide.operation import GiveUp, Operation
from otel_redis_resilience._decide.shared import Shared
from otel_redis_resilience._decide.topology import (
    REFRESH_FLOOR,
    NodeRegistry,
    RefreshGate,
    redirected,
    retarget,
    worst,
)


class Recorder:
    def __init__(self) -> None:
        self.finished: list[str] = []
        self.moved: list[Transition] = []

    def on_start(self, op: Operation) -> None:
        pass

    def on_retry(self, op: Operation, delay: float, error: BaseException) -> None:
        pass

    def on_rejected(self, op: Operation, reason: str) -> None:
        pass

    def on_finish(self, op: Operation, outcome: Any, error: BaseException | None, now: float) -> None:
        self.finished.append(outcome)

    def on_transitions(self, moved: Any) -> None:
        self.moved.extend(moved)


class Spy:
    """A retry budget that fails the test if anything spends from it."""

    def record_operation(self, now: float) -> None:
        pass

    def try_spend(self, now: float) -> bool:
        pytest.fail("a redirect spent retry budget")


def shared(**breaker: Any) -> Shared:
    return Shared(
        retry=RetryPolicy(),
        breaker=BreakerPolicy(**breaker),
        observer=Recorder(),
        lock=contextlib.nullcontext(),
    )


# -- registry ----------------------------------------------------------------------


def test_registry_makes_one_state_per_node_and_reuses_it() -> None:
    made: list[str] = []
    reg: NodeRegistry[object] = NodeRegistry(lambda n: made.append(n) or object(), contextlib.nullcontext())
    a = reg.get("10.0.0.1:7000")
    assert reg.get("10.0.0.1:7000") is a
    assert made == ["10.0.0.1:7000"]
    assert reg.find("10.0.0.2:7000") is None


def test_registry_sync_adds_new_owners_and_drops_former_ones() -> None:
    reg: NodeRegistry[object] = NodeRegistry(lambda n: object(), contextlib.nullcontext())
    old = reg.get("a:1")
    reg.get("b:1")
    added, dropped = reg.sync(["b:1", "c:1"])
    assert added == ["c:1"]
    assert dropped == ["a:1"]
    assert set(reg.snapshot()) == {"b:1", "c:1"}
    # A node that owns slots again starts afresh: a new primary's breaker starts closed.
    reg.sync(["a:1", "b:1", "c:1"])
    assert reg.find("a:1") is not old


# -- refresh gate ------------------------------------------------------------------


def test_refresh_is_single_flight() -> None:
    gate = RefreshGate(contextlib.nullcontext())
    assert gate.claim(10.0)
    assert not gate.claim(10.0 + 5 * REFRESH_FLOOR)  # one running: nobody else starts one
    gate.finished(True)
    assert gate.claim(10.0 + 5 * REFRESH_FLOOR)


def test_refresh_never_more_often_than_the_floor() -> None:
    gate = RefreshGate(contextlib.nullcontext(), floor=0.05)
    assert gate.claim(1.0)
    gate.finished(False)
    assert not gate.claim(1.049)
    assert gate.claim(1.05)
    gate.finished(True)
    assert (gate.started, gate.failed) == (2, 1)


def test_the_floor_keeps_failover_pickup_under_100ms() -> None:
    assert 0 < REFRESH_FLOOR <= 0.05


# -- redirects and retargets ---------------------------------------------------------


def test_a_redirect_is_not_an_attempt_and_spends_no_budget() -> None:
    a, b = shared(), shared()
    op = Operation(a, None, "GET", ("GET", "k"))
    assert not isinstance(op.start(0.0), GiveUp)
    b.budget = a.budget = Spy()  # type: ignore[assignment]
    timeout = redirected(op, b, 0.001)
    assert not isinstance(timeout, GiveUp)
    assert op.attempts == 1
    assert op.core is b
    op.succeeded(0.002)
    assert a.breaker.state is BreakerState.CLOSED
    assert b.breaker.state is BreakerState.CLOSED


def test_a_redirect_to_a_node_with_an_open_breaker_is_rejected() -> None:
    a, b = shared(), shared()
    b.force_open(0.0)
    op = Operation(a, None, "GET", ("GET", "k"))
    op.start(0.0)
    verdict = redirected(op, b, 0.001)
    assert isinstance(verdict, GiveUp)
    assert verdict.reason == "breaker_open"


def test_a_redirect_holds_the_deadline() -> None:
    class Scope:
        deadline_at = 0.01
        operations = failures = rejections = fallbacks = 0
        summary_span = None
        degraded = False

    a, b = shared(), shared()
    op = Operation(a, Scope(), "GET", ("GET", "k"))
    op.start(0.0)
    verdict = redirected(op, b, 0.0095)
    assert isinstance(verdict, GiveUp)
    assert verdict.reason == "deadline_exceeded"


def test_an_unsafe_write_is_not_resent_to_the_new_primary() -> None:
    """INCR sent to the old primary, no reply: the retarget keeps 'may have applied'."""
    old = shared(failure_threshold=100)
    op = Operation(old, None, "INCR", ("INCR", "n"))
    op.start(0.0)
    verdict = op.failed(ErrorKind.CONNECTION, None, ConnectionError(), True, 0.01)
    assert isinstance(verdict, GiveUp)
    assert verdict.reason == "unsafe_to_retry"
    assert verdict.outcome_unknown


def test_a_stable_write_follows_the_failover() -> None:
    old, new = shared(failure_threshold=100), shared()
    op = Operation(old, None, "SET", ("SET", "k", "v"))
    op.start(0.0)
    delay = op.failed(ErrorKind.CONNECTION, None, ConnectionError(), True, 0.01)
    assert not isinstance(delay, GiveUp)
    retarget(op, new)
    assert not isinstance(op.next_attempt(0.02), GiveUp)
    assert op.core is new
    assert op.attempts == 2
    assert op.maybe_applied


def test_clusterdown_is_no_evidence_against_the_node() -> None:
    node = shared(failure_threshold=1)
    for i in range(5):
        op = Operation(node, None, "GET", ("GET", "k"))
        op.start(float(i))
        op.failed(ErrorKind.TRANSIENT, "CLUSTERDOWN", Exception(), True, float(i))
    assert node.breaker.state is BreakerState.CLOSED


def test_worst_state() -> None:
    assert worst([]) is BreakerState.CLOSED
    assert worst([BreakerState.CLOSED, BreakerState.HALF_OPEN]) is BreakerState.HALF_OPEN
    assert worst([BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]) is BreakerState.OPEN


# -- the error's node ------------------------------------------------------------------


def test_redis_unavailable_names_its_node_and_pickles() -> None:
    import pickle

    err = RedisUnavailable("breaker_open", operation="GET", node="127.0.0.1:7000")
    assert err.node == "127.0.0.1:7000"
    assert err.nodes == ("127.0.0.1:7000",)
    assert "127.0.0.1:7000" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert (back.node, back.nodes, str(back)) == (err.node, err.nodes, str(err))
    many = RedisUnavailable("retries_exhausted", nodes=("a:1", "b:2"))
    assert many.node == "a:1"
    assert "a:1, b:2" in str(many)
    single = RedisUnavailable("breaker_open", operation="GET")
    assert single.node is None
    assert single.nodes == ()
    assert str(single).endswith("after 0 attempts")
