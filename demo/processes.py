"""The demo's subprocesses: a crashable redis-server and the example app under a real HTTP server.

:class:`RedisProcess` runs Debian's ``redis-server`` on a free loopback port with its own temp
dir and no persistence; it can be SIGKILLed and brought back on the same port (empty: an
in-memory cache that crashed lost its data). :func:`start_app` runs an example app under
uvicorn (Starlette) or gunicorn with gthread workers (Flask), as one worker process so that
its ``/health`` and ``/metrics`` describe the whole app.

Both are started in their own session (a Ctrl-C in the terminal reaches only the demo,
which then stops them in order) and, where util-linux ``setpriv`` exists, with a parent-death
signal, so that they do not outlive a demo that was itself killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["APPS", "AppServer", "DemoError", "RedisProcess", "find_free_port", "start_app"]

REPO = Path(__file__).resolve().parent.parent
_INSTALL_HINT = "install it with: apt-get install redis-server (scripts/bootstrap does)"


class DemoError(RuntimeError):
    """Something the demo needs could not be set up (a missing binary, a server that won't start)."""


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (callers retry if it was taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pdeathsig_prefix(sig: str) -> list[str]:
    """``setpriv --pdeathsig SIG --``: the kernel signals the child when we die.

    The signal follows the *thread* that forked, so only use it from the main thread.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None or threading.current_thread() is not threading.main_thread():
        return []
    return [setpriv, "--pdeathsig", sig, "--"]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _ping(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# -- redis-server -------------------------------------------------------------------------


class RedisProcess:
    """A ``redis-server`` on ``127.0.0.1`` that the demo can crash and bring back on the same port."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.access(binary, os.X_OK):
            raise DemoError(f"redis-server not found; {_INSTALL_HINT}")
        self._binary = binary
        self._dir = workdir
        self._dir.mkdir(parents=True, exist_ok=True)
        self.port = find_free_port(self.host)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log(self) -> Path:
        return self._dir / "redis.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def spawn(self) -> None:
        """Start redis-server without waiting for it (see :meth:`wait_ready`)."""
        if self.running:
            raise DemoError("redis-server is already running")
        args = [
            *_pdeathsig_prefix("KILL"),
            self._binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self.log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def ready(self) -> bool:
        """True once it answers PING; raises :class:`DemoError` if it died starting."""
        proc = self._proc
        if proc is None:
            raise DemoError("redis-server was not started")
        if proc.poll() is not None:
            self._proc = None
            raise DemoError(
                f"redis-server exited with {proc.returncode} (port {self.port}):\n{_tail(self.log)}"
            )
        return _ping(self.host, self.port)

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait for PONG; an auto-picked port taken meanwhile means another port."""
        for _attempt in range(5):
            self.spawn()
            deadline = time.monotonic() + timeout
            try:
                while not self.ready():
                    if time.monotonic() > deadline:
                        self.kill()
                        raise DemoError(f"redis-server did not answer PING in {timeout:.0f} s")
                    time.sleep(0.01)
                return
            except DemoError:
                if "Address already in use" not in _tail(self.log):
                    raise
                self.port = find_free_port(self.host)
        raise DemoError("redis-server could not find a free port")

    def kill(self) -> None:
        """SIGKILL, and reap it so the port is free again."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# -- the example app ----------------------------------------------------------------------


def _gunicorn_flags() -> list[str]:
    """Recent gunicorn opens a control socket at a fixed path (~/.gunicorn): not for a demo."""
    import gunicorn.config  # type: ignore[import-untyped]

    names = {s.name for s in gunicorn.config.KNOWN_SETTINGS}
    return ["--no-control-socket"] if "control_socket_disable" in names else []


#: The apps the demo can run: name -> what runs.
APPS: dict[str, str] = {
    "starlette": "examples.starlette_app under uvicorn (1 process, asyncio)",
    "flask": "examples.flask_app under gunicorn (1 gthread worker, 8 threads)",
}


def _app_args(app: str, port: int) -> list[str]:
    if app == "starlette":
        return [
            sys.executable, "-m", "uvicorn", "examples.starlette_app:app",
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
    if app == "flask":
        return [
            sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", "8",
            "-b", f"127.0.0.1:{port}", "--timeout", "30", "--graceful-timeout", "5",
            "--log-level", "warning", *_gunicorn_flags(), "examples.flask_app:app",
        ]  # fmt: skip
    raise ValueError(f"unknown app {app!r}")


@dataclass
class AppServer:
    app: str
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def description(self) -> str:
        return APPS[self.app]

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log, lines)

    def stop(self) -> None:
        """SIGTERM the server's process group (graceful: exporters flush), SIGKILL after 15 s."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def start_app(app: str, env: Mapping[str, str], log: Path, timeout: float = 30.0) -> AppServer:
    """Start ``app`` on a free port and wait until ``GET /health`` answers 200."""
    for _attempt in range(3):
        port = find_free_port()
        pythonpath = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*_pdeathsig_prefix("TERM"), *_app_args(app, port)],
                cwd=REPO, env={**env, "PYTHONPATH": pythonpath},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        server = AppServer(app, proc, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            server.stop()
            raise DemoError(f"{APPS[app]} did not answer /health in {timeout:.0f} s:\n{server.log_tail()}")
        if "address already in use" not in server.log_tail().lower():
            raise DemoError(f"{APPS[app]} exited with {proc.returncode}:\n{server.log_tail()}")
    raise DemoError(f"{APPS[app]} could not find a free port")
