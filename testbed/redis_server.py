"""A real, throw-away ``redis-server`` process for the tests, the benchmarks and the demo.

Every test that needs Redis talks to a genuine ``redis-server`` (no in-memory fake, no mocks):
the point of this library is surviving real network and server failures, and those only
look real when a real server misbehaves.  :class:`RedisServer` starts one on a free
loopback port with no persistence and its own temp dir, and can crash it (SIGKILL),
freeze it (SIGSTOP), thaw it and bring it back on the same port.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

__all__ = [
    "RedisServer",
    "RedisServerError",
    "find_free_port",
    "pdeathsig_prefix",
    "redis_server_binary",
]

_INSTALL_HINT = "install it with: apt-get install redis-server"
_FALLBACK_BINARY = "/usr/bin/redis-server"

# How long start() waits for the first PONG before giving up.
_START_TIMEOUT = 10.0
# How long start() keeps retrying when the port is still held (TIME_WAIT, a previous
# instance that has not released it yet, ...).  Only used when the port is fixed.
_BIND_RETRY_WINDOW = 5.0
# Grace period for a SIGTERM'd server before we escalate to SIGKILL.
_STOP_TIMEOUT = 5.0
# Auto-picked ports can be stolen between "find a free port" and redis binding it;
# pick another one this many times before failing.
_AUTO_PORT_ATTEMPTS = 5


class RedisServerError(RuntimeError):
    """redis-server is missing, failed to start, or was used in the wrong state."""


def redis_server_binary() -> str:
    """Return the path of the ``redis-server`` executable.

    Looks on ``PATH`` first, then at Debian's ``/usr/bin/redis-server``.  Raises
    :class:`RedisServerError` with an install hint when neither exists.
    """
    found = shutil.which("redis-server")
    if found:
        return found
    if os.access(_FALLBACK_BINARY, os.X_OK):
        return _FALLBACK_BINARY
    raise RedisServerError(
        f"redis-server not found on PATH or at {_FALLBACK_BINARY}; the test-suite needs a real "
        f"Redis server, {_INSTALL_HINT}"
    )


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Inherently racy (someone may take it before we use it), so callers that bind it
    later must be ready to retry with another port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------
# Leak protection.  Two layers, because a leaked redis-server keeps its port and keeps
# running after CI finishes:
#  * atexit: stops every server still alive when the interpreter exits normally
#    (including after a failed test or a KeyboardInterrupt).
#  * PR_SET_PDEATHSIG (via util-linux ``setpriv``, :func:`pdeathsig_prefix`): the kernel
#    SIGKILLs the server if the test process dies without running atexit (SIGKILL, OOM
#    killer, CI timeout).
# ---------------------------------------------------------------------------------------
_LIVE: set[RedisServer] = set()
_LIVE_LOCK = threading.Lock()


def _kill_all_live() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.kill()
            server._remove_dir()


atexit.register(_kill_all_live)


def pdeathsig_prefix(sig: str = "KILL") -> list[str]:
    """Command prefix that makes the kernel send ``sig`` to a child when we die, if possible.

    ``[setpriv, "--pdeathsig", sig, "--"]`` (util-linux), to put before a command given to
    :class:`subprocess.Popen`: ``setpriv`` execs the command, so the pid Popen returns is
    the command's own.  Empty when ``setpriv`` is missing, or when called from a thread other
    than the main one: PDEATHSIG fires when the *thread* that forked the child exits, not
    the process, so only the main thread (which lives as long as the process) is safe.  We
    use setpriv rather than a ``preexec_fn`` because preexec_fn is unsafe when other
    threads (e.g. a FaultProxy) are running.

    ``"KILL"`` suits a redis-server; ``"TERM"`` lets a server (an app under uvicorn or
    gunicorn) shut down cleanly.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return []
    return [setpriv, "--pdeathsig", sig, "--"]


def _proc_state(pid: int) -> str | None:
    """Single-letter process state from /proc (``T`` = stopped), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Format: "pid (comm) S ..." -- comm may contain spaces/parens, so split after the last ')'.
    return stat.rpartition(")")[2].split()[0]


def _ping(host: str, port: int, timeout: float) -> bool:
    """True if something on host:port answers a RESP inline PING with +PONG."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A real ``redis-server`` subprocess on ``127.0.0.1`` for one test (or one session).

    The server runs in the foreground (``--daemonize no``) with persistence disabled
    (``--save "" --appendonly no``), its own temp dir as working dir and a log file in it.
    ``DEBUG`` is enabled for local connections so tests can use ``DEBUG SLEEP`` to make
    the server genuinely slow, and ``hz`` is 100 so a graceful stop takes ~10 ms.
    ``extra_args`` are appended last, so they override these defaults.

    Lifecycle: :meth:`start` (returns once the server answers PING; ``wait=False`` returns
    at once, then poll :meth:`ready`), :meth:`stop` (graceful, idempotent), :meth:`kill`
    (crash), :meth:`pause` / :meth:`resume` (freeze / thaw with SIGSTOP / SIGCONT),
    :meth:`restart` (come back on the same port; :meth:`start` after :meth:`kill` does
    too).  Usable as a context manager (start on enter, stop on exit).

    Clients handed out by :meth:`client` are closed by :meth:`stop`, so tests do not leak
    sockets.
    """

    host: str = "127.0.0.1"

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = ()) -> None:
        self._fixed_port = port is not None
        self._port: int = port if port is not None else find_free_port(self.host)
        self._extra_args: list[str] = list(extra_args)
        self._binary = redis_server_binary()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._paused = False
        self._clients: list[redis.Redis[Any]] = []
        # Serialises lifecycle calls; a fixture and the atexit hook may race at shutdown.
        self._lock = threading.RLock()

    # -- properties -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port the server listens on (stable across :meth:`restart`)."""
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{self.host}:{self._port}/0"

    @property
    def pid(self) -> int | None:
        """Pid of the running redis-server, or None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the process is alive (a paused server counts as running)."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused and self.running

    @property
    def log_path(self) -> Path | None:
        """The server's log file (None before the first start / after stop)."""
        return self._dir / "redis.log" if self._dir is not None else None

    def log_tail(self, lines: int = 30) -> str:
        """Last ``lines`` lines of the server log plus its stdout/stderr, for error messages."""
        if self._dir is None:
            return "<no log>"
        parts = []
        for name in ("redis.log", "stdout.log"):
            path = self._dir / name
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                if text:
                    parts.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(parts) or "<empty log>"

    # -- lifecycle --------------------------------------------------------------------

    def start(self, *, wait: bool = True) -> Self:
        """Start the server and wait until it answers PING (at most ~10 s).

        With an auto-picked port, a port stolen by someone else makes us pick another
        one.  With a fixed port (explicit, or after the first start) we keep retrying the
        same port for a few seconds, which covers a previous instance that has not quite
        released it.

        ``wait=False`` only launches the process and returns at once, for a caller that
        must not block (an asyncio program) or that times the server's coming back: poll
        :meth:`ready`.  There is no retry then: a port that cannot be bound surfaces as
        :meth:`ready` raising.  The port counts as fixed from then on.
        """
        with self._lock:
            if self.running:
                raise RedisServerError(f"redis-server already running on port {self._port}")
            if self._dir is None:
                self._dir = Path(tempfile.mkdtemp(prefix=f"redis-test-{self._port}-"))
            try:
                if not wait:
                    self._launch()
                    self._fixed_port = True
                    return self
                return self._start_with_retries()
            except BaseException:
                # Also covers Ctrl-C mid-start: no half-started process is left behind, and
                # the error message already carries the log tail, so drop the dir too.
                self._terminate(kill=True)
                self._remove_dir()
                raise

    def ready(self) -> bool:
        """True once the server answers PING (one try, at most 0.5 s); False while it starts.

        For polling after ``start(wait=False)``.  Raises :class:`RedisServerError` with the
        log tail if the process exited (e.g. it could not bind its port), or if it was never
        started; its temp dir is kept, so :meth:`start` can try again.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                raise RedisServerError(f"redis-server on port {self._port} was not started")
            if proc.poll() is not None:
                self._forget_process()
                raise RedisServerError(self._exit_message(proc))
        return _ping(self.host, self._port, timeout=0.5)

    def _start_with_retries(self) -> Self:
        bind_deadline = time.monotonic() + _BIND_RETRY_WINDOW
        attempts = 0
        while True:
            attempts += 1
            failure = self._launch_and_wait()
            if failure is None:
                # From now on the port is part of the server's identity: clients and
                # proxies point at it, so restart() must come back on it.
                self._fixed_port = True
                return self
            if failure != "addr-in-use":
                raise RedisServerError(failure)
            if not self._fixed_port and attempts < _AUTO_PORT_ATTEMPTS:
                self._port = find_free_port(self.host)
                continue
            if self._fixed_port and time.monotonic() < bind_deadline:
                time.sleep(0.05)
                continue
            raise RedisServerError(
                f"redis-server could not bind {self.host}:{self._port} (address in use)\n" + self.log_tail()
            )

    def _command(self) -> list[str]:
        assert self._dir is not None
        return [
            *pdeathsig_prefix("KILL"),
            self._binary,
            "--port", str(self._port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
            "--enable-debug-command", "local",
            # Redis acts on SIGTERM from its cron, which runs `hz` times a second; at
            # the default 10 every stop() (i.e. every test) would cost ~100 ms.
            "--hz", "100",
            *self._extra_args,
        ]  # fmt: skip

    def _launch(self) -> subprocess.Popen[bytes]:
        """Spawn redis-server (not waiting for it) and register it for leak protection."""
        assert self._dir is not None
        log = self._dir / "redis.log"
        # Truncate so "Address already in use" from a previous attempt is not re-read.
        log.write_bytes(b"")
        with open(self._dir / "stdout.log", "wb") as out:
            # start_new_session: a Ctrl-C in the terminal goes to pytest, which then
            # stops servers in order, instead of killing them behind the fixtures' back.
            proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._proc = proc
        self._paused = False
        with _LIVE_LOCK:
            _LIVE.add(self)
        return proc

    def _exit_message(self, proc: subprocess.Popen[bytes]) -> str:
        return (
            f"redis-server exited with code {proc.returncode} during startup "
            f"(port {self._port})\n{self.log_tail()}"
        )

    def _launch_and_wait(self) -> str | None:
        """Spawn redis-server and wait for PONG.  Returns None on success, else a reason:
        ``"addr-in-use"`` (caller may retry) or a full error message."""
        proc = self._launch()
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._forget_process()
                if "Address already in use" in self.log_tail():
                    return "addr-in-use"
                return self._exit_message(proc)
            if _ping(self.host, self._port, timeout=0.5):
                return None
            time.sleep(0.005)
        self._terminate(kill=True)
        return (
            f"redis-server did not answer PING within {_START_TIMEOUT:.0f}s (port {self._port})\n"
            + self.log_tail()
        )

    def stop(self) -> None:
        """Gracefully stop the server (SIGTERM, SIGKILL after 5 s) and remove its temp dir.

        Idempotent.  A paused server is resumed first, since a stopped process cannot
        act on SIGTERM.  Clients returned by :meth:`client` are closed.
        """
        with self._lock:
            self._close_clients()
            self._terminate(kill=False)
            self._remove_dir()

    def kill(self) -> None:
        """Crash the server with SIGKILL and wait until it is gone (its port is then free).

        The temp dir (and log) are kept so :meth:`restart` can reuse them.
        """
        with self._lock:
            self._terminate(kill=True)

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections stay open, nothing is answered.

        The kernel still completes TCP handshakes into the listen backlog, so new
        connects succeed and then hang -- exactly like a wedged Redis.
        """
        with self._lock:
            proc = self._require_running()
            proc.send_signal(signal.SIGSTOP)
            self._paused = True
            # SIGSTOP is asynchronous; wait for it so the caller's next command
            # deterministically hits a frozen server.
            self._wait_state(proc.pid, stopped=True)

    def resume(self) -> None:
        """Thaw a server frozen by :meth:`pause` (SIGCONT).  No-op if it is not paused."""
        with self._lock:
            proc = self._require_running()
            proc.send_signal(signal.SIGCONT)
            self._paused = False
            self._wait_state(proc.pid, stopped=False)

    def restart(self, *, wait: bool = True) -> Self:
        """(Re)start the server on the same port; stops it first if it is running.

        Data is not preserved (no persistence).  Binding retries for a few seconds in
        case the port is not released yet; redis-server sets SO_REUSEADDR so sockets in
        TIME_WAIT do not block it.  ``wait=False``: as for :meth:`start`.
        """
        with self._lock:
            if self.running:
                self._close_clients()
                self._terminate(kill=False)
            self._fixed_port = True
            return self.start(wait=wait)

    # -- helpers for assertions --------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis[Any]:
        """A plain ``redis.Redis`` connected straight to this server (no proxy).

        Meant for assertions about server state.  Defaults to a 5 s socket timeout so
        an assertion can never hang the suite; pass ``socket_timeout=`` to override.
        The client is closed by :meth:`stop`.
        """
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 5.0)
        c: redis.Redis[Any] = redis.Redis(host=self.host, port=self._port, **kwargs)
        with self._lock:
            self._clients.append(c)
        return c

    def command_count(self, name: str) -> int:
        """How many times the server executed command ``name`` (from INFO commandstats).

        0 if never.  Subcommands use Redis' ``container|sub`` form, e.g. ``"config|set"``.
        Counts are since start or the last ``CONFIG RESETSTAT``.
        """
        with redis.Redis(
            host=self.host, port=self._port, socket_timeout=5.0, socket_connect_timeout=5.0
        ) as c:
            stats: Mapping[str, Any] = c.info("commandstats")
        entry = stats.get(f"cmdstat_{name.lower()}")
        return int(entry["calls"]) if entry else 0

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<RedisServer {self.host}:{self._port} pid={self.pid} {state}>"

    # -- internals --------------------------------------------------------------------

    def _require_running(self) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise RedisServerError(f"redis-server on port {self._port} is not running")
        return proc

    def _terminate(self, *, kill: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                if kill:
                    proc.kill()  # SIGKILL also works on a SIGSTOPped process.
                else:
                    if self._paused:
                        proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                    try:
                        proc.wait(timeout=_STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        proc.kill()
            # Reap it: a zombie would still show in ps and, more importantly, waiting
            # guarantees the kernel has closed its listening socket.
            proc.wait(timeout=_STOP_TIMEOUT)
        finally:
            self._forget_process()

    def _forget_process(self) -> None:
        self._proc = None
        self._paused = False
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def _close_clients(self) -> None:
        clients, self._clients = self._clients, []
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    @staticmethod
    def _wait_state(pid: int, *, stopped: bool, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = _proc_state(pid)
            if state is None or (state in ("T", "t")) == stopped:
                return
            time.sleep(0.001)
