"""Exponential backoff with full jitter. Pure."""

from __future__ import annotations


def backoff_delay(retry_number: int, *, base: float, cap: float, jitter: float) -> float:
    """Delay before retry ``retry_number`` (1 for the first retry).

    ``jitter`` is a uniform random number in [0, 1): full jitter spreads the
    retries of many clients that failed at the same instant, so they do not
    hit a recovering Redis in lockstep.
    """
    # min() before the power would still overflow for huge retry numbers; clamp the exponent.
    ceiling = min(cap, base * (2.0 ** min(retry_number - 1, 62)))
    return ceiling * jitter
