"""Every resilience decision, written once for the sync and the async drivers.

``Core`` is the per-endpoint shared state (breaker, retry budget, policies).
``Operation`` walks one logical Redis operation through its attempts: it says
whether an attempt may run and for how long, and what to do after it failed.
It performs no I/O and never sleeps; the drivers in ``_drivers`` do.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .._drive.classify import NOT_EVIDENCE, REFUSED, ErrorKind, classify, error_code
from .._errors import RedisUnavailable, UnavailableReason
from .._observe.events import Endpoint
from .._testing import is_testing
from .backoff import backoff_delay
from .breaker import REJECTED, BreakerMachine, BreakerState
from .budget import RetryBudget
from .commands import block_seconds, is_idempotent, is_read, relative_ttl, with_block
from .config import BreakerPolicy, RetryPolicy

if TYPE_CHECKING:
    from .._fallback import LastKnownGood
    from .._observe.telemetry import Telemetry
    from .._scope import RequestScope
    from .._writebehind.writebehind import WriteBehind

#: ``Operation.failed`` returns this to tell the driver to re-raise the original error.
RERAISE = -1.0

# An attempt needs at least this long to be worth starting; below it the
# deadline is treated as spent rather than starting an attempt doomed to time out.
_MIN_ATTEMPT = 0.002
# How late Redis may answer a blocking command's timeout: it checks blocked
# clients from its event loop, which sleeps up to 1/hz when idle (100 ms at the
# default hz 10; measured: a 0.25 s block answered after 0.30 s).
_SERVER_TIMER = 0.1
# A TTL must outlive a retry by this much before the retry may be sent.
_TTL_MARGIN = 0.5


class Core:
    """State shared by every request of one ``Resilience``: one per Redis endpoint."""

    def __init__(
        self,
        *,
        endpoint: Endpoint,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
        telemetry: Telemetry,
    ) -> None:
        self.endpoint = endpoint
        self.retry = retry
        self.breaker_policy = breaker
        self.telemetry = telemetry
        self.lock = threading.Lock()
        self.breaker = BreakerMachine(breaker)
        self.budget = RetryBudget(
            ratio=retry.budget_ratio, min_per_second=retry.budget_min_per_second, window=retry.budget_window
        )
        self.random = random.Random()
        #: One attempt's bound before deadlines: ``retry.attempt_timeout``, or for an
        #: asyncio client whose policy says None, the client's own socket_timeout (set by
        #: the owner: inside attempts redis-py's reads ignore it, the watchdog bounds them).
        self.attempt_timeout = retry.attempt_timeout
        #: What bounds an attempt that has no bound of its own (no deadline, no
        #: attempt_timeout, a block of 0): the asyncio client's socket_timeout, which
        #: its reads ignore inside attempts. None for sync clients, whose sockets
        #: keep it (DeadlineSocket).
        self.client_timeout: float | None = None
        #: Set by the owner: starts a background probe (thread or task).
        self.start_probe: Any = None
        #: The last-known-good store, when enabled.
        self.lkg: LastKnownGood | None = None
        #: The write-behind journal and replayer, when enabled.
        self.write_behind: WriteBehind | None = None

    # Called with the lock held, after any breaker method that may have moved.
    def _drain_locked(self) -> list[Any] | None:
        if not self.breaker.transitions:
            return None
        moved = self.breaker.transitions
        self.breaker.transitions = []
        return moved

    def after_transitions(self, moved: list[Any] | None) -> None:
        """Report transitions and start a probe if the breaker opened. Lock not held."""
        if moved is None:
            return
        self.telemetry.transitions(moved)
        if moved[-1].new is BreakerState.OPEN:
            self.maybe_probe()
        elif self.write_behind is not None:
            # Out of OPEN (a probe answered, or the breaker closed): journaled writes can go.
            self.write_behind.kick()

    def maybe_probe(self) -> None:
        if self.start_probe is None:
            return
        with self.lock:
            due = self.breaker.probe_due()
        if due:
            self.start_probe()

    def state(self) -> BreakerState:
        """The breaker's current state (the telemetry's state source)."""
        return self.breaker.state

    def force_open(self) -> None:
        with self.lock:
            self.breaker.force_open(time.monotonic())
            moved = self._drain_locked()
        self.after_transitions(moved)

    def reset(self) -> None:
        with self.lock:
            self.breaker.reset(time.monotonic())
            moved = self._drain_locked()
        self.after_transitions(moved)

    def probe_succeeded(self) -> None:
        with self.lock:
            self.breaker.on_probe_success(time.monotonic())
            moved = self._drain_locked()
        self.after_transitions(moved)

    def record_evidence(self, failed: bool, now: float, duration: float = 0.0) -> None:
        """Evidence about Redis from work outside any request (write-behind replay).

        Counts like one attempt when the breaker would admit one; while it is
        open the evidence is dropped (the probe decides when it closes).
        """
        with self.lock:
            permit = self.breaker.acquire(now)
            if permit != REJECTED:
                if failed:
                    self.breaker.on_failure(permit, now)
                else:
                    self.breaker.on_success(permit, now, duration)
            moved = self._drain_locked()
        self.after_transitions(moved)

    def probe_wanted(self) -> bool:
        with self.lock:
            return self.breaker.probe_wanted()

    def probe_finished(self) -> None:
        with self.lock:
            self.breaker.probe_finished()

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.breaker.after_fork()
        if self.write_behind is not None:
            self.write_behind.after_fork()


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
        "maybe_applied",
        "name",
        "original_args",
        "permit",
        "pipeline",
        "retryable",
        "scope",
        "span",
        "started",
        "token",
        "transaction",
    )

    def __init__(
        self,
        core: Core,
        scope: RequestScope | None,
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
        self.span: Any = None
        self.token: Any = None
        self.started = 0.0
        self.attempt_started = 0.0
        #: The attempt's time when the caller's deadline cut it below its own
        #: bound (None: not cut); a timeout then counts only above the floor.
        self.given: float | None = None
        #: Seconds a blocking command may wait server-side (0: forever), or None.
        self.block = block_seconds(name, args) if pipeline is None and name and name[0] in "BXW" else None
        self.original_args = args
        self.attempt_block: float | None = None
        #: An earlier attempt may have applied it: sticky, whatever ends the call later.
        self.maybe_applied = False

    # -- attempts --------------------------------------------------------------

    def start(self, now: float) -> float | None:
        """Begin the operation; the first attempt's timeout. Raises if rejected up front."""
        self.started = now
        telemetry = self.core.telemetry
        if telemetry.may_trace():
            telemetry.begin(self)
        return self._permit(now, None, first=True)

    def next_attempt(self, now: float, last: BaseException | None) -> float | None:
        """Permit the next attempt; its timeout (None: the client's own). Raises if rejected."""
        return self._permit(now, last, first=False)

    def _permit(self, now: float, last: BaseException | None, *, first: bool) -> float | None:
        deadline_at = self.deadline_at
        if deadline_at is not None and deadline_at - now < _MIN_ATTEMPT:
            raise self._give_up("deadline_exceeded", last, maybe_applied=self.maybe_applied, rejected=True)
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
            raise self._give_up("breaker_open", last, maybe_applied=self.maybe_applied, rejected=True)
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
        core.telemetry.finish(self, "ok" if self.attempts == 1 else "retried", None, now)

    def failed(self, exc: BaseException, sent: bool, now: float) -> float:
        """Decide after a failed attempt: a backoff delay before retrying, or raise.

        Returns :data:`RERAISE` when the original error must propagate as is.
        """
        core = self.core
        kind = classify(exc)
        if kind is ErrorKind.CALLER or kind is ErrorKind.ABORTED:
            with core.lock:
                core.breaker.on_release(self.permit)
            core.telemetry.finish(self, "error" if kind is ErrorKind.CALLER else "cancelled", exc, now)
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
            raise self._give_up("unsafe_to_retry", exc, maybe_applied=True)
        if kind is ErrorKind.WRITE_REFUSED:
            raise self._give_up("write_refused", exc, maybe_applied=maybe_applied)
        deadline_at = self.deadline_at
        if deadline_at is not None and deadline_at - now < 2 * _MIN_ATTEMPT:
            raise self._give_up("deadline_exceeded", exc, maybe_applied=maybe_applied)
        if self.attempts >= core.retry.max_attempts or not self.retryable:
            raise self._give_up("retries_exhausted", exc, maybe_applied=maybe_applied)
        if core.breaker.state is BreakerState.OPEN:
            # This very failure (or a concurrent one) opened the breaker: a retry
            # would only be rejected after its backoff, so give up now.
            raise self._give_up("breaker_opened", exc, maybe_applied=maybe_applied)
        with core.lock:
            allowed = core.budget.try_spend(now)
        if not allowed:
            raise self._give_up("budget_exhausted", exc, maybe_applied=maybe_applied, rejected=True)
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
        core.telemetry.retry(self, delay, exc)
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
            return all(is_read(_name(cmd), cmd) for cmd, _ in self.pipeline)
        return is_read(self.name, self.args)

    def _idempotent(self, now: float) -> bool:
        if self.transaction:
            # Once MULTI ... EXEC may have reached the server it is never sent again.
            return False
        if self.pipeline is not None:
            return all(self._resendable(_name(cmd), cmd, now) for cmd, _ in self.pipeline)
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
        self,
        reason: UnavailableReason,
        cause: BaseException | None,
        *,
        maybe_applied: bool = False,
        rejected: bool = False,
    ) -> RedisUnavailable:
        code = error_code(cause) if cause is not None else None
        err = RedisUnavailable(
            reason,
            operation=self.name,
            attempts=self.attempts,
            outcome_unknown=maybe_applied,
            detail=code or (type(cause).__name__ if cause is not None else ""),
            error_code=code,
        )
        err.__cause__ = cause
        telemetry = self.core.telemetry
        if rejected:
            telemetry.rejected(self, reason)
        elif self.scope is not None:
            self.scope.failures += 1
        if rejected and self.attempts == 0:
            outcome = "rejected"
        elif reason == "deadline_exceeded":
            outcome = "deadline_exceeded"
        else:
            outcome = "failed"
        telemetry.finish(self, outcome, err, time.monotonic())
        return err


def _name(args: Sequence[Any]) -> str:
    first = args[0]
    return (first.decode() if isinstance(first, bytes) else str(first)).upper()
