"""The write-behind journal's store: one SQLite file (WAL) shared by the processes of one host.

When Redis is unavailable, writes the caller explicitly opted into are appended here and later
replayed (see :mod:`.flow`). The journal is one SQLite file in WAL mode inside a private
directory, so every worker process of a server (gunicorn, uvicorn workers, ...) can share it and
a journal left behind by a crashed process is simply picked up by the next one. Opening and
durability: :mod:`.database`; argument encoding: :mod:`.codec`; lease rules: :mod:`.rules`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import uuid as uuid_module
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import database
from .codec import encode_arg, encode_key, pack_args, unpack_args
from .config import DATABASE_FILENAME, FsyncPolicy, WriteBehindConfig
from .database import APPLICATION_ID
from .errors import JournalCorruptError, JournalError, JournalFullError
from .host import holder_is_dead, host_identity, proc_stat
from .rules import lease_blocks, owner_token

__all__ = [
    "APPLICATION_ID",
    "DATABASE_FILENAME",
    "DeadEntry",
    "FsyncPolicy",
    "Journal",
    "JournalCorruptError",
    "JournalEntry",
    "JournalError",
    "JournalFullError",
    "encode_arg",
]


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled write: ``args`` is the full Redis command, already encoded to bytes."""

    id: int
    key: bytes
    args: tuple[bytes, ...]
    created_at: float


@dataclass(frozen=True, slots=True)
class DeadEntry(JournalEntry):
    """A journaled write Redis rejected with an error reply, kept for inspection."""

    failed_at: float
    error: str


# Journals to reset in a forked child: an SQLite connection must never cross fork().
_LIVE_JOURNALS: weakref.WeakSet[Journal] = weakref.WeakSet()
# Connections inherited from the parent are kept referenced forever in a forked child: letting
# them be garbage-collected would close them, and SQLite must not touch them in the child at all.
_INHERITED_CONNECTIONS: list[object] = []


def _after_fork_in_child() -> None:
    for journal in list(_LIVE_JOURNALS):
        journal._reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Journal:
    """The durable, bounded, multi-process write-behind journal.

    Thread-safe: each thread gets its own SQLite connection (so readers such as
    :meth:`has_pending` never wait behind another thread's fsync) and write transactions are
    serialized in-process by a lock (so threads of one process queue on a cheap mutex instead of
    SQLite's sleeping busy handler). Processes serialize on ``BEGIN IMMEDIATE`` with
    ``busy_timeout``. :meth:`close` must only be called once other threads stopped using it.

    Raises:
        JournalCorruptError: at construction, if the database file is corrupt, unreadable or not
            a journal. The file is never overwritten or discarded.
        JournalError: at construction, if the directory cannot be created or opened.
    """

    def __init__(self, config: WriteBehindConfig) -> None:
        if not isinstance(config, WriteBehindConfig):
            raise TypeError(f"Journal() needs a WriteBehindConfig, got {type(config).__name__}")
        self._config = config
        self._path = config.database_path
        self._closed = False
        self._init_process_state()
        database.prepare_directory(self._path)
        if not self._path.exists() and not self._path.is_symlink():
            database.create_database(self._path)
        self._uuid: str = database.verify_file(self._path, config.busy_timeout)
        self._conn()
        _LIVE_JOURNALS.add(self)

    def _init_process_state(self) -> None:
        self._local = threading.local()
        # Every connection with the thread that owns it, so close() can close them all and
        # connections of threads that ended (thread-per-request servers) do not pile up.
        self._connections: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._connections_lock = threading.Lock()
        # Operations running on some thread's connection: close() waits for them, since
        # closing an SQLite connection another thread is using can crash the process.
        self._active = 0
        self._idle = threading.Condition(self._connections_lock)
        self._write_lock = threading.Lock()
        # The lease owner is per process and per Journal object, never inherited across fork.
        # It also names the process well enough for another process of this host to tell
        # that it died (see host.holder_is_dead): pid, its start time, boot and pid namespace.
        pid = os.getpid()
        started = proc_stat(pid)
        self._owner = owner_token(
            pid, uuid_module.uuid4().hex, started[1] if started else "", host_identity()
        )

    def _reset_after_fork(self) -> None:
        _INHERITED_CONNECTIONS.append((self._local, self._connections))
        self._init_process_state()

    # ----------------------------------------------------------------- properties

    @property
    def config(self) -> WriteBehindConfig:
        """The configuration this journal was opened with."""
        return self._config

    @property
    def path(self) -> Path:
        """The SQLite database file."""
        return self._path

    @property
    def uuid(self) -> str:
        """Identity of this journal database, created once; part of every replay marker key."""
        return self._uuid

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise JournalError(f"journal {self._path} is closed")
        conn = database.connect(self._path, self._config)
        self._local.conn = conn
        with self._connections_lock:
            alive = []
            for thread_ref, other in self._connections:
                thread = thread_ref()
                if thread is not None and thread.is_alive():
                    alive.append((thread_ref, other))
                else:
                    # Its thread is gone, so nothing can be using it any more.
                    with contextlib.suppress(sqlite3.Error):
                        other.close()
            alive.append((weakref.ref(threading.current_thread()), conn))
            self._connections = alive
        return conn

    # ----------------------------------------------------------------- transactions

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        with self._idle:
            if self._closed:
                raise JournalError(f"journal {self._path} is closed")
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                if not self._active:
                    self._idle.notify_all()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: in-process lock, then ``BEGIN IMMEDIATE`` across processes."""
        with self._using(), self._write_lock:
            conn = self._conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise database.wrap(self._path, exc, "begin a write transaction") from exc
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise database.wrap(self._path, exc, "commit") from exc

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._using():
            try:
                return self._conn().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise database.wrap(self._path, exc, "read") from exc

    def append(self, key: bytes | str, args: Sequence[bytes | str | int | float]) -> int:
        """Durably journal one write and return its entry id (increasing across all processes).

        ``args`` is the full Redis command, e.g. ``(b"INCRBY", b"k", 5)``; it is encoded to bytes
        exactly as redis-py would send it. ``key`` is the key the write is ordered by.

        Raises:
            JournalFullError: a bound would be exceeded; nothing was written or dropped.
            TypeError, ValueError: ``key`` or ``args`` cannot be encoded.
            JournalError: the database could not be written (e.g. disk full, lock timeout).
        """
        k = encode_key(key)
        blob = pack_args(args)
        size = len(k) + len(blob)
        created_at = time.time()
        try:
            with self._write() as conn:
                entries, nbytes = conn.execute(
                    "SELECT entries + dead, bytes + dead_bytes FROM totals WHERE id = 1"
                ).fetchone()
                if entries + 1 > self._config.max_entries:
                    raise JournalFullError(
                        limit="max_entries",
                        limit_value=self._config.max_entries,
                        current=entries,
                        requested=1,
                    )
                if nbytes + size > self._config.max_bytes:
                    raise JournalFullError(
                        limit="max_bytes", limit_value=self._config.max_bytes, current=nbytes, requested=size
                    )
                cursor = conn.execute(
                    "INSERT INTO entries (key, args, size, created_at) VALUES (?, ?, ?, ?)",
                    (k, blob, size, created_at),
                )
                entry_id = cursor.lastrowid
        except sqlite3.Error as exc:
            raise database.wrap(self._path, exc, "append") from exc
        assert entry_id is not None
        return entry_id

    def ack(self, ids: Iterable[int]) -> int:
        """Delete replayed entries; return how many were still present (others were already acked)."""
        id_list = [(int(i),) for i in ids]
        if not id_list:
            return 0
        try:
            with self._write() as conn:
                removed = conn.executemany("DELETE FROM entries WHERE id = ?", id_list).rowcount
                empty = conn.execute("SELECT entries FROM totals WHERE id = 1").fetchone()[0] == 0
        except sqlite3.Error as exc:
            raise database.wrap(self._path, exc, "ack") from exc
        if empty:
            # Give the pages of a drained journal back to the filesystem; best effort only.
            with contextlib.suppress(JournalError, sqlite3.Error), self._write() as conn:
                conn.execute("PRAGMA incremental_vacuum").fetchall()
        return removed

    def dead_letter(self, entry_id: int, error: str) -> bool:
        """Move a pending entry to the dead-letter table with Redis's error text.

        Returns False if the entry is no longer pending (already acked or dead-lettered).
        """
        try:
            with self._write() as conn:
                cursor = conn.execute(
                    "INSERT INTO dead (id, key, args, size, created_at, failed_at, error) "
                    "SELECT id, key, args, size, created_at, ?, ? FROM entries WHERE id = ?",
                    (time.time(), str(error), int(entry_id)),
                )
                moved = cursor.rowcount == 1
                if moved:
                    conn.execute("DELETE FROM entries WHERE id = ?", (int(entry_id),))
        except sqlite3.Error as exc:
            raise database.wrap(self._path, exc, "dead-letter") from exc
        return moved

    def purge_dead(self, ids: Iterable[int] | None = None) -> int:
        """Delete dead letters (all of them, or the given ids) once they were dealt with."""
        try:
            with self._write() as conn:
                if ids is None:
                    removed = conn.execute("DELETE FROM dead").rowcount
                else:
                    id_list = [(int(i),) for i in ids]
                    removed = conn.executemany("DELETE FROM dead WHERE id = ?", id_list).rowcount
        except sqlite3.Error as exc:
            raise database.wrap(self._path, exc, "purge dead letters") from exc
        return removed

    # ----------------------------------------------------------------- reads

    def has_pending(self, key: bytes | str) -> bool:
        """Whether ``key`` has journaled writes not replayed yet (a new write must queue behind them)."""
        rows = self._read("SELECT 1 FROM entries WHERE key = ? LIMIT 1", (encode_key(key),))
        return bool(rows)

    def pending_count(self) -> int:
        """Number of entries waiting to be replayed (dead letters excluded)."""
        return int(self._read("SELECT entries FROM totals WHERE id = 1")[0][0])

    def oldest_created_at(self) -> float | None:
        """Wall-clock time the oldest pending entry was journaled; None if nothing is pending."""
        row = self._read("SELECT created_at FROM entries ORDER BY id LIMIT 1")
        return float(row[0][0]) if row else None

    def pending_bytes(self) -> int:
        """Bytes of keys and arguments waiting to be replayed (dead letters excluded)."""
        return int(self._read("SELECT bytes FROM totals WHERE id = 1")[0][0])

    def dead_count(self) -> int:
        """Number of dead-lettered entries (Redis rejected them with an error reply)."""
        return int(self._read("SELECT dead FROM totals WHERE id = 1")[0][0])

    def read_batch(self, limit: int) -> list[JournalEntry]:
        """Return up to ``limit`` pending entries, oldest first."""
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        rows = self._read("SELECT id, key, args, created_at FROM entries ORDER BY id LIMIT ?", (limit,))
        out: list[JournalEntry] = []
        for entry_id, key, blob, created_at in rows:
            args = unpack_args(blob) if isinstance(blob, bytes) else None
            if args is None or not isinstance(key, bytes):
                raise JournalCorruptError(self._path, f"entry {entry_id} cannot be decoded")
            out.append(JournalEntry(int(entry_id), key, args, float(created_at)))
        return out

    def dead_entries(self, limit: int = 100) -> list[DeadEntry]:
        """Return up to ``limit`` dead letters, oldest first, for inspection."""
        rows = self._read(
            "SELECT id, key, args, created_at, failed_at, error FROM dead ORDER BY id LIMIT ?", (int(limit),)
        )
        out: list[DeadEntry] = []
        for entry_id, key, blob, created_at, failed_at, error in rows:
            args = unpack_args(blob) if isinstance(blob, bytes) else None
            if args is None or not isinstance(key, bytes):
                raise JournalCorruptError(self._path, f"dead letter {entry_id} cannot be decoded")
            out.append(DeadEntry(int(entry_id), key, args, float(created_at), float(failed_at), str(error)))
        return out

    # ----------------------------------------------------------------- replay lease

    def try_acquire_lease(self, now: float | None = None, *, take_over_dead: bool = False) -> bool:
        """Take the replay lease if it is free, expired or already ours; return whether we hold it.

        ``now`` is wall-clock seconds (:func:`time.time`), the only clock processes share.
        With ``take_over_dead``, a lease whose holder is a process of this host (same boot, same
        pid namespace) that no longer runs is taken over at once instead of after it expires: a
        replayer SIGKILLed mid-run then delays replay by one poll, not by ``lease_seconds``.
        A holder that cannot be judged (another pid namespace, no ``/proc``) is waited out.
        """
        now = time.time() if now is None else float(now)
        dead_owner: str | None = None
        if take_over_dead:
            # Judged outside the write transaction (it reads /proc); the transaction then takes
            # the lease only if that same dead owner still holds it.
            rows = self._read("SELECT owner, expires_at FROM lease WHERE id = 1")
            holder = str(rows[0][0]) if rows else None
            if holder is not None and lease_blocks(holder, rows[0][1], self._owner, now, None):
                dead_owner = holder if holder_is_dead(holder) else None
        try:
            with self._write() as conn:
                row = conn.execute("SELECT owner, expires_at FROM lease WHERE id = 1").fetchone()
                if row is not None and lease_blocks(str(row[0]), row[1], self._owner, now, dead_owner):
                    return False
                conn.execute(
                    "INSERT INTO lease (id, owner, expires_at) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                    (self._owner, now + self._config.lease_seconds),
                )
        except sqlite3.Error as exc:
            raise database.wrap(self._path, exc, "acquire the replay lease") from exc
        return True

    def renew_lease(self, now: float | None = None) -> bool:
        """Extend our lease; False means another process took it over and we must stop replaying."""
        now = time.time() if now is None else float(now)
        try:
            with self._write() as conn:
                cursor = conn.execute(
                    "UPDATE lease SET expires_at = ? WHERE id = 1 AND owner = ?",
                    (now + self._config.lease_seconds, self._owner),
                )
                renewed = cursor.rowcount == 1
        except sqlite3.Error as exc:
            raise database.wrap(self._path, exc, "renew the replay lease") from exc
        return renewed

    def release_lease(self) -> None:
        """Give the lease up (if we hold it) so another process can replay without waiting."""
        try:
            with self._write() as conn:
                conn.execute("DELETE FROM lease WHERE id = 1 AND owner = ?", (self._owner,))
        except sqlite3.Error as exc:
            raise database.wrap(self._path, exc, "release the replay lease") from exc

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the lease if held and close every connection. Idempotent."""
        if self._closed:
            return
        with contextlib.suppress(JournalError):
            self.release_lease()
        with self._idle:
            self._closed = True
            # SQLite operations are bounded by busy_timeout; never close under a running one.
            if not self._idle.wait_for(lambda: not self._active, timeout=self._config.busy_timeout + 5):
                return  # still in use: leave the connections to the garbage collector
            connections, self._connections = self._connections, []
        for _, conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
        _LIVE_JOURNALS.discard(self)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Journal {self._path} uuid={self._uuid} {state}>"
