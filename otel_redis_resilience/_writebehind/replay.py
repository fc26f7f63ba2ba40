"""The replay drivers: one thin sync driver and one thin asyncio driver of the flows in :mod:`.flow`.

They execute steps and nothing else: journal steps on the store (in a worker thread under
asyncio, SQLite blocks), Redis steps on the client, timing each Redis round trip. Redis errors are
sorted here, at the I/O boundary, into what the pure rules read (:class:`.plan.ErrorResult`,
:class:`.flow.RedisCallFailed`).

What exactly-once needs from Redis: markers only protect the window between apply and
acknowledgement, so they must outlive it (``marker_ttl``) and must not be evicted
(``maxmemory-policy noeviction``: markers carry a TTL, so ``volatile-*`` policies evict them
first). A Redis that lost its data (no persistence, an AOF that did not reach the disk, a
failover to a replica that lagged) lost the markers too, so entries applied but not yet
acknowledged before that loss are applied again. Redis Cluster is not supported: the marker and
the written key generally live in different slots. Exactly-once holds even if two processes
replay at once; per-key order across batches relies on the lease.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import redis.exceptions as redis_exc

from .._drive.classify import error_code
from .flow import (
    DEFAULT_BATCH_SIZE,
    Flow,
    JournalStep,
    LoadScript,
    RedisCallFailed,
    ReplayTotals,
    RunPipeline,
    RunSettings,
    Step,
    Stepper,
    batch_flow,
    run_flow,
)
from .plan import (
    REPLAY_SCRIPT,
    REPLAY_SCRIPT_SHA,
    BatchOutcome,
    Entry,
    ErrorResult,
    LeaseLostError,
    ReplayProtocolError,
    ReplayStalledError,
    interpret,
    marker_key,
    plan_batch,
)
from .store import Journal

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

_IO_ERRORS = (redis_exc.ConnectionError, redis_exc.TimeoutError)


# ---------------------------------------------------------------------------- the I/O boundary


def _error_text(error: BaseException) -> str:
    # redis-py strips known codes ("WRONGTYPE", ...) from the message into status_code.
    code = getattr(error, "status_code", None)
    text = str(error)
    if isinstance(code, str) and code and not text.startswith(code):
        return f"{code} {text}"
    return text


def _sorted_result(result: object) -> object:
    """A pipeline result as the rules read it: replies unchanged, errors sorted."""
    if not isinstance(result, BaseException):
        return result
    if isinstance(result, redis_exc.NoScriptError):
        return ErrorResult("noscript", result)
    if isinstance(result, _IO_ERRORS):
        return ErrorResult("io", result)
    if isinstance(result, redis_exc.ResponseError):
        return ErrorResult("reply", result, error_code(result) or "", _error_text(result))
    return ErrorResult("other", result)


def interpret_results(entries: Sequence[Entry], results: Sequence[object]) -> BatchOutcome:
    """What redis-py's pipeline ``results`` of :func:`plan_batch`'s commands prove, one per entry."""
    return interpret(entries, [_sorted_result(r) for r in results], redis_exc.ResponseError)


def _settings(journal: Journal, batch_size: int, max_batches: int | None = None) -> RunSettings:
    config = journal.config
    return RunSettings(
        uuid=journal.uuid,
        prefix=config.marker_prefix,
        ttl=float(config.marker_ttl),
        reply_error=redis_exc.ResponseError,
        batch_size=batch_size,
        max_batches=max_batches,
    )


def _reply(step: Step, value: Any, seconds: float) -> Any:
    if isinstance(step, RunPipeline):
        return [_sorted_result(r) for r in value], seconds
    if isinstance(step, LoadScript):
        return value, seconds
    return value


def _thrown(step: Step, error: BaseException) -> BaseException:
    if isinstance(step, JournalStep) or not isinstance(error, redis_exc.RedisError):
        return error
    return RedisCallFailed(error, unreachable=isinstance(error, _IO_ERRORS))


class _Pipeline(Protocol):
    # Queuing a command on a non-transactional pipeline is synchronous for both flavours; only
    # execute() differs: a reply (sync) or an awaitable of it (asyncio).
    def execute_command(self, *args: Any, **options: Any) -> Any: ...
    def execute(self, raise_on_error: bool = True) -> Any: ...


class _Client(Protocol):
    # redis-py leaves some of these untyped; this is the part of its interface we rely on.
    def execute_command(self, *args: Any, **options: Any) -> Any: ...
    def pipeline(self, transaction: bool = True) -> _Pipeline: ...


def _send(client: Any, step: RunPipeline | LoadScript) -> Any:
    """Send a Redis step: the reply of a sync client, an awaitable of it for an asyncio one."""
    redis_client = cast(_Client, client)
    if isinstance(step, LoadScript):
        return redis_client.execute_command("SCRIPT", "LOAD", step.script)
    pipe = redis_client.pipeline(transaction=False)
    for command in step.commands:
        pipe.execute_command(*command)
    return pipe.execute(raise_on_error=False)


# ---------------------------------------------------------------------------- sync driver


def drive_sync(flow: Flow, client: redis.Redis, journal: Journal) -> Any:
    """Execute ``flow`` to its end in this thread; return what it returns."""

    def execute(step: Step) -> tuple[Any, BaseException | None]:
        started = time.monotonic()
        try:
            value = step.call(journal) if isinstance(step, JournalStep) else _send(client, step)
        except BaseException as exc:
            return None, _thrown(step, exc)
        return _reply(step, value, time.monotonic() - started), None

    stepper = Stepper(flow)
    step = stepper.start()
    while step is not None:
        step = stepper.resume(*execute(step))
    return stepper.result


def replay_batch_sync(
    client: redis.Redis, journal: Journal, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> BatchOutcome:
    """Replay the oldest ``batch_size`` pending entries in one pipeline and settle them in the journal.

    Does not take the replay lease (see :func:`replay_all_sync`).

    Raises:
        redis.exceptions.ConnectionError, redis.exceptions.TimeoutError: after acknowledging
            whatever the replies proved applied (nothing, if the pipeline failed as a whole).
        JournalError: the journal could not be read or updated; entries applied but not
            acknowledged are recognized by their markers next time.
    """
    return _raise_unreachable(drive_sync(batch_flow(_settings(journal, batch_size)), client, journal))


def replay_all_sync(
    client: redis.Redis,
    journal: Journal,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
) -> ReplayTotals:
    """Take the replay lease and replay batch after batch until the journal is empty or replay must stop.

    Connection, timeout and transient server errors end the run and are returned in
    :attr:`ReplayTotals.error` rather than raised; journal errors propagate.
    """
    totals: ReplayTotals = drive_sync(run_flow(_settings(journal, batch_size, max_batches)), client, journal)
    return totals


def _raise_unreachable(outcome: BatchOutcome) -> BatchOutcome:
    if outcome.unreachable and outcome.error is not None:
        raise outcome.error
    return outcome


# ---------------------------------------------------------------------------- asyncio driver


def _in_thread(call: Callable[[Journal], Any], journal: Journal) -> Awaitable[Any]:
    # SQLite blocks (fsync, busy_timeout): never on the event loop.
    return asyncio.to_thread(call, journal)


async def drive_async(flow: Flow, client: redis.asyncio.Redis, journal: Journal) -> Any:
    """Execute ``flow`` to its end on this event loop; return what it returns."""

    async def execute(step: Step) -> tuple[Any, BaseException | None]:
        started = time.monotonic()
        try:
            value = await (
                _in_thread(step.call, journal) if isinstance(step, JournalStep) else _send(client, step)
            )
        except BaseException as exc:  # CancelledError too: the flow releases its lease first
            return None, _thrown(step, exc)
        return _reply(step, value, time.monotonic() - started), None

    stepper = Stepper(flow)
    step = stepper.start()
    while step is not None:
        step = stepper.resume(*(await execute(step)))
    return stepper.result


async def replay_batch_async(
    client: redis.asyncio.Redis, journal: Journal, *, batch_size: int = DEFAULT_BATCH_SIZE
) -> BatchOutcome:
    """:func:`replay_batch_sync` on an asyncio client; journal calls run in a worker thread."""
    outcome: BatchOutcome = await drive_async(batch_flow(_settings(journal, batch_size)), client, journal)
    return _raise_unreachable(outcome)


async def replay_all_async(
    client: redis.asyncio.Redis,
    journal: Journal,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int | None = None,
) -> ReplayTotals:
    """:func:`replay_all_sync` on an asyncio client."""
    flow = run_flow(_settings(journal, batch_size, max_batches))
    totals: ReplayTotals = await drive_async(flow, client, journal)
    return totals
