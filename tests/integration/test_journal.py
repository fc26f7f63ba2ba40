"""Tests of the durable write-behind journal (pure SQLite, no Redis needed).

Crash-safety is checked with real child processes that are SIGKILLed mid-stream, and
multi-process sharing with real concurrent processes on one journal directory.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otel_redis_resilience import ConfigurationError
from otel_redis_resilience._writebehind.codec import encode_arg
from otel_redis_resilience._writebehind.config import DATABASE_FILENAME, FsyncPolicy, WriteBehindConfig
from otel_redis_resilience._writebehind.database import APPLICATION_ID
from otel_redis_resilience._writebehind.errors import JournalCorruptError, JournalError, JournalFullError
from otel_redis_resilience._writebehind.host import host_identity
from otel_redis_resilience._writebehind.store import Journal, JournalEntry
from otel_redis_resilience._writebehind.view import WriteBehindJournal

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def jdir(tmp_path: Path) -> Path:
    return tmp_path / "wb"


@pytest.fixture
def journal(jdir: Path) -> Iterator[Journal]:
    j = Journal(WriteBehindConfig(jdir, fsync="normal"))
    yield j
    j.close()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _child(code: str, *args: str) -> subprocess.Popen[str]:
    """A Python child process running ``code`` with this repository importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


# ------------------------------------------------------------------------------ basics


def test_append_read_ack_in_order(journal: Journal) -> None:
    ids = [journal.append(b"k%d" % (i % 3), (b"RPUSH", b"k%d" % (i % 3), str(i))) for i in range(10)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 10

    batch = journal.read_batch(4)
    assert [e.id for e in batch] == ids[:4]
    assert batch[0] == JournalEntry(ids[0], b"k0", (b"RPUSH", b"k0", b"0"), batch[0].created_at)
    assert all(isinstance(e.created_at, float) for e in batch)

    assert journal.ack([e.id for e in batch]) == 4
    assert journal.ack([ids[0]]) == 0  # already acked: harmless
    assert [e.id for e in journal.read_batch(100)] == ids[4:]
    assert journal.pending_count() == 6


def test_args_are_encoded_like_redis_py(journal: Journal) -> None:
    import redis

    encoder = redis.Redis().get_encoder()
    values: list[Any] = [b"raw", "snow\u2603", 5, -7, 1.5, 1e20, 0.1, float("inf"), bytearray(b"ba")]
    for value in values:
        assert encode_arg(value) == bytes(encoder.encode(value))
    entry_id = journal.append("k", ["SET", "k", 3.25])
    (entry,) = journal.read_batch(1)
    assert (entry.id, entry.key, entry.args) == (entry_id, b"k", (b"SET", b"k", b"3.25"))


@pytest.mark.parametrize(
    ("args", "exc"),
    [
        ((b"SET", b"k", True), TypeError),  # redis-py refuses bools as well
        ((b"SET", b"k", None), TypeError),
        (b"SET k v", TypeError),  # a bare bytes would be journaled byte by byte
        ("SET k v", TypeError),
        ((), ValueError),
    ],
)
def test_bad_args_are_rejected_and_nothing_is_written(journal: Journal, args: Any, exc: type) -> None:
    with pytest.raises(exc):
        journal.append(b"k", args)
    assert journal.pending_count() == 0


def test_has_pending(journal: Journal) -> None:
    assert not journal.has_pending(b"a")
    first = journal.append(b"a", (b"INCRBY", b"a", 1))
    second = journal.append(b"a", (b"INCRBY", b"a", 2))
    journal.append(b"b", (b"SET", b"b", b"x"))
    assert journal.has_pending(b"a")
    assert journal.has_pending("a")  # str keys are UTF-8 encoded like redis-py does
    assert not journal.has_pending(b"c")
    journal.ack([first])
    assert journal.has_pending(b"a")
    journal.ack([second])
    assert not journal.has_pending(b"a")
    assert journal.has_pending(b"b")


def test_has_pending_uses_the_key_index(journal: Journal) -> None:
    conn = sqlite3.connect(journal.path)
    try:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT 1 FROM entries WHERE key = ? LIMIT 1", (b"k",)
        ).fetchall()
    finally:
        conn.close()
    assert "entries_by_key" in " ".join(str(row) for row in plan)


def test_pending_counters(journal: Journal) -> None:
    a = journal.append(b"ab", (b"SET", b"ab", b"xyz"))
    b = journal.append(b"c", (b"DEL", b"c"))
    assert journal.pending_count() == 2
    total = journal.pending_bytes()
    assert total > len(b"abSETabxyzcDELc")
    journal.ack([a])
    assert journal.pending_count() == 1
    assert 0 < journal.pending_bytes() < total
    journal.ack([b])
    assert (journal.pending_count(), journal.pending_bytes()) == (0, 0)


def test_wait_drained(journal: Journal) -> None:
    view = WriteBehindJournal(journal)
    assert view.wait_drained(0)
    ids = [journal.append(b"k", (b"INCR", b"k")) for _ in range(3)]
    assert not view.wait_drained(0.1)
    journal.dead_letter(ids[0], "ERR dead letters do not count")
    acker = threading.Timer(0.2, journal.ack, args=(ids[1:],))
    acker.start()
    t0 = time.monotonic()
    assert view.wait_drained(5)
    assert 0.1 < time.monotonic() - t0 < 2
    acker.join()


def test_dead_letter(journal: Journal) -> None:
    bad = journal.append(b"s", (b"RPUSH", b"s", b"x"))
    good = journal.append(b"t", (b"SET", b"t", b"1"))
    assert journal.dead_letter(bad, "WRONGTYPE Operation against a key holding the wrong kind of value")
    assert not journal.dead_letter(bad, "again")  # no longer pending
    assert journal.dead_count() == 1
    assert journal.pending_count() == 1
    assert not journal.has_pending(b"s")
    assert [e.id for e in journal.read_batch(10)] == [good]
    (dead,) = journal.dead_entries()
    assert (dead.id, dead.key, dead.args) == (bad, b"s", (b"RPUSH", b"s", b"x"))
    assert dead.error.startswith("WRONGTYPE")
    assert journal.purge_dead() == 1
    assert journal.dead_count() == 0


def test_uuid_is_stable_and_unique_per_database(tmp_path: Path) -> None:
    with Journal(WriteBehindConfig(tmp_path / "a")) as j:
        first = j.uuid
    with Journal(WriteBehindConfig(tmp_path / "a")) as j:
        assert j.uuid == first
    with Journal(WriteBehindConfig(tmp_path / "b")) as j:
        assert j.uuid != first
    assert len(first) == 32


def test_closed_journal_refuses_work(jdir: Path) -> None:
    j = Journal(WriteBehindConfig(jdir))
    j.close()
    j.close()  # idempotent
    with pytest.raises(JournalError, match="closed"):
        j.append(b"k", (b"SET", b"k", b"v"))
    with pytest.raises(JournalError, match="closed"):
        j.has_pending(b"k")


def test_threads_share_one_journal(journal: Journal) -> None:
    ids: list[list[int]] = [[] for _ in range(8)]

    def worker(n: int) -> None:
        for i in range(100):
            ids[n].append(journal.append(b"t%d" % n, (b"RPUSH", b"t%d" % n, i)))
            journal.has_pending(b"t0")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for per in ids for i in per]
    assert len(set(flat)) == 800
    assert all(per == sorted(per) for per in ids)
    by_key: dict[bytes, list[bytes]] = {}
    for entry in journal.read_batch(1000):
        by_key.setdefault(entry.key, []).append(entry.args[2])
    assert all(v == [str(i).encode() for i in range(100)] for v in by_key.values())


def test_connections_of_finished_threads_are_closed(journal: Journal) -> None:
    # Thread-per-request servers start a thread for every request; their connections must not
    # accumulate until close().
    for _ in range(20):
        t = threading.Thread(target=journal.has_pending, args=(b"k",))
        t.start()
        t.join()
    assert len(journal._connections) <= 2


def test_forked_child_gets_its_own_connection_and_lease_identity(journal: Journal) -> None:
    journal.append(b"k", (b"INCR", b"k"))
    assert journal.try_acquire_lease()
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's SQLite connection or lease token
        code = 1
        try:
            journal.append(b"k", (b"INCR", b"k"))
            code = 0 if not journal.try_acquire_lease() else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert journal.pending_count() == 2
    assert journal.renew_lease()


# ------------------------------------------------------------------------------ bounds


def test_max_entries_rejects_new_writes_and_keeps_old_ones(jdir: Path) -> None:
    with Journal(WriteBehindConfig(jdir, max_entries=5, fsync="off")) as j:
        ids = [j.append(b"k", (b"INCRBY", b"k", i)) for i in range(5)]
        with pytest.raises(JournalFullError) as info:
            j.append(b"k", (b"INCRBY", b"k", 99))
        assert info.value.limit == "max_entries"
        assert info.value.limit_value == 5
        assert "max_entries=5" in str(info.value)
        assert [(e.id, e.args[2]) for e in j.read_batch(10)] == [
            (i, str(n).encode()) for n, i in enumerate(ids)
        ]
        j.ack(ids[:1])
        j.append(b"k", (b"INCRBY", b"k", 5))  # room again
        assert j.pending_count() == 5


def test_max_bytes_rejects_new_writes_and_keeps_old_ones(jdir: Path) -> None:
    with Journal(WriteBehindConfig(jdir, max_bytes=200, fsync="off")) as j:
        kept = []
        for _ in range(100):
            try:
                kept.append(j.append(b"k", (b"SET", b"k", b"v" * 30)))
            except JournalFullError as exc:
                full = exc
                break
        else:
            pytest.fail("max_bytes was never enforced")
        assert full.limit == "max_bytes"
        assert full.limit_value == 200
        assert full.requested > 0
        assert 0 < len(kept) < 100
        assert j.pending_bytes() <= 200
        assert [e.id for e in j.read_batch(1000)] == kept
        # A single write larger than the whole bound is refused too, not truncated.
        with pytest.raises(JournalFullError):
            j.append(b"k", (b"SET", b"k", b"v" * 500))


def test_dead_letters_count_toward_the_bounds(jdir: Path) -> None:
    # Dead letters are kept until an operator purges them, so they must not grow the file
    # beyond the configured bound either.
    with Journal(WriteBehindConfig(jdir, max_entries=2, fsync="off")) as j:
        j.dead_letter(j.append(b"k", (b"RPUSH", b"k", b"x")), "WRONGTYPE")
        j.append(b"k", (b"SET", b"k", b"v"))
        with pytest.raises(JournalFullError):
            j.append(b"k", (b"SET", b"k", b"w"))
        j.purge_dead()
        j.append(b"k", (b"SET", b"k", b"w"))


# ------------------------------------------------------------------------------ files


def test_directory_and_files_are_private(tmp_path: Path) -> None:
    jdir = tmp_path / "nested" / "wb"
    old = os.umask(0)  # the worst case: nothing masked out
    try:
        with Journal(WriteBehindConfig(jdir)) as j:
            j.append(b"k", (b"SET", b"k", b"v"))
            assert stat.S_IMODE(os.stat(jdir).st_mode) == 0o700
            files = sorted(p.name for p in jdir.iterdir())
            assert files == [DATABASE_FILENAME, f"{DATABASE_FILENAME}-shm", f"{DATABASE_FILENAME}-wal"]
            for name in files:
                assert stat.S_IMODE(os.stat(jdir / name).st_mode) == 0o600, name
    finally:
        os.umask(old)


def test_wal_mode_and_fsync_policy(jdir: Path) -> None:
    policies: list[tuple[FsyncPolicy, int]] = [("always", 2), ("normal", 1), ("off", 0)]
    for policy, level in policies:
        with Journal(WriteBehindConfig(jdir, fsync=policy)) as j:
            conn = j._conn()
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == level


@pytest.fixture
def filled_db(jdir: Path) -> Path:
    with Journal(WriteBehindConfig(jdir, fsync="off")) as j:
        for i in range(2000):
            j.append(b"key%d" % i, (b"SET", b"key%d" % i, b"x" * 100))
    path = jdir / DATABASE_FILENAME
    assert not (jdir / f"{DATABASE_FILENAME}-wal").exists()  # checkpointed at close
    return path


def _assert_corrupt_and_untouched(jdir: Path, path: Path, match: str) -> None:
    before = _sha256(path)
    size = path.stat().st_size
    with pytest.raises(JournalCorruptError, match=match) as info:
        Journal(WriteBehindConfig(jdir))
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    assert path.stat().st_size == size
    assert _sha256(path) == before


def test_garbage_header_is_reported_and_left_untouched(filled_db: Path) -> None:
    with open(filled_db, "r+b") as fh:
        fh.write(os.urandom(100))
    _assert_corrupt_and_untouched(filled_db.parent, filled_db, "not an SQLite database")


def test_truncated_file_is_reported_and_left_untouched(filled_db: Path) -> None:
    with open(filled_db, "r+b") as fh:
        fh.truncate(filled_db.stat().st_size // 2)
    _assert_corrupt_and_untouched(filled_db.parent, filled_db, "quick_check|malformed")


def test_damaged_pages_are_reported_and_left_untouched(filled_db: Path) -> None:
    size = filled_db.stat().st_size
    with open(filled_db, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(b"\xff" * 8192)
    _assert_corrupt_and_untouched(filled_db.parent, filled_db, "quick_check|malformed")


def test_empty_file_is_corrupt_not_a_new_journal(jdir: Path) -> None:
    jdir.mkdir(mode=0o700)
    path = jdir / DATABASE_FILENAME
    path.touch()
    _assert_corrupt_and_untouched(jdir, path, "empty")


def test_foreign_sqlite_database_is_refused(jdir: Path) -> None:
    jdir.mkdir(mode=0o700)
    path = jdir / DATABASE_FILENAME
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    _assert_corrupt_and_untouched(jdir, path, "not an otel-redis-resilience journal")


def test_newer_schema_version_is_refused(filled_db: Path) -> None:
    conn = sqlite3.connect(filled_db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    _assert_corrupt_and_untouched(filled_db.parent, filled_db, "schema version 99")


def test_missing_table_is_refused(filled_db: Path) -> None:
    conn = sqlite3.connect(filled_db, isolation_level=None)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    conn.execute("DROP TABLE lease")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()
    _assert_corrupt_and_untouched(filled_db.parent, filled_db, "missing: lease")


def test_path_that_is_not_a_file_is_refused(jdir: Path) -> None:
    (jdir / DATABASE_FILENAME).mkdir(parents=True)
    with pytest.raises(JournalCorruptError, match="not a regular file"):
        Journal(WriteBehindConfig(jdir))


def test_directory_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "wb").write_bytes(b"")
    with pytest.raises(JournalError, match="not a directory"):
        Journal(WriteBehindConfig(tmp_path / "wb"))


# ------------------------------------------------------------------------------ processes

_APPEND_FOREVER = """
    import sys
    from otel_redis_resilience._writebehind.store import Journal
    from otel_redis_resilience._writebehind.config import WriteBehindConfig
    j = Journal(WriteBehindConfig(sys.argv[1], fsync=sys.argv[2]))
    print("ready", flush=True)
    i = 0
    while True:
        entry_id = j.append(b"k%d" % (i % 7), (b"RPUSH", b"k%d" % (i % 7), i))
        # Printed only once append() returned, i.e. the write was acknowledged.
        print(entry_id, i, flush=True)
        i += 1
"""


@pytest.mark.parametrize("fsync", ["always", "normal"])
def test_acknowledged_appends_survive_sigkill(jdir: Path, fsync: str) -> None:
    acknowledged: dict[int, int] = {}
    with _child(_APPEND_FOREVER, str(jdir), fsync) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        for line in proc.stdout:
            entry_id, i = map(int, line.split())
            acknowledged[entry_id] = i
            if len(acknowledged) >= 300:
                break
        os.kill(proc.pid, signal.SIGKILL)
        # Lines already in the pipe were acknowledged before the kill as well.
        for line in proc.stdout.read().splitlines():
            parts = line.split()
            if len(parts) == 2:
                acknowledged[int(parts[0])] = int(parts[1])
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with Journal(WriteBehindConfig(jdir)) as j:
        stored = {e.id: e for e in j.read_batch(1_000_000)}
    missing = sorted(set(acknowledged) - set(stored))
    assert not missing, f"{len(missing)} acknowledged entries lost, e.g. {missing[:5]}"
    for entry_id, i in acknowledged.items():
        assert stored[entry_id].args == (b"RPUSH", b"k%d" % (i % 7), str(i).encode())


_APPEND_IN_ROUNDS = """
    import sys
    from otel_redis_resilience._writebehind.store import Journal
    from otel_redis_resilience._writebehind.config import WriteBehindConfig
    j = Journal(WriteBehindConfig(sys.argv[1], fsync="normal"))
    tag, per_round = sys.argv[2].encode(), int(sys.argv[3])
    ids = []
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "end":
            break
        for _ in range(per_round):
            ids.append(j.append(tag, (b"RPUSH", tag, len(ids))))
        print("done", flush=True)
    print(" ".join(map(str, ids)), flush=True)
"""


def test_processes_append_concurrently(jdir: Path) -> None:
    Journal(WriteBehindConfig(jdir)).close()  # created once; the children race on appends only
    rounds, per_round = 4, 150
    procs = [_child(_APPEND_IN_ROUNDS, str(jdir), f"p{k}", str(per_round)) for k in range(3)]
    # Rounds: all children append at the same time within a round, and every round starts
    # after all of them finished the previous one, so their ids interleave however the
    # machine schedules them.
    for _ in range(rounds):
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() in ("ready", "done")
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
    outputs = [p.communicate("end\n", timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    per_proc = [list(map(int, out.split()[1:])) for out, _ in outputs]  # skip the last "done"
    all_ids = [i for ids in per_proc for i in ids]
    assert len(all_ids) == len(set(all_ids)) == 3 * rounds * per_round
    assert all(ids == sorted(ids) for ids in per_proc)
    with Journal(WriteBehindConfig(jdir)) as j:
        entries = j.read_batch(len(all_ids) + 1)
    assert [e.id for e in entries] == sorted(all_ids)
    owners = [e.key for e in entries]
    assert sum(1 for a, b in itertools.pairwise(owners) if a != b) > 2
    for k in range(3):
        mine = [e for e in entries if e.key == b"p%d" % k]
        assert [e.args[2] for e in mine] == [str(i).encode() for i in range(rounds * per_round)]


_OPEN_AND_PRINT_UUID = """
    import sys
    from otel_redis_resilience._writebehind.store import Journal
    from otel_redis_resilience._writebehind.config import WriteBehindConfig
    j = Journal(WriteBehindConfig(sys.argv[1]))
    print(j.uuid, flush=True)
"""


def test_processes_creating_the_journal_at_once_share_one(jdir: Path) -> None:
    procs = [_child(_OPEN_AND_PRINT_UUID, str(jdir)) for _ in range(4)]
    outputs = [p.communicate(timeout=60) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
    uuids = {out.strip() for out, _ in outputs}
    assert len(uuids) == 1
    # No temp file left behind. (SQLite's -wal/-shm companions may outlive a process
    # that exited without closing its connection; they are not ours to judge.)
    names = {p.name for p in jdir.iterdir()} - {f"{DATABASE_FILENAME}-wal", f"{DATABASE_FILENAME}-shm"}
    assert names == {DATABASE_FILENAME}


# ------------------------------------------------------------------------------ lease


def test_lease_has_one_holder_and_expires(jdir: Path) -> None:
    a = Journal(WriteBehindConfig(jdir, lease_seconds=10))
    b = Journal(WriteBehindConfig(jdir, lease_seconds=10))
    try:
        now = time.time()
        assert a.try_acquire_lease(now)
        assert a.try_acquire_lease(now + 1)  # re-entrant for the holder
        assert not b.try_acquire_lease(now + 1)
        assert a.renew_lease(now + 5)  # now valid until now + 15
        assert not b.try_acquire_lease(now + 14)
        # a stops renewing (e.g. it hangs); once expired, b takes over and a must notice.
        assert b.try_acquire_lease(now + 15.1)
        assert not a.renew_lease(now + 15.2)
        assert not a.try_acquire_lease(now + 16)
        a.release_lease()  # not a's lease: no effect
        assert not a.try_acquire_lease(now + 16)
        b.release_lease()
        assert a.try_acquire_lease(now + 16)
    finally:
        a.close()
        b.close()


_HOLD_LEASE_AND_APPEND = """
    import sys
    from otel_redis_resilience._writebehind.store import Journal
    from otel_redis_resilience._writebehind.config import WriteBehindConfig
    j = Journal(WriteBehindConfig(sys.argv[1], lease_seconds=float(sys.argv[2])))
    assert j.try_acquire_lease()
    for i in range(50):
        j.append(b"k", (b"INCRBY", b"k", 1))
    print("done", flush=True)
    sys.stdin.readline()  # wait to be killed
"""


def test_crashed_process_journal_is_adopted(jdir: Path) -> None:
    with _child(_HOLD_LEASE_AND_APPEND, str(jdir), "1.0") as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "done"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    with Journal(WriteBehindConfig(jdir, lease_seconds=1.0)) as j:
        assert j.pending_count() == 50
        assert j.has_pending(b"k")
        assert not j.try_acquire_lease()  # the dead owner's lease is still running
        assert j.try_acquire_lease(time.time() + 1.01)
        assert len(j.read_batch(100)) == 50


def test_lease_of_a_dead_holder_is_taken_over_at_once(jdir: Path) -> None:
    with _child(_HOLD_LEASE_AND_APPEND, str(jdir), "60") as proc, Journal(WriteBehindConfig(jdir)) as j:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "done"
        # Alive: respected, with or without take_over_dead.
        assert not j.try_acquire_lease(take_over_dead=True)
        assert not j.try_acquire_lease()
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while _process_state(proc.pid) not in ("Z", None) and time.monotonic() < deadline:
            time.sleep(0.005)
        # Killed and not reaped yet (a zombie): dead, its lease is taken over at once.
        assert _process_state(proc.pid) == "Z"
        assert not j.try_acquire_lease()  # plain expiry rules: 60 s to go
        assert j.try_acquire_lease(take_over_dead=True)
        assert j.renew_lease()
        proc.wait()


def test_lease_of_a_live_holder_in_this_process_is_never_taken_over(jdir: Path) -> None:
    with Journal(WriteBehindConfig(jdir)) as a, Journal(WriteBehindConfig(jdir)) as b:
        assert a.try_acquire_lease()
        assert not b.try_acquire_lease(take_over_dead=True)


def test_lease_owner_from_an_unknown_place_is_waited_out(jdir: Path) -> None:
    # Another host or pid namespace (or an older library version): its pid means nothing here.
    # 4194305 is above any pid Linux can hand out (PID_MAX_LIMIT is 2**22).
    with Journal(WriteBehindConfig(jdir, lease_seconds=60)) as j:
        conn = sqlite3.connect(j.path, isolation_level=None)  # autocommit: no transaction left open
        try:
            conn.execute(
                "INSERT INTO lease (id, owner, expires_at) VALUES (1, ?, ?)",
                ("4194305:abc", time.time() + 60),
            )
            assert not j.try_acquire_lease(take_over_dead=True)
            conn.execute("UPDATE lease SET owner = ?", ("4194305:abc:1:other-boot/pid:[1]",))
            assert not j.try_acquire_lease(take_over_dead=True)
            # The same owner on this host, whose pid does not exist: taken over.
            conn.execute("UPDATE lease SET owner = ?", (f"4194305:abc:1:{host_identity()}",))
            assert j.try_acquire_lease(take_over_dead=True)
        finally:
            conn.close()


def _process_state(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def test_public_exceptions_print_with_the_public_module() -> None:
    import traceback

    import otel_redis_resilience
    from otel_redis_resilience import JournalCorruptError, JournalError, JournalFullError, WriteBehindError

    for cls in (JournalError, JournalFullError, JournalCorruptError, WriteBehindError):
        assert cls.__module__ == "otel_redis_resilience"
        assert getattr(otel_redis_resilience, cls.__name__) is cls
    text = "".join(traceback.format_exception_only(JournalError("disk full")))
    assert text.startswith("otel_redis_resilience.JournalError: disk full")


def test_close_releases_the_lease(jdir: Path) -> None:
    a = Journal(WriteBehindConfig(jdir))
    b = Journal(WriteBehindConfig(jdir))
    assert a.try_acquire_lease()
    assert not b.try_acquire_lease()
    a.close()
    assert b.try_acquire_lease()
    b.close()


# ------------------------------------------------------------------------------ config


def test_config_defaults(tmp_path: Path) -> None:
    c = WriteBehindConfig(tmp_path)
    assert (c.max_entries, c.max_bytes, c.fsync) == (100_000, 64 * 1024 * 1024, "always")
    assert (c.marker_prefix, c.marker_ttl, c.lease_seconds) == ("orr:wb", 7 * 86400, 10.0)
    assert c.database_path == tmp_path / DATABASE_FILENAME
    with pytest.raises(AttributeError):
        c.fsync = "off"  # type: ignore[misc]
    with pytest.raises(TypeError):
        WriteBehindConfig(tmp_path, 5)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_entries", 0),
        ("max_entries", 1.5),
        ("max_entries", True),
        ("max_bytes", -1),
        ("max_bytes", "64MiB"),
        ("fsync", "sometimes"),
        ("fsync", None),
        ("marker_prefix", ""),
        ("marker_prefix", b"orr"),
        ("marker_ttl", 0),
        ("marker_ttl", 0.5),
        ("marker_ttl", math.inf),
        ("marker_ttl", math.nan),
        ("lease_seconds", 0),
        ("lease_seconds", -1.0),
        ("lease_seconds", "10"),
        ("busy_timeout", -0.1),
    ],
)
def test_config_validation_names_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=rf"WriteBehindConfig\.{field}\b"):
        WriteBehindConfig(tmp_path, **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("directory", ["", 5, None, b"/tmp/x"])
def test_config_validation_directory(directory: object) -> None:
    with pytest.raises(ConfigurationError, match=r"WriteBehindConfig\.directory"):
        WriteBehindConfig(directory)  # type: ignore[arg-type]


def test_close_while_other_threads_read_and_write_never_crashes(jdir: Path) -> None:
    """close() used to close SQLite connections other threads were using: a segfault.

    The asyncio replayer reads ``pending_count`` in a worker thread while ``Resilience.close()``
    closes the journal. Run in a child process, so a crash fails this test instead of the run.
    """
    script = textwrap.dedent(
        f"""
        import threading
        from otel_redis_resilience._writebehind.store import Journal, JournalError
        from otel_redis_resilience._writebehind.config import WriteBehindConfig

        for round in range(30):
            j = Journal(WriteBehindConfig({str(jdir)!r} + "/r" + str(round), fsync="off"))
            stop = threading.Event()
            errors = []

            def work(n):
                i = 0
                while not stop.is_set():
                    try:
                        j.pending_count()
                        if n % 2:
                            j.append(b"k%d" % n, (b"SET", b"k%d" % n, i))
                    except JournalError as e:
                        if "closed" not in str(e):
                            errors.append(repr(e))
                        return
                    i += 1

            threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
            for t in threads:
                t.start()
            j.pending_count()
            j.close()
            stop.set()
            for t in threads:
                t.join(10)
            assert not errors, errors
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "ok"
