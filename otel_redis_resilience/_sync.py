"""The sync driver and handle: I/O and sleeping only; every decision is in ``_engine``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.client

from ._context import CURRENT_ATTEMPT, Attempt
from ._engine import RERAISE, Core, Operation
from ._errors import ConfigurationError
from ._fallback import MISS, NORMAL, STALE, recover, remember
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
    _orr_mode: int = NORMAL
    _orr_pipeline_cls: type

    def execute_command(self, *args: Any, **options: Any) -> Any:
        base: Callable[..., Any] = super().execute_command
        name = command_name(args)
        op = Operation(self._orr_core, self._orr_scope, name, args)
        mode = self._orr_mode
        if not mode:
            return run_sync(op, lambda: base(*args, **options))
        core = self._orr_core
        try:
            result = run_sync(op, lambda: base(*args, **options))
        except Exception as exc:
            return recover(mode, core.lkg, core.telemetry, name, args, options, exc, self._orr_scope)
        if mode == STALE:
            remember(core.lkg, name, args, options, result)
        return result

    def miss_on_outage(self) -> Any:
        """A view of this handle whose reads answer as cache misses (None, empty) when Redis is unavailable.

        For cache-aside code: an outage then looks like a miss and the caller
        goes to the source of truth. Writes and error replies still raise.
        """
        return self._orr_view(MISS)

    def last_known_good(self) -> Any:
        """A view whose reads serve the last successful reply of the same command when Redis is unavailable.

        Needs ``Resilience(last_known_good=LastKnownGoodPolicy(...))``. A read
        with nothing remembered answers as a miss. Stale replies are marked on
        the span (``redis.resilience.stale``) and counted as fallbacks of kind
        ``last_known_good``.
        """
        if self._orr_core.lkg is None:
            raise ConfigurationError(
                "last_known_good() needs Resilience(..., last_known_good=LastKnownGoodPolicy(...))"
            )
        return self._orr_view(STALE)

    def _orr_view(self, mode: int) -> Any:
        view: Any = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._orr_mode = mode
        return view

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe: Any = super().pipeline(transaction, shard_hint)
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
