"""Tests of exactly-once journal replay against a real redis-server.

Interruptions are real: redis-server is SIGKILLed (and restarted from its append-only file)
in the middle of a replay, and a replaying child process is SIGKILLed; the end state must be
exact, with every INCRBY counted once and every RPUSH list complete and in order.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from otel_redis_resilience._writebehind.config import WriteBehindConfig
from otel_redis_resilience._writebehind.replay import (
    REPLAY_SCRIPT,
    REPLAY_SCRIPT_SHA,
    BatchOutcome,
    LeaseLostError,
    ReplayProtocolError,
    ReplayTotals,
    interpret_results,
    marker_key,
    plan_batch,
    replay_all_async,
    replay_all_sync,
    replay_batch_async,
    replay_batch_sync,
)
from otel_redis_resilience._writebehind.store import Journal, JournalEntry
from testbed import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
NO_RETRY = Retry(NoBackoff(), 0)
ASYNC_NO_RETRY = AsyncRetry(NoBackoff(), 0)


def _client(server: RedisServer, **kw: Any) -> redis.Redis:
    """A client with redis-py's own retries off, so every failure reaches the replay code."""
    return redis.Redis(host=server.host, port=server.port, retry=NO_RETRY, socket_timeout=5.0, **kw)


def _async_client(server: RedisServer) -> redis.asyncio.Redis:
    return redis.asyncio.Redis(host=server.host, port=server.port, retry=ASYNC_NO_RETRY, socket_timeout=5.0)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(WriteBehindConfig(tmp_path / "wb", fsync="normal"))
    yield j
    j.close()


@pytest.fixture
def client(clean_redis: RedisServer) -> Iterator[redis.Redis]:
    c = _client(clean_redis)
    yield c
    c.close()


@pytest.fixture
async def aclient(clean_redis: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    c = _async_client(clean_redis)
    yield c
    await c.aclose()


def _journal_mixed(journal: Journal) -> None:
    """SET, INCRBY and RPUSH entries over a few keys, several per key."""
    journal.append(b"s", (b"SET", b"s", b"first"))
    for i in range(30):
        journal.append(b"c", (b"INCRBY", b"c", i))
        journal.append(b"l", (b"RPUSH", b"l", f"v{i}"))
    journal.append(b"s", (b"SET", b"s", b"last"))
    journal.append(b"f", (b"INCRBYFLOAT", b"f", 0.5))


def _assert_mixed_applied_once(c: redis.Redis) -> None:
    assert c.get(b"s") == b"last"
    assert int(c.get(b"c") or 0) == sum(range(30))
    assert c.lrange(b"l", 0, -1) == [f"v{i}".encode() for i in range(30)]
    assert c.get(b"f") == b"0.5"


# ------------------------------------------------------------------------------ pure planning


def _entries(*specs: tuple[int, bytes]) -> list[JournalEntry]:
    return [JournalEntry(i, key, (b"INCRBY", key, b"1"), 0.0) for i, key in specs]


def test_plan_batch_chains_entries_of_one_key() -> None:
    entries = _entries((7, b"a"), (8, b"b"), (9, b"a"))
    plan = plan_batch(entries, uuid="u" * 32, prefix="orr:wb", ttl=60)
    m = [marker_key("orr:wb", "u" * 32, i) for i in (7, 8, 9)]
    assert plan[0] == ("EVALSHA", REPLAY_SCRIPT_SHA, 1, m[0], 60000, b"INCRBY", b"a", b"1")
    assert plan[1] == ("EVALSHA", REPLAY_SCRIPT_SHA, 1, m[1], 60000, b"INCRBY", b"b", b"1")
    # The second entry of key a only runs if the first one's marker exists.
    assert plan[2] == ("EVALSHA", REPLAY_SCRIPT_SHA, 2, m[2], m[0], 60000, b"INCRBY", b"a", b"1")
    assert m[0] == b"orr:wb:" + b"u" * 32 + b":7"
    evals = plan_batch(entries, uuid="u" * 32, prefix="orr:wb", ttl=60, use_eval=True)
    assert evals[0][:2] == ("EVAL", REPLAY_SCRIPT)


def test_plan_batch_rejects_out_of_order_entries() -> None:
    with pytest.raises(ValueError, match="increasing id order"):
        plan_batch(_entries((2, b"a"), (1, b"b")), uuid="u", prefix="p", ttl=60)


def test_interpret_results_classifies_each_reply() -> None:
    entries = _entries((1, b"a"), (2, b"b"), (3, b"c"), (4, b"a"), (5, b"d"), (6, b"e"))
    results: list[object] = [
        [1, b"OK"],
        [0],
        [2, b"WRONGTYPE Operation against a key holding the wrong kind of value"],
        [3],
        redis.exceptions.NoScriptError("No matching script.", status_code="NOSCRIPT"),
        [1, 5],
    ]
    out = interpret_results(entries, results)
    assert out.applied == (1, 6)
    assert out.duplicates == (2,)
    assert out.dead == ((3, "WRONGTYPE Operation against a key holding the wrong kind of value"),)
    assert out.deferred == (4, 5)
    assert out.script_missing
    assert not out.stop
    assert out.acked == (1, 2, 6)


def test_interpret_results_stops_on_connection_and_transient_errors() -> None:
    entries = _entries((1, b"a"), (2, b"b"), (3, b"c"), (4, b"d"))
    oom = redis.exceptions.OutOfMemoryError("command not allowed", status_code="OOM")
    conn = redis.exceptions.ConnectionError("gone")
    out = interpret_results(entries, [[1, b"OK"], oom, conn, [0]])
    # What the replies prove is still acknowledged; the rest stays pending.
    assert (out.applied, out.duplicates, out.deferred) == ((1,), (4,), (2, 3))
    assert out.stop
    assert out.error is oom
    out = interpret_results(entries[:1], [[2, b"READONLY You can't write against a read only replica."]])
    assert out.stop
    assert out.deferred == (1,)
    assert not out.dead
    out = interpret_results(entries[:1], [[7]])
    assert out.stop
    assert isinstance(out.error, ReplayProtocolError)
    with pytest.raises(ValueError, match="2 results for 1 entries"):
        interpret_results(entries[:1], [[1], [1]])


# ------------------------------------------------------------------------------ sync driver


def test_replay_applies_each_entry_exactly_once(journal: Journal, client: redis.Redis) -> None:
    _journal_mixed(journal)
    total = journal.pending_count()
    totals = replay_all_sync(client, journal, batch_size=16)
    assert totals == ReplayTotals(applied=total, batches=-(-total // 16), remaining=0, completed=True)
    _assert_mixed_applied_once(client)
    assert journal.pending_count() == 0
    assert not journal.has_pending(b"c")
    # Running it again finds nothing to do and changes nothing.
    assert replay_all_sync(client, journal).applied == 0
    _assert_mixed_applied_once(client)


def test_markers_carry_the_journal_uuid_and_ttl(journal: Journal, client: redis.Redis) -> None:
    entry_id = journal.append(b"k", (b"SET", b"k", b"v"))
    replay_all_sync(client, journal)
    marker = f"orr:wb:{journal.uuid}:{entry_id}".encode()
    assert client.get(marker) == b"1"
    ttl_ms = client.pttl(marker)
    assert 7 * 86400 * 1000 - 60_000 < ttl_ms <= 7 * 86400 * 1000


def test_crash_between_apply_and_ack_applies_nothing_twice(journal: Journal, client: redis.Redis) -> None:
    _journal_mixed(journal)
    entries = journal.read_batch(1000)
    plan = plan_batch(entries, uuid=journal.uuid, prefix="orr:wb", ttl=3600)
    client.script_load(REPLAY_SCRIPT)
    # The replayer applied everything and "crashed" before acknowledging: run the Lua step
    # of the first 2/3 of the batch by hand and never ack.
    cut = len(plan) * 2 // 3
    replies = [client.execute_command(*command) for command in plan[:cut]]
    assert all(r[0] == 1 for r in replies)
    assert journal.pending_count() == len(entries)

    totals = replay_all_sync(client, journal)
    assert (totals.duplicates, totals.applied, totals.remaining) == (cut, len(entries) - cut, 0)
    _assert_mixed_applied_once(client)


def test_two_replayers_racing_apply_once(tmp_path: Path, clean_redis: RedisServer) -> None:
    # The lease normally prevents this; the markers must make it harmless anyway.
    journals = [Journal(WriteBehindConfig(tmp_path / "wb", fsync="normal")) for _ in range(2)]
    clients = [_client(clean_redis) for _ in range(2)]
    n = 4000
    _journal_counters_and_lists(journals[0], n)
    outcomes: list[list[BatchOutcome]] = [[], []]

    def replayer(k: int) -> None:
        while True:
            out = replay_batch_sync(clients[k], journals[k], batch_size=50)
            if out.size == 0:
                return
            outcomes[k].append(out)

    threads = [threading.Thread(target=replayer, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    applied = [i for per in outcomes for o in per for i in o.applied]
    assert sorted(applied) == list(range(1, n + 1))  # each entry applied by exactly one of them
    assert all(o.stop is False and not o.dead for per in outcomes for o in per)
    _assert_counters_and_lists(clients[0], n)
    for j in journals:
        j.close()
    for c in clients:
        c.close()


def test_error_reply_is_dead_lettered_and_the_rest_proceeds(journal: Journal, client: redis.Redis) -> None:
    client.set(b"s", b"a string")
    bad = journal.append(b"s", (b"RPUSH", b"s", b"x"))  # WRONGTYPE
    after_bad = journal.append(b"s", (b"SET", b"s", b"fixed"))  # same key, queued behind it
    unknown = journal.append(b"u", (b"NOSUCHCOMMAND", b"u"))
    journal.append(b"c", (b"INCRBY", b"c", 3))
    totals = replay_all_sync(client, journal)
    assert totals.completed
    assert (totals.applied, totals.dead, totals.remaining) == (2, 2, 0)
    assert client.get(b"s") == b"fixed"
    assert client.get(b"c") == b"3"
    dead = {d.id: d for d in journal.dead_entries()}
    assert set(dead) == {bad, unknown}
    assert dead[bad].error.startswith("WRONGTYPE")
    assert "unknown" in dead[unknown].error.lower()
    assert dead[bad].args == (b"RPUSH", b"s", b"x")
    assert journal.dead_count() == 2
    # A failed command leaves no marker, so nothing pretends it was applied.
    assert not client.exists(marker_key("orr:wb", journal.uuid, bad))
    assert client.exists(marker_key("orr:wb", journal.uuid, after_bad))


def test_noscript_loads_the_script_once(journal: Journal, clean_redis: RedisServer) -> None:
    c = _client(clean_redis)
    for _ in range(10):
        journal.append(b"c", (b"INCR", b"c"))
    assert replay_batch_sync(c, journal, batch_size=5).applied == (1, 2, 3, 4, 5)
    assert clean_redis.command_count("script|load") == 1
    assert clean_redis.command_count("evalsha") == 10  # 5 NOSCRIPT + 5 applied
    c.script_flush()
    assert replay_batch_sync(c, journal, batch_size=5).applied == (6, 7, 8, 9, 10)
    assert clean_redis.command_count("script|load") == 2
    assert c.get(b"c") == b"10"
    c.close()


def test_transient_server_error_stops_without_losing_or_dead_lettering(
    journal: Journal, client: redis.Redis
) -> None:
    for i in range(5):
        journal.append(b"l", (b"RPUSH", b"l", i))
    client.config_set("maxmemory", "1")  # every write is now refused with OOM
    try:
        totals = replay_all_sync(client, journal)
        assert isinstance(totals.error, redis.exceptions.OutOfMemoryError)
        assert (totals.applied, totals.dead, totals.remaining, totals.completed) == (0, 0, 5, False)
    finally:
        client.config_set("maxmemory", "0")
    assert replay_all_sync(client, journal).applied == 5
    assert client.lrange(b"l", 0, -1) == [b"0", b"1", b"2", b"3", b"4"]


def test_successor_waits_for_its_predecessor_inside_one_pipeline(
    journal: Journal, client: redis.Redis
) -> None:
    # A pipeline is not a transaction: if an entry is not applied, a later entry of the same
    # key in the same batch must not overtake it. Simulate "first not applied" by sending only
    # the second command.
    journal.append(b"l", (b"RPUSH", b"l", b"1"))
    journal.append(b"l", (b"RPUSH", b"l", b"2"))
    plan = plan_batch(journal.read_batch(2), uuid=journal.uuid, prefix="orr:wb", ttl=60)
    assert client.execute_command("EVAL", REPLAY_SCRIPT, *plan[1][2:]) == [3]
    assert client.lrange(b"l", 0, -1) == []
    replay_all_sync(client, journal)
    assert client.lrange(b"l", 0, -1) == [b"1", b"2"]


def test_decode_responses_client(journal: Journal, clean_redis: RedisServer) -> None:
    c = _client(clean_redis, decode_responses=True)
    c.set("s", "x")
    journal.append(b"s", (b"RPUSH", b"s", b"x"))
    journal.append(b"t", (b"SET", b"t", "é"))
    totals = replay_all_sync(c, journal)
    assert (totals.applied, totals.dead) == (1, 1)
    assert c.get("t") == "é"
    assert journal.dead_entries()[0].error.startswith("WRONGTYPE")
    c.close()


def test_lease_held_elsewhere_means_no_replay(tmp_path: Path, client: redis.Redis) -> None:
    a = Journal(WriteBehindConfig(tmp_path / "wb", fsync="normal"))
    b = Journal(WriteBehindConfig(tmp_path / "wb", fsync="normal"))
    try:
        a.append(b"k", (b"SET", b"k", b"v"))
        assert b.try_acquire_lease()
        totals = replay_all_sync(client, a)
        assert not totals.lease_acquired
        assert totals.remaining == 1
        assert client.get(b"k") is None
        b.release_lease()
        assert replay_all_sync(client, a).applied == 1
        assert a.try_acquire_lease()  # released after the run
    finally:
        a.close()
        b.close()


_HOLD_LEASE = """
    import sys
    from otel_redis_resilience._writebehind.store import Journal
    from otel_redis_resilience._writebehind.config import WriteBehindConfig
    j = Journal(WriteBehindConfig(sys.argv[1], fsync="normal"))
    assert j.try_acquire_lease()
    print("held", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_replay_takes_over_the_lease_of_a_killed_holder(
    driver: str, journal: Journal, clean_redis: RedisServer
) -> None:
    journal.append(b"k", (b"INCRBY", b"k", 2))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    directory = str(journal.config.directory)
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_HOLD_LEASE), directory],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "held"
        c = _client(clean_redis)
        assert not replay_all_sync(c, journal).lease_acquired  # alive: respected
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Dead: taken over at once, not after lease_seconds (10 s).
        if driver == "sync":
            totals = replay_all_sync(c, journal)
        else:

            async def run() -> ReplayTotals:
                ac = _async_client(clean_redis)
                try:
                    return await replay_all_async(ac, journal)
                finally:
                    await ac.aclose()

            totals = asyncio.run(run())
        assert totals.lease_acquired
        assert (totals.applied, totals.remaining) == (1, 0)
        assert 0 < totals.slowest < 5  # the round trip the breaker is told about
        assert c.get(b"k") == b"2"
        c.close()


def test_max_batches_and_lost_lease_end_the_run(tmp_path: Path, clean_redis: RedisServer) -> None:
    a = Journal(WriteBehindConfig(tmp_path / "wb", fsync="normal"))
    b = Journal(WriteBehindConfig(tmp_path / "wb", fsync="normal"))

    class LeaseStealingRedis(redis.Redis):
        """A real client that lets another process steal the lease while a batch is replayed."""

        def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
            assert b.try_acquire_lease(time.time() + 60)
            return super().pipeline(transaction=transaction, shard_hint=shard_hint)

    try:
        for i in range(30):
            a.append(b"l", (b"RPUSH", b"l", i))
        c = _client(clean_redis)
        first = replay_all_sync(c, a, batch_size=10, max_batches=1)
        assert (first.applied, first.batches, first.remaining, first.completed) == (10, 1, 20, False)
        assert first.error is None
        stealing = LeaseStealingRedis(host=clean_redis.host, port=clean_redis.port, retry=NO_RETRY)
        second = replay_all_sync(stealing, a, batch_size=10)
        # The batch in flight finishes (markers keep it safe); the next one is not started.
        assert isinstance(second.error, LeaseLostError)
        assert (second.applied, second.batches, second.remaining) == (10, 1, 10)
        b.release_lease()
        assert replay_all_sync(c, a, batch_size=10).applied == 10
        assert c.lrange(b"l", 0, -1) == [str(i).encode() for i in range(30)]
        c.close()
        stealing.close()
    finally:
        a.close()
        b.close()


def test_redis_down_raises_and_acks_nothing(journal: Journal, redis_server: RedisServer) -> None:
    c = _client(redis_server)
    journal.append(b"k", (b"INCR", b"k"))
    redis_server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        replay_batch_sync(c, journal)
    totals = replay_all_sync(c, journal)
    assert isinstance(totals.error, redis.exceptions.ConnectionError)
    assert journal.pending_count() == 1
    c.close()


# ------------------------------------------------------------------------------ interruptions


def _journal_counters_and_lists(journal: Journal, n: int) -> None:
    for i in range(n):
        if i % 2:
            journal.append(b"c%d" % (i % 10), (b"INCRBY", b"c%d" % (i % 10), i))
        else:
            journal.append(b"l%d" % (i % 10), (b"RPUSH", b"l%d" % (i % 10), i))


def _assert_counters_and_lists(c: redis.Redis, n: int) -> None:
    for k in range(10):
        if k % 2:
            assert int(c.get(b"c%d" % k) or 0) == sum(range(k, n, 10)), f"counter c{k}"
        else:
            expected = [str(i).encode() for i in range(k, n, 10)]
            assert c.lrange(b"l%d" % k, 0, -1) == expected, f"list l{k}"


_KILLER = """
    import os, signal, sys, time, redis
    port, pid, threshold = map(int, sys.argv[1:4])
    c = redis.Redis(port=port, socket_timeout=5)
    print("watching", flush=True)
    deadline = time.monotonic() + 30
    while c.dbsize() < threshold and time.monotonic() < deadline:
        pass
    os.kill(pid, signal.SIGKILL)
"""


def _kill_when(server: RedisServer, markers: int) -> subprocess.Popen[str]:
    """Start a process that SIGKILLs the server as soon as it holds ``markers`` replay markers.

    Watching the server rather than the journal makes the kill land while a pipeline is being
    applied, or after it was applied and before the journal acknowledged it: the window the
    markers exist for. A separate process, because a thread of ours would wait for the GIL
    while the replayer parses replies and acknowledges, i.e. miss exactly that window.
    """
    assert server.pid is not None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(_KILLER),
            str(server.port),
            str(server.pid),
            str(markers + 10),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "watching"
    return proc


N_BIG = 20_000
DURABLE_REDIS = ["--appendonly", "yes", "--appendfsync", "always"]


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A server that keeps (fsynced AOF) whatever it replied to, across SIGKILL and restart."""
    with RedisServer(extra_args=DURABLE_REDIS) as server:
        yield server


def _replay_through_kills(
    run: Callable[[], ReplayTotals], server: RedisServer, thresholds: list[int]
) -> ReplayTotals:
    applied = duplicates = interrupted = 0
    for markers in thresholds:
        with _kill_when(server, markers) as killer:
            totals = run()
            killer.wait(timeout=30)
        applied += totals.applied
        duplicates += totals.duplicates
        if totals.error is not None:
            assert isinstance(totals.error, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError)
            interrupted += 1
        server.restart()  # reloads the append-only file
    final = run()
    assert final.completed, final
    assert final.error is None, final
    assert interrupted == len(thresholds), "redis was never killed mid-replay"
    # Entries applied when the kill came but not acknowledged were found by their markers.
    assert duplicates + final.duplicates > 0, "no kill landed between apply and acknowledgement"
    return ReplayTotals(
        applied=applied + final.applied,
        duplicates=duplicates + final.duplicates,
        dead=final.dead,
        remaining=final.remaining,
        completed=True,
    )


def test_redis_killed_mid_replay_sync(journal: Journal, durable_redis: RedisServer) -> None:
    _journal_counters_and_lists(journal, N_BIG)
    c = _client(durable_redis)
    totals = _replay_through_kills(
        lambda: replay_all_sync(c, journal, batch_size=500), durable_redis, [3_050, 9_130, 15_270]
    )
    assert totals.applied + totals.duplicates == N_BIG
    assert (totals.dead, totals.remaining) == (0, 0)
    _assert_counters_and_lists(c, N_BIG)
    c.close()


def test_redis_killed_mid_replay_async(journal: Journal, durable_redis: RedisServer) -> None:
    _journal_counters_and_lists(journal, N_BIG)

    def run() -> ReplayTotals:
        async def go() -> ReplayTotals:
            c = _async_client(durable_redis)
            try:
                return await replay_all_async(c, journal, batch_size=500)
            finally:
                await c.aclose()

        return asyncio.run(go())

    totals = _replay_through_kills(run, durable_redis, [3_050, 9_130, 15_270])
    assert totals.applied + totals.duplicates == N_BIG
    assert totals.remaining == 0
    c = durable_redis.client()
    _assert_counters_and_lists(c, N_BIG)


_REPLAY_IN_CHILD = """
    import sys, redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    from otel_redis_resilience._writebehind.store import Journal
    from otel_redis_resilience._writebehind.config import WriteBehindConfig
    from otel_redis_resilience._writebehind.replay import replay_all_sync
    j = Journal(WriteBehindConfig(sys.argv[1], fsync="normal", lease_seconds=0.5))
    c = redis.Redis(port=int(sys.argv[2]), retry=Retry(NoBackoff(), 0))
    print("ready", flush=True)
    replay_all_sync(c, j, batch_size=100)
    print("finished", flush=True)
"""


def test_replayer_process_killed_mid_replay(tmp_path: Path, clean_redis: RedisServer) -> None:
    jdir = tmp_path / "wb"
    n = 10_000
    with Journal(WriteBehindConfig(jdir, fsync="normal", lease_seconds=0.5)) as journal:
        _journal_counters_and_lists(journal, n)
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_REPLAY_IN_CHILD), str(jdir), str(clean_redis.port)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        ) as proc:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 30
            while journal.pending_count() > n // 2 and time.monotonic() < deadline:
                time.sleep(0.0005)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        assert 0 < journal.pending_count() < n, "the child was not killed mid-replay"

        c = _client(clean_redis)
        # The dead child's lease blocks us until it expires: nobody replays concurrently.
        blocked = replay_all_sync(c, journal)
        if not blocked.lease_acquired:
            time.sleep(0.6)
        totals = replay_all_sync(c, journal)
        assert totals.completed
        assert totals.remaining == 0
        _assert_counters_and_lists(c, n)
        c.close()


# ------------------------------------------------------------------------------ async driver


async def test_async_replay_applies_each_entry_exactly_once(
    journal: Journal, aclient: redis.asyncio.Redis, client: redis.Redis
) -> None:
    _journal_mixed(journal)
    total = journal.pending_count()
    entries = journal.read_batch(1000)
    plan = plan_batch(entries, uuid=journal.uuid, prefix="orr:wb", ttl=3600)
    await aclient.script_load(REPLAY_SCRIPT)
    pipe = aclient.pipeline(transaction=False)
    for command in plan[:10]:  # applied but never acknowledged: a crash
        pipe.execute_command(*command)
    await pipe.execute()

    totals = await replay_all_async(aclient, journal, batch_size=16)
    assert (totals.applied, totals.duplicates, totals.remaining, totals.completed) == (
        total - 10,
        10,
        0,
        True,
    )
    _assert_mixed_applied_once(client)
    assert (await replay_all_async(aclient, journal)).applied == 0


async def test_async_noscript_and_dead_letter(
    journal: Journal, aclient: redis.asyncio.Redis, client: redis.Redis
) -> None:
    client.set(b"s", b"x")
    journal.append(b"s", (b"RPUSH", b"s", b"x"))
    journal.append(b"c", (b"INCR", b"c"))
    out = await replay_batch_async(aclient, journal)
    assert (out.applied, [i for i, _ in out.dead]) == ((2,), [1])
    assert client.get(b"c") == b"1"
    assert journal.dead_count() == 1


async def test_async_redis_down_raises(journal: Journal, redis_server: RedisServer) -> None:
    c = _async_client(redis_server)
    journal.append(b"k", (b"INCR", b"k"))
    redis_server.kill()
    with pytest.raises(redis.exceptions.ConnectionError):
        await replay_batch_async(c, journal)
    assert journal.pending_count() == 1
    await c.aclose()
