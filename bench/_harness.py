"""Shared helpers for the benchmark scripts in ``bench/`` (not a benchmark itself).

* :class:`RedisServer`: a throw-away ``redis-server`` on a free loopback port, with
  persistence off (``--save "" --appendonly no``), stopped at interpreter exit and,
  through ``setpriv --pdeathsig``, killed by the kernel if the benchmark dies hard.
* :func:`median`, :func:`p90`, :func:`table`: statistics and markdown output.
* :func:`interleave`: the round-robin driver the micro-benchmarks share.

The scripts run as ``python bench/NAME.py``, which puts ``bench/`` on ``sys.path``, so
they import this module as ``_harness``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
REDIS_BINARY_FALLBACK = "/usr/bin/redis-server"


def find_free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.path.exists(REDIS_BINARY_FALLBACK):
        return REDIS_BINARY_FALLBACK
    sys.exit("redis-server not found (apt-get install redis-server)")


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


_LIVE: set[RedisServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


class RedisServer:
    """A real ``redis-server`` on ``127.0.0.1``; the port survives :meth:`kill` + :meth:`start`."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port if port is not None else find_free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="orr-bench-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    def _command(self) -> list[str]:
        prefix: list[str] = []
        setpriv = shutil.which("setpriv")
        if setpriv and threading.current_thread() is threading.main_thread():
            prefix = [setpriv, "--pdeathsig", "KILL", "--"]
        return [
            *prefix,
            redis_binary(),
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._dir),
            "--logfile", str(self._dir / "redis.log"),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start and wait for PONG; retries the same port while the old one is released."""
        deadline = time.monotonic() + timeout
        while True:
            proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._proc = proc
            with _LIVE_LOCK:
                _LIVE.add(self)
            while time.monotonic() < deadline and proc.poll() is None:
                if _ping(self.port):
                    return self
                time.sleep(0.002)
            if proc.poll() is None:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING")
            if time.monotonic() >= deadline:
                raise RuntimeError(f"redis-server could not start on port {self.port}")
            time.sleep(0.02)  # exited at once: most likely the port is still held

    def kill(self) -> None:
        """SIGKILL (a crash) and reap; the port is kept for a later :meth:`start`."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self._proc = None

    def stop(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- statistics and output -------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; the first column is left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_us(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


class Results:
    """Per-variant, per-round µs/op: wall clock, and CPU time of the benchmarking thread."""

    def __init__(self, names: Iterable[str]) -> None:
        self.wall: dict[str, list[float]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in self.wall}

    def add(self, name: str, wall_ns: int, cpu_ns: int, ops: int) -> None:
        self.wall[name].append(wall_ns / ops / 1000.0)
        self.cpu[name].append(cpu_ns / ops / 1000.0)


def interleave(
    variants: Sequence[tuple[str, Callable[[int], int]]],
    *,
    rounds: int,
    ops: int,
    warmup_rounds: int,
) -> Results:
    """Run every variant once per round, rotating who goes first; µs/op per round.

    Each callable runs ``ops`` operations and returns the wall-clock nanoseconds they
    took (timed inside, with ``time.perf_counter_ns``); the thread's CPU time
    (``time.thread_time_ns``) is taken around the call. Warm-up rounds are run the
    same way and thrown away.
    """
    results = Results(name for name, _ in variants)
    n = len(variants)
    for r in range(warmup_rounds + rounds):
        for i in range(n):
            name, fn = variants[(r + i) % n]
            cpu = time.thread_time_ns()
            ns = fn(ops)
            cpu = time.thread_time_ns() - cpu
            if r >= warmup_rounds:
                results.add(name, ns, cpu, ops)
    return results


def paired_ratio(results: dict[str, list[float]], name: str, base: str) -> float:
    """Median over rounds of (variant / base) in the same round: robust to drifting noise."""
    return median([a / b for a, b in zip(results[name], results[base], strict=True)])


async def ainterleave(
    variants: Sequence[tuple[str, Callable[[int], Awaitable[int]]]],
    *,
    rounds: int,
    ops: int,
    warmup_rounds: int,
) -> Results:
    """:func:`interleave` for coroutine functions (run on the current event loop)."""
    results = Results(name for name, _ in variants)
    n = len(variants)
    for r in range(warmup_rounds + rounds):
        for i in range(n):
            name, fn = variants[(r + i) % n]
            cpu = time.thread_time_ns()
            ns = await fn(ops)
            cpu = time.thread_time_ns() - cpu
            if r >= warmup_rounds:
                results.add(name, ns, cpu, ops)
    return results


def environment() -> str:
    """One line naming what the numbers were measured on."""
    import platform

    import redis

    try:
        out = subprocess.run([redis_binary(), "--version"], capture_output=True, text=True, timeout=5).stdout
        server = out.split()[2].removeprefix("v=")
    except Exception:
        server = "?"
    return (
        f"Python {platform.python_version()}, redis-py {redis.__version__}, redis-server {server}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}"
    )


def render_profile(title: str, prof: Any, top: int = 30) -> str:
    """A ``cProfile.Profile`` as a markdown section: the ``top`` functions by own time."""
    import io
    import pstats

    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    text = out.getvalue()
    for prefix in (*sys.path, str(Path(__file__).resolve().parent.parent)):
        if prefix.startswith("/"):
            text = text.replace(prefix.rstrip("/") + "/", "")
    return f"### cProfile: {title}\n\n```\n{text.strip()}\n```\n"


def per_call_us(fn: Callable[[], object], number: int, repeat: int = 5) -> float:
    """Best-of-``repeat`` mean µs per call of ``fn`` over ``number`` calls (no I/O micro-costs)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter_ns()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter_ns() - t) / number / 1000.0)
    return best
