"""Redis Cluster decisions: the per-node registry, topology refresh rules, redirects. Pure.

A cluster ``Resilience`` keeps one :class:`Shared` (breaker, retry budget) per
primary node, keyed ``"host:port"``. This module decides, with time passed in and
the lock injected (as ``shared.py``), without any I/O:

- which nodes have a breaker (:class:`NodeRegistry`): created when a node is
  first routed to, dropped by a refresh that finds it owns no slot any more;
- when the topology may be refreshed (:class:`RefreshGate`): one refresh at a
  time per process (single-flight: a caller that finds one running does not
  wait for it), and never more often than :data:`REFRESH_FLOOR`;
- what a redirect does to an operation (:func:`redirected`): MOVED and ASK are
  replies, not failures, so the node that sent one is credited, the attempt
  count and the retry budget are untouched, and the operation continues on the
  node it was sent to, under that node's breaker, within the same deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .breaker import BreakerState
from .operation import GiveUp, Operation
from .shared import Lock, Shared

#: Seconds between two topology refreshes, at least. A failover is found by the
#: first refresh after the promotion, so this bounds how late it is picked up
#: while some caller needs the refresh; 50 ms keeps that under the 100 ms target
#: and costs one CLUSTER SLOTS every 50 ms, only while some node is failing.
REFRESH_FLOOR = 0.05
#: The longest one refresh may take (each node asked gets its share); a caller's
#: own deadline cuts it shorter.
REFRESH_TIMEOUT = 0.5
#: Redirects followed for one operation before giving up (redis-py's TTL is 16).
MAX_REDIRECTS = 16

T = TypeVar("T")

_SEVERITY = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


def worst(states: Iterable[BreakerState]) -> BreakerState:
    """The worst of the states (open > half-open > closed); closed for none."""
    found = BreakerState.CLOSED
    for state in states:
        if _SEVERITY[state] > _SEVERITY[found]:
            found = state
    return found


class NodeRegistry(Generic[T]):
    """Per-node state (a ``Core``), keyed ``"host:port"``; the lock guards the dict only."""

    def __init__(self, make: Callable[[str], T], lock: Lock) -> None:
        self._make = make
        self._lock = lock
        self._nodes: dict[str, T] = {}

    def get(self, name: str) -> T:
        """The node's state, made on first use (a node found by a redirect or a refresh)."""
        found = self._nodes.get(name)  # the hot path: no lock for a node already known
        if found is not None:
            return found
        made = self._make(name)
        with self._lock:
            # A concurrent caller may have made it first: keep theirs, one breaker per node.
            return self._nodes.setdefault(name, made)

    def find(self, name: str) -> T | None:
        return self._nodes.get(name)

    def snapshot(self) -> dict[str, T]:
        with self._lock:
            return dict(self._nodes)

    def sync(self, owners: Iterable[str]) -> tuple[list[str], list[str]]:
        """After a refresh: every slot owner has state, every other node loses it.

        Returns the names added and the names dropped. A node dropped and later
        routed to again starts afresh (a new primary's breaker starts closed).
        """
        wanted = set(owners)
        fresh = {name: self._make(name) for name in wanted if name not in self._nodes}
        with self._lock:
            dropped = [name for name in self._nodes if name not in wanted]
            for name in dropped:
                del self._nodes[name]
            added = []
            for name, state in fresh.items():
                if name not in self._nodes:
                    self._nodes[name] = state
                    added.append(name)
        return sorted(added), sorted(dropped)


class RefreshGate:
    """When a topology refresh may start: single-flight, and at most one per ``floor`` seconds."""

    def __init__(self, lock: Lock, floor: float = REFRESH_FLOOR) -> None:
        self._lock = lock
        self.floor = floor
        self._running = False
        self._last_start = float("-inf")
        #: Refreshes started, and how many of them failed (for tests and reports).
        self.started = 0
        self.failed = 0

    def claim(self, now: float) -> bool:
        """True if the caller is to refresh now (it must call :meth:`finished`)."""
        with self._lock:
            if self._running or now - self._last_start < self.floor:
                return False
            self._running = True
            self._last_start = now
            self.started += 1
            return True

    def finished(self, ok: bool) -> None:
        with self._lock:
            self._running = False
            if not ok:
                self.failed += 1

    @property
    def running(self) -> bool:
        return self._running

    def after_fork(self, lock: Lock) -> None:
        """A refresh running in the parent did not survive ``fork()``."""
        self._lock = lock
        self._running = False


def retarget(op: Operation, core: Shared) -> None:
    """Between attempts (no permit held): the operation's next attempt goes to ``core``'s node.

    The attempt walk carries over: attempts made, whether an earlier attempt may
    have applied a write (so a write that may have run on the old primary is not
    re-sent to the new one unless its reply is stable).
    """
    op.core = core


def redirected(op: Operation, core: Shared, now: float) -> float | GiveUp | None:
    """The attempt got MOVED or ASK: continue on ``core``'s node; its attempt's timeout, or a verdict.

    The redirecting node answered, so its breaker is credited with a success (a
    reply is evidence that it serves). The attempt is not counted again, no retry
    budget is spent and no backoff applies: the redirect is part of the attempt.
    The deadline still holds, and the new node's breaker may reject.
    """
    old = op.core
    with old.lock:
        old.breaker.on_success(op.permit, now, now - op.attempt_started)
        moved = old._drain_locked() if old.breaker.transitions else None
    if moved is not None:
        old.after_transitions(moved)
    op.core = core
    attempts = op.attempts
    timeout = op.next_attempt(now)
    # The permit above counted one more attempt: a redirect is not one.
    op.attempts = attempts
    return timeout
