"""The circuit breaker state machine. Pure: no I/O, no clock, no locks.

Callers pass the current time in and serialise access (``Resilience`` holds a
lock only around these method calls, never across Redis I/O).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .config import BreakerPolicy
from .window import RollingCounts


class BreakerState(enum.Enum):
    """The state of a circuit breaker."""

    #: Calls flow; failures are counted.
    CLOSED = "closed"
    #: Calls are rejected at once, without touching the network.
    OPEN = "open"
    #: A few trial calls are let through to see whether Redis is back.
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of breaker state, and why it happened."""

    previous: BreakerState
    new: BreakerState
    reason: str
    at: float


#: Returned by :meth:`BreakerMachine.acquire` when the call must be rejected.
REJECTED = -1


class BreakerMachine:
    """Decides, per attempt, whether it may run, and updates state from its result.

    A permit is an int: ``generation << 1 | is_trial``. The generation changes
    with every transition, so a result that arrives after the state moved on
    (a slow call started while closed that fails after the breaker opened) is
    ignored instead of being counted against the new state.
    """

    __slots__ = (
        "_consecutive",
        "_forced",
        "_generation",
        "_opened_at",
        "_policy",
        "_probe_running",
        "_trial_in_flight",
        "_trial_successes",
        "_window",
        "state",
        "transitions",
    )

    def __init__(self, policy: BreakerPolicy) -> None:
        self._policy = policy
        self.state = BreakerState.CLOSED
        self._generation = 0
        self._consecutive = 0
        self._window = RollingCounts(policy.window)
        self._opened_at = 0.0
        self._forced = False
        self._trial_in_flight = 0
        self._trial_successes = 0
        self._probe_running = False
        #: Transitions not yet reported; the caller drains it after each call.
        self.transitions: list[Transition] = []

    # -- state changes -----------------------------------------------------

    def _move(self, new: BreakerState, reason: str, now: float) -> None:
        self.transitions.append(Transition(self.state, new, reason, now))
        self.state = new
        self._generation += 1
        self._consecutive = 0
        self._trial_in_flight = 0
        self._trial_successes = 0
        if new is BreakerState.OPEN:
            self._opened_at = now
        else:
            self._forced = False
        if new is BreakerState.CLOSED:
            # A fresh start: failures from before the outage must not re-open it.
            self._window.clear()

    # -- per attempt ---------------------------------------------------------

    def acquire(self, now: float) -> int:
        """A permit for one attempt, or :data:`REJECTED`."""
        state = self.state
        if state is BreakerState.CLOSED:
            return self._generation << 1
        if state is BreakerState.OPEN:
            if self._forced or now - self._opened_at < self._policy.reset_timeout:
                return REJECTED
            self._move(BreakerState.HALF_OPEN, "reset_timeout", now)
        if self._trial_in_flight >= self._policy.half_open_max_calls:
            return REJECTED
        self._trial_in_flight += 1
        return self._generation << 1 | 1

    def on_success(self, permit: int, now: float, duration: float) -> None:
        """Record a successful attempt (a reply came back)."""
        if permit >> 1 != self._generation:
            return
        slow = self._policy.slow_call_threshold
        if slow is not None and duration >= slow:
            self._failed(permit, now, "slow_calls")
            return
        if permit & 1:
            self._trial_in_flight -= 1
            self._trial_successes += 1
            if self._trial_successes >= self._policy.half_open_max_calls:
                self._move(BreakerState.CLOSED, "trial_calls_succeeded", now)
            return
        self._consecutive = 0
        self._window.add(now)

    def on_failure(self, permit: int, now: float) -> None:
        """Record a failed attempt (Redis unavailable, not a caller error)."""
        if permit >> 1 != self._generation:
            return
        self._failed(permit, now, "consecutive_failures")

    def on_release(self, permit: int) -> None:
        """The attempt ended with neither verdict (a caller error, a cancellation)."""
        if permit >> 1 == self._generation and permit & 1:
            self._trial_in_flight -= 1

    def _failed(self, permit: int, now: float, reason: str) -> None:
        if permit & 1:
            self._move(BreakerState.OPEN, "trial_call_failed", now)
            return
        self._consecutive += 1
        self._window.add(now, failed=True)
        policy = self._policy
        if self._consecutive >= policy.failure_threshold:
            self._move(BreakerState.OPEN, reason, now)
            return
        total, failed = self._window.totals(now)
        if total >= policy.minimum_calls and failed >= policy.failure_rate_threshold * total:
            self._move(BreakerState.OPEN, "failure_rate", now)

    # -- background probe ---------------------------------------------------

    def probe_due(self) -> bool:
        """Whether a background probe should be started now (claims it if so)."""
        if (
            self.state is BreakerState.OPEN
            and not self._forced
            and not self._probe_running
            and self._policy.probe_interval is not None
        ):
            self._probe_running = True
            return True
        return False

    def probe_wanted(self) -> bool:
        """Whether a running probe loop should keep going."""
        return self.state is BreakerState.OPEN and not self._forced

    def probe_finished(self) -> None:
        """The probe loop has exited."""
        self._probe_running = False

    def on_probe_success(self, now: float) -> None:
        """Redis answered a health probe: let trial calls through at once."""
        if self.state is BreakerState.OPEN and not self._forced:
            self._move(BreakerState.HALF_OPEN, "probe_succeeded", now)

    # -- operators ----------------------------------------------------------

    def force_open(self, now: float) -> None:
        """Open and stay open (no probes, no half-open) until :meth:`reset`."""
        if self.state is not BreakerState.OPEN:
            self._move(BreakerState.OPEN, "forced_open", now)
        self._forced = True

    def reset(self, now: float) -> None:
        """Close, forgetting all history."""
        if self.state is not BreakerState.CLOSED:
            self._move(BreakerState.CLOSED, "reset", now)
        self._consecutive = 0
        self._window.clear()

    def after_fork(self) -> None:
        """The probe thread did not survive ``fork()``; let the child start its own."""
        self._probe_running = False
