"""The testing switch the decisions read: no backoff sleeps. Pure (a module flag)."""

from __future__ import annotations

_testing = False


def set_testing(testing: bool) -> None:
    """Turn testing mode on or off.

    In testing mode retries still happen (so tests see the real number of
    attempts) but backoff sleeps are skipped, keeping test suites fast.
    """
    global _testing
    _testing = bool(testing)


def is_testing() -> bool:
    """Whether testing mode is on."""
    return _testing
