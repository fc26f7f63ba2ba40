"""Write-behind through the handle: journaled during an outage, replayed exactly once, in order.

Real redis-server processes (with an append-only file, so a killed server keeps
what was applied), real worker processes, real SIGKILLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from otel_redis_resilience import (
    BreakerPolicy,
    BreakerState,
    ConfigurationError,
    Journaled,
    JournalFullError,
    RedisUnavailable,
    Resilience,
    RetryPolicy,
    WriteBehindConfig,
    WriteBehindError,
)
from tests.infra import RedisServer

ROOT = Path(__file__).resolve().parent.parent
AOF = ["--appendonly", "yes", "--appendfsync", "always"]
FAST = {
    "retry": RetryPolicy(attempt_timeout=0.2, max_attempts=2),
    "breaker": BreakerPolicy(failure_threshold=2, probe_interval=0.05, half_open_max_calls=1),
}


def worker(mode: str, port: int, directory: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.writebehind_worker",
            mode,
            "--port",
            str(port),
            "--dir",
            str(directory),
            *extra,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def drain(res: Resilience, timeout: float = 30.0) -> None:
    """Keep nudging until the journal is empty: pings close the breaker, which starts the replayer."""
    journal = res.write_behind_journal
    deadline = time.monotonic() + timeout
    while journal.pending_count() and time.monotonic() < deadline:
        with contextlib.suppress(RedisUnavailable), res.request() as h:
            h.ping()
        res.replay_now()
        time.sleep(0.05)
    assert journal.pending_count() == 0


class Expected:
    """What the acknowledged writes must have produced.

    Writes announced (``try``) but never acknowledged (``ack``) by a killed
    process are in doubt: each may be present once or not at all, never twice.
    """

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.lists: defaultdict[str, list[str]] = defaultdict(list)
        self.sets: dict[str, str] = {}
        self.writes = 0
        self.in_doubt: list[tuple[str, str, str]] = []

    def feed(self, lines: list[str]) -> None:
        tried: set[tuple[str, str, str]] = set()
        for line in lines:
            parts = line.split(" ", 3)
            if len(parts) != 4 or parts[0] not in ("try", "ack"):
                continue  # a line cut short by SIGKILL
            word, op, key, value = parts
            if word == "try":
                tried.add((op, key, value))
                continue
            tried.discard((op, key, value))
            self.writes += 1
            if op == "incrby":
                self.counters[key] += int(value)
            elif op == "rpush":
                self.lists[key].append(value)
            else:
                self.sets[key] = value
        self.in_doubt += sorted(tried)

    def check(self, client: redis.Redis) -> tuple[int, int]:
        """Assert the state is exact; return (acknowledged writes present, duplicates found)."""
        present = duplicates = 0
        problems = []
        doubt_incr: defaultdict[str, list[int]] = defaultdict(list)
        doubt_push: dict[str, str] = {}
        for op, key, value in self.in_doubt:
            if op == "incrby":
                doubt_incr[key].append(int(value))
            elif op == "rpush":
                doubt_push[key] = value
        for key, total in self.counters.items():
            extra = int(client.get(key) or 0) - total
            possible = {
                sum(c for i, c in enumerate(doubt_incr[key]) if mask >> i & 1)
                for mask in range(1 << len(doubt_incr[key]))
            }
            if extra not in possible:
                problems.append(f"{key}: {extra:+} against the acknowledged total")
            else:
                present += sum(1 for _ in ())  # counted below, per acknowledged write
        for key, values in self.lists.items():
            got = [v.decode() for v in client.lrange(key, 0, -1)]
            duplicates += len(got) - len(set(got))
            allowed = [values, [*values, doubt_push[key]]] if key in doubt_push else [values]
            if got not in allowed:
                problems.append(f"{key}: {len(got)} items, expected {len(values)} in order")
            present += len(values) if got[: len(values)] == values else 0
        for key, value in self.sets.items():
            if client.get(key) == value.encode():
                present += 1
            else:
                problems.append(f"{key} missing")
        assert not problems, problems
        # Counter totals matched exactly, so every acknowledged INCRBY is there once.
        present += self.writes - len(self.sets) - sum(len(v) for v in self.lists.values())
        return present, duplicates


@pytest.mark.slow
def test_exactly_once_across_processes_sigkill_and_restart(tmp_path: Path) -> None:
    journal_dir = tmp_path / "journal"
    with RedisServer(extra_args=AOF) as server:
        server.kill()  # the outage starts before any write
        steady = worker(
            "write", server.port, journal_dir, "--name", "a", "--threads", "4", "--writes", "1500"
        )
        doomed = worker("write", server.port, journal_dir, "--name", "b", "--threads", "4", "--writes", "0")
        expected = Expected()
        doomed_lines: list[str] = []
        assert doomed.stdout is not None
        # Let the doomed process acknowledge a good number of writes, then SIGKILL it mid-outage.
        acks = 0
        while acks < 4200:
            line = doomed.stdout.readline()
            assert line, doomed.stderr.read() if doomed.stderr else "worker died"
            doomed_lines.append(line.strip())
            acks += line.startswith("ack ")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=30)
        # Read through the same buffered reader: communicate() would skip what it read ahead.
        doomed_lines += doomed.stdout.read().splitlines()
        out, err = steady.communicate(timeout=180)
        assert steady.returncode == 0, err
        expected.feed(out.splitlines())
        expected.feed(doomed_lines)
        assert expected.writes >= 10_000

        server.restart()
        fresh = worker("replay", server.port, journal_dir)
        out, err = fresh.communicate(timeout=180)
        assert fresh.returncode == 0, err
        assert "drained 0" in out, out + err
        present, duplicates = expected.check(server.client())
        print(
            f"\nwrites acknowledged: {expected.writes}; present: {present}; duplicates: {duplicates}; "
            f"in flight at SIGKILL (present at most once): {len(expected.in_doubt)}"
        )
        assert present == expected.writes
        assert duplicates == 0


@pytest.mark.slow
def test_redis_killed_again_mid_replay_still_exactly_once(tmp_path: Path) -> None:
    with RedisServer(extra_args=AOF) as server:
        client = redis.Redis(host=server.host, port=server.port, socket_timeout=2)
        res = Resilience(
            client,
            **FAST,  # type: ignore[arg-type]
            write_behind=WriteBehindConfig(tmp_path / "j", fsync="off", lease_seconds=0.5),
        )
        server.kill()
        n = 20_000
        expected = Expected()
        lines = []
        with res.request() as h:
            wb = h.write_behind()
            for i in range(n):
                if i % 2:
                    assert isinstance(wb.incrby(f"c:{i % 7}", i % 3 + 1), Journaled)
                    lines.append(f"ack incrby c:{i % 7} {i % 3 + 1}")
                else:
                    assert isinstance(wb.rpush(f"l:{i % 5}", str(i)), Journaled)
                    lines.append(f"ack rpush l:{i % 5} {i}")
        expected.feed(lines)
        journal = res.write_behind_journal
        assert journal.pending_count() == n
        server.restart()
        # Let replay start and get part-way, then kill Redis under it.
        deadline = time.monotonic() + 60
        while journal.pending_count() > n * 0.6 and time.monotonic() < deadline:
            with contextlib.suppress(RedisUnavailable), res.request() as h:
                h.ping()  # closes the breaker once the probe saw Redis; closing starts the replayer
            time.sleep(0.005)
        server.kill()
        remaining = journal.pending_count()
        assert 0 < remaining < n, remaining
        server.restart()
        drain(res, timeout=90)
        present, duplicates = expected.check(server.client())
        print(f"\nmid-replay kill: {n} writes, {remaining} pending at the kill; present {present}")
        print(f"duplicates: {duplicates}")
        assert duplicates == 0
        res.close()


def test_healthy_writes_apply_now_and_queue_behind_pending(tmp_path: Path, redis_server: RedisServer) -> None:
    res = Resilience(
        redis.Redis(host=redis_server.host, port=redis_server.port),
        **FAST,  # type: ignore[arg-type]
        write_behind=WriteBehindConfig(tmp_path / "j"),
    )
    with res.request() as h:
        wb = h.write_behind()
        assert wb.set("k", "now") is True  # healthy: applied, plain reply
        assert wb.get("k") == b"now"  # reads pass through
        with pytest.raises(WriteBehindError, match="single-key"):
            wb.delete("a", "b")
        with pytest.raises(WriteBehindError, match="MSET"):
            wb.mset({"a": 1})
    redis_server.kill()
    with res.request(deadline=1.0) as h:
        first = h.write_behind().rpush("l", "1")
        assert isinstance(first, Journaled)
        assert first.reason in ("retries_exhausted", "breaker_open")
    redis_server.restart()
    # Redis is back but "l" still has a pending write: the next one queues behind it.
    journal = res.write_behind_journal
    with res.request() as h:
        if journal.has_pending("l"):
            second = h.write_behind().rpush("l", "2")
            assert isinstance(second, Journaled) or second == 2
        else:
            h.write_behind().rpush("l", "2")
    drain(res)
    assert redis_server.client().lrange("l", 0, -1) == [b"1", b"2"]
    res.close()


def test_unknown_outcome_of_non_idempotent_write_is_not_journaled(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from tests.infra import FaultProxy

    with FaultProxy(redis_server.host, redis_server.port) as proxy:
        client = redis.Redis(host=proxy.host, port=proxy.port, protocol=2, driver_info=None)
        res = Resilience(client, **FAST, write_behind=WriteBehindConfig(tmp_path / "j"))  # type: ignore[arg-type]
        with res.request() as h:
            h.ping()
            proxy.set_mode("drop_replies", count=1)
            with pytest.raises(RedisUnavailable) as info:
                h.write_behind().incrby("n", 5)
            assert info.value.outcome_unknown
            assert res.write_behind_journal.pending_count() == 0
            proxy.set_mode("drop_replies", count=1)
            # An idempotent write in the same spot is safe to journal (and replay).
            out = h.write_behind().set("k", "v")
            assert out is True or isinstance(out, Journaled)
        assert redis_server.client().get("n") == b"5"
        res.close()


def test_full_journal_rejects_with_clear_error_and_keeps_everything(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    res = Resilience(
        redis.Redis(host=redis_server.host, port=redis_server.port),
        **FAST,  # type: ignore[arg-type]
        write_behind=WriteBehindConfig(tmp_path / "j", max_entries=50),
    )
    redis_server.kill()
    with res.request() as h:
        wb = h.write_behind()
        for i in range(50):
            assert isinstance(wb.rpush("l", str(i)), Journaled)
        with pytest.raises(JournalFullError, match="50"):
            wb.rpush("l", "50")
    assert res.write_behind_journal.pending_count() == 50
    redis_server.restart()
    drain(res)
    assert redis_server.client().lrange("l", 0, -1) == [str(i).encode() for i in range(50)]
    res.close()


def test_corrupt_journal_is_a_clear_error_at_start(tmp_path: Path, clean_redis: RedisServer) -> None:
    from otel_redis_resilience import JournalCorruptError

    directory = tmp_path / "j"
    directory.mkdir(mode=0o700)
    db = directory / "journal.sqlite3"
    res = Resilience(
        redis.Redis(host=clean_redis.host, port=clean_redis.port), write_behind=WriteBehindConfig(directory)
    )
    res.close()
    assert db.exists(), sorted(os.listdir(directory))
    db.write_bytes(b"this is not a journal" * 100)
    before = db.read_bytes()
    with pytest.raises(JournalCorruptError, match="journal"):
        Resilience(
            redis.Redis(host=clean_redis.host, port=clean_redis.port),
            write_behind=WriteBehindConfig(directory),
        )
    assert db.read_bytes() == before  # never discarded or overwritten
    with pytest.raises(ConfigurationError, match="WriteBehindConfig"):
        Resilience(redis.Redis(host=clean_redis.host, port=clean_redis.port), write_behind="/tmp/x")  # type: ignore[arg-type]


def test_replay_drains_in_half_open_without_request_traffic(tmp_path: Path) -> None:
    # A quiet service sends no trial call to close the breaker; once the probe has
    # seen Redis answer, the journal must drain anyway.
    with RedisServer(extra_args=AOF) as server:
        client = redis.Redis(host=server.host, port=server.port)
        res = Resilience(client, **FAST, write_behind=WriteBehindConfig(tmp_path / "j"))  # type: ignore[arg-type]
        try:
            server.kill()
            with res.request() as h:
                outs = [h.write_behind().incrby("n", 1) for _ in range(10)]
            assert all(isinstance(o, Journaled) for o in outs)
            assert res.breaker_state is BreakerState.OPEN
            server.restart()
            journal = res.write_behind_journal
            deadline = time.monotonic() + 20
            while journal.pending_count() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert journal.pending_count() == 0
            assert res.breaker_state is BreakerState.HALF_OPEN  # no traffic has closed it
            assert server.client().get("n") == b"10"
        finally:
            res.close()
            client.close()


async def test_async_write_behind_journals_and_replays(tmp_path: Path) -> None:
    with RedisServer(extra_args=AOF) as server:
        client = redis.asyncio.Redis(host=server.host, port=server.port)
        res = Resilience(client, **FAST, write_behind=WriteBehindConfig(tmp_path / "j"))  # type: ignore[arg-type]
        server.kill()
        async with res.request() as h:
            wb = h.write_behind()
            outs: list[Any] = [await wb.incrby("n", 2) for _ in range(100)]
        assert all(isinstance(o, Journaled) for o in outs)
        server.restart()
        journal = res.write_behind_journal
        deadline = time.monotonic() + 20
        while journal.pending_count() and time.monotonic() < deadline:
            with contextlib.suppress(RedisUnavailable):
                async with res.request() as h:
                    await h.ping()
            await asyncio.sleep(0.05)
        assert journal.pending_count() == 0
        assert server.client().get("n") == b"200"
        res.close()
        await client.aclose()
