"""The replay protocol's rules, pure: the Lua step, the plan of a batch and what its replies prove.

Every journaled entry is applied by one Lua script together with a marker key
``{prefix}:{journal_uuid}:{entry_id}``, atomically on the server: if the marker already exists the
entry was applied before (by us before a crash, or by another replayer) and is skipped. The
journal entry is deleted (acknowledged) only after Redis confirmed it, so replay can be
interrupted anywhere and re-run without losing an entry or applying one twice.

Order per key: entries are sent oldest first in one pipeline per batch. A pipeline is not a
transaction, so if one entry is not applied (a transient server error) a later entry of the same
key in the same batch must not overtake it; the script therefore also receives the marker of the
key's previous entry in the batch and refuses to run until that marker exists.

Errors reach these rules already sorted by the I/O side (:class:`ErrorResult`); nothing here
imports redis-py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, TypeAlias

__all__ = [
    "REPLAY_SCRIPT",
    "REPLAY_SCRIPT_SHA",
    "BatchOutcome",
    "Command",
    "Entry",
    "ErrorResult",
    "LeaseLostError",
    "ReplayProtocolError",
    "ReplayStalledError",
    "interpret",
    "marker_key",
    "plan_batch",
]

#: The replay step. KEYS[1] is the entry's marker; KEYS[2], if present, the marker of the
#: previous entry of the same key in this batch. ARGV[1] is the marker TTL in milliseconds,
#: ARGV[2..] the journaled command. Replies: {1, reply} applied, {0} already applied (duplicate),
#: {2, error} the command failed (nothing applied, marker removed), {3} not run because the
#: previous entry of the key was not applied.
#: The marker is SET before the command so that, under maxmemory, the only write that can be
#: refused for OOM is the marker, before any effect; once a script has written, Redis lets it
#: finish. pcall keeps a failing command from leaving a marker behind.
REPLAY_SCRIPT: Final = """\
if #KEYS > 1 and redis.call('EXISTS', KEYS[2]) == 0 then
  return {3}
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return {0}
end
local reply = redis.pcall(unpack(ARGV, 2))
if type(reply) == 'table' and reply.err then
  redis.call('DEL', KEYS[1])
  return {2, reply.err}
end
return {1, reply}
"""
#: SHA1 of :data:`REPLAY_SCRIPT`, as ``SCRIPT LOAD`` returns it.
REPLAY_SCRIPT_SHA: Final = hashlib.sha1(REPLAY_SCRIPT.encode("utf-8")).hexdigest()

_APPLIED: Final = 1
_DUPLICATE: Final = 0
_FAILED: Final = 2
_BLOCKED: Final = 3

# Error codes that say "not now" rather than "this command is wrong": the entry stays pending and
# replay stops. NOPERM/NOAUTH/WRONGPASS are configuration problems an operator fixes; dead-letter
# every entry because of them would be worse than waiting.
TRANSIENT_CODES: Final = frozenset(
    {
        "OOM", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "MISCONF", "TRYAGAIN", "CLUSTERDOWN",
        "NOREPLICAS", "NOPERM", "NOAUTH", "WRONGPASS", "MOVED", "ASK", "NOSCRIPT",
    }
)  # fmt: skip

#: One planned Redis command: the EVALSHA (or EVAL) arguments of one journal entry.
Command: TypeAlias = tuple[bytes | str | int, ...]


class ReplayProtocolError(Exception):
    """Redis answered the replay script with something it can never return (e.g. a proxy in between)."""

    # error.type (on the replay span) names the package, not a private module path.
    __module__ = "otel_redis_resilience"


class ReplayStalledError(Exception):
    """A batch made no progress without a Redis error (e.g. the script keeps disappearing)."""

    __module__ = "otel_redis_resilience"


class LeaseLostError(Exception):
    """Another process took the replay lease over (ours expired); this run stopped replaying."""

    __module__ = "otel_redis_resilience"


class Entry(Protocol):
    """What the plan reads of a journal entry (the store's ``JournalEntry`` is one)."""

    @property
    def id(self) -> int: ...
    @property
    def key(self) -> bytes: ...
    @property
    def args(self) -> tuple[bytes, ...]: ...


@dataclass(frozen=True, slots=True)
class ErrorResult:
    """A pipeline result that is an error, sorted by the I/O side.

    ``kind``: ``noscript`` (the script is not cached), ``io`` (connection or timeout),
    ``reply`` (an error reply, its ``code`` and full ``text``), ``other``. ``error`` is the
    original exception, handed back untouched in :attr:`BatchOutcome.error`.
    """

    kind: Literal["noscript", "io", "reply", "other"]
    error: BaseException
    code: str = ""
    text: str = ""


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What happened to one batch of journal entries.

    Attributes:
        applied: ids applied now (acknowledged in the journal).
        duplicates: ids whose marker already existed: applied before, acknowledged now.
        dead: ``(id, error)`` of entries Redis rejected with an error reply; dead-lettered.
        deferred: ids not applied and still pending (transient error, missing script, blocked
            behind an earlier entry of the same key, or not reached).
        script_missing: Redis answered NOSCRIPT for at least one entry.
        stop: replay must stop now (connection, timeout or transient server error); see ``error``.
        error: the error behind ``stop``.
        slowest: seconds of the batch's slowest Redis round trip.
        unreachable: ``error`` is a connection error or a timeout (Redis could not be reached).
    """

    applied: tuple[int, ...] = ()
    duplicates: tuple[int, ...] = ()
    dead: tuple[tuple[int, str], ...] = ()
    deferred: tuple[int, ...] = ()
    script_missing: bool = False
    stop: bool = False
    error: BaseException | None = field(default=None, compare=False)
    slowest: float = field(default=0.0, compare=False)
    unreachable: bool = field(default=False, compare=False)

    @property
    def acked(self) -> tuple[int, ...]:
        """Ids whose effect Redis confirmed, to delete from the journal."""
        return tuple(sorted(self.applied + self.duplicates))

    @property
    def progressed(self) -> bool:
        """Whether at least one entry left the pending queue."""
        return bool(self.applied or self.duplicates or self.dead)

    @property
    def size(self) -> int:
        """Number of entries the batch covered."""
        return len(self.applied) + len(self.duplicates) + len(self.dead) + len(self.deferred)


def marker_key(prefix: str, journal_uuid: str, entry_id: int) -> bytes:
    """The Redis key proving entry ``entry_id`` of journal ``journal_uuid`` was applied."""
    return f"{prefix}:{journal_uuid}:{entry_id}".encode()


def plan_batch(
    entries: Sequence[Entry], *, uuid: str, prefix: str, ttl: float, use_eval: bool = False
) -> list[Command]:
    """Build the ``EVALSHA`` (or, with ``use_eval``, ``EVAL``) argument tuple of every entry, in order.

    Raises:
        ValueError: entries are not in increasing id order, or ``ttl`` is not positive.
    """
    if not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
    ttl_ms = max(1, round(ttl * 1000))
    head: tuple[str, str] = ("EVAL", REPLAY_SCRIPT) if use_eval else ("EVALSHA", REPLAY_SCRIPT_SHA)
    previous_marker: dict[bytes, bytes] = {}
    last_id: int | None = None
    commands: list[Command] = []
    for entry in entries:
        if last_id is not None and entry.id <= last_id:
            raise ValueError(f"entries must be in increasing id order, got {entry.id} after {last_id}")
        last_id = entry.id
        marker = marker_key(prefix, uuid, entry.id)
        before = previous_marker.get(entry.key)
        if before is None:
            commands.append((*head, 1, marker, ttl_ms, *entry.args))
        else:
            commands.append((*head, 2, marker, before, ttl_ms, *entry.args))
        previous_marker[entry.key] = marker
    return commands


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


class _Verdicts:
    """The ids of one interpretation, sorted into what they became."""

    def __init__(self) -> None:
        self.applied: list[int] = []
        self.duplicates: list[int] = []
        self.dead: list[tuple[int, str]] = []
        self.deferred: list[int] = []
        self.script_missing = False
        self.error: BaseException | None = None
        self.unreachable = False

    def stop(self, entry_id: int, error: BaseException, *, unreachable: bool = False) -> None:
        # The first error is the one reported; every stopped entry stays pending.
        if self.error is None:
            self.error, self.unreachable = error, unreachable
        self.deferred.append(entry_id)

    def outcome(self) -> BatchOutcome:
        return BatchOutcome(
            applied=tuple(self.applied),
            duplicates=tuple(self.duplicates),
            dead=tuple(self.dead),
            deferred=tuple(self.deferred),
            script_missing=self.script_missing,
            stop=self.error is not None,
            error=self.error,
            unreachable=self.unreachable,
        )


def interpret(
    entries: Sequence[Entry], results: Sequence[object], reply_error: Callable[[str], BaseException]
) -> BatchOutcome:
    """Classify the pipeline results of :func:`plan_batch`'s commands, one per entry.

    Results are judged one by one: the script only replies "applied" when it applied the entry
    and only "duplicate" when the marker proves an earlier apply, and it refuses to run an entry
    whose predecessor (same key) was not applied, so each proven result can be acknowledged even
    when a neighbour failed. ``reply_error`` makes the error reported for a transient error the
    script caught (the I/O side's error-reply type, so the breaker classifies it like any reply).
    """
    if len(results) != len(entries):
        raise ValueError(f"{len(results)} results for {len(entries)} entries")
    v = _Verdicts()
    for entry, result in zip(entries, results, strict=True):
        if isinstance(result, ErrorResult):
            if result.kind == "noscript":
                v.script_missing = True
                v.deferred.append(entry.id)
            elif result.kind == "reply" and not (
                result.code in TRANSIENT_CODES or "unknown command" in result.text.lower()
            ):
                # Not transient: the script could not run this entry (e.g. too many arguments
                # to unpack), and retrying would block the queue.
                v.dead.append((entry.id, result.text))
            else:
                v.stop(entry.id, result.error, unreachable=result.kind == "io")
            continue
        reply: Sequence[object] = result if isinstance(result, list | tuple) else ()
        status = reply[0] if reply else None
        if status == _APPLIED:
            v.applied.append(entry.id)
        elif status == _DUPLICATE:
            v.duplicates.append(entry.id)
        elif status == _BLOCKED:
            v.deferred.append(entry.id)
        elif status == _FAILED and len(reply) >= 2:
            message = _text(reply[1])
            if message.split(" ", 1)[0] in TRANSIENT_CODES:
                v.stop(entry.id, reply_error(message))
            else:
                v.dead.append((entry.id, message))
        else:
            problem = f"unexpected reply to the replay script for entry {entry.id}: {result!r}"
            v.stop(entry.id, ReplayProtocolError(problem))
    return v.outcome()


def merge(first: BatchOutcome, second: BatchOutcome) -> BatchOutcome:
    """Combine a batch's outcome with the outcome of retrying its deferred entries."""
    return BatchOutcome(
        applied=first.applied + second.applied,
        duplicates=first.duplicates + second.duplicates,
        dead=first.dead + second.dead,
        deferred=second.deferred,
        script_missing=second.script_missing,
        stop=first.stop or second.stop,
        error=first.error if first.error is not None else second.error,
        unreachable=first.unreachable if first.error is not None else second.unreachable,
    )


def failed(
    outcome: BatchOutcome, pending: Sequence[Entry], error: BaseException, *, unreachable: bool
) -> BatchOutcome:
    """The outcome when a request failed as a whole: nothing in ``pending`` is proven."""
    done = set(outcome.applied) | set(outcome.duplicates) | {i for i, _ in outcome.dead}
    kept = outcome.error is not None
    return BatchOutcome(
        applied=outcome.applied,
        duplicates=outcome.duplicates,
        dead=outcome.dead,
        deferred=tuple(e.id for e in pending if e.id not in done),
        script_missing=outcome.script_missing,
        stop=True,
        error=outcome.error if kept else error,
        unreachable=outcome.unreachable if kept else unreachable,
    )
