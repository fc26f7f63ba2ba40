"""What the sync and async handles share: views, an operation's set-up, pipelines'. No I/O."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._decide.commands import _NAMES, command_name
from ._decide.operation import Operation
from ._drive.flows import view_flow
from ._errors import ConfigurationError
from ._fallback import MISS, NORMAL, STALE, WRITE_BEHIND
from ._scope import RequestScope, scope_closed_error

if TYPE_CHECKING:
    from ._drive.core import Core
    from ._drive.flows import ViewFlow


class HandleBase:
    """Mixed into both handle classes, ahead of the redis-py client class."""

    _orr_core: Core
    _orr_scope: RequestScope | None
    _orr_mode: int = NORMAL

    def _orr_operation(self, args: Sequence[Any]) -> Operation:
        """The operation for one command (``args``, name first) on this handle.

        Raises:
            ScopeClosedError: the handle's request scope has ended.
        """
        name = _NAMES.get(args[0]) or command_name(args)
        scope = self._orr_scope
        if scope is not None and scope.ended:
            raise scope_closed_error(name)
        return Operation(self._orr_core, scope, name, args)

    def _orr_flow(
        self, op: Operation, args: Sequence[Any], options: dict[str, Any], decodes: Callable[[], bool]
    ) -> ViewFlow:
        """The written-once flow of a command on a view (see ``_drive/flows.py``)."""
        return view_flow(self._orr_core, self._orr_mode, op.name, args, options, self._orr_scope, decodes)

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

    def write_behind(self) -> Any:
        """A view whose writes are applied now when Redis is healthy and journaled when it is not.

        Needs ``Resilience(write_behind=WriteBehindConfig(directory=...))``. Each
        single-key write returns its usual reply when applied, or a
        :class:`Journaled` (with the entry id and why) when it was journaled: the
        breaker is open, Redis is unavailable, the deadline is spent, or earlier
        writes to the same key are still waiting (a new write queues behind them,
        never overtakes them). Journaled writes are replayed in order, exactly
        once, when the breaker closes. A non-idempotent write whose outcome is
        unknown (sent, no reply) is not journaled, since replaying it could apply
        it twice: it raises ``RedisUnavailable(outcome_unknown=True)``. Reads pass
        through as on the plain handle.
        """
        if self._orr_core.write_behind is None:
            raise ConfigurationError(
                "write_behind() needs Resilience(..., write_behind=WriteBehindConfig(directory=...))"
            )
        return self._orr_view(WRITE_BEHIND)

    def _orr_view(self, mode: int) -> Any:
        view: Any = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view._orr_mode = mode
        return view

    def _orr_adopt(self, pipe: Any, pipeline_class: type) -> Any:
        """Turn a redis-py pipeline made by the client into one that runs as a single operation."""
        if self._orr_mode == WRITE_BEHIND:
            # Journaling is per single-key write; a pipeline sent as one operation
            # would silently bypass it.
            raise ConfigurationError(
                "write_behind() views have no pipeline() or transaction(): write-behind journals "
                "single-key writes one by one, and a pipeline would bypass it. Call the writes "
                "on the view one at a time (h.write_behind().set(...)), or use h.pipeline() on "
                "the plain handle when the writes need not survive an outage"
            )
        pipe.__class__ = pipeline_class
        pipe._orr_core = self._orr_core
        pipe._orr_scope = self._orr_scope
        return pipe

    def __repr__(self) -> str:
        return f"<{type(self).__name__} for {self._orr_core.endpoint}>"


def pipeline_operation(
    pipe: Any, transaction: bool
) -> tuple[Operation, list[tuple[Sequence[Any], Any]]] | None:
    """The operation for a pipeline's ``execute()``, and a snapshot of its commands (None: nothing to do).

    Raises:
        ScopeClosedError: the pipeline's request scope has ended.
    """
    scope = pipe._orr_scope
    if scope is not None and scope.ended:
        raise scope_closed_error("MULTI/EXEC" if transaction else "pipeline execute()")
    stack = pipe.command_stack
    if not stack and not pipe.watching:
        return None
    snapshot = list(stack)
    op = Operation(
        pipe._orr_core,
        scope,
        "MULTI" if transaction else "PIPELINE",
        (),
        pipeline=snapshot,
        transaction=transaction,
        # After WATCH the pipeline is bound to one connection: a retry on
        # another one would silently drop the WATCH.
        retryable=not pipe.watching,
    )
    return op, snapshot


def make_class(cache: dict[type, type], mixin: type, base: type) -> type:
    """A cached subclass of ``base`` with ``mixin`` in front."""
    found = cache.get(base)
    if found is None:
        found = type(f"Resilient{base.__name__}", (mixin, base), {"__module__": mixin.__module__})
        cache[base] = found
    return found
