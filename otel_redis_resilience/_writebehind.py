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
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._breaker import BreakerState
from ._context import CURRENT_ATTEMPT, Attempt
from ._errors import RedisUnavailable
from ._journal import Journal, JournalConfig, JournalFullError
from ._replay import ReplayTotals, replay_all_async, replay_all_sync
from ._safety import IDEMPOTENT_WRITES, READ_COMMANDS, command_name

if TYPE_CHECKING:
    from ._engine import Core


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
        self._failed_runs = 0
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

    def append(self, key: Any, args: Sequence[Any], reason: str, scope: Any) -> Journaled:
        try:
            entry_id = self.journal.append(key, args)
        except JournalFullError:
            self._rejected.add(1, {"reason": "journal_full", **self.core.telemetry.server_attrs})
            raise
        self.core.telemetry.journaled(command_name(args), reason, scope)
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
        # (half-open after reset_timeout alone), the run fails and backs off; replay
        # is idempotent, so nothing is lost or applied twice.
        return self.core.breaker.state is not BreakerState.OPEN

    def _idle_wait(self) -> float | None:
        # Entries left after a failed run (often a stale pooled connection just
        # after Redis came back): replay is idempotent, so try again soon, backing
        # off. Entries left for another reason (another process holds the lease):
        # look again after a lease period. Nothing left: sleep until kicked.
        if not self.journal.pending_count():
            return None
        lease = self.journal.config.lease_seconds
        if self._failed_runs:
            return float(min(lease, 0.1 * 2 ** min(self._failed_runs - 1, 6)))
        return lease

    def _note(self, totals: ReplayTotals | None, failure: Exception | None, started_ns: int) -> bool:
        """Record a run's result and report it; True if replay should stop for now."""
        telemetry = self.core.telemetry
        if totals is not None and (totals.applied or totals.duplicates):
            # Counted also when the run then failed: a batch can be partly applied.
            self._replayed.add(totals.applied + totals.duplicates, telemetry.server_attrs)
        # A run that found another process holding the lease did nothing: no span.
        if totals is None or totals.lease_acquired:
            telemetry.replayed(totals, started_ns, failure)
        if totals is None or totals.error is not None:
            self._failed_runs += 1
            return True
        self._failed_runs = 0
        return not totals.lease_acquired or totals.batches == 0

    def _run_sync(self) -> None:
        while not self._closed:
            self._wake.wait(self._idle_wait())
            self._wake.clear()
            while not self._closed and self._ready() and self.journal.pending_count():
                started_ns = time.time_ns()
                token = CURRENT_ATTEMPT.set(Attempt(time.monotonic() + _BATCH_DEADLINE))
                totals: ReplayTotals | None = None
                failure: Exception | None = None
                try:
                    totals = replay_all_sync(self.client, self.journal, max_batches=1)
                except Exception as exc:
                    failure = exc
                finally:
                    CURRENT_ATTEMPT.reset(token)
                if self._note(totals, failure, started_ns):
                    break

    async def _run_async(self) -> None:
        awake = self._awake
        assert awake is not None
        while not self._closed:
            wait = await asyncio.to_thread(self._idle_wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await awake.wait()
            awake.clear()
            while (
                not self._closed
                and self._ready()
                and (await asyncio.to_thread(self.journal.pending_count)) > 0
            ):
                started_ns = time.time_ns()
                totals: ReplayTotals | None = None
                failure: Exception | None = None
                try:
                    async with asyncio.timeout(_BATCH_DEADLINE):
                        totals = await replay_all_async(self.client, self.journal, max_batches=1)
                except Exception as exc:
                    failure = exc
                if self._note(totals, failure, started_ns):
                    break

    def close(self) -> None:
        self._closed = True
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
        self.needs_start = True
