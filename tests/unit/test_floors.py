"""The decision floor (``otel_redis_resilience/_decide``) stays pure: read from its imports.

Decisions take time, errors and collaborators in; they import no I/O, no clock, no
threads and no OpenTelemetry, and nothing from the floors above them (drivers,
telemetry, write-behind, the package face). Type-only imports count too: a
decision that needs to name an upper floor's type is in the wrong place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "otel_redis_resilience"
DECIDE = PACKAGE / "_decide"
FORBIDDEN = ("redis", "socket", "asyncio", "threading", "sqlite3", "opentelemetry", "time", "select")
MODULES = sorted(DECIDE.glob("*.py"))


def imports(path: Path) -> list[tuple[int, str, int]]:
    """(line, absolute-or-relative module name, relative level) of every import in ``path``."""
    found: list[tuple[int, str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.module or "", node.level))
    return found


def test_the_floor_has_modules() -> None:
    names = {p.stem for p in MODULES}
    assert {"breaker", "budget", "backoff", "commands", "errors", "observer", "operation", "shared"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_decisions_import_no_io_clock_threads_or_telemetry(path: Path) -> None:
    bad = [
        f"{path.name}:{line} imports {name}"
        for line, name, level in imports(path)
        if level == 0 and name.split(".")[0] in FORBIDDEN
    ]
    assert not bad, bad


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_decisions_import_nothing_from_the_floors_above(path: Path) -> None:
    bad = []
    for line, name, level in imports(path):
        # ``from . import x`` / ``from .x import y``: the floor itself. ``..``: above it.
        if level >= 2 or (
            level == 0
            and name.startswith("otel_redis_resilience")
            and not name.startswith("otel_redis_resilience._decide")
        ):
            bad.append(f"{path.name}:{line} imports {'.' * level}{name}")
    assert not bad, bad


def test_the_checker_sees_what_it_must_refuse(tmp_path: Path) -> None:
    # The parser is what the tests above rely on: it finds plain, from-, type-only and
    # relative imports alike.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import socket\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from .._drive.core import Core\nfrom redis.exceptions import ResponseError\n"
    )
    seen = {(name, level) for _, name, level in imports(probe)}
    assert {("socket", 0), ("_drive.core", 2), ("redis.exceptions", 0)} <= seen
