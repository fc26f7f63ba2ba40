"""The exceptions of write-behind. Pure: raised by the rules, the store and the replayer alike."""

from __future__ import annotations

import os
from typing import Literal

__all__ = ["JournalCorruptError", "JournalError", "JournalFullError", "WriteBehindError"]


class WriteBehindError(RuntimeError):
    """The write cannot be written behind (a multi-key or unsupported command)."""

    # Tracebacks and error.type name the public path, which is where callers import it from.
    __module__ = "otel_redis_resilience"


class JournalError(Exception):
    """Base class of every error raised by the write-behind journal."""

    __module__ = "otel_redis_resilience"


class JournalFullError(JournalError):
    """The journal reached a configured bound; the new write was rejected and nothing was dropped.

    Attributes:
        limit: which bound was hit, ``"max_entries"`` or ``"max_bytes"``.
        limit_value: the configured value of that bound.
        current: entries (or bytes) held when the write was rejected, dead letters included.
        requested: entries (1) or bytes the rejected write needed.
    """

    __module__ = "otel_redis_resilience"

    def __init__(
        self, *, limit: Literal["max_entries", "max_bytes"], limit_value: int, current: int, requested: int
    ) -> None:
        self.limit: Literal["max_entries", "max_bytes"] = limit
        self.limit_value = limit_value
        self.current = current
        self.requested = requested
        unit = "entries" if limit == "max_entries" else "bytes"
        super().__init__(
            f"write-behind journal is full: {current} {unit} held (pending + dead-lettered), "
            f"a new write needs {requested} more, {limit}={limit_value}; "
            "the write was not journaled and nothing already journaled was dropped"
        )


class JournalCorruptError(JournalError):
    """The journal file is corrupt, unreadable or not a journal; it was left untouched.

    Attributes:
        path: the database file.
        reason: what is wrong with it.
    """

    __module__ = "otel_redis_resilience"

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(
            f"write-behind journal {self.path!s} is corrupt or unreadable: {reason} "
            "(the file was left untouched; move it aside to start a new journal, "
            "its pending writes would then not be replayed)"
        )
