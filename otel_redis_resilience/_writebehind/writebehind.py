"""Write-behind: writes made during an outage are journaled durably and replayed exactly once.

The decisions (may this command be written behind? apply now or journal?) are
pure functions here; the sync and async handles only do the I/O. Replay runs in
the background (a thread for sync clients, a task for asyncio) once the breaker
is no longer open, through :mod:`._replay`, which applies each entry together with a
marker of its id in one Lua step so an interrupted replay never applies twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from .._decide.breaker import BreakerState
from .._decide.commands import IDEMPOTENT_WRITES, READ_COMMANDS, command_name
from .._drive.classify import ErrorKind, classify
from .._drive.context import CURRENT_ATTEMPT, Attempt
from .._errors import RedisUnavailable
from .._observe.telemetry import _ratelimited
from .replay import ReplayTotals, replay_all_async, replay_all_sync
from .store import Journal, JournalConfig, JournalError, JournalFullError

if TYPE_CHECKING:
    from .._decide.operation import Core


#: The configuration of the write-behind journal (see :class:`JournalConfig`).
WriteBehindConfig = JournalConfig

#: Single-key write commands that can be written behind (the key is the first argument).
WRITE_BEHIND_COMMANDS: frozenset[str] = frozenset(
    """
    SET SETEX PSETEX SETNX SETRANGE SETBIT APPEND INCR INCRBY INCRBYFLOAT DECR DECRBY GETDEL
    LPUSH RPUSH LPUSHX RPUSHX LREM LSET LTRIM HSET HMSET HSETNX HDEL HINCRBY HINCRBYFLOAT
    SADD SREM ZADD ZREM ZINCRBY ZREMRANGEBYSCORE ZREMRANGEBYLEX ZREMRANGEBYRANK
    DEL UNLINK EXPIRE PEXPIRE EXPIREAT PEXPIREAT PERSIST XADD XDEL XTRIM PFADD GEOADD
    """.split()
)
_MULTI_KEY_CAPABLE = frozenset({"DEL", "UNLINK"})

#: Seconds one replay batch may take before it is abandoned (and retried later).
_BATCH_DEADLINE = 10.0
#: After a failed run, the next one waits 0.05, 0.1, 0.2 ... s, at most this long (and at most
#: lease_seconds), whatever kicks the replayer. Failed runs also count against the breaker, so a
#: dead Redis soon opens it and replay stops until the probe sees Redis answer; the cap only
#: bounds how late the first run after a recovery can be when the breaker did not open.
_MAX_BACKOFF = 2.0
#: How often a replayer looks at the lease again while another process holds it: a holder
#: that died is taken over at the next look (see Journal.try_acquire_lease).
_LEASE_POLL = 0.5


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


class WriteBehindError(RuntimeError):
    """The write cannot be written behind (a multi-key or unsupported command)."""

    __module__ = "otel_redis_resilience"


def write_key(name: str, args: Sequence[Any]) -> Any:
    """The key a write-behind command writes; None for a read; else :class:`WriteBehindError`."""
    if name in READ_COMMANDS:
        return None
    if name not in WRITE_BEHIND_COMMANDS:
        raise WriteBehindError(
            f"write_behind() takes single-key write commands; {name} is not one "
            "(use the plain handle for reads, scripts and multi-key commands)"
        )
    if len(args) < 2 or (name in _MULTI_KEY_CAPABLE and len(args) > 2):
        raise WriteBehindError(
            f"write_behind() takes single-key writes; this {name} names {len(args) - 1} keys"
        )
    return args[1]


def may_journal_after(exc: RedisUnavailable, name: str) -> bool:
    """Whether a failed direct write may be journaled.

    If it may already have been applied (sent, no reply) only an idempotent write
    can be journaled: replaying a lost INCRBY whose first copy did run would count
    it twice. Such a write raises instead, with ``outcome_unknown`` set.
    """
    return not exc.outcome_unknown or name in IDEMPOTENT_WRITES


def is_evidence(error: BaseException) -> bool:
    """Whether a failed replay run says Redis is unavailable (and so counts against the breaker).

    The same kinds as for a request's attempt: connection errors, timeouts (redis-py's and the
    asyncio batch deadline's builtin one) and the replies of a server that serves nothing
    (LOADING, BUSY, MASTERDOWN); not errors of the journal, a lost lease, an error reply the
    breaker ignores (READONLY, OOM...), a full connection pool or a rejected password.
    """
    return classify(error) in _EVIDENCE


_EVIDENCE = frozenset({ErrorKind.TIMEOUT, ErrorKind.CONNECTION, ErrorKind.NOT_SERVING})


# Sans-I/O steps of the replayer's loop (WriteBehind._loop); the sync and async drivers only wait,
# read the journal and run replay.
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
_Step: TypeAlias = _Idle | _Hold | _Pending | _Run
_Loop: TypeAlias = Generator[_Step, Any, None]


class WriteBehind:
    """The journal of one ``Resilience`` and its background replayer."""

    def __init__(self, config: JournalConfig, core: Core, client: Any, *, is_async: bool) -> None:
        self.journal = Journal(config)
        self.core = core
        self.client = client
        self.is_async = is_async
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._awake: asyncio.Event | None = None
        self._closed = False
        #: Set by close(): ends a hold early (kicks must not).
        self._stop = threading.Event()
        self._failed_runs = 0
        #: time.monotonic() before which no replay run starts, whatever kicks the replayer:
        #: the backoff after a failed run, or the next look at a lease held elsewhere.
        self._hold_until = 0.0
        #: True until the replayer first started in this process: a journal left by a
        #: crashed process is adopted and replayed as soon as a request scope opens.
        self.needs_start = True
        inst = core.telemetry.instruments
        self._replayed = inst.writebehind_replayed
        self._rejected = inst.writebehind_rejected
        inst.writebehind_sources.add(self)

    # -- enqueue (called by the handles) -------------------------------------------

    def must_queue(self, key: Any) -> bool:
        return self.journal.has_pending(key)

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
        telemetry = self.core.telemetry
        try:
            entry_id = self.journal.append(key, args)
        except JournalFullError:
            self._rejected.add(1, {"reason": "journal_full", **telemetry.server_attrs})
            raise
        except JournalError as exc:
            # Not the caller's bug and not a crash: like Redis being down, a degraded reply is
            # the right answer, so it is a RedisUnavailable (fallbacks and 503 handlers serve it).
            self._rejected.add(1, {"reason": "journal_failed", **telemetry.server_attrs})
            _ratelimited(
                f"journal:{telemetry.endpoint}",
                logging.ERROR,
                "Redis %s write-behind journal failed (%s); writes that cannot reach Redis are refused",
                telemetry.endpoint,
                exc,
            )
            err = RedisUnavailable(
                "journal_failed",
                operation=command_name(args),
                attempts=after.attempts if after is not None else 0,
                outcome_unknown=after.outcome_unknown if after is not None else False,
                detail=type(exc).__name__,
            )
            raise err from exc
        telemetry.journaled(command_name(args), reason, scope)
        return Journaled(entry_id, reason)

    # -- replay -------------------------------------------------------------------

    def kick(self) -> None:
        """Ask the replayer to run (after a write was journaled, or the breaker left open)."""
        if self._closed:
            return
        self.needs_start = False
        if self.is_async:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.needs_start = True
                return
            if self._task is None or self._task.done() or self._task.get_loop() is not loop:
                self._awake = asyncio.Event()
                # A fresh context: the task outlives the request that started it, and
                # must not carry its trace, scope or attempt.
                self._task = loop.create_task(
                    self._run_async(), name="otel-redis-resilience-replay", context=contextvars.Context()
                )
            if self._awake is not None:
                self._awake.set()
            return
        self._wake.set()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run_sync, name="otel-redis-resilience-replay", daemon=True
            )
            self._thread.start()

    def _ready(self) -> bool:
        # Half-open too: usually the probe has just seen Redis answer, and a quiet
        # service may send no trial call for a long time. If Redis is still down
        # (half-open after reset_timeout alone), the run fails, which re-opens the
        # breaker, and backs off; replay is idempotent, so nothing is lost or applied twice.
        return self.core.breaker.state is not BreakerState.OPEN

    def _idle_wait(self, pending: int, now: float) -> float | None:
        # Nothing left: sleep until kicked. Held (a failed run's backoff, or the lease is
        # held elsewhere): look again when the hold ends. Entries left otherwise (the
        # breaker is open): look again soon; leaving open also kicks.
        if not pending:
            return None
        if self._hold_until > now:
            return self._hold_until - now
        return min(self.journal.config.lease_seconds, _LEASE_POLL)

    def _note(self, totals: ReplayTotals | None, failure: Exception | None, started_ns: int) -> bool:
        """Record a run's result, tell the breaker and report it; True if replay should stop for now."""
        core = self.core
        telemetry = core.telemetry
        now = time.monotonic()
        if totals is not None and (totals.applied or totals.duplicates):
            # Counted also when the run then failed: a batch can be partly applied.
            self._replayed.add(totals.applied + totals.duplicates, telemetry.server_attrs)
        # A run that found another process holding the lease did nothing: no span.
        if totals is None or totals.lease_acquired:
            telemetry.replayed(totals, started_ns, failure)
        lease = self.journal.config.lease_seconds
        error = failure if totals is None else totals.error
        if error is not None:
            self._failed_runs += 1
            self._hold_until = now + min(lease, _MAX_BACKOFF, 0.05 * 2 ** min(self._failed_runs - 1, 6))
            # Writes queued behind pending entries never reach Redis: during an outage the
            # replayer may be the only one to see it down, and the breaker must hear it.
            if is_evidence(error):
                core.record_evidence(True, now)
            return True
        assert totals is not None
        if not totals.lease_acquired:
            self._hold_until = now + min(lease, _LEASE_POLL)
            return True
        self._failed_runs = 0
        self._hold_until = 0.0
        if totals.batches:
            core.record_evidence(False, now, totals.slowest)
        return totals.batches == 0

    def _loop(self) -> _Loop:
        """The replayer's decisions, as steps for a driver (sync thread or asyncio task)."""
        while not self._closed:
            pending: int = yield _PENDING
            yield _Idle(self._idle_wait(pending, time.monotonic()))
            hold = self._hold_until - time.monotonic()
            if hold > 0:
                # Kicked during the hold (every journaled write kicks): wait out the rest,
                # or a write rate of thousands per second becomes that many runs against a
                # dead Redis, each a connection attempt, two lease transactions and a span.
                yield _Hold(hold)
            while not self._closed and self._ready() and (yield _PENDING):
                result: _RunResult = yield _RUN
                if self._note(*result):
                    break

    def _replay_sync(self) -> _RunResult:
        started_ns = time.time_ns()
        token = CURRENT_ATTEMPT.set(Attempt(time.monotonic() + _BATCH_DEADLINE))
        try:
            return replay_all_sync(self.client, self.journal, max_batches=1), None, started_ns
        except Exception as exc:
            return None, exc, started_ns
        finally:
            CURRENT_ATTEMPT.reset(token)

    async def _replay_async(self) -> _RunResult:
        started_ns = time.time_ns()
        try:
            async with asyncio.timeout(_BATCH_DEADLINE):
                totals = await replay_all_async(self.client, self.journal, max_batches=1)
        except Exception as exc:
            return None, exc, started_ns
        return totals, None, started_ns

    def _run_sync(self) -> None:
        steps = self._loop()
        reply: Any = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(step, _Idle):
                self._wake.wait(step.timeout)
                self._wake.clear()
            elif isinstance(step, _Hold):
                self._stop.wait(step.seconds)
            elif isinstance(step, _Pending):
                reply = self.journal.pending_count()
            else:
                reply = self._replay_sync()

    async def _run_async(self) -> None:
        awake = self._awake
        assert awake is not None
        steps = self._loop()
        reply: Any = None
        while True:
            try:
                step = steps.send(reply)
            except StopIteration:
                return
            reply = None
            if isinstance(step, _Idle):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(step.timeout):
                        await awake.wait()
                awake.clear()
            elif isinstance(step, _Hold):
                await asyncio.sleep(step.seconds)  # close() cancels the task
            elif isinstance(step, _Pending):
                reply = await asyncio.to_thread(self.journal.pending_count)
            else:
                reply = await self._replay_async()

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._awake is not None:
            loop = self._task.get_loop() if self._task is not None else None
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._awake.set)
        task = self._task
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):
                task.get_loop().call_soon_threadsafe(task.cancel)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=_BATCH_DEADLINE + 1)
        self.journal.close()

    def after_fork(self) -> None:
        self._thread = None
        self._task = None
        self._awake = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.needs_start = True
