"""The flows written once for sync and asyncio: I/O-free generators that a driver steps through.

Like httpx's ``auth_flow``: a flow yields the step it needs performed (run the
operation's attempts, journal a write, sleep, ping) and receives the result (or
has the step's error thrown into it); it decides everything else. The drivers in
``sync.py`` and ``aio.py`` perform the steps (blocking, or awaiting; an fsync off
the event loop; a thread or a task) and nothing else.

- :func:`view_flow`: a command on a degraded view (``miss_on_outage()``,
  ``last_known_good()``, ``write_behind()``): what answers when Redis cannot, and
  apply-now-or-journal. The plain handle's command (NORMAL) does not go through
  a generator: it is the hot path and calls the attempt loop directly.
- :func:`probe_flow`: the background health probe.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from .._decide.config import BreakerPolicy
from .._errors import RedisUnavailable
from .._fallback import STALE, WRITE_BEHIND, recover, remember
from .._writebehind.writebehind import may_journal_after, write_key

if TYPE_CHECKING:
    from .._scope import RequestScope
    from .._writebehind.writebehind import WriteBehind
    from .core import Core

#: Step: run the operation's attempts; the reply is sent back, or its error thrown in.
RUN: Final = "run"


@dataclass(frozen=True, slots=True)
class Journal:
    """Step: journal a write (``wb.append``); the ``Journaled`` is sent back, or its error thrown in."""

    wb: WriteBehind
    key: Any
    args: Sequence[Any]
    reason: str
    scope: RequestScope | None
    after: RedisUnavailable | None = None


@dataclass(frozen=True, slots=True)
class Sleep:
    """Step: wait this many seconds."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Ping:
    """Step: PING within ``timeout``; send back the ``time.monotonic()`` of the reply, or None."""

    timeout: float


ViewStep: TypeAlias = str | Journal
ViewFlow: TypeAlias = Generator[ViewStep, Any, Any]
ProbeFlow: TypeAlias = Generator[Sleep | Ping, float | None, None]


class Stepper:
    """Steps a flow: the generator protocol (send, throw, the return value), written once.

    A driver loops ``while stepper.running``, performs ``stepper.step``, and hands
    back the result with :meth:`send` or the error with :meth:`throw`; then returns
    ``stepper.value``.
    """

    __slots__ = ("_flow", "running", "step", "value")

    def __init__(self, flow: Generator[Any, Any, Any]) -> None:
        self._flow = flow
        self.running = True
        self.step: Any = RUN
        self.value: Any = None
        self._resume(flow.send, None)

    def send(self, reply: Any) -> None:
        self._resume(self._flow.send, reply)

    def throw(self, error: BaseException) -> None:
        self._resume(self._flow.throw, error)

    def close(self) -> None:
        """End the flow where it stands (its ``finally`` clauses run)."""
        self._flow.close()

    def _resume(self, how: Callable[[Any], Any], arg: Any) -> None:
        try:
            self.step = how(arg)
        except StopIteration as done:
            self.running = False
            self.value = done.value


def view_flow(
    core: Core,
    mode: int,
    name: str,
    args: Sequence[Any],
    options: dict[str, Any],
    scope: RequestScope | None,
    decode: Callable[[], bool],
) -> ViewFlow:
    """One command on a view in ``mode``; returns its reply (or a fallback, or a ``Journaled``).

    ``decode()`` says whether the client decodes replies (asked only for a miss reply).
    """
    if mode == WRITE_BEHIND:
        wb = core.write_behind
        assert wb is not None
        return (yield from _apply_or_journal(wb, name, args, scope))
    try:
        result = yield RUN
    except Exception as exc:
        return recover(mode, core.lkg, core.telemetry, name, args, options, exc, scope, decode=decode())
    if mode == STALE:
        remember(core.lkg, name, args, options, result)
    return result


def _apply_or_journal(
    wb: WriteBehind, name: str, args: Sequence[Any], scope: RequestScope | None
) -> ViewFlow:
    key = write_key(name, args)
    if key is None:
        return (yield RUN)
    if wb.must_queue(key):
        queued = yield Journal(wb, key, args, "queued_behind", scope)
        wb.kick()  # the entries ahead may be waiting for a replayer to notice Redis is fine
        return queued
    try:
        return (yield RUN)
    except RedisUnavailable as exc:
        if not may_journal_after(exc, name):
            raise
        journaled = yield Journal(wb, key, args, exc.reason, scope, exc)
    wb.kick()
    return journaled


def probe_flow(core: Core, policy: BreakerPolicy, current: Callable[[], bool]) -> ProbeFlow:
    """Ping every ``probe_interval`` while the breaker is open; the first reply half-opens it.

    ``current()`` is False once ``Resilience.close()`` has run since this probe
    started: the probe stops, and leaves the probe claim to ``close()`` (which
    already released it). A driver must close the flow if it stops stepping it.
    """
    interval = policy.probe_interval or 0.0
    timeout = policy.probe_timeout or interval
    try:
        while current() and core.probe_wanted():
            yield Sleep(interval)
            if not current() or not core.probe_wanted():
                break
            answered_at = yield Ping(timeout)
            if answered_at is not None:
                core.probe_succeeded(answered_at)
                break
    finally:
        if current():
            core.probe_finished()
