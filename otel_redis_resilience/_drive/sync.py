"""The sync driver and handle: I/O and sleeping only; every decision is in ``_engine``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.client

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


def run_sync(op: Operation, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``call(*args, **kwargs)`` as the attempts of ``op``."""
    timeout = op.start(_monotonic())
    while True:
        attempt = Attempt(None if timeout is None else _monotonic() + timeout)
        token = CURRENT_ATTEMPT.set(attempt)
        try:
            result = call(*args, **kwargs)
        except BaseException as exc:
            CURRENT_ATTEMPT.reset(token)
            delay = op.failed(exc, attempt.sent, _monotonic())
            if delay == RERAISE:
                raise
            if delay > 0:
                time.sleep(delay)
            timeout = op.next_attempt(_monotonic(), exc)
            continue
        CURRENT_ATTEMPT.reset(token)
        op.succeeded(_monotonic())
        return result


class SyncHandle(HandleBase, redis.Redis):
    """The request-scoped resilient handle for a sync client.

    It is the client itself, seen through one request: every redis-py command
    method is there with its usual signature and return type, and each one is
    routed through the breaker, the retries and the request's deadline. It
    shares the client's connection pool; closing it closes nothing.
    """

    _orr_core: Core
    _orr_scope: RequestScope | None
    #: The client class whose execute_command runs each attempt (a user subclass's
    #: override included). Looked up per call, so instrumentation that patches the
    #: class later (contrib's RedisInstrumentor) still sees every attempt.
    _orr_client_cls: type = redis.Redis

    def execute_command(self, *args: Any, **options: Any) -> Any:
        name = _NAMES.get(args[0]) or command_name(args)
        if self._orr_scope is not None and self._orr_scope.ended:
            raise scope_closed_error(name)
        op = Operation(self._orr_core, self._orr_scope, name, args)
        base = self._orr_client_cls.execute_command  # type: ignore[attr-defined]
        mode = self._orr_mode
        if not mode:
            if op.block is not None:
                # A blocking command's block time may be shortened to the deadline: op.args.
                return run_sync(op, lambda: base(self, *op.args, **options))
            return run_sync(op, base, self, *args, **options)
        core = self._orr_core
        if mode == WRITE_BEHIND:
            return self._orr_write_behind(op, name, args, lambda: base(self, *op.args, **options))
        try:
            result = run_sync(op, lambda: base(self, *op.args, **options))
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
                decode=self.get_encoder().decode_responses,
            )
        if mode == STALE:
            remember(core.lkg, name, args, options, result)
        return result

    def _orr_write_behind(self, op: Operation, name: str, args: Any, call: Callable[[], Any]) -> Any:
        wb = self._orr_core.write_behind
        assert wb is not None
        key = write_key(name, args)
        if key is None:
            return run_sync(op, call)
        if wb.must_queue(key):
            queued = wb.append(key, args, "queued_behind", self._orr_scope)
            wb.kick()  # the entries ahead may be waiting for a replayer to notice Redis is fine
            return queued
        try:
            return run_sync(op, call)
        except RedisUnavailable as exc:
            if not may_journal_after(exc, name):
                raise
            journaled = wb.append(key, args, exc.reason, self._orr_scope, after=exc)
        wb.kick()
        return journaled

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        return self._orr_adopt(pipe, make_class(_pipeline_classes, PIPELINE_HOOKS, type(pipe)))

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
PIPELINE_HOOKS = SyncPipelineHooks


def handle_class(client_cls: type) -> type:
    """The handle class for a client class (a user subclass keeps its own methods)."""
    if client_cls is redis.Redis:
        return SyncHandle
    found = make_class(_handle_classes, SyncHandle, client_cls)
    found._orr_client_cls = client_cls  # type: ignore[attr-defined]
    return found
