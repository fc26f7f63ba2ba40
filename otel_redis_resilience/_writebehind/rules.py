"""The rules of write-behind, pure: no I/O, no clock (time is passed in), no Redis or SQLite.

Which commands may be journaled and under which key, when a failed direct write may be
journaled, how long the replayer holds back after a run, and when a replay lease held by
someone else may be taken. The store, the replayer and the handles ask; they do the I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .._decide.commands import IDEMPOTENT_WRITES, WRITE_BEHIND_COMMANDS, journal_key
from .errors import WriteBehindError

__all__ = [
    "BATCH_DEADLINE",
    "LEASE_POLL",
    "MAX_BACKOFF",
    "WRITE_BEHIND_COMMANDS",
    "ReplaySchedule",
    "RunReport",
    "RunVerdict",
    "backoff",
    "dead_by_stat",
    "lease_blocks",
    "may_journal_after",
    "owner_token",
    "pid_to_judge",
    "write_key",
]


#: Seconds one replay batch may take before it is abandoned (and retried later).
BATCH_DEADLINE: Final = 10.0
#: After a failed run, the next one waits 0.05, 0.1, 0.2 ... s, at most this long (and at most
#: lease_seconds), whatever kicks the replayer. Failed runs also count against the breaker, so a
#: dead Redis soon opens it and replay stops until the probe sees Redis answer; the cap only
#: bounds how late the first run after a recovery can be when the breaker did not open.
MAX_BACKOFF: Final = 2.0
_FIRST_BACKOFF: Final = 0.05
#: How often a replayer looks at the lease again while another process holds it: a holder
#: that died is taken over at the next look (see :func:`dead_by_stat`).
LEASE_POLL: Final = 0.5


# ---------------------------------------------------------------------------- what may be journaled


def write_key(name: str, args: Sequence[Any]) -> Any:
    """The key a write-behind command writes; None for a read; else :class:`WriteBehindError`."""
    key, problem = journal_key(name, args)
    if problem is not None:
        raise WriteBehindError(problem)
    return key


class _Failure(Protocol):
    # What may_journal_after reads of a RedisUnavailable (kept structural: the rules import no redis).
    @property
    def outcome_unknown(self) -> bool: ...


def may_journal_after(exc: _Failure, name: str) -> bool:
    """Whether a failed direct write may be journaled.

    If it may already have been applied (sent, no reply) only an idempotent write
    can be journaled: replaying a lost INCRBY whose first copy did run would count
    it twice. Such a write raises instead, with ``outcome_unknown`` set.
    """
    return not exc.outcome_unknown or name in IDEMPOTENT_WRITES


# ---------------------------------------------------------------------------- when the replayer runs


def backoff(failed_runs: int, lease_seconds: float) -> float:
    """Seconds to hold back after ``failed_runs`` failed runs in a row (>= 1)."""
    doubled: float = _FIRST_BACKOFF * 2.0 ** min(failed_runs - 1, 6)
    return min(lease_seconds, MAX_BACKOFF, doubled)


@dataclass(frozen=True, slots=True)
class RunReport:
    """What one replay run did, as the schedule needs it (the I/O side fills it in).

    Attributes:
        lease_acquired: False if another process held the lease (the run did nothing).
        batches: pipelines executed.
        slowest: seconds of the slowest Redis round trip.
        failed: the run ended on an error (raised, or in its totals).
        evidence: that error says Redis is unavailable (classified at the I/O boundary).
    """

    lease_acquired: bool = True
    batches: int = 0
    slowest: float = 0.0
    failed: bool = False
    evidence: bool = False


@dataclass(frozen=True, slots=True)
class RunVerdict:
    """What to do after a run: stop for now, and what the breaker is told (None: nothing)."""

    stop: bool
    #: True: a failure; False: a success lasting ``duration``; None: tell the breaker nothing.
    breaker_failure: bool | None = None
    duration: float = 0.0


class ReplaySchedule:
    """When the replayer may run next: the backoff after failures and the look at a held lease.

    Times are ``time.monotonic()`` seconds passed in by the driver.
    """

    __slots__ = ("failed_runs", "hold_until", "lease_seconds")

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self.failed_runs = 0
        #: Before this, no run starts whatever kicks the replayer.
        self.hold_until = 0.0

    def idle_wait(self, pending: int, now: float) -> float | None:
        """How long to wait for a kick before looking again (None: until kicked)."""
        # Nothing left: sleep until kicked. Held (a failed run's backoff, or the lease is
        # held elsewhere): look again when the hold ends. Entries left otherwise (the
        # breaker is open): look again soon; leaving open also kicks.
        if not pending:
            return None
        if self.hold_until > now:
            return self.hold_until - now
        return min(self.lease_seconds, LEASE_POLL)

    def hold_left(self, now: float) -> float:
        """Seconds of hold still to wait out, kicks or not (0 when free to run)."""
        return max(0.0, self.hold_until - now)

    def after_run(self, report: RunReport, now: float) -> RunVerdict:
        """Account for a run's result; say whether to stop and what the breaker hears."""
        if report.failed:
            self.failed_runs += 1
            self.hold_until = now + backoff(self.failed_runs, self.lease_seconds)
            # Writes queued behind pending entries never reach Redis: during an outage the
            # replayer may be the only one to see it down, and the breaker must hear it.
            return RunVerdict(stop=True, breaker_failure=True if report.evidence else None)
        if not report.lease_acquired:
            self.hold_until = now + min(self.lease_seconds, LEASE_POLL)
            return RunVerdict(stop=True)
        self.failed_runs = 0
        self.hold_until = 0.0
        if report.batches:
            return RunVerdict(stop=False, breaker_failure=False, duration=report.slowest)
        return RunVerdict(stop=True)


# ---------------------------------------------------------------------------- the replay lease


def owner_token(pid: int, nonce: str, started: str, host: str) -> str:
    """The lease owner token: unique per journal object, and naming its process for others."""
    return f"{pid}:{nonce}:{started}:{host}"


def lease_blocks(holder: str | None, expires_at: float, me: str, now: float, dead: str | None) -> bool:
    """Whether a lease row keeps ``me`` from taking the lease at wall-clock ``now``.

    Free, expired or ours: it does not. Held by ``dead`` (a holder judged dead just before):
    it does not either, as long as that same holder still holds it.
    """
    return holder is not None and holder != me and expires_at > now and holder != dead


def pid_to_judge(owner: str, host: str, my_pid: int) -> int | None:
    """The pid to look at to tell whether the lease ``owner`` died; None if it cannot be judged.

    Only a process of this host (same boot, same pid namespace: ``host``) that recorded its
    start time can be judged; another host, container or library version is waited out.
    """
    parts = owner.split(":", 3)
    if len(parts) != 4 or not host or parts[3] != host or not parts[2]:
        return None
    try:
        pid = int(parts[0])
    except ValueError:
        return None
    # Our own pid: another journal object of this very process, alive.
    return None if pid == my_pid else pid


def dead_by_stat(owner: str, stat: tuple[str, str] | None) -> bool:
    """Whether ``owner`` surely no longer runs, given (state, start time) of its pid or None.

    Gone; a zombie (killed, not yet reaped by its parent); or the pid reused by another
    process. A wrong "dead" would let two processes replay at once (still exactly once, thanks
    to the markers, but per-key order across batches relies on the lease).
    """
    return stat is None or stat[0] in ("Z", "X", "x") or stat[1] != owner.split(":", 3)[2]
