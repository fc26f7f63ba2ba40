"""The pure rules of write-behind, tested directly: no Redis, no SQLite, fake time.

The replay flow is driven here by a fake driver that answers its steps from a script, the way
the sync and asyncio drivers answer them from a store and a client.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from otel_redis_resilience._writebehind import codec, rules
from otel_redis_resilience._writebehind.errors import JournalError, WriteBehindError
from otel_redis_resilience._writebehind.flow import (
    JournalStep,
    LoadScript,
    RedisCallFailed,
    ReplayTotals,
    RunPipeline,
    RunSettings,
    Stepper,
    batch_flow,
    run_flow,
)
from otel_redis_resilience._writebehind.plan import (
    REPLAY_SCRIPT,
    ErrorResult,
    LeaseLostError,
    ReplayStalledError,
    interpret,
    plan_batch,
)
from otel_redis_resilience._writebehind.view import DeadLetter

PACKAGE = Path(__file__).resolve().parents[2] / "otel_redis_resilience" / "_writebehind"
PURE = ("rules.py", "codec.py", "plan.py", "flow.py", "errors.py")
FORBIDDEN = {"sqlite3", "redis", "asyncio", "threading", "socket", "opentelemetry", "time"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return {name.split(".")[0] for name in names}


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_no_io_and_no_clock(module: str) -> None:
    assert not _imports(PACKAGE / module) & FORBIDDEN


def test_the_import_scan_sees_a_forbidden_import() -> None:
    # Guards the guard: the store does import sqlite3 and the clock.
    assert {"sqlite3", "time"} <= _imports(PACKAGE / "store.py")


# ---------------------------------------------------------------------------- what may be journaled


def test_write_key_is_the_single_key_of_a_write() -> None:
    assert rules.write_key("INCRBY", ("INCRBY", "k", 5)) == "k"
    assert rules.write_key("DEL", ("DEL", "k")) == "k"
    assert rules.write_key("GET", ("GET", "k")) is None  # reads pass through
    with pytest.raises(WriteBehindError, match="single-key writes; this DEL names 2 keys"):
        rules.write_key("DEL", ("DEL", "a", "b"))
    with pytest.raises(WriteBehindError, match="MSET is not one"):
        rules.write_key("MSET", ("MSET", "a", 1))


@dataclass
class _Failure:
    outcome_unknown: bool


def test_only_idempotent_writes_are_journaled_after_an_unknown_outcome() -> None:
    assert rules.may_journal_after(_Failure(outcome_unknown=False), "INCRBY")
    assert not rules.may_journal_after(_Failure(outcome_unknown=True), "INCRBY")
    assert rules.may_journal_after(_Failure(outcome_unknown=True), "SET")


# ---------------------------------------------------------------------------- when the replayer runs


def test_backoff_doubles_and_is_capped_by_the_lease_and_two_seconds() -> None:
    assert [rules.backoff(n, 10.0) for n in (1, 2, 3, 6)] == [0.05, 0.1, 0.2, 1.6]
    assert rules.backoff(7, 10.0) == rules.backoff(50, 10.0) == 2.0
    assert rules.backoff(7, 0.3) == 0.3


def test_schedule_backs_off_after_failures_and_resets_after_success() -> None:
    s = rules.ReplaySchedule(lease_seconds=10.0)
    now = 1000.0
    assert s.idle_wait(0, now) is None  # nothing pending: wait for a kick
    assert s.idle_wait(3, now) == 0.5  # pending but not run (breaker open): look again soon
    verdict = s.after_run(rules.RunReport(failed=True, evidence=True), now)
    assert verdict == rules.RunVerdict(stop=True, breaker_failure=True)
    assert s.hold_left(now) == pytest.approx(0.05)
    assert s.idle_wait(3, now + 0.01) == pytest.approx(0.04)
    s.after_run(rules.RunReport(failed=True, evidence=False), now + 1)  # e.g. a journal error
    assert s.hold_left(now + 1) == pytest.approx(0.1)
    assert s.after_run(rules.RunReport(failed=True), now + 2).breaker_failure is None
    verdict = s.after_run(rules.RunReport(batches=2, slowest=0.003), now + 3)
    assert verdict == rules.RunVerdict(stop=False, breaker_failure=False, duration=0.003)
    assert (s.failed_runs, s.hold_left(now + 3)) == (0, 0.0)
    # A run with nothing to replay says nothing to the breaker, and the loop stops.
    assert s.after_run(rules.RunReport(batches=0), now + 4) == rules.RunVerdict(stop=True)


def test_schedule_polls_a_lease_held_elsewhere() -> None:
    s = rules.ReplaySchedule(lease_seconds=10.0)
    assert s.after_run(rules.RunReport(lease_acquired=False), 50.0) == rules.RunVerdict(stop=True)
    assert s.hold_left(50.0) == 0.5
    short = rules.ReplaySchedule(lease_seconds=0.2)
    short.after_run(rules.RunReport(lease_acquired=False), 50.0)
    assert short.hold_left(50.0) == pytest.approx(0.2)


# ---------------------------------------------------------------------------- lease take-over


HOST = "boot-1/pid:[4026531836]"


def test_lease_blocks_unless_free_expired_ours_or_dead() -> None:
    other = rules.owner_token(7, "n", "123", HOST)
    assert not rules.lease_blocks(None, 0.0, "me", 10.0, None)  # free
    assert rules.lease_blocks(other, 20.0, "me", 10.0, None)  # held and valid
    assert not rules.lease_blocks(other, 10.0, "me", 10.0, None)  # expired (at now)
    assert not rules.lease_blocks("me", 20.0, "me", 10.0, None)  # ours: re-entrant
    assert not rules.lease_blocks(other, 20.0, "me", 10.0, other)  # its holder was judged dead
    assert rules.lease_blocks(other, 20.0, "me", 10.0, "someone-else")


def test_only_a_holder_of_this_host_with_a_start_time_is_judged() -> None:
    assert rules.pid_to_judge(rules.owner_token(7, "n", "123", HOST), HOST, my_pid=1) == 7
    assert rules.pid_to_judge(rules.owner_token(7, "n", "123", "other/host"), HOST, my_pid=1) is None
    assert rules.pid_to_judge(rules.owner_token(7, "n", "", HOST), HOST, my_pid=1) is None
    assert rules.pid_to_judge("7:n", HOST, my_pid=1) is None  # an older token format
    assert rules.pid_to_judge(rules.owner_token(7, "n", "1", HOST), "", my_pid=1) is None  # no /proc
    assert rules.pid_to_judge(rules.owner_token(1, "n", "1", HOST), HOST, my_pid=1) is None  # us
    assert rules.pid_to_judge(f"x:n:1:{HOST}", HOST, my_pid=1) is None


def test_a_holder_is_dead_when_gone_a_zombie_or_its_pid_reused() -> None:
    owner = rules.owner_token(7, "n", "123", HOST)
    assert rules.dead_by_stat(owner, None)
    assert rules.dead_by_stat(owner, ("Z", "123"))
    assert rules.dead_by_stat(owner, ("S", "999"))  # another process got the pid
    assert not rules.dead_by_stat(owner, ("S", "123"))
    assert not rules.dead_by_stat(owner, ("R", "123"))


# ---------------------------------------------------------------------------- codec


def test_codec_round_trips_and_refuses_what_redis_py_refuses() -> None:
    blob = codec.pack_args(["SET", b"k", 5, 1.5, "snow\u2603"])
    assert codec.unpack_args(blob) == (b"SET", b"k", b"5", b"1.5", "snow\u2603".encode())
    assert codec.unpack_args(blob[:-1]) is None  # truncated: corruption, not a shorter command
    assert codec.unpack_args(b"") is None
    with pytest.raises(TypeError, match="bool"):
        codec.encode_arg(True)
    with pytest.raises(TypeError):
        codec.pack_args(b"SET k v")  # would journal byte by byte
    with pytest.raises(ValueError, match="at least the command name"):
        codec.pack_args([])
    assert codec.encode_key("k\u00e9") == "k\u00e9".encode()


def test_dead_letters_show_their_code_never_their_values() -> None:
    assert codec.error_code_of("WRONGTYPE Operation against a key holding the wrong kind of value") == (
        "WRONGTYPE"
    )
    assert codec.error_code_of("ERR unknown command 'NOSUCH'") == "ERR"
    assert codec.error_code_of("user script:1: secret") == ""
    letter = DeadLetter(
        4, "WRONGTYPE", 1.0, 2.0, b"secret-key", (b"RPUSH", b"secret-key", b"v"), "WRONGTYPE x"
    )
    assert "secret" not in repr(letter)
    assert "WRONGTYPE" in repr(letter)


# ---------------------------------------------------------------------------- the replay flow


@dataclass(frozen=True)
class _Entry:
    id: int
    key: bytes
    args: tuple[bytes, ...]


class _FakeStore:
    """Answers the flow's journal steps from memory."""

    def __init__(self, entries: list[_Entry], *, lease: bool = True, renew: bool = True) -> None:
        self.entries = entries
        self.lease, self.renew = lease, renew
        self.acked: list[int] = []
        self.dead: list[tuple[int, str]] = []
        self.released = 0

    def try_acquire_lease(self, now: float | None = None, *, take_over_dead: bool = False) -> bool:
        assert now is None
        assert take_over_dead
        return self.lease

    def renew_lease(self, now: float | None = None) -> bool:
        return self.renew

    def release_lease(self) -> None:
        self.released += 1

    def pending_count(self) -> int:
        return len(self.entries)

    def read_batch(self, limit: int) -> list[_Entry]:
        return self.entries[:limit]

    def ack(self, ids: Any) -> int:
        self.acked += ids
        self.entries = [e for e in self.entries if e.id not in set(ids)]
        return len(ids)

    def dead_letter(self, entry_id: int, error: str) -> bool:
        self.dead.append((entry_id, error))
        self.entries = [e for e in self.entries if e.id != entry_id]
        return True


Redis = Callable[[RunPipeline | LoadScript], Any]


def _drive(flow: Generator[Any, Any, Any], store: _FakeStore, redis: Redis) -> Any:
    stepper: Stepper[Any] = Stepper(flow)
    step = stepper.start()
    while step is not None:
        try:
            value = step.call(store) if isinstance(step, JournalStep) else (redis(step), 0.001)
        except BaseException as exc:
            step = stepper.resume(None, exc)
        else:
            step = stepper.resume(value, None)
    return stepper.result


def _settings(**kw: Any) -> RunSettings:
    return RunSettings(uuid="u" * 32, prefix="orr:wb", ttl=60.0, reply_error=RuntimeError, **kw)


def _entries(n: int) -> list[_Entry]:
    return [_Entry(i, b"k", (b"INCR", b"k")) for i in range(1, n + 1)]


def _all_applied(step: RunPipeline | LoadScript) -> Any:
    assert isinstance(step, RunPipeline)
    return [[1, b"OK"] for _ in step.commands]


def test_a_run_replays_batches_renews_and_releases_the_lease() -> None:
    store = _FakeStore(_entries(5))
    totals = _drive(run_flow(_settings(batch_size=2)), store, _all_applied)
    assert totals == ReplayTotals(applied=5, batches=3, remaining=0, completed=True)
    assert store.acked == [1, 2, 3, 4, 5]
    assert store.released == 1


def test_a_run_without_the_lease_does_nothing() -> None:
    store = _FakeStore(_entries(2), lease=False)
    totals = _drive(run_flow(_settings()), store, _all_applied)
    assert totals == ReplayTotals(lease_acquired=False, remaining=2)
    assert store.released == 0


def test_a_lost_lease_ends_the_run_after_the_batch_in_flight() -> None:
    store = _FakeStore(_entries(4), renew=False)
    totals = _drive(run_flow(_settings(batch_size=2)), store, _all_applied)
    assert isinstance(totals.error, LeaseLostError)
    assert (totals.applied, totals.remaining) == (2, 2)


def test_noscript_loads_the_script_then_falls_back_to_eval() -> None:
    sent: list[str] = []

    def redis(step: RunPipeline | LoadScript) -> Any:
        if isinstance(step, LoadScript):
            sent.append("load")
            assert step.script == REPLAY_SCRIPT
            return "sha"
        sent.append(str(step.commands[0][0]))
        if step.commands[0][0] == "EVALSHA":
            return [ErrorResult("noscript", RuntimeError("NOSCRIPT")) for _ in step.commands]
        return [[1, 1] for _ in step.commands]

    outcome = _drive(batch_flow(_settings()), _FakeStore(_entries(3)), redis)
    assert sent == ["EVALSHA", "load", "EVALSHA", "EVAL"]
    assert outcome.applied == (1, 2, 3)


def test_an_unreachable_redis_ends_the_run_and_keeps_every_entry() -> None:
    gone = ConnectionError("gone")

    def redis(step: RunPipeline | LoadScript) -> Any:
        raise RedisCallFailed(gone, unreachable=True)

    store = _FakeStore(_entries(3))
    totals = _drive(run_flow(_settings()), store, redis)
    assert totals.error is gone
    assert (totals.applied, totals.batches, totals.remaining) == (0, 0, 3)
    assert store.acked == []
    assert store.released == 1


def test_a_journal_error_propagates_after_the_lease_is_released() -> None:
    store = _FakeStore(_entries(1))

    def broken(limit: int) -> list[_Entry]:
        raise JournalError("disk")

    store.read_batch = broken  # type: ignore[method-assign]
    with pytest.raises(JournalError, match="disk"):
        _drive(run_flow(_settings()), store, _all_applied)
    assert store.released == 1


def test_interpret_dead_letters_errors_and_stops_on_transient_ones() -> None:
    entries = _entries(4)
    results: list[object] = [
        [1, b"OK"],
        ErrorResult("reply", ValueError(), "WRONGTYPE", "WRONGTYPE bad"),
        [2, b"OOM command not allowed"],
        [3],
    ]
    out = interpret(entries, results, RuntimeError)
    assert (out.applied, out.dead, out.deferred) == ((1,), ((2, "WRONGTYPE bad"),), (3, 4))
    assert out.stop
    assert isinstance(out.error, RuntimeError)
    assert not out.unreachable
    io = interpret(entries[:1], [ErrorResult("io", OSError())], RuntimeError)
    assert io.unreachable
    assert io.deferred == (1,)


def test_a_batch_that_makes_no_progress_is_stalled() -> None:
    def blocked(step: RunPipeline | LoadScript) -> Any:
        assert isinstance(step, RunPipeline)
        return [[3] for _ in step.commands]

    totals = _drive(run_flow(_settings()), _FakeStore(_entries(2)), blocked)
    assert isinstance(totals.error, ReplayStalledError)


def test_plan_and_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        _settings(batch_size=0)
    with pytest.raises(ValueError, match="ttl"):
        plan_batch(_entries(1), uuid="u", prefix="p", ttl=0)
