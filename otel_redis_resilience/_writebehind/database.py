"""Opening the journal's SQLite file: create it atomically, verify it without writing, connect.

Durability (``fsync`` policy, mapped to ``PRAGMA synchronous``):

* ``"always"`` (``FULL``): every acknowledged append is fsynced before it returns. Nothing
  acknowledged is lost on a process SIGKILL, an OS crash or a power loss.
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
import os
import sqlite3
import stat
import time
import uuid as uuid_module
from pathlib import Path
from typing import Final

from .config import DATABASE_FILENAME, SYNCHRONOUS, WriteBehindConfig
from .errors import JournalCorruptError, JournalError

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "connect",
    "create_database",
    "prepare_directory",
    "verify_file",
    "wrap",
]

SCHEMA_VERSION: Final = 1
# PRAGMA application_id lets us tell our own files from any other SQLite database ("ORRW").
APPLICATION_ID: Final = 0x4F525257

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


def prepare_directory(path: Path) -> None:
    """Create the private directory (0700) if missing; clear stale temporary files."""
    directory = path.parent
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
    _remove_stale_tmp_files(directory)


def _remove_stale_tmp_files(directory: Path) -> None:
    now = time.time()
    with contextlib.suppress(OSError):
        for child in directory.iterdir():
            name = child.name
            if name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX):
                with contextlib.suppress(OSError):
                    if now - child.lstat().st_mtime > _STALE_TMP_SECONDS:
                        child.unlink()


def create_database(path: Path) -> None:
    # Build the database under a temporary name and hard-link it into place, so that the
    # final path only ever holds a fully initialized journal (an empty or half-written file
    # there is corruption, never "not created yet") and two processes creating it at the
    # same time cannot overwrite each other: link() fails if the name exists.
    directory = path.parent
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
            os.link(tmp, path)
        _fsync_directory(directory)
    except (OSError, sqlite3.Error) as exc:
        raise JournalError(f"cannot create journal database {path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _check_file(path: Path) -> None:
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


def verify_file(path: Path, busy_timeout: float) -> str:
    """Check the file thoroughly, without ever writing to it; return the journal uuid."""
    _check_file(path)
    # Read-only, so that a failed check cannot modify the file in any way, not even by the
    # checkpoint SQLite runs when the last read-write connection closes.
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalCorruptError(path, f"cannot open the database: {exc}") from exc
    try:
        return _verify(path, conn)
    finally:
        conn.close()


def connect(path: Path, config: WriteBehindConfig) -> sqlite3.Connection:
    """Open and configure a read-write connection to the (already verified) database."""
    try:
        conn = sqlite3.connect(
            path,
            isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
            check_same_thread=False,  # used by one thread, but close() may run on another
            timeout=config.busy_timeout,
        )
    except sqlite3.Error as exc:
        raise JournalCorruptError(path, f"cannot open the database: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(config.busy_timeout * 1000)}")
        conn.execute(f"PRAGMA synchronous = {SYNCHRONOUS[config.fsync]}")
        # fullfsync only matters on macOS, where plain fsync does not reach the platter.
        full = 1 if config.fsync == "always" else 0
        conn.execute(f"PRAGMA fullfsync = {full}")
        conn.execute(f"PRAGMA checkpoint_fullfsync = {full}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise JournalError(f"cannot put journal {path} in WAL mode (got {mode!r})")
        # Keep the WAL file from staying huge after a burst of writes.
        conn.execute(f"PRAGMA journal_size_limit = {64 * _MIB}")
    except JournalError:
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise JournalCorruptError(path, str(exc)) from exc
    except sqlite3.Error as exc:
        conn.close()
        raise JournalError(f"cannot configure journal {path}: {exc}") from exc
    return conn


def _verify(path: Path, conn: sqlite3.Connection) -> str:
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


def wrap(path: Path, exc: sqlite3.Error, action: str) -> JournalError:
    """The journal error for an SQLite error: corruption is told apart."""
    # A ProgrammingError (a closed connection...) has no sqlite_errorname.
    if isinstance(exc, sqlite3.DatabaseError) and getattr(exc, "sqlite_errorname", None) in (
        "SQLITE_CORRUPT",
        "SQLITE_NOTADB",
    ):
        return JournalCorruptError(path, f"{action} failed: {exc}")
    return JournalError(f"journal {path}: {action} failed: {exc}")


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


def _fsync_directory(directory: Path) -> None:
    # Makes the new directory entry durable; not possible (nor needed) on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
