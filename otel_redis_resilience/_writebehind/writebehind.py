"""Write-behind: writes made during an outage are journaled durably and replayed exactly once.

:class:`WriteBehind` is what one ``Resilience`` holds: the store, the operators' view, and a
background replayer. The replayer's decisions are one loop (:meth:`WriteBehind.loop`) of steps,
and the schedule it follows (backoff, lease polling) is :class:`.rules.ReplaySchedule`; a thread
(sync clients) or a task (asyncio) only executes the steps. Each run is :func:`.replay.replay_all_sync`
or its asyncio twin, both driving the one flow of :mod:`.flow`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from .._decide.breaker import BreakerState
from .._decide.commands import command_name
from .._drive.classify import ErrorKind, classify
from .._drive.context import CURRENT_ATTEMPT, Attempt
from .._errors import RedisUnavailable
from .._observe.writebehind import WriteBehindEmitter
from .config import WriteBehindConfig
from .errors import JournalError, JournalFullError, WriteBehindError
from .flow import ReplayTotals, Stepper
from .replay import replay_all_async, replay_all_sync
from .rules import (
    BATCH_DEADLINE,
    WRITE_BEHIND_COMMANDS,
    ReplaySchedule,
    RunReport,
    may_journal_after,
    write_key,
)
from .store import Journal
from .view import WriteBehindJournal

if TYPE_CHECKING:
    from .._decide.breaker import BreakerMachine
    from .._observe.telemetry import Telemetry


class Core(Protocol):
    """What write-behind uses of its ``Resilience``'s core (kept structural: the core imports us)."""

    @property
    def telemetry(self) -> Telemetry: ...
    @property
    def breaker(self) -> BreakerMachine: ...
    def record_evidence(self, failed: bool, now: float, duration: float = 0.0) -> None: ...


__all__ = [
    "WRITE_BEHIND_COMMANDS",
    "Journaled",
    "WriteBehind",
    "WriteBehindConfig",
    "WriteBehindError",
    "is_evidence",
    "may_journal_after",
    "write_key",
]


@dataclass(frozen=True, slots=True)
class Journaled:
    """What a write-behind write returns when it was journaled instead of applied now.

    Attributes:
        entry_id: The journal entry's id (increasing across processes sharing the journal).
        reason: Why: ``queued_behind`` (earlier writes to the same key are still pending),
            or the :class:`RedisUnavailable` reason (``breaker_open``, ``retries_exhausted``,
            ``deadline_exceeded``, ``budget_exhausted``).
    """

    entry_id: int
    reason: str


_EVIDENCE = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.NOT_SERVING})


def is_evidence(error: BaseException) -> bool:
    """Whether a failed replay run says Redis is unavailable (and so counts against the breaker).

    The same kinds as for a request's attempt: connection errors, timeouts (redis-py's and the
    asyncio batch deadline's builtin one) and the replies of a server that serves nothing
    (LOADING, BUSY, MASTERDOWN); not errors of the journal, a lost lease, an error reply the
    breaker ignores (READONLY, OOM...), a full connection pool or a rejected password.
    """
    return classify(error) in _EVIDENCE


# The replayer loop's steps; the thread and task drivers only wait, count and run.
@dataclass(frozen=True, slots=True)
class _Idle:
    """Wait until kicked, or ``timeout`` seconds (None: until kicked)."""

    timeout: float | None


@dataclass(frozen=True, slots=True)
class _Hold:
    """Sleep ``seconds``; kicks do not end it (only close does)."""

    seconds: float


class _Pending:
    """Reply with the journal's pending count."""


class _Run:
    """Run one replay run; reply with ``(totals or None, the exception it raised or None, start ns)``."""


_PENDING = _Pending()
_RUN = _Run()
_RunResult: TypeAlias = tuple[ReplayTotals | None, Exception | None, int]
_LoopStep: TypeAlias = _Idle | _Hold | _Pending | _Run


class WriteBehind:
    """The journal of one ``Resilience`` and its background replayer."""

    def __init__(self, config: WriteBehindConfig, core: Core, client: Any, *, is_async: bool) -> None:
        self._store = Journal(config)
        #: The operators' view (``Resilience.write_behind_journal``); also read by the queue gauge.
        self.journal = WriteBehindJournal(self._store)
        self.config = config
        self.core = core
        self.client = client
        self._emit = WriteBehindEmitter(core.telemetry)
        self._schedule = ReplaySchedule(config.lease_seconds)
        self._closed = False
        #: True until the replayer first started in this process: a journal left by a
        #: crashed process is adopted and replayed as soon as a request scope opens.
        self.needs_start = True
        # The flavour is chosen once, here: nothing else branches on it.
        self._driver: _ThreadDriver | _TaskDriver = _TaskDriver(self) if is_async else _ThreadDriver(self)
        self._emit.watch(self)

    # -- enqueue (called by the handles) -------------------------------------------

    def must_queue(self, key: Any) -> bool:
        return self._store.has_pending(key)

    def append(
        self, key: Any, args: Sequence[Any], reason: str, scope: Any, *, after: RedisUnavailable | None = None
    ) -> Journaled:
        """Journal a write; ``after`` is the failure that sent it here (None when queued behind).

        Raises:
            JournalFullError: a configured bound is reached (the caller chose the bound).
            RedisUnavailable: ``reason="journal_failed"``, the journal could not take it (disk
                full, I/O error, lock timeout...): the write was neither applied nor kept. The
                JournalError is its ``__cause__``; ``outcome_unknown`` is the direct attempt's.
        """
        try:
            entry_id = self._store.append(key, args)
        except JournalFullError:
            self._emit.journal_full()
            raise
        except JournalError as exc:
            # Not the caller's bug and not a crash: like Redis being down, a degraded reply is
            # the right answer, so it is a RedisUnavailable (fallbacks and 503 handlers serve it).
            self._emit.journal_failed(exc)
            err = RedisUnavailable(
                "journal_failed",
                operation=command_name(args),
                attempts=after.attempts if after is not None else 0,
                outcome_unknown=after.outcome_unknown if after is not None else False,
                detail=type(exc).__name__,
            )
            raise err from exc
        self._emit.journaled(command_name(args), reason, scope)
        return Journaled(entry_id, reason)

    # -- replay -------------------------------------------------------------------

    def kick(self) -> None:
        """Ask the replayer to run (after a write was journaled, or the breaker left open)."""
        if self._closed:
            return
        self.needs_start = not self._driver.kick()

    def _ready(self) -> bool:
        # Half-open too: usually the probe has just seen Redis answer, and a quiet
        # service may send no trial call for a long time. If Redis is still down
        # (half-open after reset_timeout alone), the run fails, which re-opens the
        # breaker, and backs off; replay is idempotent, so nothing is lost or applied twice.
        return self.core.breaker.state is not BreakerState.OPEN

    def _note(self, totals: ReplayTotals | None, failure: Exception | None, started_ns: int) -> bool:
        """Report a run, follow the schedule and tell the breaker; True if replay should stop for now."""
        self._emit.run_ended(totals, started_ns, failure)
        error = failure if totals is None else totals.error
        report = RunReport(
            lease_acquired=totals is None or totals.lease_acquired,
            batches=0 if totals is None else totals.batches,
            slowest=0.0 if totals is None else totals.slowest,
            failed=error is not None,
            evidence=error is not None and is_evidence(error),
        )
        now = time.monotonic()
        verdict = self._schedule.after_run(report, now)
        if verdict.breaker_failure is not None:
            self.core.record_evidence(verdict.breaker_failure, now, verdict.duration)
        return verdict.stop

    def loop(self) -> Generator[_LoopStep, Any, None]:
        """The replayer's decisions, as steps for a driver (sync thread or asyncio task)."""
        schedule = self._schedule
        while not self._closed:
            pending: int = yield _PENDING
            yield _Idle(schedule.idle_wait(pending, time.monotonic()))
            hold = schedule.hold_left(time.monotonic())
            if hold > 0:
                # Kicked during the hold (every journaled write kicks): wait out the rest,
                # or a write rate of thousands per second becomes that many runs against a
                # dead Redis, each a connection attempt, two lease transactions and a span.
                yield _Hold(hold)
            while not self._closed and self._ready() and (yield _PENDING):
                result: _RunResult = yield _RUN
                if self._note(*result):
                    break

    def close(self) -> None:
        self._closed = True
        self._driver.close()
        self._store.close()

    def after_fork(self) -> None:
        self._driver = type(self._driver)(self)
        self.needs_start = True


class _ThreadDriver:
    """Runs the replayer loop in a daemon thread (sync clients)."""

    def __init__(self, wb: WriteBehind) -> None:
        self._wb = wb
        self._wake = threading.Event()
        #: Set by close(): ends a hold early (kicks must not).
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def kick(self) -> bool:
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, name="otel-redis-resilience-replay", daemon=True
            )
            self._thread.start()
        return True

    def _run(self) -> None:
        stepper = Stepper(self._wb.loop())
        step = stepper.start()
        while step is not None:
            step = stepper.resume(self._execute(step), None)

    def _execute(self, step: Any) -> Any:
        if isinstance(step, _Idle):
            self._wake.wait(step.timeout)
            self._wake.clear()
        elif isinstance(step, _Hold):
            self._stop.wait(step.seconds)
        elif isinstance(step, _Pending):
            return self._wb._store.pending_count()
        else:
            return self._replay()
        return None

    def _replay(self) -> _RunResult:
        started_ns = time.time_ns()
        # The sync connections cap every socket call at the current attempt's deadline.
        token = CURRENT_ATTEMPT.set(Attempt(time.monotonic() + BATCH_DEADLINE))
        try:
            return replay_all_sync(self._wb.client, self._wb._store, max_batches=1), None, started_ns
        except Exception as exc:
            return None, exc, started_ns
        finally:
            CURRENT_ATTEMPT.reset(token)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=BATCH_DEADLINE + 1)


class _TaskDriver:
    """Runs the replayer loop as an asyncio task on the loop of the request that kicked it."""

    def __init__(self, wb: WriteBehind) -> None:
        self._wb = wb
        self._task: asyncio.Task[None] | None = None
        self._awake: asyncio.Event | None = None

    def kick(self) -> bool:
        """Start or wake the task; False outside an event loop (the next scope starts it)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._awake = asyncio.Event()
            # A fresh context: the task outlives the request that started it, and
            # must not carry its trace, scope or attempt.
            self._task = loop.create_task(
                self._run(self._awake), name="otel-redis-resilience-replay", context=contextvars.Context()
            )
        if self._awake is not None:
            self._awake.set()
        return True

    async def _run(self, awake: asyncio.Event) -> None:
        stepper = Stepper(self._wb.loop())
        step = stepper.start()
        while step is not None:
            step = stepper.resume(await self._execute(step, awake), None)

    async def _execute(self, step: Any, awake: asyncio.Event) -> Any:
        if isinstance(step, _Idle):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(step.timeout):
                    await awake.wait()
            awake.clear()
            return None
        if isinstance(step, _Hold):
            await asyncio.sleep(step.seconds)  # close() cancels the task
            return None
        if isinstance(step, _Pending):
            return await asyncio.to_thread(self._wb._store.pending_count)
        started_ns = time.time_ns()
        try:
            async with asyncio.timeout(BATCH_DEADLINE):
                totals = await replay_all_async(self._wb.client, self._wb._store, max_batches=1)
        except Exception as exc:
            return None, exc, started_ns
        return totals, None, started_ns

    def close(self) -> None:
        task, awake = self._task, self._awake
        if task is None or task.done():
            return
        with contextlib.suppress(RuntimeError):  # its event loop is already closed
            loop = task.get_loop()
            if awake is not None:
                loop.call_soon_threadsafe(awake.set)
            loop.call_soon_threadsafe(task.cancel)
