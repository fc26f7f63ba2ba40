"""Write-behind: a durable journal of writes made during an outage, replayed exactly once.

The floors, from the bottom: :mod:`.errors`, :mod:`.config`; pure rules (:mod:`.rules`: what
may be journaled, backoff, lease take-over; :mod:`.plan`: the replay protocol; :mod:`.flow`: the
replay run as steps; :mod:`.codec`: argument encoding); SQLite (:mod:`.database`, :mod:`.store`,
:mod:`.host`); the drivers (:mod:`.replay`) and :mod:`.writebehind`, which a ``Resilience`` holds;
:mod:`.view` is what operators see. Telemetry is emitted by ``_observe.writebehind`` only.
"""

from .config import WriteBehindConfig
from .errors import JournalCorruptError, JournalError, JournalFullError, WriteBehindError
from .plan import LeaseLostError, ReplayProtocolError, ReplayStalledError
from .rules import WRITE_BEHIND_COMMANDS
from .view import DeadLetter, WriteBehindJournal
from .writebehind import Journaled, WriteBehind

__all__ = [
    "WRITE_BEHIND_COMMANDS",
    "DeadLetter",
    "JournalCorruptError",
    "JournalError",
    "JournalFullError",
    "Journaled",
    "LeaseLostError",
    "ReplayProtocolError",
    "ReplayStalledError",
    "WriteBehind",
    "WriteBehindConfig",
    "WriteBehindError",
    "WriteBehindJournal",
]
