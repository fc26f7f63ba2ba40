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
from testbed import RedisServer

ROOT = Path(__file__).resolve().parents[2]
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
            "tests.integration.writebehind_worker",
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
        if journal.pending_count():  # "l" is the only key journaled
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
    from testbed import FaultProxy

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
            # No request traffic has closed it; the replayer's own successful run is a trial
            # call that succeeded (its evidence reaches the breaker), so it may have closed it.
            assert res.breaker_state in (BreakerState.HALF_OPEN, BreakerState.CLOSED)
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


# ------------------------------------------------------------------------------ a full disk


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A real 256 KiB filesystem (tmpfs, mounted as root) and a way to fill it up and free it again."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], check=True)

    class Disk:
        path = mount_point
        filler = mount_point / "filler"

        def fill(self) -> None:
            """Write a file until the filesystem says ENOSPC."""
            fd = os.open(self.filler, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
            try:
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"x" * 4096)
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"x")
            finally:
                os.close(fd)

        def free(self) -> None:
            self.filler.unlink()

    try:
        yield Disk()
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _write_until_refused(write: Any, limit: int = 400) -> tuple[list[Any], BaseException]:
    """Make writes until one raises; (what the accepted ones returned, the error)."""
    accepted: list[Any] = []
    for i in range(limit):
        try:
            accepted.append(write(i))
        except Exception as exc:
            return accepted, exc
    raise AssertionError(f"{limit} writes on a full disk were all accepted")


def _assert_journal_failed(exc: BaseException, operation: str) -> None:
    from otel_redis_resilience import JournalError

    assert isinstance(exc, RedisUnavailable), repr(exc)
    assert exc.reason == "journal_failed"
    assert exc.operation == operation
    assert exc.outcome_unknown is False  # never sent, never journaled: the write was not kept
    assert isinstance(exc.__cause__, JournalError)
    assert not isinstance(exc.__cause__, JournalFullError)
    assert "full" in str(exc.__cause__)


def test_full_disk_write_is_redis_unavailable_journal_failed(
    tiny_disk: Any, redis_server: RedisServer
) -> None:
    res = Resilience(
        redis.Redis(host=redis_server.host, port=redis_server.port),
        **FAST,  # type: ignore[arg-type]
        write_behind=WriteBehindConfig(tiny_disk.path / "j"),
    )
    try:
        redis_server.kill()
        with res.request() as h:
            wb = h.write_behind()
            assert isinstance(wb.rpush("l", "first"), Journaled)
            tiny_disk.fill()
            # Every write to "l" now queues behind the pending one; "k:i" ones fail on Redis first.
            accepted, exc = _write_until_refused(lambda i: wb.rpush("l", f"q{i}"))
            _assert_journal_failed(exc, "RPUSH")
            _, exc = _write_until_refused(lambda i: wb.hset("h", f"f{i}", "v" * 2000))
            _assert_journal_failed(exc, "HSET")
        journal = res.write_behind_journal
        kept = journal.pending_count()
        assert kept >= 1 + len(accepted)  # nothing acknowledged was lost
        tiny_disk.free()
        with res.request() as h:
            assert isinstance(h.write_behind().rpush("l", "after"), Journaled)
        redis_server.restart()
        drain(res)
        values = redis_server.client().lrange("l", 0, -1)
        assert values[0] == b"first"
        assert values[-1] == b"after"
        assert values[1:-1] == [a for a in values[1:-1] if a.startswith(b"q")]
    finally:
        res.close()


async def test_async_full_disk_write_is_redis_unavailable_journal_failed(
    tiny_disk: Any, redis_server: RedisServer
) -> None:
    client = redis.asyncio.Redis(host=redis_server.host, port=redis_server.port)
    res = Resilience(client, **FAST, write_behind=WriteBehindConfig(tiny_disk.path / "j"))  # type: ignore[arg-type]
    try:
        redis_server.kill()
        async with res.request() as h:
            wb = h.write_behind()
            assert isinstance(await wb.rpush("l", "first"), Journaled)
            tiny_disk.fill()
            exc: BaseException | None = None
            for i in range(400):
                try:
                    await wb.rpush("l", f"q{i}")
                except Exception as e:
                    exc = e
                    break
            assert exc is not None
            _assert_journal_failed(exc, "RPUSH")
    finally:
        res.close()
        await client.aclose()


_EXAMPLE_ON_FULL_DISK = """
import json, os, sys
os.environ["REDIS_URL"] = f"redis://127.0.0.1:{sys.argv[2]}/0"
os.environ["WRITE_BEHIND_DIR"] = sys.argv[3]
os.environ["DATABASE"] = sys.argv[4]
fill = sys.argv[5]
def fill_disk():
    fd = os.open(fill, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"x")
    except OSError:
        pass
    os.close(fd)
if sys.argv[1] == "flask":
    from examples.flask_app import app
    client = app.test_client()
    post = lambda body: client.post("/events", json=body)
    status = lambda r: r.status_code
    body = lambda r: r.get_json()
else:
    from starlette.testclient import TestClient
    from examples.starlette_app import app
    client = TestClient(app).__enter__()
    post = lambda body: client.post("/events", json=body)
    status = lambda r: r.status_code
    body = lambda r: r.json()
first = post({"id": "e0"})
fill_disk()
for i in range(1, 400):
    r = post({"id": f"e{i}", "pad": "p" * 2000})
    if status(r) != 202:
        break
print(json.dumps({"first": status(first), "status": status(r), "body": body(r)}), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("app", ["flask", "starlette"])
def test_example_apps_answer_503_when_the_journal_disk_is_full(
    app: str, tiny_disk: Any, redis_server: RedisServer, tmp_path: Path
) -> None:
    import json

    redis_server.kill()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _EXAMPLE_ON_FULL_DISK,
            app,
            str(redis_server.port),
            str(tiny_disk.path / "j"),
            str(tmp_path / "items.sqlite3"),
            str(tiny_disk.filler),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["first"] == 202  # journaled while Redis is down
    assert out["status"] == 503, out
    assert out["body"]["journaled"] is False
    assert out["body"]["error"] == "journal_failed"


# ------------------------------------------------------------------------------ a journaling outage


def _write_behind(runner: Any, method: str, *args: Any) -> Any:
    """One write-behind write in its own request scope, through a sync or an asyncio ``Runner``."""
    if runner.loop is None:
        with runner.res.request() as h:
            return getattr(h.write_behind(), method)(*args)

    async def go() -> Any:
        async with runner.res.request() as h:
            return await getattr(h.write_behind(), method)(*args)

    return runner.loop.run_until_complete(go())


def _outage_runs(mode: str, tmp_path: Path, server: RedisServer, seconds: float) -> dict[str, Any]:
    """A process adopts a journal with pending writes to "k" while Redis is down (killed), then
    writes to "k" continuously: every write queues behind and never touches Redis, so only the
    replayer can learn that Redis is down. Returns its replay runs and breaker transitions."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from otel_redis_resilience import BreakerTransitioned
    from tests.support import Runner

    directory = tmp_path / "j"
    server.kill()
    first = Runner(
        mode, server.host, server.port, **FAST, write_behind=WriteBehindConfig(directory, fsync="off")
    )
    for i in range(3):
        assert isinstance(_write_behind(first, "rpush", "k", f"adopted{i}"), Journaled)
    first.close()

    exporter = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(exporter))
    # Library defaults for the breaker: five consecutive failures open it.
    runner = Runner(
        mode,
        server.host,
        server.port,
        tracer_provider=tp,
        write_behind=WriteBehindConfig(directory, fsync="off"),
    )
    try:
        t0 = time.monotonic()
        reasons = Counter()
        while time.monotonic() - t0 < seconds:
            out = _write_behind(runner, "rpush", "k", "v")
            assert isinstance(out, Journaled)
            reasons[out.reason] += 1
            runner.sleep(0.001)
        opened = [e.at - t0 for e in runner.recorder.of(BreakerTransitioned) if e.new is BreakerState.OPEN]
        runs = [s for s in exporter.get_finished_spans() if s.name == "redis.resilience.writebehind.replay"]
        return {"runs": len(runs), "opened": opened, "reasons": reasons, "state": runner.res.breaker_state}
    finally:
        runner.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_journaling_outage_opens_the_breaker_and_replay_backs_off(
    mode: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    got = _outage_runs(mode, tmp_path, redis_server, 1.5)
    print(
        f"\n{mode}: {got['runs']} replay runs in 1.5 s; breaker opened at {got['opened']}; {got['reasons']}"
    )
    assert got["reasons"]["queued_behind"] > 100  # the writes themselves never reached Redis
    assert got["opened"], "the breaker never opened during a full outage"
    assert got["opened"][0] < 1.5
    assert got["runs"] <= 8


def test_kick_after_a_successful_run_replays_at_once(tmp_path: Path, redis_server: RedisServer) -> None:
    res = Resilience(
        redis.Redis(host=redis_server.host, port=redis_server.port),
        **FAST,  # type: ignore[arg-type]
        write_behind=WriteBehindConfig(tmp_path / "j", fsync="off"),
    )
    try:
        journal = res.write_behind_journal
        for i in range(3):
            res.force_open()
            with res.request() as h:
                assert isinstance(h.write_behind().set("k", str(i)), Journaled)
            t0 = time.monotonic()
            res.reset()  # out of open: kicks the replayer
            while journal.pending_count() and time.monotonic() - t0 < 5:
                time.sleep(0.002)
            assert journal.pending_count() == 0
            assert time.monotonic() - t0 < 0.5
            assert redis_server.client().get("k") == str(i).encode()
    finally:
        res.close()


def test_replay_lease_of_a_killed_holder_is_taken_over_at_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    directory = tmp_path / "j"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.writebehind_worker",
            "hold-lease",
            "--port",
            "0",
            "--dir",
            str(directory),
            "--writes",
            "100",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        # Library defaults: lease_seconds=10.
        res = Resilience(
            redis.Redis(host=redis_server.host, port=redis_server.port),
            write_behind=WriteBehindConfig(directory),
        )
        journal = res.write_behind_journal
        try:
            time.sleep(0.5)
            # A live holder is respected: nobody replays beside it.
            assert journal.pending_count() == 100
            assert redis_server.client().get("counter") is None
            holder.kill()  # SIGKILL; not reaped yet: a zombie holds no lease either
            t0 = time.monotonic()
            while journal.pending_count() and time.monotonic() - t0 < 15:
                time.sleep(0.01)
            handover = time.monotonic() - t0
            print(f"\nreplay resumed {handover:.3f} s after the lease holder was SIGKILLed")
            assert journal.pending_count() == 0
            assert handover < 2.0
            assert redis_server.client().get("counter") == b"100"
        finally:
            res.close()
    finally:
        holder.kill()
        holder.wait()
