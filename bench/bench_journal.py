"""Benchmark of the write-behind journal: append cost per fsync policy, and replay throughput.

Run from the repository root::

    python bench/bench_journal.py [--appends 5000] [--replay 20000] [--batch-size 500]

Append cost is measured from one thread, one write at a time, into a fresh journal in a
temporary directory (on the same filesystem as ``$TMPDIR``; fsync cost depends entirely on it).
Replay throughput is measured against a loopback ``redis-server`` this script starts on a free
port (no persistence) and stops at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from otel_redis_resilience._writebehind.config import FsyncPolicy, WriteBehindConfig
from otel_redis_resilience._writebehind.replay import replay_all_async, replay_all_sync
from otel_redis_resilience._writebehind.store import Journal

POLICIES: tuple[FsyncPolicy, ...] = ("always", "normal", "off")
N_KEYS = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_server() -> Iterator[int]:
    """A throw-away redis-server on a free loopback port; yields the port."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.access(binary, os.X_OK):
        sys.exit("redis-server not found on PATH (apt-get install redis-server)")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir, "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"redis-server did not start on port {port}")
                time.sleep(0.01)
        client.close()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _command(i: int) -> tuple[bytes, tuple[bytes | int, ...]]:
    key = b"k%d" % (i % N_KEYS)
    kind = i % 3
    if kind == 0:
        return key, (b"SET", key, b"value-%d" % i)
    if kind == 1:
        return b"c" + key, (b"INCRBY", b"c" + key, i)
    return b"l" + key, (b"RPUSH", b"l" + key, i)


def bench_append(base: Path, policy: FsyncPolicy, n: int) -> tuple[float, float, float]:
    """Median, p99 and mean microseconds per append."""
    with Journal(WriteBehindConfig(base / f"append-{policy}", fsync=policy, max_entries=n + 100)) as journal:
        for i in range(50):  # warm up: connection, page cache, WAL file growth
            journal.append(*_command(i))
        timings = []
        for i in range(n):
            key, args = _command(i)
            start = time.perf_counter()
            journal.append(key, args)
            timings.append(time.perf_counter() - start)
    timings.sort()
    return (
        statistics.median(timings) * 1e6,
        timings[int(len(timings) * 0.99)] * 1e6,
        statistics.fmean(timings) * 1e6,
    )


def bench_has_pending(base: Path, n_entries: int, n_calls: int) -> tuple[float, float]:
    """Median microseconds of has_pending() for a key with and without pending writes."""
    with _fill(base / "has-pending", "off", n_entries) as journal:
        results = []
        for key in (b"ck1", b"absent"):
            timings = []
            for _ in range(n_calls):
                start = time.perf_counter()
                journal.has_pending(key)
                timings.append(time.perf_counter() - start)
            results.append(statistics.median(timings) * 1e6)
    return results[0], results[1]


def _fill(directory: Path, policy: FsyncPolicy, n: int) -> Journal:
    journal = Journal(WriteBehindConfig(directory, fsync=policy, max_entries=n + 1))
    for i in range(n):
        journal.append(*_command(i))
    return journal


def _verify(port: int, n: int) -> None:
    c = redis.Redis(port=port)
    total = sum(int(c.get(b"ck%d" % k) or 0) for k in range(N_KEYS))
    pushed = sum(c.llen(b"lk%d" % k) for k in range(N_KEYS))
    c.close()
    assert total == sum(i for i in range(n) if i % 3 == 1), "INCRBY totals differ"
    assert pushed == sum(1 for i in range(n) if i % 3 == 2), "RPUSH counts differ"


def bench_replay_sync(base: Path, port: int, policy: FsyncPolicy, n: int, batch_size: int) -> float:
    """Writes per second replayed by the sync driver."""
    journal = _fill(base / f"replay-sync-{policy}", policy, n)
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
    client.flushall()
    start = time.perf_counter()
    totals = replay_all_sync(client, journal, batch_size=batch_size)
    elapsed = time.perf_counter() - start
    assert totals.completed, totals
    assert totals.applied == n, totals
    client.close()
    journal.close()
    _verify(port, n)
    return n / elapsed


def bench_replay_async(base: Path, port: int, policy: FsyncPolicy, n: int, batch_size: int) -> float:
    """Writes per second replayed by the asyncio driver."""
    journal = _fill(base / f"replay-async-{policy}", policy, n)
    redis.Redis(port=port).flushall()

    async def run() -> float:
        client = redis.asyncio.Redis(port=port, retry=AsyncRetry(NoBackoff(), 0))
        start = time.perf_counter()
        totals = await replay_all_async(client, journal, batch_size=batch_size)
        elapsed = time.perf_counter() - start
        await client.aclose()
        assert totals.completed, totals
        assert totals.applied == n, totals
        return elapsed

    elapsed = asyncio.run(run())
    journal.close()
    _verify(port, n)
    return n / elapsed


def main() -> None:
    """Run the benchmarks and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--appends", type=int, default=5000, help="appends per fsync policy")
    parser.add_argument("--replay", type=int, default=20_000, help="entries to replay")
    parser.add_argument("--batch-size", type=int, default=500, help="replay batch size")
    parser.add_argument("--quick", action="store_true", help="500 appends, 2000 entries replayed")
    args = parser.parse_args()
    if args.quick:
        args.appends, args.replay = min(args.appends, 500), min(args.replay, 2000)

    base = Path(tempfile.mkdtemp(prefix="bench-journal-"))
    try:
        print(f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, journal in {base}")
        print()
        print(f"Append, one thread, {args.appends} writes per policy")
        print(f"{'fsync':<8} {'median µs':>10} {'p99 µs':>10} {'mean µs':>10}")
        for policy in POLICIES:
            median, p99, mean = bench_append(base, policy, args.appends)
            print(f"{policy:<8} {median:>10.1f} {p99:>10.1f} {mean:>10.1f}", flush=True)
        hit, miss = bench_has_pending(base, args.replay, args.appends)
        print(
            f"has_pending() with {args.replay} entries pending: "
            f"{hit:.1f} µs (key pending), {miss:.1f} µs (key not pending)"
        )
        print()
        with redis_server() as port:
            print(
                f"Replay of {args.replay} writes (SET/INCRBY/RPUSH) to loopback redis-server :{port}, "
                f"batch size {args.batch_size}"
            )
            print(f"{'driver':<8} {'fsync':<8} {'writes/s':>10}")
            for policy in ("always", "normal"):
                rate = bench_replay_sync(base, port, policy, args.replay, args.batch_size)
                print(f"{'sync':<8} {policy:<8} {rate:>10,.0f}", flush=True)
                rate = bench_replay_async(base, port, policy, args.replay, args.batch_size)
                print(f"{'async':<8} {policy:<8} {rate:>10,.0f}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
