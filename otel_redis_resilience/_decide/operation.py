"""The attempt walk of one operation, written once for the sync and the async drivers. Pure.

``Operation`` walks one logical Redis operation (a command, a pipeline, a
transaction) through its attempts: it says whether an attempt may run and for
how long, and what to do after one failed. It performs no I/O, never sleeps and
reads no clock: the drivers (``_drive/sync.py``, ``_drive/aio.py``) do, and pass
the time in. A failure arrives sorted (an :class:`ErrorKind` and an error code,
from ``_drive/classify.py``); when the operation must give up it returns a
:class:`GiveUp` verdict, and the driver raises ``RedisUnavailable`` from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from .backoff import backoff_delay
from .breaker import REJECTED, BreakerState
from .commands import (
    BLOCKING_COMMANDS,
    block_seconds,
    command_name,
    is_idempotent,
    is_read,
    relative_ttl,
    with_block,
)
from .errors import NOT_EVIDENCE, REFUSED, ErrorKind, UnavailableReason
from .observer import Outcome, Scope
from .shared import Shared
from .testing import is_testing

#: ``Operation.failed`` returns this to tell the driver to re-raise the original error.
RERAISE = -1.0


class GiveUp(NamedTuple):
    """The verdict that no (further) attempt is made: the driver raises ``RedisUnavailable``.

    Immutable; a named tuple rather than a frozen dataclass because a rejection
    builds one per call and a frozen dataclass costs several times more to build.
    """

    reason: UnavailableReason
    #: The command may have been applied by an attempt that failed.
    outcome_unknown: bool = False
    #: Short-circuited without touching the network (a rejection).
    rejected: bool = False
    #: The Redis error code of the last error reply, or None.
    error_code: str | None = None


# An attempt needs at least this long to be worth starting; below it the
# deadline is treated as spent rather than starting an attempt doomed to time out.
_MIN_ATTEMPT = 0.002
# How late Redis may answer a blocking command's timeout: it checks blocked
# clients from its event loop, which sleeps up to 1/hz when idle (100 ms at the
# default hz 10; measured: a 0.25 s block answered after 0.30 s).
_SERVER_TIMER = 0.1
# A TTL must outlive a retry by this much before the retry may be sent.
_TTL_MARGIN = 0.5


class Operation:
    """One logical operation (a command, a pipeline or a transaction) and its attempts."""

    __slots__ = (
        "args",
        "attempt_block",
        "attempt_started",
        "attempts",
        "block",
        "core",
        "deadline_at",
        "given",
        "last_code",
        "maybe_applied",
        "name",
        "observed",
        "original_args",
        "permit",
        "pipeline",
        "retryable",
        "scope",
        "started",
        "transaction",
    )

    def __init__(
        self,
        core: Shared,
        scope: Scope | None,
        name: str,
        args: Sequence[Any],
        *,
        pipeline: Sequence[tuple[Sequence[Any], Any]] | None = None,
        transaction: bool = False,
        retryable: bool = True,
    ) -> None:
        self.core = core
        self.scope = scope
        self.name = name
        self.args = args
        self.pipeline = pipeline
        self.transaction = transaction
        self.retryable = retryable
        self.attempts = 0
        self.permit = REJECTED
        self.deadline_at = scope.deadline_at if scope is not None else None
        #: The observer's own per-operation state (a span and its context token); opaque here.
        self.observed: Any = None
        #: The error code of the last failed attempt, for the verdict that cites it.
        self.last_code: str | None = None
        self.started = 0.0
        self.attempt_started = 0.0
        #: The attempt's time when the caller's deadline cut it below its own
        #: bound (None: not cut); a timeout then counts only above the floor.
        self.given: float | None = None
        #: Seconds a blocking command may wait server-side (0: forever), or None.
        self.block = block_seconds(name, args) if pipeline is None and name in BLOCKING_COMMANDS else None
        self.original_args = args
        self.attempt_block: float | None = None
        #: An earlier attempt may have applied it: sticky, whatever ends the call later.
        self.maybe_applied = False

    # -- attempts --------------------------------------------------------------

    def start(self, now: float) -> float | GiveUp | None:
        """Begin the operation; the first attempt's timeout (None: the client's own), or a verdict."""
        self.started = now
        self.core.observer.on_start(self)
        return self._permit(now, first=True)

    def next_attempt(self, now: float) -> float | GiveUp | None:
        """Permit the next attempt; its timeout (None: the client's own), or a verdict."""
        return self._permit(now, first=False)

    def _permit(self, now: float, *, first: bool) -> float | GiveUp | None:
        deadline_at = self.deadline_at
        if deadline_at is not None and deadline_at - now < _MIN_ATTEMPT:
            return self._give_up("deadline_exceeded", maybe_applied=self.maybe_applied, rejected=True)
        core = self.core
        breaker = core.breaker
        # One short critical section per attempt; never held across I/O.
        with core.lock:
            if first:
                core.budget.record_operation(now)
            permit = breaker.acquire(now)
            moved = core._drain_locked() if breaker.transitions else None
        if moved is not None:
            core.after_transitions(moved)
        if permit == REJECTED:
            core.maybe_probe()
            return self._give_up("breaker_open", maybe_applied=self.maybe_applied, rejected=True)
        self.permit = permit
        self.attempts += 1
        self.attempt_started = now
        timeout = core.attempt_timeout
        block = self.block
        if block is not None:
            if deadline_at is not None:
                # Block no longer than the deadline allows, so the server answers
                # its own timeout (nil) before we would have to cut the attempt.
                # What it leaves for that reply to arrive is what a timeout must
                # exceed to count as evidence (see _timeout_is_evidence).
                remaining = deadline_at - now
                room = remaining - max(core.breaker_policy.evidence_floor, remaining / 10) - _SERVER_TIMER
                if block == 0 or block > room:
                    block = max(room, 0.001)
                    self.args = with_block(self.name, self.original_args, block)
            timeout = None if block == 0 or timeout is None else timeout + block + _SERVER_TIMER
        self.attempt_block = block
        self.given = None
        if deadline_at is not None:
            remaining = deadline_at - now
            if timeout is None or remaining < timeout:
                timeout = remaining
                self.given = remaining
        return timeout

    def succeeded(self, now: float) -> None:
        core = self.core
        breaker = core.breaker
        duration = now - self.attempt_started
        block = self.attempt_block
        if block is not None:
            # A blocking command's wait is what it asked for, not slowness.
            duration = 0.0 if block == 0 else max(duration - block, 0.0)
        with core.lock:
            breaker.on_success(self.permit, now, duration)
            moved = core._drain_locked() if breaker.transitions else None
        if moved is not None:
            core.after_transitions(moved)
        core.observer.on_finish(self, "ok" if self.attempts == 1 else "retried", None, now)

    def failed(
        self, kind: ErrorKind, code: str | None, error: BaseException, sent: bool, now: float
    ) -> float | GiveUp:
        """Decide after a failed attempt: a backoff delay before retrying, or a verdict.

        ``kind`` and ``code`` sort ``error`` (which is only reported, never inspected);
        ``sent``: a byte of the command reached the socket. Returns :data:`RERAISE`
        when the original error must propagate as is.
        """
        core = self.core
        self.last_code = code
        if kind is ErrorKind.CALLER or kind is ErrorKind.ABORTED:
            with core.lock:
                core.breaker.on_release(self.permit)
            core.observer.on_finish(self, "error" if kind is ErrorKind.CALLER else "cancelled", error, now)
            return RERAISE
        with core.lock:
            if kind in NOT_EVIDENCE or (kind is ErrorKind.TIMEOUT and not self._timeout_is_evidence(now)):
                core.breaker.on_release(self.permit)
            else:
                core.breaker.on_failure(self.permit, now)
            moved = core._drain_locked()
        core.after_transitions(moved)
        # A refused command did not run; nothing was applied when nothing was sent.
        # A plain pipeline is the exception: its other commands ran around the refused one.
        maybe_applied = sent and (
            kind is ErrorKind.TIMEOUT
            or kind is ErrorKind.CONNECTION
            or (kind in REFUSED and self.pipeline is not None and not self.transaction)
        )
        if maybe_applied and self._read_only():
            maybe_applied = False  # a read that may have run changed nothing
        maybe_applied = self.maybe_applied = maybe_applied or self.maybe_applied
        # The reason names what happened, checked in a fixed order so timing cannot change it.
        if maybe_applied and not self._idempotent(now):
            return self._give_up("unsafe_to_retry", maybe_applied=True)
        if kind is ErrorKind.WRITE_REFUSED:
            return self._give_up("write_refused", maybe_applied=maybe_applied)
        deadline_at = self.deadline_at
        if deadline_at is not None and deadline_at - now < 2 * _MIN_ATTEMPT:
            return self._give_up("deadline_exceeded", maybe_applied=maybe_applied)
        if self.attempts >= core.retry.max_attempts or not self.retryable:
            return self._give_up("retries_exhausted", maybe_applied=maybe_applied)
        if core.breaker.state is BreakerState.OPEN:
            # This very failure (or a concurrent one) opened the breaker: a retry
            # would only be rejected after its backoff, so give up now.
            return self._give_up("breaker_opened", maybe_applied=maybe_applied)
        with core.lock:
            allowed = core.budget.try_spend(now)
        if not allowed:
            return self._give_up("budget_exhausted", maybe_applied=maybe_applied, rejected=True)
        if is_testing():
            delay = 0.0
        else:
            policy = core.retry
            delay = backoff_delay(
                self.attempts, base=policy.backoff_base, cap=policy.backoff_cap, jitter=core.random.random()
            )
            if deadline_at is not None:
                # Leave at least half of what remains for the attempt itself.
                delay = min(delay, (deadline_at - now) / 2)
        core.observer.on_retry(self, delay, error)
        return delay

    def _timeout_is_evidence(self, now: float) -> bool:
        """Whether a timed-out attempt says anything against Redis."""
        floor = self.core.breaker_policy.evidence_floor
        block = self.attempt_block
        given = self.given
        if block is None:
            # Judged by the time it was allowed, not by when the timeout was noticed:
            # a starved event loop notices late, and that is no evidence either.
            return given is None or given >= floor  # uncut: it had its whole attempt_timeout
        if block == 0:
            return False  # blocking forever: waiting is what it was asked to do
        # What ended it may be shorter than what it was allowed (a sync client's
        # socket_timeout): only the time beyond its block, and beyond Redis's own
        # timer, is time Redis had to answer.
        elapsed = now - self.attempt_started
        allowed = elapsed if given is None else min(given, elapsed)
        return allowed - block >= floor + _SERVER_TIMER - 1e-6

    def _read_only(self) -> bool:
        if self.pipeline is not None:
            return all(is_read(command_name(cmd), cmd) for cmd, _ in self.pipeline)
        return is_read(self.name, self.args)

    def _idempotent(self, now: float) -> bool:
        if self.transaction:
            # Once MULTI ... EXEC may have reached the server it is never sent again.
            return False
        if self.pipeline is not None:
            return all(self._resendable(command_name(cmd), cmd, now) for cmd, _ in self.pipeline)
        return self._resendable(self.name, self.original_args, now)

    def _resendable(self, name: str, args: Sequence[Any], now: float) -> bool:
        policy = self.core.retry
        if not is_idempotent(name, args, policy.idempotent_commands, policy.idempotent_scripts):
            return False
        ttl = relative_ttl(name, args)
        if ttl is None:
            return True
        # The first run's TTL must still be running when the retry arrives, or the
        # retry finds the key gone and answers 0 (EXPIRE k 1, GETEX k PX 150).
        if self.deadline_at is not None:
            horizon = self.deadline_at
        else:
            attempt = self.core.attempt_timeout or self.core.client_timeout or 5.0
            horizon = now + policy.backoff_cap + attempt
        return self.started + ttl > horizon + _TTL_MARGIN

    def _give_up(
        self, reason: UnavailableReason, *, maybe_applied: bool = False, rejected: bool = False
    ) -> GiveUp:
        # The error code cited is the last failed attempt's (None before the first).
        return GiveUp(reason, maybe_applied, rejected, self.last_code)

    def gave_up(self, verdict: GiveUp, error: BaseException, now: float) -> None:
        """The driver raised ``error`` for ``verdict``: count it and report the end."""
        observer = self.core.observer
        if verdict.rejected:
            observer.on_rejected(self, verdict.reason)
        elif self.scope is not None:
            self.scope.failures += 1
        outcome: Outcome
        if verdict.rejected and self.attempts == 0:
            outcome = "rejected"
        elif verdict.reason == "deadline_exceeded":
            outcome = "deadline_exceeded"
        else:
            outcome = "failed"
        observer.on_finish(self, outcome, error, now)
