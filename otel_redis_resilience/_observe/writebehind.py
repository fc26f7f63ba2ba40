"""Write-behind's telemetry, the only place it is emitted from.

Metrics, the replay span and log lines of the write-behind journal leave from here, through the
``Telemetry`` object's instruments, tracer and rate-limited log; ``_writebehind`` only calls
these methods and emits nothing itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import telemetry as _telemetry

if TYPE_CHECKING:
    from .._scope import RequestScope
    from .._writebehind.flow import ReplayTotals

__all__ = ["WriteBehindEmitter"]


class WriteBehindEmitter:
    """What one write-behind journal reports, emitted on its ``Resilience``'s telemetry."""

    __slots__ = ("_telemetry",)

    def __init__(self, telemetry: _telemetry.Telemetry) -> None:
        self._telemetry = telemetry

    def watch(self, source: Any) -> None:
        """Report ``source.journal.pending_count()`` on the queue-size gauge while it lives."""
        self._telemetry.instruments.writebehind_sources.add(source)

    def journaled(self, operation: str, reason: str, scope: RequestScope | None) -> None:
        """A write was journaled instead of applied now (a fallback of kind ``write_behind``)."""
        self._telemetry.journaled(operation, reason, scope)

    def journal_full(self) -> None:
        """A write was refused: the journal is at its bound (``JournalFullError``)."""
        tel = self._telemetry
        tel.instruments.writebehind_rejected.add(1, {"reason": "journal_full", **tel.server_attrs})

    def journal_failed(self, error: BaseException) -> None:
        """A write was refused: the journal could not take it (disk full, I/O error...)."""
        tel = self._telemetry
        tel.instruments.writebehind_rejected.add(1, {"reason": "journal_failed", **tel.server_attrs})
        # Looked up at call time: tests swap the rate limiter for a fresh one.
        _telemetry._ratelimited(
            f"journal:{tel.endpoint}",
            logging.ERROR,
            "Redis %s write-behind journal failed (%s); writes that cannot reach Redis are refused",
            tel.endpoint,
            error,
        )

    def run_ended(self, totals: ReplayTotals | None, started_ns: int, failure: BaseException | None) -> None:
        """A replay run ended; ``totals`` is None when it raised ``failure`` instead."""
        tel = self._telemetry
        if totals is not None and (totals.applied or totals.duplicates):
            # Counted also when the run then failed: a batch can be partly applied.
            tel.instruments.writebehind_replayed.add(totals.applied + totals.duplicates, tel.server_attrs)
        # A run that found another process holding the lease did nothing: no span.
        if totals is None or totals.lease_acquired:
            tel.replayed(totals, started_ns, failure)
