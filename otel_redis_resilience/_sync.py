"""The sync driver and handle: I/O and sleeping only; every decision is in ``_engine``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.client

from ._context import CURRENT_ATTEMPT, Attempt
from ._engine import RERAISE, Core, Operation
from ._safety import command_name
from ._scope import RequestScope

T = TypeVar("T")
_monotonic = time.monotonic


def run_sync(op: Operation, call: Callable[[], T]) -> T:
    """Run ``call`` as the attempts of ``op``."""
    timeout = op.start(_monotonic())
    while True:
        start = _monotonic()
        attempt = Attempt(None if timeout is None else start + timeout)
        token = CURRENT_ATTEMPT.set(attempt)
        try:
            result = call()
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


class SyncHandle(redis.Redis):
    """The request-scoped resilient handle for a sync client.

    It is the client itself, seen through one request: every redis-py command
    method is there with its usual signature and return type, and each one is
    routed through the breaker, the retries and the request's deadline. It
    shares the client's connection pool; closing it closes nothing.
    """

    _orr_core: Core
    _orr_scope: RequestScope | None
    _orr_pipeline_cls: type

    def execute_command(self, *args: Any, **options: Any) -> Any:
        base = super().execute_command
        op = Operation(self._orr_core, self._orr_scope, command_name(args), args)
        return run_sync(op, lambda: base(*args, **options))

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe: Any = super().pipeline(transaction, shard_hint)  # type: ignore[no-untyped-call]
        pipe.__class__ = _pipeline_class(type(pipe))
        pipe._orr_core = self._orr_core
        pipe._orr_scope = self._orr_scope
        return pipe

    def close(self) -> None:
        """Does nothing: the handle does not own the client or its pool."""

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} for {self._orr_core.endpoint}>"


class SyncPipelineHooks:
    """Mixed in front of redis-py's sync ``Pipeline``: one operation per ``execute()``."""

    _orr_core: Core
    _orr_scope: RequestScope | None
    command_stack: list[tuple[Sequence[Any], Any]]
    transaction: bool
    explicit_transaction: bool
    watching: bool

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = self.command_stack
        if not stack and not self.watching:
            return []
        snapshot = list(stack)
        transaction = bool(self.transaction or self.explicit_transaction)
        base = super().execute  # type: ignore[misc]

        def call() -> list[Any]:
            # redis-py clears the stack after every execute; a retry needs it back.
            self.command_stack = list(snapshot)
            return base(raise_on_error)  # type: ignore[no-any-return]

        op = Operation(
            self._orr_core,
            self._orr_scope,
            "MULTI" if transaction else "PIPELINE",
            (),
            pipeline=snapshot,
            transaction=transaction,
            # After WATCH the pipeline is bound to one connection: a retry on
            # another one would silently drop the WATCH.
            retryable=not self.watching,
        )
        return run_sync(op, call)

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        base = super().immediate_execute_command  # type: ignore[misc]
        op = Operation(self._orr_core, self._orr_scope, command_name(args), args, retryable=False)
        return run_sync(op, lambda: base(*args, **options))


_pipeline_classes: dict[type, type] = {}


def _pipeline_class(cls: type) -> type:
    found = _pipeline_classes.get(cls)
    if found is None:
        found = type(f"Resilient{cls.__name__}", (SyncPipelineHooks, cls), {"__module__": __name__})
        _pipeline_classes[cls] = found
    return found


_handle_classes: dict[type, type] = {}


def handle_class(client_cls: type) -> type:
    """The handle class for a client class (a user subclass of ``redis.Redis`` keeps its methods)."""
    if client_cls is redis.Redis:
        return SyncHandle
    found = _handle_classes.get(client_cls)
    if found is None:
        found = type(f"Resilient{client_cls.__name__}", (SyncHandle, client_cls), {"__module__": __name__})
        _handle_classes[client_cls] = found
    return found
