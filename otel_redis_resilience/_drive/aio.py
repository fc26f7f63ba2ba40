"""The asyncio driver and handle: I/O and sleeping only; every decision is in ``_engine``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio

from .._decide.commands import _NAMES, command_name
from .._decide.operation import RERAISE, Core, Operation
from .._errors import RedisUnavailable
from .._fallback import STALE, WRITE_BEHIND, recover, remember
from .._handle import HandleBase, make_class, pipeline_operation
from .._scope import RequestScope, scope_closed_error
from .._writebehind.writebehind import may_journal_after, write_key
from .context import CURRENT_ATTEMPT, Attempt

T = TypeVar("T")
_monotonic = time.monotonic

# How often the watchdog looks for attempts past their deadline. An attempt can
# overrun its deadline by at most this much (plus event-loop latency).
_TICK = 0.002


class _Watchdog:
    """Cancels attempts that outlive their deadline: one timer per event loop, not one per attempt.

    ``asyncio.timeout`` schedules and cancels a timer for every attempt, and
    under concurrency the cancelled timers churn the loop's heap; measured here
    at about 4.5 µs per attempt. The watchdog keeps the in-flight attempts in a
    dict and checks them every ``_TICK`` while there are any.
    """

    __slots__ = ("inflight", "loop", "ticking")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.inflight: dict[asyncio.Task[Any], tuple[float, Attempt]] = {}
        self.ticking = False

    def watch(self, task: asyncio.Task[Any], deadline: float, attempt: Attempt) -> None:
        self.inflight[task] = (deadline, attempt)
        if not self.ticking:
            self.ticking = True
            self.loop.call_later(_TICK, self._tick)

    def _tick(self) -> None:
        inflight = self.inflight
        if not inflight:
            self.ticking = False
            return
        now = _monotonic()
        for task, (deadline, attempt) in list(inflight.items()):
            if now >= deadline and not attempt.expired:
                attempt.expired = True
                task.cancel()
        self.loop.call_later(_TICK, self._tick)


_watchdogs: dict[asyncio.AbstractEventLoop, _Watchdog] = {}


def _watchdog(loop: asyncio.AbstractEventLoop) -> _Watchdog:
    dog = _watchdogs.get(loop)
    if dog is None:
        for old in [lp for lp in _watchdogs if lp.is_closed()]:
            del _watchdogs[old]
        dog = _watchdogs[loop] = _Watchdog(loop)
    return dog


async def run_async(op: Operation, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run ``call(*args, **kwargs)`` as the attempts of ``op``; never blocks the event loop."""
    timeout = op.start(_monotonic())
    task: Any = None
    while True:
        attempt = Attempt(None)
        token = CURRENT_ATTEMPT.set(attempt)
        if timeout is None:
            # Nothing of ours bounds it: the client's socket_timeout does, as in redis-py.
            timeout = op.core.client_timeout
        try:
            if timeout is None:
                result = await call(*args, **kwargs)
            else:
                # A deadline by cancellation, never wait_for (on 3.11 it can swallow a
                # cancellation, CPython gh-86296). Cancelling mid-read makes redis-py
                # drop the connection, so no reply is ever left in flight.
                if task is None:
                    task = asyncio.current_task()
                    dog = _watchdog(task.get_loop())
                    baseline = task.cancelling()
                dog.watch(task, _monotonic() + timeout, attempt)
                try:
                    result = await call(*args, **kwargs)
                except asyncio.CancelledError:
                    # Ours only if we expired it and nobody else cancelled meanwhile
                    # (the same rule as asyncio.timeout).
                    if attempt.expired and task.uncancel() <= baseline:
                        raise TimeoutError("attempt deadline reached") from None
                    raise
                finally:
                    dog.inflight.pop(task, None)
                if attempt.expired:
                    # Expired as the reply arrived and the cancellation was absorbed:
                    # withdraw our request, as asyncio.timeout does.
                    task.uncancel()
        except BaseException as exc:
            CURRENT_ATTEMPT.reset(token)
            delay = op.failed(exc, attempt.sent, _monotonic())
            if delay == RERAISE:
                raise
            if delay > 0:
                await asyncio.sleep(delay)
            timeout = op.next_attempt(_monotonic(), exc)
            continue
        CURRENT_ATTEMPT.reset(token)
        op.succeeded(_monotonic())
        return result


class AsyncHandle(HandleBase, redis.asyncio.Redis):  # type: ignore[misc]  # redis-py's own stubs clash
    """The request-scoped resilient handle for an asyncio client.

    Every redis-py command coroutine is there with its usual signature and
    return type, routed through the breaker, the retries and the request's
    deadline. It shares the client's connection pool; closing it closes nothing.
    """

    _orr_core: Core
    _orr_scope: RequestScope | None

    #: The client class whose execute_command runs each attempt (a user subclass's
    #: override included). Looked up per call, so instrumentation that patches the
    #: class later (contrib's RedisInstrumentor) still sees every attempt.
    _orr_client_cls: type = redis.asyncio.Redis

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = _NAMES.get(args[0]) or command_name(args)
        if self._orr_scope is not None and self._orr_scope.ended:
            raise scope_closed_error(name)
        op = Operation(self._orr_core, self._orr_scope, name, args)
        base = self._orr_client_cls.execute_command  # type: ignore[attr-defined]
        mode = self._orr_mode
        if not mode:
            if op.block is not None:
                # A blocking command's block time may be shortened to the deadline: op.args.
                return await run_async(op, lambda: base(self, *op.args, **options))
            return await run_async(op, base, self, *args, **options)
        core = self._orr_core
        if mode == WRITE_BEHIND:
            return await self._orr_write_behind(op, name, args, lambda: base(self, *op.args, **options))
        try:
            result = await run_async(op, lambda: base(self, *op.args, **options))
        except Exception as exc:
            return recover(
                mode,
                core.lkg,
                core.telemetry,
                name,
                args,
                options,
                exc,
                self._orr_scope,
                decode=self.get_encoder().decode_responses,  # type: ignore[no-untyped-call]
            )
        if mode == STALE:
            remember(core.lkg, name, args, options, result)
        return result

    async def _orr_write_behind(
        self, op: Operation, name: str, args: Any, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        wb = self._orr_core.write_behind
        assert wb is not None
        key = write_key(name, args)
        if key is None:
            return await run_async(op, call)
        # A WAL read never waits for writers: cheap enough to run on the loop.
        if wb.must_queue(key):
            # The append fsyncs: keep it off the event loop.
            queued = await asyncio.to_thread(wb.append, key, args, "queued_behind", self._orr_scope)
            wb.kick()  # the entries ahead may be waiting for a replayer to notice Redis is fine
            return queued
        try:
            return await run_async(op, call)
        except RedisUnavailable as exc:
            if not may_journal_after(exc, name):
                raise
            journaled = await asyncio.to_thread(wb.append, key, args, exc.reason, self._orr_scope, after=exc)
        wb.kick()
        return journaled

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        return self._orr_adopt(pipe, make_class(_pipeline_classes, PIPELINE_HOOKS, type(pipe)))

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        """Does nothing: the handle does not own the client or its pool."""

    async def close(self, close_connection_pool: bool | None = None) -> None:
        """Does nothing: the handle does not own the client or its pool."""

    def __del__(self, *args: Any) -> None:
        pass


class AsyncPipelineHooks:
    """Mixed in front of redis-py's asyncio ``Pipeline``: one operation per ``execute()``."""

    _orr_core: Core
    _orr_scope: RequestScope | None
    command_stack: list[tuple[Sequence[Any], Any]]
    is_transaction: bool
    explicit_transaction: bool
    watching: bool

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        planned = pipeline_operation(self, bool(self.is_transaction or self.explicit_transaction))
        if planned is None:
            return []
        op, snapshot = planned
        base = super().execute  # type: ignore[misc]

        async def call() -> list[Any]:
            # redis-py clears the stack after every execute; a retry needs it back.
            self.command_stack = list(snapshot)
            return await base(raise_on_error)  # type: ignore[no-any-return]

        return await run_async(op, call)

    async def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        if self._orr_scope is not None and self._orr_scope.ended:
            raise scope_closed_error(command_name(args))
        base = super().immediate_execute_command  # type: ignore[misc]
        op = Operation(self._orr_core, self._orr_scope, command_name(args), args, retryable=False)
        return await run_async(op, lambda: base(*args, **options))


_pipeline_classes: dict[type, type] = {}
_handle_classes: dict[type, type] = {}
PIPELINE_HOOKS = AsyncPipelineHooks


def handle_class(client_cls: type) -> type:
    """The handle class for a client class (a user subclass keeps its own methods)."""
    if client_cls is redis.asyncio.Redis:
        return AsyncHandle
    found = make_class(_handle_classes, AsyncHandle, client_cls)
    found._orr_client_cls = client_cls  # type: ignore[attr-defined]
    return found
