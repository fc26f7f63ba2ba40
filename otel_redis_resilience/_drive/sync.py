"""The sync driver: the attempt loop, the handle, and the steps of the flows, by blocking I/O.

Every decision is in ``_decide`` (the attempt walk) and ``flows.py`` (views,
apply-or-journal, the probe); this module only blocks, sleeps and starts threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

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


def run_sync(op: Operation, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``call(*args, **kwargs)`` as the attempts of ``op``."""
    timeout = op.start(_monotonic())
    if isinstance(timeout, GiveUp):  # rejected up front
        raise unavailable(op, timeout, None)
    while True:
        attempt = Attempt(None if timeout is None else _monotonic() + timeout)
        token = CURRENT_ATTEMPT.set(attempt)
        try:
            result = call(*args, **kwargs)
        except BaseException as exc:
            delay = after_failure(op, exc, attempt, token)
            if delay is None:
                raise
            if delay > 0:
                time.sleep(delay)
            timeout = next_timeout(op, exc)
            continue
        CURRENT_ATTEMPT.reset(token)
        op.succeeded(_monotonic())
        return result


def drive_view(flow: ViewFlow, op: Operation, call: Callable[[], Any]) -> Any:
    """Perform a view's steps: run the attempts, or journal (the append fsyncs: it blocks)."""
    stepper = Stepper(flow)
    while stepper.running:
        step = stepper.step
        try:
            if isinstance(step, Journal):
                reply = step.wb.append(step.key, step.args, step.reason, step.scope, after=step.after)
            else:
                reply = run_sync(op, call)
        except Exception as exc:
            stepper.throw(exc)
        else:
            stepper.send(reply)
    return stepper.value


class SyncHandle(HandleBase, redis.Redis):
    """The request-scoped resilient handle for a sync client.

    It is the client itself, seen through one request: every redis-py command
    method is there with its usual signature and return type, and each one is
    routed through the breaker, the retries and the request's deadline. It
    shares the client's connection pool; closing it closes nothing.
    """

    #: The client class whose execute_command runs each attempt (a user subclass's
    #: override included). Looked up per call, so instrumentation that patches the
    #: class later (contrib's RedisInstrumentor) still sees every attempt.
    _orr_client_cls: type = redis.Redis

    def execute_command(self, *args: Any, **options: Any) -> Any:
        op = self._orr_operation(args)
        base = self._orr_client_cls.execute_command  # type: ignore[attr-defined]
        if not self._orr_mode:  # the plain handle: the hot path, no flow
            if op.block is None:
                return run_sync(op, base, self, *args, **options)
            # A blocking command's block time may be shortened to the deadline: op.args.
            return run_sync(op, lambda: base(self, *op.args, **options))
        flow = self._orr_flow(op, args, options, self._orr_decodes)
        return drive_view(flow, op, lambda: base(self, *op.args, **options))

    def _orr_decodes(self) -> bool:
        return bool(self.get_encoder().decode_responses)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        return self._orr_adopt(pipe, make_class(_pipeline_classes, SyncPipelineHooks, type(pipe)))

    def close(self) -> None:
        """Does nothing: the handle does not own the client or its pool."""

    def __del__(self) -> None:
        pass


class SyncPipelineHooks:
    """Mixed in front of redis-py's sync ``Pipeline``: one operation per ``execute()``."""

    _orr_core: Core
    _orr_scope: RequestScope | None
    command_stack: list[tuple[Sequence[Any], Any]]
    transaction: bool
    explicit_transaction: bool
    watching: bool

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        planned = pipeline_operation(self, bool(self.transaction or self.explicit_transaction))
        if planned is None:
            return []
        op, snapshot = planned
        base = super().execute  # type: ignore[misc]

        def call() -> list[Any]:
            # redis-py clears the stack after every execute; a retry needs it back.
            self.command_stack = list(snapshot)
            return base(raise_on_error)  # type: ignore[no-any-return]

        return run_sync(op, call)

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        if self._orr_scope is not None and self._orr_scope.ended:
            raise scope_closed_error(command_name(args))
        base = super().immediate_execute_command  # type: ignore[misc]
        op = Operation(self._orr_core, self._orr_scope, command_name(args), args, retryable=False)
        return run_sync(op, lambda: base(*args, **options))


_pipeline_classes: dict[type, type] = {}
_handle_classes: dict[type, type] = {}


def handle_class(client_cls: type) -> type:
    """The handle class for a client class (a user subclass keeps its own methods)."""
    if client_cls is redis.Redis:
        return SyncHandle
    found = make_class(_handle_classes, SyncHandle, client_cls)
    found._orr_client_cls = client_cls  # type: ignore[attr-defined]
    return found


def _probe(flow: ProbeFlow, client: Any) -> None:
    """Step the probe flow in this thread until it ends."""
    answered_at: float | None = None
    try:
        while True:
            step = flow.send(answered_at)
            answered_at = None
            if isinstance(step, Ping):
                token = CURRENT_ATTEMPT.set(Attempt(_monotonic() + step.timeout))
                try:
                    client.execute_command("PING")
                    answered_at = _monotonic()
                except Exception:
                    pass
                finally:
                    CURRENT_ATTEMPT.reset(token)
            else:
                time.sleep(step.seconds)
    except StopIteration:
        return
    finally:
        flow.close()


class SyncDriver:
    """What ``Resilience`` does differently for a sync client, chosen once at construction."""

    is_async = False
    handle_class = staticmethod(handle_class)

    def __init__(self) -> None:
        self._probe_thread: threading.Thread | None = None

    def check_with(self, asynchronous: bool) -> None:
        """Raise TypeError for ``async with`` on a sync client's request scope."""
        if asynchronous:
            raise TypeError("this Resilience wraps a sync client: use `with res.request():`")

    def hooked_class(self, cls: type, health_checks: bool) -> type:
        return hooked_class(cls, is_async=False, health_checks=health_checks)

    def keep_in_use(self, pool: Any, conn: Any) -> None:
        """The sync pool's release() ignores connections it does not know: nothing to do."""

    def start_write_behind(self, core: Core) -> None:
        # A journal left by a crashed process is replayed at once, from a thread.
        if core.write_behind is not None:
            core.write_behind.kick()

    def start_probe(self, flow: ProbeFlow, client: Any, endpoint: object) -> bool:
        name = f"otel-redis-resilience-probe-{endpoint}"
        thread = threading.Thread(target=_probe, args=(flow, client), name=name, daemon=True)
        self._probe_thread = thread
        thread.start()
        return True

    def stop_probe(self) -> None:
        # The thread sees close()'s new generation at its next step and stops.
        self._probe_thread = None
