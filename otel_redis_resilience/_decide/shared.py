"""The decision state one endpoint's operations share: breaker, retry budget, policies. Pure.

Why the lock is injected rather than made here: this state is shared by every
thread and task of one ``Resilience``, so its updates must be serialised, but the
decision floor imports no ``threading`` (it must run, and be tested, without
threads, clocks or I/O). The owner (``_drive/core.py``) passes a
``threading.Lock``; tests may pass any context manager. It is held only around
these pure updates, never across I/O, and never while the observer or a listener
runs.

Time is always passed in (``now``: a ``time.monotonic()`` reading taken by the
driver). Collaborators are given at construction: the :class:`Observer`, and
``start_probe``, which the owner implements by starting a thread or a task.
Subclasses may override :meth:`Shared.left_open` (write-behind replays then).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from .breaker import REJECTED, BreakerMachine, BreakerState, Transition
from .budget import RetryBudget
from .config import BreakerPolicy, RetryPolicy
from .observer import Observer


class Lock(Protocol):
    """A mutual-exclusion context manager (``threading.Lock``)."""

    def __enter__(self) -> Any: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> Any: ...


class Shared:
    """Decision state shared by every operation of one ``Resilience``: one per Redis endpoint."""

    def __init__(
        self,
        *,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
        observer: Observer,
        lock: Lock,
        start_probe: Callable[[], None] | None = None,
    ) -> None:
        self.retry = retry
        self.breaker_policy = breaker
        self.observer = observer
        self.lock = lock
        #: Starts a background probe (a thread or a task): the owner's I/O.
        self.start_probe = start_probe
        self.breaker = BreakerMachine(breaker)
        self.budget = RetryBudget.of(retry)
        self.random = random.Random()
        #: One attempt's bound before deadlines: ``retry.attempt_timeout``, or, when the
        #: policy says None, the client's own socket_timeout (set by the owner).
        self.attempt_timeout = retry.attempt_timeout
        #: What bounds an attempt that has no bound of its own (no deadline, no
        #: attempt_timeout, a block of 0): the asyncio client's socket_timeout, which
        #: its reads ignore inside attempts. None for sync clients, whose sockets
        #: keep it (DeadlineSocket).
        self.client_timeout: float | None = None

    # Called with the lock held, after any breaker method that may have moved.
    def _drain_locked(self) -> list[Transition] | None:
        if not self.breaker.transitions:
            return None
        moved = self.breaker.transitions
        self.breaker.transitions = []
        return moved

    def after_transitions(self, moved: list[Transition] | None) -> None:
        """Report transitions and start a probe if the breaker opened. Lock not held."""
        if moved is None:
            return
        self.observer.on_transitions(moved)
        if moved[-1].new is BreakerState.OPEN:
            self.maybe_probe()
        else:
            self.left_open()

    def left_open(self) -> None:
        """The breaker left OPEN (a probe answered, or it closed). Lock not held."""

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

    def force_open(self, now: float) -> None:
        with self.lock:
            self.breaker.force_open(now)
            moved = self._drain_locked()
        self.after_transitions(moved)

    def reset(self, now: float) -> None:
        with self.lock:
            self.breaker.reset(now)
            moved = self._drain_locked()
        self.after_transitions(moved)

    def probe_succeeded(self, now: float) -> None:
        with self.lock:
            self.breaker.on_probe_success(now)
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
