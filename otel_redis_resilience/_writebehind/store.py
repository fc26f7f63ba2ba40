"""Durable write-behind journal: an embedded SQLite database shared by the processes of one host.

When Redis is unavailable, writes the caller explicitly opted into are appended here and later
replayed (see :mod:`otel_redis_resilience._writebehind.replay`). The journal is one SQLite file in WAL mode
inside a private directory, so every worker process of a server (gunicorn, uvicorn workers, ...)
can share it and a journal left behind by a crashed process is simply picked up by the next one.

Durability (``fsync`` policy, mapped to ``PRAGMA synchronous``):

* ``"always"`` (``FULL``): every acknowledged append is fsynced before :meth:`Journal.append`
  returns. Nothing acknowledged is lost on a process SIGKILL, an OS crash or a power loss.
* ``"normal"`` (``NORMAL``): in WAL mode commits are not fsynced individually. A process crash
  (SIGKILL, OOM kill) loses nothing, because the data is already in the OS page cache, but an OS
  crash or power loss can lose the most recent transactions. The database stays consistent.
* ``"off"`` (``OFF``): like ``"normal"`` for process crashes; an OS crash or power loss can lose
  recent transactions and may even corrupt the database file (then :class:`JournalCorruptError`
  is raised at the next open rather than silently starting over).

The journal must live on a local filesystem: WAL mode relies on shared memory between the
processes, which network filesystems do not provide.
"""

from __future__ import annotations

import contextlib
import math
import os
import sqlite3
import stat
import struct
import threading
import time
import uuid as uuid_module
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Final, Literal

from .._errors import ConfigurationError

__all__ = [
    "DATABASE_FILENAME",
    "DeadEntry",
    "FsyncPolicy",
    "Journal",
    "JournalConfig",
    "JournalCorruptError",
    "JournalEntry",
    "JournalError",
    "JournalFullError",
    "encode_arg",
]

FsyncPolicy = Literal["always", "normal", "off"]

#: Name of the SQLite file inside :attr:`JournalConfig.directory`.
DATABASE_FILENAME: Final = "journal.sqlite3"

SCHEMA_VERSION: Final = 1
# PRAGMA application_id lets us tell our own files from any other SQLite database ("ORRW").
APPLICATION_ID: Final = 0x4F525257

_SYNCHRONOUS: Final[dict[str, str]] = {"always": "FULL", "normal": "NORMAL", "off": "OFF"}
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_TMP_PREFIX: Final = f".{DATABASE_FILENAME}."
_TMP_SUFFIX: Final = ".tmp"
# A temporary file this old cannot belong to a creation still in progress.
_STALE_TMP_SECONDS: Final = 300.0
_MIB: Final = 1024 * 1024

_SCHEMA: Final = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE entries (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    key        BLOB    NOT NULL,
    args       BLOB    NOT NULL,
    size       INTEGER NOT NULL,
    created_at REAL    NOT NULL
);
CREATE INDEX entries_by_key ON entries (key, id);

CREATE TABLE dead (
    id         INTEGER PRIMARY KEY,
    key        BLOB    NOT NULL,
    args       BLOB    NOT NULL,
    size       INTEGER NOT NULL,
    created_at REAL    NOT NULL,
    failed_at  REAL    NOT NULL,
    error      TEXT    NOT NULL
);

CREATE TABLE totals (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    entries    INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    dead       INTEGER NOT NULL,
    dead_bytes INTEGER NOT NULL
);
INSERT INTO totals (id, entries, bytes, dead, dead_bytes) VALUES (1, 0, 0, 0, 0);

-- Counters maintained by triggers so the bound check in append() is O(1) and can never drift
-- from the rows, whichever process or code path inserts or deletes them.
CREATE TRIGGER entries_insert AFTER INSERT ON entries BEGIN
    UPDATE totals SET entries = entries + 1, bytes = bytes + NEW.size WHERE id = 1;
END;
CREATE TRIGGER entries_delete AFTER DELETE ON entries BEGIN
    UPDATE totals SET entries = entries - 1, bytes = bytes - OLD.size WHERE id = 1;
END;
CREATE TRIGGER dead_insert AFTER INSERT ON dead BEGIN
    UPDATE totals SET dead = dead + 1, dead_bytes = dead_bytes + NEW.size WHERE id = 1;
END;
CREATE TRIGGER dead_delete AFTER DELETE ON dead BEGIN
    UPDATE totals SET dead = dead - 1, dead_bytes = dead_bytes - OLD.size WHERE id = 1;
END;

CREATE TABLE lease (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    owner      TEXT NOT NULL,
    expires_at REAL NOT NULL
);
"""
_REQUIRED_TABLES: Final = frozenset({"meta", "entries", "dead", "totals", "lease"})
_REQUIRED_TRIGGERS: Final = frozenset({"entries_insert", "entries_delete", "dead_insert", "dead_delete"})


class JournalError(Exception):
    """Base class of every error raised by the write-behind journal."""

    # Tracebacks and error.type name the public path, which is where callers import it from.
    __module__ = "otel_redis_resilience"


class JournalFullError(JournalError):
    """The journal reached a configured bound; the new write was rejected and nothing was dropped.

    Attributes:
        limit: which bound was hit, ``"max_entries"`` or ``"max_bytes"``.
        limit_value: the configured value of that bound.
        current: entries (or bytes) held when the write was rejected, dead letters included.
        requested: entries (1) or bytes the rejected write needed.
    """

    __module__ = "otel_redis_resilience"

    def __init__(
        self, *, limit: Literal["max_entries", "max_bytes"], limit_value: int, current: int, requested: int
    ) -> None:
        self.limit: Literal["max_entries", "max_bytes"] = limit
        self.limit_value = limit_value
        self.current = current
        self.requested = requested
        unit = "entries" if limit == "max_entries" else "bytes"
        super().__init__(
            f"write-behind journal is full: {current} {unit} held (pending + dead-lettered), "
            f"a new write needs {requested} more, {limit}={limit_value}; "
            "the write was not journaled and nothing already journaled was dropped"
        )


class JournalCorruptError(JournalError):
    """The journal file is corrupt, unreadable or not a journal; it was left untouched.

    Attributes:
        path: the database file.
        reason: what is wrong with it.
    """

    __module__ = "otel_redis_resilience"

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(
            f"write-behind journal {self.path!s} is corrupt or unreadable: {reason} "
            "(the file was left untouched; move it aside to start a new journal, "
            "its pending writes would then not be replayed)"
        )


def _finite(value: object) -> float | None:
    """``value`` as a finite float, or None if it is not a real number (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True)
class JournalConfig:
    """Where and how the write-behind journal is stored. Every field is validated at construction.

    Args:
        directory: private directory holding the database; created with mode 0700 if missing.
            Processes that should share (and adopt) a journal use the same directory.
        max_entries: bound on entries held (pending plus dead-lettered).
        max_bytes: bound on bytes of keys and arguments held (pending plus dead-lettered).
        fsync: durability policy, see the module documentation.
        marker_prefix: prefix of the replay marker keys ``{prefix}:{journal_uuid}:{entry_id}``.
        marker_ttl: seconds a replay marker lives in Redis. It must exceed the longest time an
            applied entry can stay unacknowledged (normally milliseconds; a crash between apply
            and acknowledgement extends it until the next replay).
        lease_seconds: how long the replay lease lasts without renewal; a crashed replayer's
            lease lets another process take over after this long.
        busy_timeout: seconds to wait for another process's write transaction before failing.
    """

    directory: str | os.PathLike[str]
    _: KW_ONLY
    max_entries: int = 100_000
    max_bytes: int = 64 * _MIB
    fsync: FsyncPolicy = "always"
    marker_prefix: str = "orr:wb"
    marker_ttl: float = 7 * 86400.0
    lease_seconds: float = 10.0
    busy_timeout: float = 5.0

    def __post_init__(self) -> None:
        directory: object = self.directory
        if not isinstance(directory, str | os.PathLike):
            raise ConfigurationError(
                f"JournalConfig.directory must be a str or os.PathLike, got {directory!r}"
            )
        path = os.fspath(directory)
        if not isinstance(path, str) or not path:
            raise ConfigurationError(
                f"JournalConfig.directory must be a non-empty text path, got {directory!r}"
            )
        for name in ("max_entries", "max_bytes"):
            value: object = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"JournalConfig.{name} must be an int >= 1, got {value!r}")
        fsync: object = self.fsync
        if fsync not in _SYNCHRONOUS:
            raise ConfigurationError(
                f"JournalConfig.fsync must be one of 'always', 'normal', 'off', got {fsync!r}"
            )
        prefix: object = self.marker_prefix
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError(f"JournalConfig.marker_prefix must be a non-empty str, got {prefix!r}")
        ttl = _finite(self.marker_ttl)
        # Below one second the marker could expire before the batch that set it is acknowledged.
        if ttl is None or ttl < 1:
            raise ConfigurationError(
                f"JournalConfig.marker_ttl must be a finite number of seconds >= 1, got {self.marker_ttl!r}"
            )
        lease = _finite(self.lease_seconds)
        if lease is None or lease <= 0:
            raise ConfigurationError(
                f"JournalConfig.lease_seconds must be a finite number > 0, got {self.lease_seconds!r}"
            )
        busy = _finite(self.busy_timeout)
        if busy is None or busy < 0:
            raise ConfigurationError(
                f"JournalConfig.busy_timeout must be a finite number >= 0, got {self.busy_timeout!r}"
            )

    @property
    def database_path(self) -> Path:
        """The SQLite file inside :attr:`directory`."""
        return Path(os.fspath(self.directory)) / DATABASE_FILENAME


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled write: ``args`` is the full Redis command, already encoded to bytes."""

    id: int
    key: bytes
    args: tuple[bytes, ...]
    created_at: float


@dataclass(frozen=True, slots=True)
class DeadEntry:
    """A journaled write Redis rejected with an error reply, kept for inspection."""

    id: int
    key: bytes
    args: tuple[bytes, ...]
    created_at: float
    failed_at: float
    error: str


def encode_arg(value: bytes | bytearray | memoryview | str | int | float) -> bytes:
    """Encode one command argument exactly like redis-py's ``Encoder`` (UTF-8 strings, ``repr`` numbers)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, bool):
        # redis-py refuses bools too: True would silently become b"True", not b"1".
        raise TypeError("invalid command argument of type bool; convert it to bytes, str, int or float")
    if isinstance(value, int | float):
        return repr(value).encode("ascii")
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"invalid command argument of type {type(value).__name__}; use bytes, str, int or float")


def _encode_key(key: bytes | str) -> bytes:
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    raise TypeError(f"journal key must be bytes or str, got {type(key).__name__}")


def _pack_args(args: Sequence[bytes | str | int | float]) -> bytes:
    # A bare bytes/str is a Sequence too; iterating it would journal single characters.
    if isinstance(args, str | bytes | bytearray | memoryview):
        raise TypeError("args must be a sequence of command arguments, e.g. (b'SET', b'k', b'v')")
    parts = [encode_arg(a) for a in args]
    if not parts:
        raise ValueError("args must contain at least the command name")
    # Length-prefixed, big-endian: count, then each length, then the concatenated bytes.
    return struct.pack(f">I{len(parts)}I", len(parts), *(len(p) for p in parts)) + b"".join(parts)


def _unpack_args(blob: bytes) -> tuple[bytes, ...] | None:
    try:
        (count,) = struct.unpack_from(">I", blob, 0)
        lengths = struct.unpack_from(f">{count}I", blob, 4)
    except struct.error:
        return None
    pos = 4 + 4 * count
    if pos + sum(lengths) != len(blob) or count == 0:
        return None
    out: list[bytes] = []
    for n in lengths:
        out.append(blob[pos : pos + n])
        pos += n
    return tuple(out)


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

    def __init__(self, config: JournalConfig) -> None:
        if not isinstance(config, JournalConfig):
            raise TypeError(f"Journal() needs a JournalConfig, got {type(config).__name__}")
        self._config = config
        self._path = config.database_path
        self._closed = False
        self._init_process_state()
        self._prepare_directory()
        if not self._path.exists() and not self._path.is_symlink():
            self._create_database()
        self._uuid: str = self._verify_file()
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
        # that it died (see _holder_is_dead): pid, its start time, boot and pid namespace.
        pid = os.getpid()
        started = _proc_stat(pid)
        self._owner = f"{pid}:{uuid_module.uuid4().hex}:{started[1] if started else ''}:{_host_identity()}"

    def _reset_after_fork(self) -> None:
        _INHERITED_CONNECTIONS.append((self._local, self._connections))
        self._init_process_state()

    # ----------------------------------------------------------------- properties

    @property
    def config(self) -> JournalConfig:
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

    @property
    def lease_owner_token(self) -> str:
        """The token this object writes into the lease row when it holds the replay lease."""
        return self._owner

    # ----------------------------------------------------------------- opening

    def _prepare_directory(self) -> None:
        directory = self._path.parent
        try:
            directory.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            if not directory.is_dir():
                raise JournalError(f"journal directory {directory} exists and is not a directory") from None
        except OSError as exc:
            raise JournalError(f"cannot create journal directory {directory}: {exc}") from exc
        else:
            # mkdir's mode is filtered by the umask; a permissive umask must not widen it.
            os.chmod(directory, 0o700)
        self._remove_stale_tmp_files(directory)

    @staticmethod
    def _remove_stale_tmp_files(directory: Path) -> None:
        now = time.time()
        with contextlib.suppress(OSError):
            for child in directory.iterdir():
                name = child.name
                if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(OSError):
                        if now - child.lstat().st_mtime > _STALE_TMP_SECONDS:
                            child.unlink()

    def _create_database(self) -> None:
        # Build the database under a temporary name and hard-link it into place, so that the
        # final path only ever holds a fully initialized journal (an empty or half-written file
        # there is corruption, never "not created yet") and two processes creating it at the
        # same time cannot overwrite each other: link() fails if the name exists.
        directory = self._path.parent
        tmp = directory / f"{_TMP_PREFIX}{uuid_module.uuid4().hex}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("BEGIN IMMEDIATE")
                for statement in _split_schema(_SCHEMA):
                    conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (name, value) VALUES (?, ?)",
                    [
                        ("uuid", uuid_module.uuid4().hex),
                        ("created_at", repr(time.time())),
                        ("schema_version", str(SCHEMA_VERSION)),
                    ],
                )
                conn.execute("COMMIT")
                conn.execute("PRAGMA journal_mode = WAL")
            finally:
                conn.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            # FileExistsError: another process created it first, and we use theirs.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self._path)
            _fsync_directory(directory)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot create journal database {self._path}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _check_file(self) -> None:
        path = self._path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise JournalCorruptError(path, "the file disappeared while opening it") from None
        except OSError as exc:
            raise JournalCorruptError(path, f"cannot stat the file: {exc}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise JournalCorruptError(path, "it is not a regular file")
        if st.st_size == 0:
            raise JournalCorruptError(path, "the file is empty (0 bytes), expected an initialized journal")
        try:
            with open(path, "rb") as fh:
                header = fh.read(100)
        except OSError as exc:
            raise JournalCorruptError(path, f"cannot read the file: {exc}") from exc
        if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
            raise JournalCorruptError(path, "not an SQLite database (bad or truncated file header)")

    def _verify_file(self) -> str:
        """Check the file thoroughly, without ever writing to it; return the journal uuid."""
        self._check_file()
        # Read-only, so that a failed check cannot modify the file in any way, not even by the
        # checkpoint SQLite runs when the last read-write connection closes.
        uri = self._path.resolve().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=self._config.busy_timeout, check_same_thread=False)
        except sqlite3.Error as exc:
            raise JournalCorruptError(self._path, f"cannot open the database: {exc}") from exc
        try:
            return self._verify(conn)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        """Open and configure a read-write connection to the (already verified) database."""
        try:
            conn = sqlite3.connect(
                self._path,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # used by one thread, but close() may run on another
                timeout=self._config.busy_timeout,
            )
        except sqlite3.Error as exc:
            raise JournalCorruptError(self._path, f"cannot open the database: {exc}") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._config.busy_timeout * 1000)}")
            conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[self._config.fsync]}")
            # fullfsync only matters on macOS, where plain fsync does not reach the platter.
            full = 1 if self._config.fsync == "always" else 0
            conn.execute(f"PRAGMA fullfsync = {full}")
            conn.execute(f"PRAGMA checkpoint_fullfsync = {full}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise JournalError(f"cannot put journal {self._path} in WAL mode (got {mode!r})")
            # Keep the WAL file from staying huge after a burst of writes.
            conn.execute(f"PRAGMA journal_size_limit = {64 * _MIB}")
        except JournalError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise JournalCorruptError(self._path, str(exc)) from exc
        except sqlite3.Error as exc:
            conn.close()
            raise JournalError(f"cannot configure journal {self._path}: {exc}") from exc
        return conn

    def _verify(self, conn: sqlite3.Connection) -> str:
        path = self._path
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            raise JournalCorruptError(path, f"PRAGMA quick_check failed: {exc}") from exc
        problems = [str(r[0]) for r in rows]
        if problems != ["ok"]:
            shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
            raise JournalCorruptError(path, f"PRAGMA quick_check reported: {shown}")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            names = {
                (str(kind), str(name))
                for kind, name in conn.execute("SELECT type, name FROM sqlite_master").fetchall()
            }
        except sqlite3.DatabaseError as exc:
            raise JournalCorruptError(path, f"cannot read the schema: {exc}") from exc
        if app_id != APPLICATION_ID:
            raise JournalCorruptError(
                path,
                f"not an otel-redis-resilience journal (application_id={app_id}, expected {APPLICATION_ID})",
            )
        if version != SCHEMA_VERSION:
            newer = " (written by a newer version of this library)" if version > SCHEMA_VERSION else ""
            raise JournalCorruptError(
                path,
                f"unsupported schema version {version}{newer}, this library reads version {SCHEMA_VERSION}",
            )
        tables = {name for kind, name in names if kind == "table"}
        triggers = {name for kind, name in names if kind == "trigger"}
        missing = sorted((_REQUIRED_TABLES - tables) | (_REQUIRED_TRIGGERS - triggers))
        if missing:
            raise JournalCorruptError(path, f"schema is incomplete, missing: {', '.join(missing)}")
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'uuid'").fetchone()
            totals = conn.execute("SELECT COUNT(*) FROM totals WHERE id = 1").fetchone()
        except sqlite3.DatabaseError as exc:
            raise JournalCorruptError(path, f"cannot read the journal metadata: {exc}") from exc
        if row is None or not isinstance(row[0], str) or len(row[0]) != 32:
            raise JournalCorruptError(path, "the journal uuid is missing from the meta table")
        if totals is None or totals[0] != 1:
            raise JournalCorruptError(path, "the totals row is missing")
        return str(row[0])

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise JournalError(f"journal {self._path} is closed")
        conn = self._connect()
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
                raise self._wrap(exc, "begin a write transaction") from exc
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
                raise self._wrap(exc, "commit") from exc

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._using():
            try:
                return self._conn().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._wrap(exc, "read") from exc

    def _wrap(self, exc: sqlite3.Error, action: str) -> JournalError:
        # A ProgrammingError (a closed connection...) has no sqlite_errorname.
        if isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorname", None) in (
            "SQLITE_CORRUPT",
            "SQLITE_NOTADB",
        ):
            return JournalCorruptError(self._path, f"{action} failed: {exc}")
        return JournalError(f"journal {self._path}: {action} failed: {exc}")

    # ----------------------------------------------------------------- writes

    def append(self, key: bytes | str, args: Sequence[bytes | str | int | float]) -> int:
        """Durably journal one write and return its entry id (increasing across all processes).

        ``args`` is the full Redis command, e.g. ``(b"INCRBY", b"k", 5)``; it is encoded to bytes
        exactly as redis-py would send it. ``key`` is the key the write is ordered by.

        Raises:
            JournalFullError: a bound would be exceeded; nothing was written or dropped.
            TypeError, ValueError: ``key`` or ``args`` cannot be encoded.
            JournalError: the database could not be written (e.g. disk full, lock timeout).
        """
        k = _encode_key(key)
        blob = _pack_args(args)
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
            raise self._wrap(exc, "append") from exc
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
            raise self._wrap(exc, "ack") from exc
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
            raise self._wrap(exc, "dead-letter") from exc
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
            raise self._wrap(exc, "purge dead letters") from exc
        return removed

    # ----------------------------------------------------------------- reads

    def has_pending(self, key: bytes | str) -> bool:
        """Whether ``key`` has journaled writes not replayed yet (a new write must queue behind them)."""
        rows = self._read("SELECT 1 FROM entries WHERE key = ? LIMIT 1", (_encode_key(key),))
        return bool(rows)

    def pending_count(self) -> int:
        """Number of entries waiting to be replayed (dead letters excluded)."""
        return int(self._read("SELECT entries FROM totals WHERE id = 1")[0][0])

    def wait_drained(self, timeout: float | None = None, *, poll: float = 0.05) -> bool:
        """Block until no entry is pending (dead letters excluded); False if ``timeout`` passed first.

        It only watches: the replayer drains the journal (ask it with ``res.replay_now()``;
        it runs once the breaker is not open). Entries written meanwhile, by any process
        sharing the journal, must drain too. From asyncio code, run it in a thread
        (``await asyncio.to_thread(journal.wait_drained, 30)``): it sleeps between looks.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while self.pending_count():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(poll if left is None else min(poll, left))
        return True

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
            args = _unpack_args(blob) if isinstance(blob, bytes) else None
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
            args = _unpack_args(blob) if isinstance(blob, bytes) else None
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
            if rows and rows[0][0] != self._owner and rows[0][1] > now and _holder_is_dead(str(rows[0][0])):
                dead_owner = str(rows[0][0])
        try:
            with self._write() as conn:
                row = conn.execute("SELECT owner, expires_at FROM lease WHERE id = 1").fetchone()
                if row is not None and row[0] != self._owner and row[1] > now and row[0] != dead_owner:
                    return False
                conn.execute(
                    "INSERT INTO lease (id, owner, expires_at) VALUES (1, ?, ?) "
                    "ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at",
                    (self._owner, now + self._config.lease_seconds),
                )
        except sqlite3.Error as exc:
            raise self._wrap(exc, "acquire the replay lease") from exc
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
            raise self._wrap(exc, "renew the replay lease") from exc
        return renewed

    def release_lease(self) -> None:
        """Give the lease up (if we hold it) so another process can replay without waiting."""
        try:
            with self._write() as conn:
                conn.execute("DELETE FROM lease WHERE id = 1 AND owner = ?", (self._owner,))
        except sqlite3.Error as exc:
            raise self._wrap(exc, "release the replay lease") from exc

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


def _split_schema(script: str) -> list[str]:
    """Split the schema into statements; triggers contain ``;`` inside ``BEGIN ... END``."""
    statements: list[str] = []
    buf: list[str] = []
    for line in script.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        buf.append(line)
        candidate = "\n".join(buf)
        if stripped.endswith(";") and sqlite3.complete_statement(candidate):
            statements.append(candidate)
            buf = []
    if buf:
        statements.append("\n".join(buf))
    return statements


def _host_identity() -> str:
    """This kernel boot and pid namespace: only there does a pid name the same process for us."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            boot = fh.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}/{namespace}"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of process ``pid``; None if it does not exist.

    Raises OSError if it cannot be told (no ``/proc``, or it is hidden from us).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after its last
    # ")" are plain: state is field 3, the start time field 22.
    fields = data[data.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        raise OSError(f"unexpected /proc/{pid}/stat")
    return fields[0].decode("ascii", "replace"), fields[19].decode("ascii", "replace")


def _holder_is_dead(owner: str) -> bool:
    """Whether the process named by a lease owner token surely no longer runs.

    False whenever in doubt: a wrong "dead" would let two processes replay at once (still
    exactly once, thanks to the markers, but per-key order across batches relies on the lease).
    """
    parts = owner.split(":", 3)
    host = _host_identity()
    if len(parts) != 4 or not host or parts[3] != host or not parts[2]:
        return False  # another host, container or library version: wait for the lease to expire
    try:
        pid = int(parts[0])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # another Journal object of this very process: alive
    try:
        stat = _proc_stat(pid)
    except OSError:
        return False
    # Gone; a zombie (killed, not yet reaped by its parent); or the pid reused by another process.
    return stat is None or stat[0] in ("Z", "X", "x") or stat[1] != parts[2]


def _fsync_directory(directory: Path) -> None:
    # Makes the new directory entry durable; not possible (nor needed) on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
