"""``Core``: one endpoint's shared decision state, wired to its collaborators.

The decisions live in ``_decide.shared.Shared`` (pure, lock injected); this
subclass is where they meet the rest: the real ``threading.Lock``, the
``Telemetry`` that observes them, the last-known-good store, the write-behind
journal (kicked when the breaker leaves open), and what a fork resets. One per
``Resilience``; shared by every thread and task using it.

It also holds what both attempt loops do around the decisions after a failure
(``after_failure``, ``next_timeout``): sort the error at the I/O boundary, read the
clock, and turn a :class:`GiveUp` verdict into the ``RedisUnavailable`` the caller
gets (:func:`unavailable`), since the decisions may not build a redis-py exception.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextvars import Token
from typing import TYPE_CHECKING

from .._decide.config import BreakerPolicy, RetryPolicy
from .._decide.operation import RERAISE, GiveUp, Operation
from .._decide.shared import Shared
from .._errors import RedisUnavailable
from .._observe.events import Endpoint
from .classify import classify, error_code
from .context import CURRENT_ATTEMPT, Attempt

if TYPE_CHECKING:
    from .._fallback import LastKnownGood
    from .._observe.telemetry import Telemetry
    from .._writebehind.writebehind import WriteBehind

_monotonic = time.monotonic


class Core(Shared):
    """State shared by every request of one ``Resilience``: one per Redis endpoint."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
        telemetry: Telemetry,
        start_probe: Callable[[], None] | None = None,
        lkg: LastKnownGood | None = None,
    ) -> None:
        super().__init__(
            retry=retry, breaker=breaker, observer=telemetry, lock=threading.Lock(), start_probe=start_probe
        )
        self.endpoint = endpoint
        self.telemetry = telemetry
        #: The last-known-good store, when enabled.
        self.lkg = lkg
        #: The write-behind journal and replayer, when enabled (made after the Core it reports to).
        self.write_behind: WriteBehind | None = None

    def left_open(self) -> None:
        # Out of OPEN (a probe answered, or the breaker closed): journaled writes can go.
        if self.write_behind is not None:
            self.write_behind.kick()

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.breaker.after_fork()
        if self.write_behind is not None:
            self.write_behind.after_fork()


def unavailable(
    op: Operation, verdict: GiveUp, cause: BaseException | None, node: str | None = None
) -> RedisUnavailable:
    """The ``RedisUnavailable`` for ``verdict``, ``cause`` chained; ``op``'s end reported.

    ``node``: the cluster node (``"host:port"``) the operation gave up on, if any.
    """
    code = verdict.error_code
    err = RedisUnavailable(
        verdict.reason,
        operation=op.name,
        attempts=op.attempts,
        outcome_unknown=verdict.outcome_unknown,
        detail=code or (type(cause).__name__ if cause is not None else ""),
        error_code=code,
        node=node,
    )
    err.__cause__ = cause
    op.gave_up(verdict, err, _monotonic())
    return err


def after_failure(
    op: Operation, exc: BaseException, attempt: Attempt, token: Token[Attempt | None]
) -> float | None:
    """End a failed attempt: seconds to wait before the next, None to re-raise ``exc`` as is,
    or raise the verdict.

    Called inside the driver's ``except`` block, so a verdict chains ``exc`` as its context too.
    """
    CURRENT_ATTEMPT.reset(token)
    delay = op.failed(classify(exc), error_code(exc), exc, attempt.sent, _monotonic())
    if isinstance(delay, GiveUp):
        raise unavailable(op, delay, exc)
    return None if delay == RERAISE else delay


def next_timeout(op: Operation, last: BaseException) -> float | None:
    """The next attempt's timeout after the backoff, or raise its verdict (``last`` chained)."""
    timeout = op.next_attempt(_monotonic())
    if isinstance(timeout, GiveUp):
        raise unavailable(op, timeout, last)
    return timeout
