"""Shared helpers for the benchmark scripts in ``bench/`` (not a benchmark itself).

* :class:`RedisServer`, :class:`FaultProxy`, :func:`find_free_port`: the tests' own
  ``testbed`` (a throw-away ``redis-server`` on a free loopback port, persistence off, never
  leaked; a fault-injecting TCP proxy), re-exported.
* :func:`median`, :func:`p90`, :func:`table`: statistics and markdown output.
* :func:`interleave`: the round-robin driver the micro-benchmarks share.

The scripts run as ``.venv/bin/python bench/NAME.py``, which puts ``bench/`` on
``sys.path``, so they import this module as ``_harness``, first of all their imports:
outside the project's virtualenv (where ``redis``, ``testbed`` and the library cannot be
imported) it exits with a message saying so instead of an ``ImportError`` traceback.
``testbed`` and the library come from the virtualenv's editable install, which puts the
checkout on ``sys.path``: nothing here patches ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: What only the project's virtualenv has (``scripts/bootstrap`` makes it).
_NEEDED = ("redis", "testbed", "otel_redis_resilience")


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else absolute."""
    path = Path(os.path.abspath(path))  # not resolve(): .venv/bin/python is a symlink
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _require_project_venv() -> None:
    """Exit with a clear message when the project's packages cannot be imported."""
    missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    script = _shown(Path(sys.argv[0])) if sys.argv and sys.argv[0] else "bench/NAME.py"
    python = _shown(REPO / ".venv" / "bin" / "python")
    bootstrap = _shown(REPO / "scripts" / "bootstrap")
    sys.exit(
        f"{script}: run it with the project's virtualenv: {sys.executable} cannot import "
        f"{', '.join(missing)}.\nSet the virtualenv up once with {bootstrap}, then run: {python} {script}"
    )


_require_project_venv()

# The benchmarks run the tests' own redis-server launcher (persistence off, its own
# temp dir, never leaked: atexit and ``setpriv --pdeathsig``; start() after kill()
# brings it back on the same port) and fault proxy.
from testbed import FaultProxy, RedisServer, find_free_port, redis_server_binary  # noqa: E402

HOST = "127.0.0.1"

__all__ = ["HOST", "FaultProxy", "RedisServer", "find_free_port"]


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
    around: Callable[[str], AbstractContextManager[object]] | None = None,
) -> Results:
    """Run every variant once per round, rotating who goes first; µs/op per round.

    Each callable runs ``ops`` operations and returns the wall-clock nanoseconds they
    took (timed inside, with ``time.perf_counter_ns``); the thread's CPU time
    (``time.thread_time_ns``) is taken around the call. Warm-up rounds are run the
    same way and thrown away. ``around(name)``, if given, is a context entered before
    and left after each variant's run, outside both timings (e.g. to instrument
    redis-py for one variant only).
    """
    results = Results(name for name, _ in variants)
    n = len(variants)
    for r in range(warmup_rounds + rounds):
        for i in range(n):
            name, fn = variants[(r + i) % n]
            with around(name) if around is not None else nullcontext():
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
        version = [redis_server_binary(), "--version"]
        out = subprocess.run(version, capture_output=True, text=True, timeout=5).stdout
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
    for prefix in (*sys.path, str(REPO)):
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
