"""The journal as operators see it: what is pending, how old, what could not be applied.

``Resilience.write_behind_journal`` returns a :class:`WriteBehindJournal`. It only reads, and
has nothing of the store's machinery (no lease, no acknowledgement, no raw SQL).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .codec import error_code_of
from .store import Journal

__all__ = ["DeadLetter", "WriteBehindJournal"]

_POLL = 0.05


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A journaled write Redis rejected with an error reply (``WRONGTYPE``...), kept for inspection.

    Its repr shows the id, the error code and the times only: the key, the command and Redis's
    error text may hold application data, so they are read as attributes, never printed by a
    stray log of the object.

    Attributes:
        id: the journal entry id.
        error_code: the Redis error code (``"WRONGTYPE"``; ``""`` if the reply had none).
        created_at: wall-clock time the write was journaled.
        failed_at: wall-clock time Redis rejected it.
        key: the key written.
        args: the full command as sent (bytes).
        error: Redis's error text.
    """

    id: int
    error_code: str
    created_at: float
    failed_at: float
    key: bytes = field(repr=False)
    args: tuple[bytes, ...] = field(repr=False)
    error: str = field(repr=False)


class WriteBehindJournal:
    """The write-behind journal, for operators: pending count, oldest entry age, dead letters.

    Counts cover every process sharing the journal's directory.
    """

    __slots__ = ("_store",)

    def __init__(self, store: Journal) -> None:
        self._store = store

    def pending_count(self) -> int:
        """Entries waiting to be replayed (dead letters excluded)."""
        return self._store.pending_count()

    def oldest_entry_age(self) -> float | None:
        """Seconds since the oldest pending entry was journaled; None if nothing is pending."""
        created = self._store.oldest_created_at()
        return None if created is None else max(0.0, time.time() - created)

    def dead_entries(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first."""
        return [
            DeadLetter(d.id, error_code_of(d.error), d.created_at, d.failed_at, d.key, d.args, d.error)
            for d in self._store.dead_entries(limit)
        ]

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Block until no entry is pending (dead letters excluded); False if ``timeout`` passed first.

        It only watches: the replayer drains the journal (ask it with ``res.replay_now()``;
        it runs once the breaker is not open). Entries written meanwhile, by any process
        sharing the journal, must drain too. From asyncio code, run it in a thread
        (``await asyncio.to_thread(journal.wait_drained, 30)``): it sleeps between looks.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while self._store.pending_count():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(_POLL if left is None else min(_POLL, left))
        return True

    def __repr__(self) -> str:
        return f"<WriteBehindJournal {self._store.path}>"
