"""The one configuration of write-behind: :class:`WriteBehindConfig`, validated at construction."""

from __future__ import annotations

import math
import os
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Final, Literal

from .._errors import ConfigurationError

__all__ = ["DATABASE_FILENAME", "FsyncPolicy", "WriteBehindConfig"]

FsyncPolicy = Literal["always", "normal", "off"]

#: Name of the SQLite file inside :attr:`WriteBehindConfig.directory`.
DATABASE_FILENAME: Final = "journal.sqlite3"

#: The fsync policies and the ``PRAGMA synchronous`` each one maps to (see the store's docstring).
SYNCHRONOUS: Final[dict[str, str]] = {"always": "FULL", "normal": "NORMAL", "off": "OFF"}
_MIB: Final = 1024 * 1024
_NAME: Final = "WriteBehindConfig"


def _finite(value: object) -> float | None:
    """``value`` as a finite float, or None if it is not a real number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True)
class WriteBehindConfig:
    """Where and how the write-behind journal is stored. Every field is validated at construction.

    Args:
        directory: private directory holding the database; created with mode 0700 if missing.
            Processes that should share (and adopt) a journal use the same directory.
        max_entries: bound on entries held (pending plus dead-lettered).
        max_bytes: bound on bytes of keys and arguments held (pending plus dead-lettered).
        fsync: durability policy: ``"always"`` (``synchronous=FULL``: survives SIGKILL and power
            loss), ``"normal"`` (survives a process crash; an OS crash may lose the last
            writes), ``"off"`` (for tests).
        marker_prefix: prefix of the replay marker keys ``{prefix}:{journal_uuid}:{entry_id}``.
        marker_ttl: seconds a replay marker lives in Redis. It must exceed the longest time an
            applied entry can stay unacknowledged (normally milliseconds; a crash between apply
            and acknowledgement extends it until the next replay).
        lease_seconds: how long the replay lease lasts without renewal; a crashed replayer's
            lease lets another process take over after this long.
        busy_timeout: seconds to wait for another process's write transaction before failing.
    """

    directory: str | os.PathLike[str]
    _: KW_ONLY
    max_entries: int = 100_000
    max_bytes: int = 64 * _MIB
    fsync: FsyncPolicy = "always"
    marker_prefix: str = "orr:wb"
    marker_ttl: float = 7 * 86400.0
    lease_seconds: float = 10.0
    busy_timeout: float = 5.0

    def __post_init__(self) -> None:
        directory: object = self.directory
        if not isinstance(directory, str | os.PathLike):
            raise ConfigurationError(f"{_NAME}.directory must be a str or os.PathLike, got {directory!r}")
        path = os.fspath(directory)
        if not isinstance(path, str) or not path:
            raise ConfigurationError(f"{_NAME}.directory must be a non-empty text path, got {directory!r}")
        for name in ("max_entries", "max_bytes"):
            value: object = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{_NAME}.{name} must be an int >= 1, got {value!r}")
        fsync: object = self.fsync
        if fsync not in SYNCHRONOUS:
            raise ConfigurationError(f"{_NAME}.fsync must be one of 'always', 'normal', 'off', got {fsync!r}")
        prefix: object = self.marker_prefix
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(f"{_NAME}.marker_prefix must be a non-empty str, got {prefix!r}")
        ttl = _finite(self.marker_ttl)
        # Below one second the marker could expire before the batch that set it is acknowledged.
        if ttl is None or ttl < 1:
            raise ConfigurationError(
                f"{_NAME}.marker_ttl must be a finite number of seconds >= 1, got {self.marker_ttl!r}"
            )
        lease = _finite(self.lease_seconds)
        if lease is None or lease <= 0:
            raise ConfigurationError(
                f"{_NAME}.lease_seconds must be a finite number > 0, got {self.lease_seconds!r}"
            )
        busy = _finite(self.busy_timeout)
        if busy is None or busy < 0:
            raise ConfigurationError(
                f"{_NAME}.busy_timeout must be a finite number >= 0, got {self.busy_timeout!r}"
            )

    @property
    def database_path(self) -> Path:
        """The SQLite file inside :attr:`directory`."""
        return Path(os.fspath(self.directory)) / DATABASE_FILENAME
