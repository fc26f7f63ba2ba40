"""Property-based tests of the pure breaker state machine, with injected time."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from otel_redis_resilience import BreakerPolicy, BreakerState
from otel_redis_resilience._decide.breaker import REJECTED, BreakerMachine
from otel_redis_resilience._decide.budget import RetryBudget

POLICY = BreakerPolicy(
    failure_threshold=3,
    failure_rate_threshold=0.5,
    minimum_calls=6,
    window=10.0,
    reset_timeout=5.0,
    half_open_max_calls=2,
    slow_call_threshold=1.0,
)


class BreakerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = BreakerMachine(POLICY)
        self.now = 1000.0
        self.permits: list[int] = []
        self.consecutive = 0
        self.chain: list[BreakerState] = [BreakerState.CLOSED]
        self.forced = False
        self.opened_at: float | None = None

    def _sync_transitions(self) -> None:
        for t in self.m.transitions:
            assert t.previous is self.chain[-1], "transitions must chain"
            assert t.new is not t.previous
            self.chain.append(t.new)
            if t.new is BreakerState.OPEN:
                self.opened_at = t.at
            self.consecutive = 0
        self.m.transitions.clear()

    @rule(dt=st.floats(min_value=0.0, max_value=8.0))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def acquire(self) -> None:
        before = self.m.state
        permit = self.m.acquire(self.now)
        self._sync_transitions()
        if before is BreakerState.CLOSED:
            assert permit != REJECTED, "a closed breaker lets every call through"
        if (
            before is BreakerState.OPEN
            and self.opened_at is not None
            and (self.forced or self.now - self.opened_at < POLICY.reset_timeout)
        ):
            assert permit == REJECTED, "open and not yet timed out: rejected"
        if permit != REJECTED:
            self.permits.append(permit)

    @precondition(lambda self: self.permits)
    @rule(i=st.integers(min_value=0), slow=st.booleans())
    def succeed(self, i: int, slow: bool) -> None:
        permit = self.permits.pop(i % len(self.permits))
        self.m.on_success(permit, self.now, 2.0 if slow else 0.01)
        self._sync_transitions()

    @precondition(lambda self: self.permits)
    @rule(i=st.integers(min_value=0))
    def fail(self, i: int) -> None:
        permit = self.permits.pop(i % len(self.permits))
        was = self.m.state
        current = permit >> 1 == self.m._generation
        self.m.on_failure(permit, self.now)
        self._sync_transitions()
        if current and was is BreakerState.HALF_OPEN and permit & 1:
            assert self.m.state is BreakerState.OPEN, "a failed trial call re-opens"
        if not current:
            assert self.m.state is was, "a stale result never moves the breaker"

    @precondition(lambda self: self.permits)
    @rule(i=st.integers(min_value=0))
    def release(self, i: int) -> None:
        permit = self.permits.pop(i % len(self.permits))
        was = self.m.state
        self.m.on_release(permit)
        self._sync_transitions()
        assert self.m.state is was

    @rule()
    def probe_success(self) -> None:
        was = self.m.state
        self.m.on_probe_success(self.now)
        self._sync_transitions()
        if was is BreakerState.OPEN and not self.forced:
            assert self.m.state is BreakerState.HALF_OPEN
        elif was is not BreakerState.OPEN:
            assert self.m.state is was

    @rule()
    def force_open(self) -> None:
        self.m.force_open(self.now)
        self._sync_transitions()
        self.forced = True
        assert self.m.state is BreakerState.OPEN

    @rule()
    def reset(self) -> None:
        self.m.reset(self.now)
        self._sync_transitions()
        self.forced = False
        assert self.m.state is BreakerState.CLOSED

    @invariant()
    def trial_slots_bounded(self) -> None:
        assert 0 <= self.m._trial_in_flight <= POLICY.half_open_max_calls
        if self.m.state is not BreakerState.HALF_OPEN:
            assert self.m._trial_in_flight == 0

    @invariant()
    def state_matches_chain(self) -> None:
        assert self.m.state is self.chain[-1]


TestBreakerModel = BreakerModel.TestCase
TestBreakerModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


def test_consecutive_failures_open_exactly_at_threshold() -> None:
    m = BreakerMachine(POLICY)
    for i in range(POLICY.failure_threshold):
        assert m.state is BreakerState.CLOSED, i
        m.on_failure(m.acquire(0.0), 0.0)
    assert m.state is BreakerState.OPEN
    assert m.transitions[-1].reason == "consecutive_failures"


def test_failure_rate_opens_after_minimum_calls() -> None:
    m = BreakerMachine(POLICY)
    t = 0.0
    for _ in range(3):  # success, failure alternating: 50% failures, never 3 in a row
        m.on_success(m.acquire(t), t, 0.01)
        assert m.state is BreakerState.CLOSED
        m.on_failure(m.acquire(t), t)
        t += 0.1
    assert m.state is BreakerState.OPEN
    assert m.transitions[-1].reason == "failure_rate"


def test_half_open_closes_after_enough_trials_and_rejects_extra() -> None:
    m = BreakerMachine(POLICY)
    m.force_open(0.0)
    m.reset(0.0)
    for _ in range(3):
        m.on_failure(m.acquire(0.0), 0.0)
    assert m.acquire(4.9) == REJECTED
    p1, p2 = m.acquire(5.0), m.acquire(5.0)
    assert m.state is BreakerState.HALF_OPEN
    assert m.acquire(5.0) == REJECTED  # only half_open_max_calls at once
    m.on_success(p1, 5.0, 0.01)
    m.on_success(p2, 5.0, 0.01)
    assert m.state is BreakerState.CLOSED


def test_window_forgets_old_failures() -> None:
    m = BreakerMachine(POLICY)
    m.on_failure(m.acquire(0.0), 0.0)
    m.on_failure(m.acquire(0.0), 0.0)
    m.on_success(m.acquire(0.0), 0.0, 0.0)  # resets the consecutive count
    for i in range(2):
        m.on_failure(m.acquire(100.0 + i), 100.0 + i)
    assert m.state is BreakerState.CLOSED


def test_retry_budget_ratio_and_floor() -> None:
    b = RetryBudget(ratio=0.1, min_per_second=1.0, window=10.0)
    for _ in range(100):
        b.record_operation(0.0)
    allowed = sum(b.try_spend(0.0) for _ in range(100))
    assert allowed == 20  # 10% of 100 calls + 1/s x 10 s
    # Once the window has passed, history is forgotten and the floor returns.
    assert sum(b.try_spend(30.0) for _ in range(100)) == 10
