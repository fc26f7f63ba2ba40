"""The process-wide retry budget. Pure: time is passed in; callers serialise access."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .window import RollingCounts

if TYPE_CHECKING:
    from .config import RetryPolicy


class RetryBudget:
    """Allows retries up to ``ratio`` of recent operations plus a per-second floor.

    During an outage every operation fails; without a budget each would be
    retried ``max_attempts - 1`` times and multiply the load on a Redis that is
    trying to come back. With it, retries stay a bounded fraction of traffic.
    """

    __slots__ = ("_calls", "_floor", "_ratio", "_retries", "record_operation")

    def __init__(self, *, ratio: float, min_per_second: float, window: float) -> None:
        self._ratio = ratio
        self._floor = min_per_second * window
        self._calls = RollingCounts(window)
        self._retries = RollingCounts(window)
        #: Count one operation started at ``now`` (the window's own ``add``: hot path).
        self.record_operation = self._calls.add

    @classmethod
    def of(cls, policy: RetryPolicy) -> RetryBudget:
        """The budget a retry policy asks for."""
        return cls(
            ratio=policy.budget_ratio,
            min_per_second=policy.budget_min_per_second,
            window=policy.budget_window,
        )

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; False if it is spent."""
        calls, _ = self._calls.totals(now)
        retries, _ = self._retries.totals(now)
        if retries + 1 > self._ratio * calls + self._floor:
            return False
        self._retries.add(now)
        return True
