"""The demo's subprocesses: the example app under a real HTTP server (redis-server is testbed's).

The demo's redis-server is the tests' own :class:`testbed.RedisServer` (no persistence, its
own temp dir, SIGKILLed and brought back on the same port, empty: an in-memory cache that
crashed lost its data). :func:`start_app` runs an example app under uvicorn (Starlette) or
gunicorn with gthread workers (Flask), as one worker process so that its ``/health`` and
``/metrics`` describe the whole app.

Both are started in their own session (a Ctrl-C in the terminal reaches only the demo,
which then stops them in order) and, where util-linux ``setpriv`` exists, with a parent-death
signal (:func:`testbed.pdeathsig_prefix`), so that they do not outlive a demo that was itself
killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from testbed import find_free_port, pdeathsig_prefix

__all__ = ["APPS", "AppServer", "DemoError", "start_app"]

REPO = Path(__file__).resolve().parent.parent


class DemoError(RuntimeError):
    """Something the demo needs could not be set up (a server that won't start)."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


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
                [*pdeathsig_prefix("TERM"), *_app_args(app, port)],
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
