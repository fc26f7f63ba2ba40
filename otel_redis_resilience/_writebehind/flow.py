"""The replay run, written once: a generator of steps that a sync or an asyncio driver executes.

As httpx drives ``auth_flow``: every decision of a run (take the lease, read a batch, run its
pipeline, load the script on NOSCRIPT, settle what the replies proved, renew the lease, stop)
lives here, and the drivers in :mod:`.replay` only execute the steps. Pure: no Redis, SQLite,
asyncio or clock. A Redis step is answered with ``(reply, seconds it took)``; a Redis error comes
back thrown in as :class:`RedisCallFailed`, any other failure of a step as itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeAlias, TypeVar

from .errors import JournalError
from .plan import (
    REPLAY_SCRIPT,
    BatchOutcome,
    Command,
    Entry,
    LeaseLostError,
    ReplayStalledError,
    failed,
    interpret,
    merge,
    plan_batch,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "JournalStep",
    "LoadScript",
    "RedisCallFailed",
    "ReplayTotals",
    "RunPipeline",
    "RunSettings",
    "Stepper",
    "batch_flow",
    "run_flow",
]

DEFAULT_BATCH_SIZE: Final = 500


class Store(Protocol):
    """The journal operations a run needs (the store's ``Journal`` has them)."""

    def try_acquire_lease(self, now: float | None = None, *, take_over_dead: bool = False) -> bool: ...
    def renew_lease(self, now: float | None = None) -> bool: ...
    def release_lease(self) -> None: ...
    def pending_count(self) -> int: ...
    def read_batch(self, limit: int) -> Sequence[Entry]: ...
    def ack(self, ids: Sequence[int]) -> int: ...
    def dead_letter(self, entry_id: int, error: str) -> bool: ...


# ---------------------------------------------------------------------------- steps


@dataclass(frozen=True, slots=True)
class JournalStep:
    """Run ``call`` on the journal (SQLite: a blocking call; asyncio drivers run it in a thread)."""

    call: Callable[[Store], Any]


@dataclass(frozen=True, slots=True)
class RunPipeline:
    """Send ``commands`` in one non-transactional pipeline; reply: (its results, seconds)."""

    commands: list[Command]


@dataclass(frozen=True, slots=True)
class LoadScript:
    """``SCRIPT LOAD`` the replay script; reply: (its sha, seconds)."""

    script: str = REPLAY_SCRIPT


Step: TypeAlias = JournalStep | RunPipeline | LoadScript
Flow: TypeAlias = Generator[Step, Any, Any]


class RedisCallFailed(Exception):
    """A Redis step failed as a whole; ``unreachable``: a connection error or a timeout."""

    def __init__(self, error: BaseException, *, unreachable: bool) -> None:
        super().__init__(error)
        self.error = error
        self.unreachable = unreachable


def _take_lease(store: Store) -> bool:
    # A holder that died mid-run (SIGKILL, OOM kill) is taken over at once, not after its lease.
    return store.try_acquire_lease(None, take_over_dead=True)


def _renew(store: Store) -> bool:
    return store.renew_lease(None)


def _release(store: Store) -> None:
    store.release_lease()


def _pending(store: Store) -> int:
    return store.pending_count()


def _settle(outcome: BatchOutcome) -> Callable[[Store], None]:
    def settle(store: Store) -> None:
        if outcome.acked:
            store.ack(outcome.acked)
        for entry_id, error in outcome.dead:
            store.dead_letter(entry_id, error)

    return settle


# ---------------------------------------------------------------------------- the flows


@dataclass(frozen=True, slots=True)
class RunSettings:
    """What a run needs to know: the journal's identity, the markers, the batch bounds."""

    uuid: str
    prefix: str
    ttl: float
    reply_error: Callable[[str], BaseException]
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batches: int | None = None

    def __post_init__(self) -> None:
        size: object = self.batch_size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {size!r}")


def _apply(entries: Sequence[Entry], s: RunSettings) -> Generator[Step, Any, BatchOutcome]:
    """Run the batch with EVALSHA; on NOSCRIPT load the script once and retry only the entries not
    yet settled (markers make re-sending applied ones harmless, but retrying fewer is cheaper);
    if the script is still missing, or cannot be loaded, send the remaining ones with EVAL.
    A request that fails as a whole proves nothing about the entries it carried: they stay
    pending and the batch stops.
    """
    outcome = BatchOutcome()
    pending = list(entries)
    use_eval = False
    slowest = 0.0
    for attempt in range(3):
        if attempt == 1:
            try:
                _, seconds = yield LoadScript()
                slowest = max(slowest, seconds)
            except RedisCallFailed as exc:
                if exc.unreachable:
                    lost = failed(outcome, pending, exc.error, unreachable=True)
                    return dataclasses.replace(lost, slowest=slowest)
                use_eval = True  # SCRIPT LOAD refused (e.g. by an ACL): send the script itself
        elif attempt == 2:
            use_eval = True
        commands = plan_batch(pending, uuid=s.uuid, prefix=s.prefix, ttl=s.ttl, use_eval=use_eval)
        try:
            results, seconds = yield RunPipeline(commands)
        except RedisCallFailed as exc:
            return dataclasses.replace(
                failed(outcome, pending, exc.error, unreachable=exc.unreachable), slowest=slowest
            )
        slowest = max(slowest, seconds)
        current = interpret(pending, results, s.reply_error)
        outcome = current if attempt == 0 else merge(outcome, current)
        if not outcome.script_missing or outcome.stop:
            break
        retry = set(outcome.deferred)
        pending = [e for e in pending if e.id in retry]
    if outcome.script_missing and not outcome.stop:
        # Unreachable with a real Redis (EVAL needs no cached script); do not spin on it.
        stalled = ReplayStalledError("replay script missing even after EVAL")
        outcome = failed(outcome, pending, stalled, unreachable=False)
    return dataclasses.replace(outcome, slowest=slowest)


def batch_flow(s: RunSettings) -> Generator[Step, Any, BatchOutcome]:
    """One batch: the oldest ``batch_size`` pending entries, applied and settled in the journal.

    Takes no lease. Applied and duplicate entries are acknowledged, entries Redis rejected are
    dead-lettered, the rest stays pending.
    """
    entries: Sequence[Entry] = yield JournalStep(lambda store: store.read_batch(s.batch_size))
    if not entries:
        return BatchOutcome()
    outcome = yield from _apply(entries, s)
    yield JournalStep(_settle(outcome))
    return outcome


@dataclass(frozen=True, slots=True)
class ReplayTotals:
    """Result of a replay run.

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
        """Account for one batch; return True when the run must end."""
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


def run_flow(s: RunSettings) -> Generator[Step, Any, ReplayTotals]:
    """A run: take the lease, replay batch after batch until the journal is empty or replay must
    stop, renewing the lease before every batch and releasing it at the end.

    A batch that could not reach Redis ends the run with its error in the totals (its counts
    are not added: the pipeline failed as a whole); journal errors propagate.
    """
    if not (yield JournalStep(_take_lease)):
        return ReplayTotals(lease_acquired=False, remaining=(yield JournalStep(_pending)))
    acc = _Totals()
    try:
        while s.max_batches is None or acc.batches < s.max_batches:
            if acc.batches and not (yield JournalStep(_renew)):
                acc.error = LeaseLostError("the replay lease was taken over by another process")
                break
            outcome = yield from batch_flow(s)
            if outcome.unreachable:
                acc.error = outcome.error
                break
            if acc.add(outcome):
                break
    finally:
        # An unreleased lease only delays the next replayer until it expires.
        with contextlib.suppress(JournalError):
            yield JournalStep(_release)
    return acc.result((yield JournalStep(_pending)))


# ---------------------------------------------------------------------------- driving


S = TypeVar("S")


class Stepper(Generic[S]):
    """Advances a flow by what its last step gave: a value sent in, or an exception thrown in.

    The drivers' loops are then three lines each; :attr:`result` holds the flow's return value
    once :meth:`resume` returned None.
    """

    __slots__ = ("_flow", "result")

    def __init__(self, flow: Generator[S, Any, Any]) -> None:
        self._flow = flow
        self.result: Any = None

    def start(self) -> S | None:
        return self._advance(None, None)

    def resume(self, value: Any, error: BaseException | None) -> S | None:
        return self._advance(value, error)

    def _advance(self, value: Any, error: BaseException | None) -> S | None:
        try:
            if error is not None:
                return self._flow.throw(error)
            return self._flow.send(value)
        except StopIteration as done:
            self.result = done.value
            return None
