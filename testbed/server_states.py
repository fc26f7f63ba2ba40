"""Put real redis-server processes into the states behind each error reply.

Each builder is a context manager yielding a :class:`ServerState`: where to connect, with
which client options, and a write (and a read) that the server answers with the state's
error reply. Every process is stopped (or killed) and every blocking client released on
exit. Nothing is faked: the replies come from redis-server itself.

=============  =========================================================================
reply          how
=============  =========================================================================
LOADING        DEBUG POPULATE + SAVE, then a restart with ``key-load-delay`` (a hidden
               config) so loading the RDB takes minutes; killed on exit
BUSY           ``EVAL "while true do end" 0`` from a thread, ``busy-reply-threshold``
               100 ms; SCRIPT KILL on exit
MASTERDOWN     a replica of a port nothing listens on, ``replica-serve-stale-data no``
               (and ``replica-read-only no``, so writes get MASTERDOWN too)
READONLY       a replica (``REPLICAOF``) of a live primary, link up
OOM            ``maxmemory`` just above what is used, ``noeviction``, filled
MISCONF        ``CONFIG SET dir`` to a directory that is then removed, BGSAVE fails
               (``stop-writes-on-bgsave-error yes``)
NOREPLICAS     ``min-replicas-to-write 1`` and no replica
NOPERM         an ACL user allowed only GET (and the connection handshake)
NOAUTH         ``requirepass`` and a client without a password
WRONGPASS      ``requirepass`` and a client with a wrong one
CLUSTERDOWN    a ``cluster-enabled`` node that serves no slot
TRYAGAIN       two cluster nodes, a slot MIGRATING from one to the other, and a
               multi-key read of a present and a missing key of that slot
=============  =========================================================================
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis._parsers.base import BaseParser

from testbed.redis_server import RedisServer, find_free_port, pdeathsig_prefix, redis_server_binary

__all__ = ["STATES", "ServerState", "reply_code"]


@dataclass
class ServerState:
    """A server answering ``code`` to ``write`` (and to ``read`` when set)."""

    code: str
    host: str
    port: int
    #: redis-py client options (password, username...).
    client_kw: dict[str, Any] = field(default_factory=dict)
    #: (method, args) answered with ``code``.
    write: tuple[str, tuple[Any, ...]] = ("set", ("k", "v"))
    #: (method, args) of a read that still works in this state (None: reads fail too).
    read: tuple[str, tuple[Any, ...]] | None = None
    #: Whether ``write`` is a single-key write that ``write_behind()`` can take.
    write_behind_capable: bool = True
    #: Things to check the state is still on (e.g. the loading server did not finish).
    still_on: Callable[[], bool] = lambda: True


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.01)
    raise RuntimeError(f"server state not reached in {timeout}s: {what}")


def _error_of(c: redis.Redis, *args: Any) -> BaseException | None:  # type: ignore[type-arg]
    try:
        c.execute_command(*args)
    except redis.exceptions.ResponseError as e:
        return e
    return None


def reply_code(exc: BaseException) -> str | None:
    """The error code of a redis-py error reply, whichever class redis-py made of it.

    redis-py turns the codes it knows into classes and strips them from the message
    (``OOM ...`` becomes ``OutOfMemoryError("command not allowed ...")``).
    """
    for code, cls in BaseParser.EXCEPTION_CLASSES.items():
        if isinstance(cls, type) and type(exc) is cls:
            return code
    if isinstance(exc, redis.exceptions.ResponseError) and exc.args:
        word = str(exc.args[0]).split(" ", 1)[0]
        if word.isupper():
            return word
    return None


def _replies(code: str, c: redis.Redis, *args: Any) -> bool:  # type: ignore[type-arg]
    err = _error_of(c, *args)
    return err is not None and reply_code(err) == code


# ---------------------------------------------------------------------------------------


def _raw_reply(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as so:
        so.sendall(request)
        return so.recv(4096)


class _RawServer:
    """A redis-server started without waiting for PONG (a loading server answers LOADING)."""

    def __init__(self, args: list[str], directory: Path) -> None:
        self.port = find_free_port()
        self.dir = directory
        # fmt: off
        command = [
            *pdeathsig_prefix("KILL"),  # like RedisServer's: never outlives the test process
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--daemonize", "no",
            "--dir", str(directory),
            "--logfile", str(directory / "raw.log"),
            *args,
        ]
        # fmt: on
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)


@contextlib.contextmanager
def loading() -> Iterator[ServerState]:
    directory = Path(tempfile.mkdtemp(prefix="redis-loading-"))
    try:
        with RedisServer(extra_args=["--dbfilename", "dump.rdb", "--dir", str(directory)]) as seed:
            c = seed.client()
            # Incompressible values: the RDB must be big for the loader to serve events often.
            p = c.pipeline(transaction=False)
            for i in range(2000):
                p.set(f"key:{i}", os.urandom(1024))
            p.execute()
            c.save()
        raw = _RawServer(
            [
                "--dbfilename", "dump.rdb",
                "--save", "",
                "--appendonly", "no",
                # 20 ms per key: 2000 keys take 40 s to load; events are served every
                # KiB loaded (every key), so the server answers (LOADING) throughout.
                "--key-load-delay", "20000",
                "--loading-process-events-interval-bytes", "1024",
            ],
            directory,
        )  # fmt: skip
        try:
            # A raw socket: redis-py drops its connection on every LOADING reply and, with
            # its default retries, reconnects with backoff.
            def still_loading() -> bool:
                return _raw_reply(raw.port, b"PING\r\n").startswith(b"-LOADING")

            _wait(still_loading, 10, "LOADING reply")
            yield ServerState("LOADING", "127.0.0.1", raw.port, read=None, still_on=still_loading)
        finally:
            raw.kill()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def busy() -> Iterator[ServerState]:
    with RedisServer(extra_args=["--busy-reply-threshold", "100"]) as server:
        runner = server.client(socket_timeout=60)
        done = threading.Event()

        def spin() -> None:
            with contextlib.suppress(redis.exceptions.RedisError):
                runner.eval("while true do end", 0)
            done.set()

        t = threading.Thread(target=spin, daemon=True)
        t.start()
        probe = server.client()
        _wait(lambda: _replies("BUSY", probe, "PING"), 10, "BUSY reply")
        try:
            yield ServerState("BUSY", server.host, server.port, still_on=lambda: not done.is_set())
        finally:
            killer = server.client()
            _wait(lambda: done.is_set() or _error_of(killer, "SCRIPT", "KILL") is None, 10, "SCRIPT KILL")
            t.join(timeout=10)


@contextlib.contextmanager
def masterdown() -> Iterator[ServerState]:
    dead_port = find_free_port()  # nothing listens there: the primary is down
    with RedisServer(extra_args=["--replica-serve-stale-data", "no", "--replica-read-only", "no"]) as server:
        c = server.client()
        c.execute_command("REPLICAOF", "127.0.0.1", str(dead_port))
        _wait(lambda: _replies("MASTERDOWN", c, "GET", "k"), 10, "MASTERDOWN reply")
        yield ServerState("MASTERDOWN", server.host, server.port, read=None)


@contextlib.contextmanager
def readonly() -> Iterator[ServerState]:
    with RedisServer(extra_args=["--repl-diskless-sync-delay", "0"]) as primary, RedisServer() as replica:
        primary.client().set("r", "from-primary")
        c = replica.client()
        c.execute_command("REPLICAOF", primary.host, str(primary.port))
        _wait(lambda: c.info("replication")["master_link_status"] == "up", 10, "replication link up")
        _wait(lambda: c.get("r") == b"from-primary", 10, "replica synced")
        yield ServerState("READONLY", replica.host, replica.port, read=("get", ("r",)))


@contextlib.contextmanager
def oom() -> Iterator[ServerState]:
    with RedisServer() as server:
        c = server.client()
        c.set("r", "still-readable")
        c.config_set("maxmemory-policy", "noeviction")
        # Fill a little, then make the limit lower than what is used: full, nothing to evict.
        for i in range(100):
            c.set(f"fill:{i}", "x" * 1024)
        used = int(c.info("memory")["used_memory"])
        c.config_set("maxmemory", str(used // 2))
        _wait(lambda: _replies("OOM", c, "SET", "k", "v"), 5, "OOM reply")
        yield ServerState("OOM", server.host, server.port, read=("get", ("r",)))


@contextlib.contextmanager
def misconf() -> Iterator[ServerState]:
    with RedisServer(extra_args=["--enable-protected-configs", "yes"]) as server:
        c = server.client()
        c.set("r", "still-readable")
        gone = Path(tempfile.mkdtemp(prefix="redis-misconf-"))
        c.config_set("stop-writes-on-bgsave-error", "yes")
        # Writes are refused after a failed BGSAVE only when save points are configured.
        c.config_set("save", "3600 1")
        c.config_set("dir", str(gone))
        # The server's working directory is removed: the BGSAVE child cannot create its
        # temp file there, whoever we are (root included).
        gone.rmdir()
        c.bgsave()
        _wait(lambda: c.info("persistence")["rdb_last_bgsave_status"] == "err", 10, "BGSAVE failed")
        _wait(lambda: _replies("MISCONF", c, "SET", "k", "v"), 5, "MISCONF reply")
        try:
            yield ServerState("MISCONF", server.host, server.port, read=("get", ("r",)))
        finally:
            with contextlib.suppress(Exception):
                c.config_set("dir", tempfile.gettempdir())


@contextlib.contextmanager
def noreplicas() -> Iterator[ServerState]:
    with RedisServer() as server:
        c = server.client()
        c.set("r", "still-readable")
        c.config_set("min-replicas-to-write", "1")
        _wait(lambda: _replies("NOREPLICAS", c, "SET", "k", "v"), 5, "NOREPLICAS reply")
        yield ServerState("NOREPLICAS", server.host, server.port, read=("get", ("r",)))


@contextlib.contextmanager
def noperm() -> Iterator[ServerState]:
    with RedisServer() as server:
        c = server.client()
        c.set("r", "still-readable")
        # GET only, plus what redis-py's handshake sends (its CLIENT SETINFO errors are ignored).
        c.execute_command("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+get")
        kw = {"username": "limited", "password": "pw"}
        lim = server.client(**kw)
        _wait(lambda: _replies("NOPERM", lim, "SET", "k", "v"), 5, "NOPERM reply")
        yield ServerState("NOPERM", server.host, server.port, client_kw=kw, read=("get", ("r",)))


@contextlib.contextmanager
def noauth() -> Iterator[ServerState]:
    with RedisServer() as server:
        server.client().config_set("requirepass", "secret")
        yield ServerState("NOAUTH", server.host, server.port, read=None)


@contextlib.contextmanager
def wrongpass() -> Iterator[ServerState]:
    with RedisServer() as server:
        server.client().config_set("requirepass", "secret")
        yield ServerState("WRONGPASS", server.host, server.port, client_kw={"password": "wrong"}, read=None)


def _cluster_args(directory: Path, bus: int | None = None) -> list[str]:
    # The bus port is given: the default (port + 10000) is invalid above port 55535.
    bus = bus or find_free_port()
    return [
        "--cluster-enabled", "yes",
        "--cluster-port", str(bus),
        "--cluster-config-file", str(directory / f"nodes-{os.getpid()}-{bus}.conf"),
    ]  # fmt: skip


@contextlib.contextmanager
def clusterdown() -> Iterator[ServerState]:
    directory = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
    try:
        with RedisServer(extra_args=_cluster_args(directory)) as node:
            c = node.client()
            _wait(lambda: _replies("CLUSTERDOWN", c, "SET", "k", "v"), 10, "CLUSTERDOWN reply")
            yield ServerState("CLUSTERDOWN", node.host, node.port, read=None)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def tryagain() -> Iterator[ServerState]:
    directory = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
    try:
        b_bus = find_free_port()
        with (
            RedisServer(extra_args=_cluster_args(directory)) as a,
            RedisServer(extra_args=_cluster_args(directory, b_bus)) as b,
        ):
            ca, cb = a.client(), b.client()
            ca.execute_command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
            b_id = cb.execute_command("CLUSTER", "MYID")
            b_id = b_id.decode() if isinstance(b_id, bytes) else str(b_id)
            ca.execute_command("CLUSTER", "MEET", b.host, str(b.port), str(b_bus))
            _wait(lambda: b_id in str(ca.execute_command("CLUSTER", "NODES")), 10, "MEET")
            _wait(lambda: ca.cluster("info")["cluster_state"] == "ok", 10, "cluster ok")
            slot = int(ca.execute_command("CLUSTER", "KEYSLOT", "{t}a"))
            ca.set("{t}a", "present")
            ca.execute_command("CLUSTER", "SETSLOT", str(slot), "MIGRATING", b_id)
            _wait(lambda: _replies("TRYAGAIN", ca, "MGET", "{t}a", "{t}b"), 10, "TRYAGAIN reply")
            yield ServerState(
                "TRYAGAIN",
                a.host,
                a.port,
                write=("mget", (["{t}a", "{t}b"],)),
                write_behind_capable=False,
                read=None,
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


#: Every state builder, by error code.
STATES: dict[str, Callable[[], contextlib.AbstractContextManager[ServerState]]] = {
    "LOADING": loading,
    "BUSY": busy,
    "MASTERDOWN": masterdown,
    "READONLY": readonly,
    "OOM": oom,
    "MISCONF": misconf,
    "NOREPLICAS": noreplicas,
    "NOPERM": noperm,
    "NOAUTH": noauth,
    "WRONGPASS": wrongpass,
    "CLUSTERDOWN": clusterdown,
    "TRYAGAIN": tryagain,
}
