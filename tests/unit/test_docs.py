"""The telemetry and configuration references name everything the code emits or accepts."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from otel_redis_resilience import (
    BreakerPolicy,
    LastKnownGoodPolicy,
    Resilience,
    RetryPolicy,
    WriteBehindConfig,
)

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "otel_redis_resilience"
TELEMETRY_DOC = (ROOT / "docs" / "telemetry.md").read_text()
CONFIG_DOC = (ROOT / "docs" / "configuration.md").read_text()


def _core_source() -> str:
    return "\n".join(p.read_text() for p in sorted(CORE.rglob("*.py")))


def _emitted() -> set[str]:
    src = _core_source()
    names = set(re.findall(r'create_[a-z_]+\(\s*"([^"]+)"', src))  # metrics
    names |= set(re.findall(r'add_event\(\s*"([^"]+)"', src))  # span events
    names |= set(re.findall(r'start_span\(\s*"([^"]+)"', src))  # named spans
    # Every attribute key of our own namespace, wherever it is written.
    names |= set(re.findall(r'"(redis\.resilience\.[a-z_.]+)"', src))
    return names


def test_the_scan_finds_what_it_should() -> None:
    emitted = _emitted()
    assert "db.client.operation.duration" in emitted
    assert "redis.resilience.retry" in emitted
    assert "redis.resilience.writebehind.replay" in emitted
    assert len(emitted) > 25


@pytest.mark.parametrize("name", sorted(_emitted()))
def test_telemetry_reference_names_everything_emitted(name: str) -> None:
    # The reference may write a shared prefix once (`redis.resilience.writebehind.applied`,
    # `.duplicates`...): accept the last component in backticks after its prefix is shown.
    if f"`{name}`" in TELEMETRY_DOC:
        return
    prefix, _, last = name.rpartition(".")
    assert f"`{prefix}." in TELEMETRY_DOC, name
    assert f"`.{last}`" in TELEMETRY_DOC, name


def _config_names() -> set[str]:
    names = {
        f.name
        for cls in (RetryPolicy, BreakerPolicy, LastKnownGoodPolicy, WriteBehindConfig)
        for f in dataclasses.fields(cls)
        if not f.name.startswith("_")
    }
    params = inspect.signature(Resilience.__init__).parameters
    names |= {p for p in params if p != "self"}
    return names


@pytest.mark.parametrize("name", sorted(_config_names()))
def test_configuration_reference_names_every_option(name: str) -> None:
    assert f"`{name}`" in CONFIG_DOC, name
