"""A rolling window of (total, failed) counts in fixed time buckets. Pure: time is passed in."""

from __future__ import annotations

_BUCKETS = 10


class RollingCounts:
    """Counts events over the last ``window`` seconds, in ten buckets.

    Old buckets are zeroed lazily when time moves past them, so recording is
    O(1) and never allocates.
    """

    __slots__ = ("_failed", "_last_index", "_total", "_width")

    def __init__(self, window: float) -> None:
        self._width = window / _BUCKETS
        self._total = [0] * _BUCKETS
        self._failed = [0] * _BUCKETS
        self._last_index: int | None = None

    def _advance(self, now: float) -> int:
        index = int(now // self._width)
        last = self._last_index
        if last is None or index - last >= _BUCKETS:
            if last is not None:
                for i in range(_BUCKETS):
                    self._total[i] = 0
                    self._failed[i] = 0
        elif index > last:
            for i in range(last + 1, index + 1):
                slot = i % _BUCKETS
                self._total[slot] = 0
                self._failed[slot] = 0
        if last is None or index > last:
            self._last_index = index
        return self._last_index % _BUCKETS  # type: ignore[operator]

    def add(self, now: float, *, failed: bool = False, count: int = 1) -> None:
        last = self._last_index
        # Fast path: still in the current bucket (nearly every call under load).
        slot = last % _BUCKETS if last is not None and int(now // self._width) == last else self._advance(now)
        self._total[slot] += count
        if failed:
            self._failed[slot] += count

    def totals(self, now: float) -> tuple[int, int]:
        """Return ``(total, failed)`` over the window ending at ``now``."""
        self._advance(now)
        return sum(self._total), sum(self._failed)

    def clear(self) -> None:
        for i in range(_BUCKETS):
            self._total[i] = 0
            self._failed[i] = 0
