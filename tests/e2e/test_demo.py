"""The demo's short mode, as CI runs it: ``python -m demo --short`` and its report checked.

The demo (``demo/``) starts a real redis-server and the Starlette example app under uvicorn,
drives traffic, SIGKILLs Redis, restarts it and writes ``report.json`` and ``timeline.png``.
What must hold: it exits 0, no request got an HTTP error, the breaker opened during the
outage and closed once Redis was back, requests were served in every phase, every journaled
write reached Redis, and the PNG is a real, non-trivial image.

Runs the module with the current interpreter (``scripts/demo`` would run the bootstrap,
which is CI's job, not the test's). A few fast tests pin the report's own logic: what
counts as an HTTP error, and how breaker transitions are pieced together from ``/health``
polls and span events.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from demo.report import RunInfo, health_transitions, merge_transitions
from demo.traffic import COUNTER, EVENTS, HEALTH, ITEMS, HealthPoint, Recording, classify

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_short_demo(tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # the demo's own receiver
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--short", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    context = f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n"
    context += proc.stderr[-4000:]
    assert proc.returncode == 0, context
    report = json.loads((out / "report.json").read_text())

    assert report["ok"] is True, context
    assert report["http_errors"]["total"] == 0, report["http_errors"]
    for phase in ("healthy", "outage", "recovery"):
        ph = report["phases"][phase]
        assert ph["ok"] > 0, (phase, ph)
        assert ph["errors"] == 0, (phase, ph)
        # Reads have a fallback: every one of them answered 200.
        reads = ph["routes"]["GET /items/{id}"]
        assert reads["requests"] > 0, (phase, reads)
        assert reads["ok"] == reads["requests"], (phase, reads)
    # During the outage the database answered the reads; the counter said it was unavailable.
    assert report["phases"]["outage"]["reads"]["database"] > 0
    assert report["declared_unavailable"]["POST /counter"]["total"] > 0

    breaker = report["breaker"]
    assert breaker["opened"], breaker["transitions"]
    assert breaker["closed_again"], breaker["transitions"]
    states = [(t["from"], t["to"]) for t in breaker["transitions"]]
    assert states[0] == ("closed", "open"), states
    assert states[-1][1] == "closed", states
    assert report["metrics"]["fallbacks"]["total"] > 0
    assert report["metrics"]["rejections"]["total"] > 0

    wb = report["write_behind"]
    assert wb["journaled"] > 0, wb
    assert wb["missing_from_redis"] == 0, wb

    assert report["otlp"]["mode"] == "local"
    assert report["otlp"]["spans_received"] > 0
    assert not report["otlp"]["receiver_errors"]
    trace = report["degraded_trace"]
    assert trace is not None
    assert "redis.resilience.degraded=true" in trace["text"]

    png = out / "timeline.png"
    assert report["timeline_png"] == str(png)
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000, len(data)
    assert (out / "report.md").read_text().rstrip().endswith("PASS")


# -- the report's logic --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "status", "body", "outcome"),
    [
        (ITEMS, 200, {"item": {}, "source": "database"}, "ok"),
        (ITEMS, 503, {"error": "redis_unavailable"}, "error"),  # reads have a fallback
        (ITEMS, None, None, "error"),  # no HTTP answer
        (COUNTER, 200, {"counter": 3}, "ok"),
        (COUNTER, 503, {"error": "redis_unavailable", "applied": "unknown"}, "declared"),
        (COUNTER, 500, "Internal Server Error", "error"),
        (EVENTS, 202, {"id": "e1", "journaled": True}, "ok"),
        (EVENTS, 202, {"id": "e1", "journaled": False}, "error"),  # body contradicts the status
        (EVENTS, 503, {"error": "journal_full", "journaled": False}, "declared"),
        (HEALTH, 200, {"status": "ok", "redis": {"breaker": "open"}}, "ok"),
    ],
)
def test_classify(route: str, status: int | None, body: object, outcome: str) -> None:
    assert classify(route, status, body)[0] == outcome


def _polls(*spans: tuple[float, float, str]) -> Recording:
    """/health polls every 100 ms: (from, to, state) ranges."""
    rec = Recording()
    for start, end, state in spans:
        t = start
        while t < end - 1e-9:
            rec.health.append(HealthPoint(round(t, 3), state, 200, 0.001))
            t += 0.1
    return rec


RUN = RunInfo("starlette", "uvicorn", 0.0, 6.0, 14.0, 22.0, 8, 120.0, "redis://", "local", "")
POLLS = _polls((0.0, 6.05, "closed"), (6.1, 14.1, "open"), (14.15, 14.3, "closed"))


def _tr(t: float, a: str, b: str, reason: str) -> dict[str, object]:
    return {"t": t, "from": a, "to": b, "reason": reason, "seen_by": "span event on GET"}


def test_transitions_fill_in_what_no_span_shows() -> None:
    """The background probe's open -> half_open has no span, and lasted less than a poll."""
    spans = [
        _tr(6.04, "closed", "open", "consecutive_failures"),
        _tr(11.04, "open", "half_open", "reset_timeout"),
        _tr(11.044, "half_open", "open", "trial_call_failed"),
        _tr(14.121, "half_open", "closed", "trial_calls_succeeded"),
    ]
    polls = [(h.t, h.state or "") for h in POLLS.health]
    merged = merge_transitions(spans, health_transitions(RUN, POLLS), polls)
    assert [(m["from"], m["to"], m["reason"]) for m in merged] == [
        ("closed", "open", "consecutive_failures"),
        ("open", "half_open", "reset_timeout"),
        ("half_open", "open", "trial_call_failed"),
        ("open", "half_open", "probe_succeeded"),
        ("half_open", "closed", "trial_calls_succeeded"),
    ]
    times = [m["t"] for m in merged]
    assert times == sorted(times)


def test_transitions_from_polls_alone() -> None:
    """Exporting elsewhere (no spans): open then closed means it went through half-open."""
    merged = merge_transitions([], health_transitions(RUN, POLLS), [])
    assert [(m["from"], m["to"]) for m in merged] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
