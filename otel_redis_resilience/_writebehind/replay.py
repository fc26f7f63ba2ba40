"""Exactly-once replay of the write-behind journal into Redis.

Every journaled entry is applied by one Lua script together with a marker key
``{prefix}:{journal_uuid}:{entry_id}``, atomically on the server: if the marker already exists the
entry was applied before (by us before a crash, or by another replayer) and is skipped. The
journal entry is deleted (acknowledged) only after Redis confirmed it, so replay can be
interrupted anywhere (process killed, Redis killed, connection dropped) and re-run without losing
an entry or applying one twice, INCRBY and RPUSH included.

Order per key: entries are sent oldest first in one pipeline per batch. A pipeline is not a
transaction, so if one entry is not applied (a transient server error) a later entry of the same
key in the same batch must not overtake it; the script therefore also receives the marker of the
key's previous entry in the batch and refuses to run until that marker exists.

Limits: markers only protect the window between apply and acknowledgement (milliseconds, or until
the next replay after a crash), so they must outlive it (``marker_ttl``) and must not be evicted
(``maxmemory-policy noeviction``: markers carry a TTL, so ``volatile-*`` policies evict them
first). A Redis that lost its data (restarted without persistence, or with an AOF that did not
reach the disk: use ``appendfsync always``; a failover to a replica that lagged) lost the markers
too, so entries applied but not yet acknowledged before that loss are applied again. Redis
Cluster is not supported: the marker and the written key generally live in different slots.
Exactly-once holds even if two processes replay at the same time (an owner stalled past its
lease); per-key order across batches relies on the lease, which lets only one process replay at a
time. A lease whose holder died (a process of this host that no longer runs) is taken over at once
rather than after it expires.

Decisions live in pure functions (:func:`plan_batch`, :func:`interpret_results` and a small
sans-I/O step generator), shared by the sync and the asyncio drivers, which only do I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeAlias, cast

import redis.exceptions as redis_exc

from otel_redis_resilience._writebehind.store import Journal, JournalEntry, JournalError

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "REPLAY_SCRIPT",
    "REPLAY_SCRIPT_SHA",
    "BatchOutcome",
    "LeaseLostError",
    "ReplayProtocolError",
    "ReplayStalledError",
    "ReplayTotals",
    "interpret_results",
    "marker_key",
    "plan_batch",
    "replay_all_async",
    "replay_all_sync",
    "replay_batch_async",
    "replay_batch_sync",
]

DEFAULT_BATCH_SIZE: Final = 500

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
_TRANSIENT_CODES: Final = frozenset(
    {
        "OOM",
        "READONLY",
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "MISCONF",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "NOREPLICAS",
        "NOPERM",
        "NOAUTH",
        "WRONGPASS",
        "MOVED",
        "ASK",
        "NOSCRIPT",
    }
)

#: One planned Redis command: the EVALSHA (or EVAL) arguments of one journal entry.
Command: TypeAlias = tuple[bytes | str | int, ...]


class ReplayProtocolError(Exception):
    """Redis answered the replay script with something it can never return (e.g. a proxy in between)."""


class ReplayStalledError(Exception):
    """A batch made no progress without a Redis error (e.g. the script keeps disappearing)."""


class LeaseLostError(Exception):
    """Another process took the replay lease over (ours expired); this run stopped replaying."""


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
        slowest: seconds of the batch's slowest Redis round trip (set by the drivers).
    """

    applied: tuple[int, ...] = ()
    duplicates: tuple[int, ...] = ()
    dead: tuple[tuple[int, str], ...] = ()
    deferred: tuple[int, ...] = ()
    script_missing: bool = False
    stop: bool = False
    error: BaseException | None = field(default=None, compare=False)
    slowest: float = field(default=0.0, compare=False)

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


@dataclass(frozen=True, slots=True)
class ReplayTotals:
    """Result of :func:`replay_all_sync` / :func:`replay_all_async`.

    Attributes:
        applied: entries applied by this run.
        duplicates: entries found already applied (their marker existed) and acknowledged.
        dead: entries dead-lettered because Redis rejected them.
        batches: pipelines executed.
        remaining: entries still pending when the run ended.
        lease_acquired: False if another process holds the replay lease (nothing was done).
        completed: the journal was drained.
        error: why the run stopped early (connection/timeout/transient server error, lost lease).
        slowest: seconds of the run's slowest Redis round trip (one pipeline, or SCRIPT LOAD):
            what the breaker is told about Redis's speed when the run succeeds.
    """

    applied: int = 0
    duplicates: int = 0
    dead: int = 0
    batches: int = 0
    remaining: int = 0
    lease_acquired: bool = True
    completed: bool = False
    error: BaseException | None = field(default=None, compare=False)
    slowest: float = field(default=0.0, compare=False)


def marker_key(prefix: str, journal_uuid: str, entry_id: int) -> bytes:
    """The Redis key proving entry ``entry_id`` of journal ``journal_uuid`` was applied."""
    return f"{prefix}:{journal_uuid}:{entry_id}".encode()


def plan_batch(
    entries: Sequence[JournalEntry],
    *,
    uuid: str,
    prefix: str,
    ttl: float,
    use_eval: bool = False,
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


def _error_code(error: BaseException | str) -> str:
    if isinstance(error, BaseException):
        # redis-py strips known codes ("NOSCRIPT", "OOM", ...) from the message into status_code.
        code = getattr(error, "status_code", None)
        if isinstance(code, str) and code:
            return code
        text = str(error)
    else:
        text = error
    first = text.split(" ", 1)[0]
    return first if first.isupper() else ""


def _error_text(error: BaseException) -> str:
    code = getattr(error, "status_code", None)
    text = str(error)
    if isinstance(code, str) and code and not text.startswith(code):
        return f"{code} {text}"
    return text


def interpret_results(entries: Sequence[JournalEntry], results: Sequence[object]) -> BatchOutcome:
    """Classify the pipeline results of :func:`plan_batch`'s commands, one per entry.

    Results are judged one by one: the script only replies "applied" when it applied the entry
    and only "duplicate" when the marker proves an earlier apply, and it refuses to run an entry
    whose predecessor (same key) was not applied, so each proven result can be acknowledged even
    when a neighbour failed.
    """
    if len(results) != len(entries):
        raise ValueError(f"{len(results)} results for {len(entries)} entries")
    applied: list[int] = []
    duplicates: list[int] = []
    dead: list[tuple[int, str]] = []
    deferred: list[int] = []
    script_missing = False
    stop_error: BaseException | None = None

    def stop(error: BaseException) -> None:
        nonlocal stop_error
        if stop_error is None:
            stop_error = error

    for entry, result in zip(entries, results, strict=True):
        if isinstance(result, BaseException):
            if isinstance(result, redis_exc.NoScriptError):
                script_missing = True
                deferred.append(entry.id)
            elif isinstance(result, redis_exc.ConnectionError | redis_exc.TimeoutError):
                stop(result)
                deferred.append(entry.id)
            elif isinstance(result, redis_exc.ResponseError):
                text = _error_text(result)
                # A script-level error that is not transient: the script could not run this
                # entry (e.g. too many arguments to unpack), and retrying would block the queue.
                if _error_code(result) in _TRANSIENT_CODES or "unknown command" in text.lower():
                    stop(result)
                    deferred.append(entry.id)
                else:
                    dead.append((entry.id, text))
            else:
                stop(result)
                deferred.append(entry.id)
            continue
        reply: Sequence[object] = result if isinstance(result, list | tuple) else ()
        status = reply[0] if reply else None
        if status == _APPLIED:
            applied.append(entry.id)
        elif status == _DUPLICATE:
            duplicates.append(entry.id)
        elif status == _BLOCKED:
            deferred.append(entry.id)
        elif status == _FAILED and len(reply) >= 2:
            message = _text(reply[1])
            if _error_code(message) in _TRANSIENT_CODES:
                stop(redis_exc.ResponseError(message))
                deferred.append(entry.id)
            else:
                dead.append((entry.id, message))
        else:
            stop(
                ReplayProtocolError(f"unexpected reply to the replay script for entry {entry.id}: {result!r}")
            )
            deferred.append(entry.id)
    return BatchOutcome(
        applied=tuple(applied),
        duplicates=tuple(duplicates),
        dead=tuple(dead),
        deferred=tuple(deferred),
        script_missing=script_missing,
        stop=stop_error is not None,
        error=stop_error,
    )


# ---------------------------------------------------------------------------- sans-I/O steps


@dataclass(frozen=True, slots=True)
class _RunPipeline:
    commands: list[Command]


@dataclass(frozen=True, slots=True)
class _LoadScript:
    pass


_Request: TypeAlias = _RunPipeline | _LoadScript
# A driver sends back the pipeline results (list) or the loaded sha (str); I/O failures
# (connection/timeout errors) are thrown into the generator instead.
_Steps: TypeAlias = Generator[_Request, Any, BatchOutcome]
_IO_ERRORS: Final = (redis_exc.ConnectionError, redis_exc.TimeoutError)


def _merge(first: BatchOutcome, second: BatchOutcome) -> BatchOutcome:
    """Combine a batch's outcome with the outcome of retrying its deferred entries."""
    return BatchOutcome(
        applied=first.applied + second.applied,
        duplicates=first.duplicates + second.duplicates,
        dead=first.dead + second.dead,
        deferred=second.deferred,
        script_missing=second.script_missing,
        stop=first.stop or second.stop,
        error=first.error if first.error is not None else second.error,
    )


def _failed(outcome: BatchOutcome, pending: Sequence[JournalEntry], error: BaseException) -> BatchOutcome:
    """The outcome when a request failed as a whole: nothing in ``pending`` is proven."""
    done = set(outcome.applied) | set(outcome.duplicates) | {i for i, _ in outcome.dead}
    deferred = tuple(e.id for e in pending if e.id not in done)
    return BatchOutcome(
        applied=outcome.applied,
        duplicates=outcome.duplicates,
        dead=outcome.dead,
        deferred=deferred,
        script_missing=outcome.script_missing,
        stop=True,
        error=outcome.error if outcome.error is not None else error,
    )


def _batch_steps(entries: Sequence[JournalEntry], *, uuid: str, prefix: str, ttl: float) -> _Steps:
    """Every decision of one batch, as requests for the driver to execute.

    Run the batch with EVALSHA; on NOSCRIPT load the script once and retry only the entries not
    yet settled (markers make re-sending applied ones harmless, but retrying fewer is cheaper);
    if the script is still missing, or cannot be loaded, send the remaining ones with EVAL.
    A request that fails as a whole (the driver throws its Redis error in) proves nothing about
    the entries it carried: they stay pending and the batch stops.
    """
    outcome = BatchOutcome()
    pending: list[JournalEntry] = list(entries)
    use_eval = False
    for attempt in range(3):
        if attempt == 1:
            try:
                yield _LoadScript()
            except _IO_ERRORS as exc:
                return _failed(outcome, pending, exc)
            except redis_exc.RedisError:
                use_eval = True  # SCRIPT LOAD refused (e.g. by an ACL): send the script itself
        elif attempt == 2:
            use_eval = True
        commands = plan_batch(pending, uuid=uuid, prefix=prefix, ttl=ttl, use_eval=use_eval)
        try:
            results = yield _RunPipeline(commands)
        except redis_exc.RedisError as exc:
            return _failed(outcome, pending, exc)
        current = interpret_results(pending, results)
        outcome = current if attempt == 0 else _merge(outcome, current)
        if not outcome.script_missing or outcome.stop:
            break
        retry = set(outcome.deferred)
        pending = [e for e in pending if e.id in retry]
    if outcome.script_missing and not outcome.stop:
        # Unreachable with a real Redis (EVAL needs no cached script); do not spin on it.
        outcome = _failed(outcome, pending, ReplayStalledError("replay script missing even after EVAL"))
    return outcome


def _steps_for(journal: Journal, entries: Sequence[JournalEntry]) -> _Steps:
    config = journal.config
    return _batch_steps(entries, uuid=journal.uuid, prefix=config.marker_prefix, ttl=float(config.marker_ttl))


def _settle(journal: Journal, outcome: BatchOutcome) -> None:
    acked = outcome.acked
    if acked:
        journal.ack(acked)
    for entry_id, error in outcome.dead:
        journal.dead_letter(entry_id, error)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")


# ---------------------------------------------------------------------------- sync driver


class _SyncCommands(Protocol):
    # redis-py leaves some of these untyped; this is the part of its interface we rely on.
    def execute_command(self, *args: Any, **options: Any) -> Any: ...


class _SyncPipeline(_SyncCommands, Protocol):
    def execute(self, raise_on_error: bool = True) -> list[Any]: ...


def _execute_sync(client: redis.Redis, request: _Request) -> object:
    if isinstance(request, _LoadScript):
        return cast(_SyncCommands, client).execute_command("SCRIPT", "LOAD", REPLAY_SCRIPT)
    pipe = cast(_SyncPipeline, client.pipeline(transaction=False))
    for command in request.commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)


def replay_batch_sync(
    client: redis.Redis, journal: Journal, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> BatchOutcome:
    """Replay the oldest ``batch_size`` pending entries in one pipeline and settle them in the journal.

    Does not take the replay lease (see :func:`replay_all_sync`). Applied and duplicate entries
    are acknowledged, entries Redis rejected are dead-lettered, the rest stays pending. Transient
    server errors (OOM, READONLY, BUSY, ...) and other Redis errors end the batch with
    :attr:`BatchOutcome.stop` set and the error in :attr:`BatchOutcome.error`.

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: after acknowledging
            whatever the replies proved applied (nothing, if the pipeline failed as a whole).
        otel_redis_resilience._writebehind.store.JournalError: the journal could not be read or updated;
            entries applied but not acknowledged are recognized by their markers next time.
    """
    _check_batch_size(batch_size)
    entries = journal.read_batch(batch_size)
    if not entries:
        return BatchOutcome()
    steps = _steps_for(journal, entries)
    slowest = 0.0
    try:
        request = next(steps)
        while True:
            started = time.monotonic()
            try:
                response = _execute_sync(client, request)
            except redis_exc.RedisError as exc:
                request = steps.throw(exc)
            else:
                slowest = max(slowest, time.monotonic() - started)
                request = steps.send(response)
    except StopIteration as done:
        outcome: BatchOutcome = dataclasses.replace(done.value, slowest=slowest)
    _settle(journal, outcome)
    if isinstance(outcome.error, _IO_ERRORS):
        raise outcome.error
    return outcome


def replay_all_sync(
    client: redis.Redis,
    journal: Journal,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
) -> ReplayTotals:
    """Take the replay lease and replay batch after batch until the journal is empty or replay must stop.

    Connection, timeout and transient server errors end the run and are returned in
    :attr:`ReplayTotals.error` rather than raised; journal errors propagate. The lease is renewed
    before every batch and released at the end.
    """
    _check_batch_size(batch_size)
    # A holder that died mid-run (SIGKILL, OOM kill) is taken over at once, not after its lease.
    if not journal.try_acquire_lease(time.time(), take_over_dead=True):
        return ReplayTotals(lease_acquired=False, remaining=journal.pending_count())
    acc = _Totals()
    try:
        while max_batches is None or acc.batches < max_batches:
            if acc.batches and not journal.renew_lease(time.time()):
                acc.error = _lease_lost()
                break
            try:
                outcome = replay_batch_sync(client, journal, batch_size=batch_size)
            except _IO_ERRORS as exc:
                acc.error = exc
                break
            if acc.add(outcome):
                break
    finally:
        # An unreleased lease only delays the next replayer until it expires.
        with contextlib.suppress(JournalError):
            journal.release_lease()
    return acc.result(journal.pending_count())


# ---------------------------------------------------------------------------- async driver


class _AsyncCommands(Protocol):
    async def execute_command(self, *args: Any, **options: Any) -> Any: ...


class _AsyncPipeline(Protocol):
    # Queuing a command on a non-transactional pipeline is synchronous; only execute() awaits.
    def execute_command(self, *args: Any, **options: Any) -> Any: ...
    async def execute(self, raise_on_error: bool = True) -> list[Any]: ...


async def _execute_async(client: redis.asyncio.Redis, request: _Request) -> object:
    if isinstance(request, _LoadScript):
        return await cast(_AsyncCommands, client).execute_command("SCRIPT", "LOAD", REPLAY_SCRIPT)
    pipe = cast(_AsyncPipeline, client.pipeline(transaction=False))
    for command in request.commands:
        pipe.execute_command(*command)
    return await pipe.execute(raise_on_error=False)


async def replay_batch_async(
    client: redis.asyncio.Redis, journal: Journal, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> BatchOutcome:
    """The asyncio twin of :func:`replay_batch_sync`; journal calls run in a worker thread."""
    _check_batch_size(batch_size)
    entries = await asyncio.to_thread(journal.read_batch, batch_size)
    if not entries:
        return BatchOutcome()
    steps = _steps_for(journal, entries)
    slowest = 0.0
    try:
        request = next(steps)
        while True:
            started = time.monotonic()
            try:
                response = await _execute_async(client, request)
            except redis_exc.RedisError as exc:
                request = steps.throw(exc)
            else:
                slowest = max(slowest, time.monotonic() - started)
                request = steps.send(response)
    except StopIteration as done:
        outcome: BatchOutcome = dataclasses.replace(done.value, slowest=slowest)
    await asyncio.to_thread(_settle, journal, outcome)
    if isinstance(outcome.error, _IO_ERRORS):
        raise outcome.error
    return outcome


async def replay_all_async(
    client: redis.asyncio.Redis,
    journal: Journal,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
) -> ReplayTotals:
    """The asyncio twin of :func:`replay_all_sync`."""
    _check_batch_size(batch_size)
    if not await asyncio.to_thread(journal.try_acquire_lease, time.time(), take_over_dead=True):
        remaining = await asyncio.to_thread(journal.pending_count)
        return ReplayTotals(lease_acquired=False, remaining=remaining)
    acc = _Totals()
    try:
        while max_batches is None or acc.batches < max_batches:
            if acc.batches and not await asyncio.to_thread(journal.renew_lease, time.time()):
                acc.error = _lease_lost()
                break
            try:
                outcome = await replay_batch_async(client, journal, batch_size=batch_size)
            except _IO_ERRORS as exc:
                acc.error = exc
                break
            if acc.add(outcome):
                break
    finally:
        with contextlib.suppress(JournalError):
            await asyncio.to_thread(journal.release_lease)
    remaining = await asyncio.to_thread(journal.pending_count)
    return acc.result(remaining)


# ---------------------------------------------------------------------------- shared loop state


def _lease_lost() -> LeaseLostError:
    return LeaseLostError("the replay lease was taken over by another process")


@dataclass(slots=True)
class _Totals:
    applied: int = 0
    duplicates: int = 0
    dead: int = 0
    batches: int = 0
    completed: bool = False
    error: BaseException | None = None
    slowest: float = 0.0

    def add(self, outcome: BatchOutcome) -> bool:
        """Account for one batch; return True when the loop must end."""
        if outcome.size == 0:
            self.completed = True
            return True
        self.batches += 1
        self.slowest = max(self.slowest, outcome.slowest)
        self.applied += len(outcome.applied)
        self.duplicates += len(outcome.duplicates)
        self.dead += len(outcome.dead)
        if outcome.stop:
            self.error = outcome.error
            return True
        if not outcome.progressed:
            self.error = ReplayStalledError("a replay batch made no progress")
            return True
        return False

    def result(self, remaining: int) -> ReplayTotals:
        return ReplayTotals(
            applied=self.applied,
            duplicates=self.duplicates,
            dead=self.dead,
            batches=self.batches,
            remaining=remaining,
            lease_acquired=True,
            completed=self.completed or (self.error is None and remaining == 0),
            error=self.error,
            slowest=self.slowest,
        )
