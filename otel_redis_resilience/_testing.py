"""A switch for test suites: no backoff sleeps (kept on the decision floor, which reads it)."""

from __future__ import annotations

from ._decide.testing import is_testing, set_testing

__all__ = ["is_testing", "set_testing"]
