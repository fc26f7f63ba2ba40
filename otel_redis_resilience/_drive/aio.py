"""The asyncio driver: the attempt loop, the handle, and the steps of the flows, by awaiting.

Every decision is in ``_decide`` (the attempt walk) and ``flows.py`` (views,
apply-or-journal, the probe); this module only awaits, sleeps, moves blocking
work off the event loop and starts tasks. It never blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio

from .._decide.commands import command_name
from .._decide.operation import GiveUp, Operation
from .._handle import HandleBase, make_class, pipeline_operation
from .._scope import RequestScope, scope_closed_error
from .connection import hooked_class
from .context import CURRENT_ATTEMPT, Attempt
from .core import Core, after_failure, next_timeout, unavailable
from .flows import Journal, Ping, ProbeFlow, Stepper, ViewFlow

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
    if isinstance(timeout, GiveUp):  # rejected up front
        raise unavailable(op, timeout, None)
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
            delay = after_failure(op, exc, attempt, token)
            if delay is None:
                raise
            if delay > 0:
                await asyncio.sleep(delay)
            timeout = next_timeout(op, exc)
            continue
        CURRENT_ATTEMPT.reset(token)
        op.succeeded(_monotonic())
        return result


async def drive_view(flow: ViewFlow, op: Operation, call: Callable[[], Awaitable[Any]]) -> Any:
    """Perform a view's steps: await the attempts, or journal in a worker thread (the append fsyncs)."""
    stepper = Stepper(flow)
    while stepper.running:
        step = stepper.step
        try:
            if not isinstance(step, Journal):
                reply = await run_async(op, call)
            else:
                reply = await asyncio.to_thread(
                    step.wb.append, step.key, step.args, step.reason, step.scope, after=step.after
                )
        except Exception as exc:
            stepper.throw(exc)
        else:
            stepper.send(reply)
    return stepper.value


class AsyncHandle(HandleBase, redis.asyncio.Redis):  # type: ignore[misc]  # redis-py's own stubs clash
    """The request-scoped resilient handle for an asyncio client.

    Every redis-py command coroutine is there with its usual signature and
    return type, routed through the breaker, the retries and the request's
    deadline. It shares the client's connection pool; closing it closes nothing.
    """

    #: The client class whose execute_command runs each attempt (a user subclass's
    #: override included). Looked up per call, so instrumentation that patches the
    #: class later (contrib's RedisInstrumentor) still sees every attempt.
    _orr_client_cls: type = redis.asyncio.Redis

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        op = self._orr_operation(args)
        base = self._orr_client_cls.execute_command  # type: ignore[attr-defined]
        if self._orr_mode:
            flow = self._orr_flow(op, args, options, self._orr_decodes)
            return await drive_view(flow, op, lambda: base(self, *op.args, **options))
        if op.block is None:  # the plain handle: the hot path, no flow
            return await run_async(op, base, self, *args, **options)
        # A blocking command's block time may be shortened to the deadline: op.args.
        return await run_async(op, lambda: base(self, *op.args, **options))

    def _orr_decodes(self) -> bool:
        return bool(self.get_encoder().decode_responses)  # type: ignore[no-untyped-call]

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        return self._orr_adopt(pipe, make_class(_pipeline_classes, AsyncPipelineHooks, type(pipe)))

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


def handle_class(client_cls: type) -> type:
    """The handle class for a client class (a user subclass keeps its own methods)."""
    if client_cls is redis.asyncio.Redis:
        return AsyncHandle
    found = make_class(_handle_classes, AsyncHandle, client_cls)
    found._orr_client_cls = client_cls  # type: ignore[attr-defined]
    return found


async def _probe(flow: ProbeFlow, client: Any) -> None:
    """Step the probe flow in this task until it ends (or the task is cancelled)."""
    with contextlib.closing(flow):
        step = next(flow, None)
        while step is not None:
            reply: float | None = None
            if isinstance(step, Ping):
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(step.timeout):
                        await client.execute_command("PING")
                    reply = _monotonic()
            else:
                await asyncio.sleep(step.seconds)
            try:
                step = flow.send(reply)
            except StopIteration:
                step = None


class AsyncDriver:
    """What ``Resilience`` does differently for an asyncio client, chosen once at construction."""

    is_async = True
    handle_class = staticmethod(handle_class)

    def __init__(self) -> None:
        self._probe_task: asyncio.Task[None] | None = None

    def check_with(self, asynchronous: bool) -> None:
        """Raise TypeError for a plain ``with`` on an asyncio client's request scope."""
        if not asynchronous:
            raise TypeError("this Resilience wraps an asyncio client: use `async with res.request():`")

    def hooked_class(self, cls: type, health_checks: bool) -> type:
        return hooked_class(cls, is_async=True, health_checks=health_checks)

    def keep_in_use(self, pool: Any, conn: Any) -> None:
        """The pool's reset() forgot the connection the client holds: give it back.

        The asyncio pool's release() (``client.aclose()``) raises KeyError for a
        connection it does not know.
        """
        in_use = getattr(pool, "_in_use_connections", None)
        if in_use is not None:
            in_use.add(conn)

    def start_write_behind(self, core: Core) -> None:
        """Nothing yet: the replayer is a task, started by the first request scope's loop."""

    def start_probe(self, flow: ProbeFlow, client: Any, endpoint: object) -> bool:
        name = "otel-redis-resilience-probe"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        # A fresh context, like the sync probe's thread: no request's trace, scope or attempt.
        self._probe_task = loop.create_task(_probe(flow, client), name=name, context=contextvars.Context())
        return True

    def stop_probe(self) -> None:
        task, self._probe_task = self._probe_task, None
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                task.get_loop().call_soon_threadsafe(task.cancel)
