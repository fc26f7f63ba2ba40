"""Turning a recorded run into the demo's report: a JSON-able dict, Markdown, and pass/fail checks.

Everything here is pure: :func:`build_report` takes what :mod:`demo.run` recorded (the
load's samples, the ``/health`` and ``/metrics`` timelines, the final metrics, the spans the
local OTLP receiver decoded) and returns the report; :func:`render_markdown` prints it.

What counts as an HTTP error: a request that got no HTTP answer, or an answer its route's
API does not allow (see :func:`demo.traffic.classify`). ``POST /counter``'s 503 saying Redis is
unavailable (and whether the increment may have happened) is the API working as designed:
it is reported as *declared unavailable*, not as an error. Reads (``GET /items/{id}``) have a
fallback and must always answer 200.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from demo.otlp_receiver import SpanRecord, format_trace_tree
from demo.traffic import COUNTER, EVENTS, ITEMS, ROUTES, MetricSample, Recording, Sample

__all__ = ["PHASES", "RunInfo", "build_report", "render_markdown"]

PHASES = ("healthy", "outage", "recovery")
TRANSITION_EVENT = "redis.resilience.breaker.transition"
# Clock and request-latency slack when matching /health polls with span events.
_SLACK = 0.3


@dataclass
class RunInfo:
    """How the run went: what ran, and when each phase started (wall-clock seconds)."""

    app: str
    server: str
    t_start: float
    t_kill: float
    t_back: float
    t_end: float
    clients: int
    rate: float
    redis_url: str
    #: ``"local"`` (the demo's receiver), ``"external"`` (the user's endpoint).
    otlp_mode: str
    otlp_endpoint: str
    #: Seconds after ``t_back`` until the restarted Redis executed its first GET, if seen.
    first_redis_get: float | None = None
    #: Event ids the app journaled (202), and those missing from Redis when the run ended.
    journaled_ids: list[str] = field(default_factory=list)
    missing_ids: list[str] = field(default_factory=list)
    #: Seconds after ``t_back`` until every journaled event was in Redis, if that happened.
    replayed_after: float | None = None
    otlp_spans: int = 0
    otlp_metric_points: int = 0
    otlp_errors: list[str] = field(default_factory=list)

    def phase_of(self, t: float) -> str | None:
        if self.t_start <= t < self.t_kill:
            return "healthy"
        if self.t_kill <= t < self.t_back:
            return "outage"
        if self.t_back <= t <= self.t_end:
            return "recovery"
        return None

    def windows(self) -> dict[str, tuple[float, float]]:
        return {
            "healthy": (self.t_start, self.t_kill),
            "outage": (self.t_kill, self.t_back),
            "recovery": (self.t_back, self.t_end),
        }


# -- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def _latency(samples: Sequence[Sample]) -> dict[str, float | None]:
    lat = [s.latency for s in samples if s.status is not None]
    return {
        "p50": _ms(percentile(lat, 50)),
        "p99": _ms(percentile(lat, 99)),
        "max": _ms(max(lat) if lat else None),
    }


def _counts(samples: Sequence[Sample]) -> dict[str, Any]:
    outcomes = Counter(s.outcome for s in samples)
    return {
        "requests": len(samples),
        "ok": outcomes["ok"],
        "declared_unavailable": outcomes["declared"],
        "errors": outcomes["error"],
        "latency_ms": _latency(samples),
    }


# -- breaker ------------------------------------------------------------------------------


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def health_transitions(run: RunInfo, rec: Recording) -> list[dict[str, Any]]:
    """State changes seen by the ``/health`` poller.

    A state shorter than a poll interval is not seen; an open breaker only closes through
    half-open, so "open, then closed" is reported as both steps.
    """
    out: list[dict[str, Any]] = []
    prev: str | None = None
    prev_t = run.t_start
    for h in rec.health:
        if h.state is None:
            continue
        # It happened between the last poll that saw the old state (t_lo) and this one.
        base = {"t": h.t, "t_lo": prev_t, "reason": ""}
        if prev == "open" and h.state == "closed":
            seen_by = "/health poll (half-open for less than a poll)"
            out.append({**base, "from": "open", "to": "half_open", "seen_by": seen_by})
            out.append({**base, "from": "half_open", "to": "closed", "seen_by": seen_by})
        elif prev is not None and h.state != prev:
            out.append({**base, "from": prev, "to": h.state, "seen_by": "/health poll"})
        prev, prev_t = h.state, h.t
    return out


def span_transitions(spans: Iterable[SpanRecord]) -> list[dict[str, Any]]:
    """``redis.resilience.breaker.transition`` span events: exact time and reason."""
    out = []
    for span in spans:
        for ev in span.events_named(TRANSITION_EVENT):
            a = ev.attributes
            out.append(
                {
                    "t": ev.time_unix_nano / 1e9,
                    "from": a.get("redis.resilience.breaker.previous_state", "?"),
                    "to": a.get("redis.resilience.breaker.state", "?"),
                    "reason": a.get("redis.resilience.reason", ""),
                    "seen_by": f"span event on {span.name}",
                }
            )
    return sorted(out, key=lambda x: x["t"])


def merge_transitions(
    from_spans: list[dict[str, Any]], from_health: list[dict[str, Any]], polls: Sequence[tuple[float, str]]
) -> list[dict[str, Any]]:
    """Span events (exact), plus the ``/health`` changes no span event explains.

    The background probe moves the breaker outside any request, so its transitions have no
    span event, and a state that lasted less than a poll interval is invisible to the
    poller: when the next known transition starts from another state than the last one
    ended in, the step in between is inferred, timed at the last poll that still saw the old
    state (it happened between that poll and the next known transition).
    """
    merged = [(s["t"], 1, s) for s in from_spans]
    for h in from_health:
        lo, hi = h.pop("t_lo") - _SLACK, h["t"] + _SLACK
        if any(s["to"] == h["to"] and lo <= s["t"] <= hi for s in from_spans):
            continue  # the span event says it, exactly
        if from_spans and (h["from"], h["to"]) == ("open", "half_open"):
            # Requests record their transitions; this one happened outside any request.
            h = {**h, "reason": "probe_succeeded", "seen_by": "/health poll (background probe: no span)"}
        # It happened before any transition out of its new state seen since the last poll.
        after = [s["t"] for s in from_spans if s["from"] == h["to"] and lo <= s["t"] <= h["t"]]
        if after:
            h["t"] = min(after)
        merged.append((h["t"], 0, h))
    merged.sort(key=lambda x: (x[0], x[1]))
    out: list[dict[str, Any]] = []
    state = "closed"
    for _, _, tr in merged:
        if tr["from"] != state:
            seen = [t for t, st in polls if st == state and t <= tr["t"]]
            out.append(
                {
                    "t": max([*seen[-1:], out[-1]["t"] if out else tr["t"]]),
                    "from": state,
                    "to": tr["from"],
                    "reason": "probe_succeeded" if (state, tr["from"]) == ("open", "half_open") else "",
                    "seen_by": f"inferred: after the last /health poll seeing {state}",
                }
            )
        out.append(tr)
        state = tr["to"]
    return out


# -- metrics ------------------------------------------------------------------------------


def _by(samples: Iterable[MetricSample], name: str, *labels: str) -> dict[str, int | float]:
    out: dict[str, float] = {}
    for s in samples:
        if s.name == name:
            key = ", ".join(f"{lbl}={s.labels.get(lbl, '')}" for lbl in labels) if labels else "total"
            out[key] = out.get(key, 0.0) + s.value
    return {k: int(v) if v.is_integer() else v for k, v in sorted(out.items())}


def _total(samples: Iterable[MetricSample], name: str) -> float:
    return sum(s.value for s in samples if s.name == name)


def metrics_section(final: Sequence[MetricSample]) -> dict[str, Any]:
    return {
        "fallbacks": {
            "total": int(_total(final, "redis_resilience_fallbacks_total")),
            "by": _by(final, "redis_resilience_fallbacks_total", "kind", "reason"),
        },
        "retries": {
            "total": int(_total(final, "redis_resilience_retries_total")),
            "by": _by(final, "redis_resilience_retries_total", "db_operation_name", "error_type"),
        },
        "rejections": {
            "total": int(_total(final, "redis_resilience_rejections_total")),
            "by": _by(final, "redis_resilience_rejections_total", "reason"),
        },
        "breaker_transitions": {
            "total": int(_total(final, "redis_resilience_breaker_transitions_total")),
            "by": _by(final, "redis_resilience_breaker_transitions_total", "previous_state", "state"),
        },
        "writebehind_replayed": int(_total(final, "redis_resilience_writebehind_replayed_total")),
        "writebehind_queue_size": int(_total(final, "redis_resilience_writebehind_queue_size")),
    }


def first_redis_get(spans: Iterable[SpanRecord], since: float) -> float | None:
    """When the first ``GET`` started after ``since`` was answered by Redis (from its span)."""
    ends = [
        s.end_time_unix_nano / 1e9
        for s in spans
        if s.kind == "CLIENT"
        and s.name == "GET"
        and s.start_time_unix_nano / 1e9 >= since
        and s.attributes.get("redis.resilience.outcome") in ("ok", "retried")
    ]
    return min(ends) if ends else None


def replay_batches(spans: Iterable[SpanRecord], t0: float) -> list[dict[str, Any]]:
    """The write-behind replay batches (``redis.resilience.writebehind.replay`` spans)."""
    out = []
    for s in sorted(spans, key=lambda s: s.start_time_unix_nano):
        if s.name == "redis.resilience.writebehind.replay":
            a = s.attributes
            out.append(
                {
                    "t": round(s.start_time_unix_nano / 1e9 - t0, 3),
                    "applied": a.get("redis.resilience.writebehind.applied"),
                    "duplicates": a.get("redis.resilience.writebehind.duplicates"),
                    "dead": a.get("redis.resilience.writebehind.dead"),
                    "remaining": a.get("redis.resilience.writebehind.remaining"),
                    "error": a.get("error.type", ""),
                }
            )
    return out


# -- the degraded request's trace ---------------------------------------------------------

_NOISE_SUFFIXES = (" http send", " http receive")


def degraded_trace(spans: Sequence[SpanRecord]) -> dict[str, Any] | None:
    """The trace of the most telling degraded request: preferably a read (it falls back) whose
    failed call opened the breaker, else one with retries; ``None`` if none says degraded."""
    candidates = [
        s for s in spans if s.kind == "SERVER" and s.attributes.get("redis.resilience.degraded") is True
    ]
    if not candidates:
        return None
    children: dict[str, list[SpanRecord]] = {}
    for s in spans:
        if s.parent_span_id:
            children.setdefault(s.parent_span_id, []).append(s)

    def subtree(root: SpanRecord) -> list[SpanRecord]:
        out, todo = [], [root]
        while todo:
            s = todo.pop()
            out.append(s)
            todo.extend(children.get(s.span_id, []))
        return out

    def score(root: SpanRecord) -> tuple[int, int]:
        events = [e for s in subtree(root) for e in s.events]
        to_open = [
            e for e in events
            if e.name == TRANSITION_EVENT and e.attributes.get("redis.resilience.breaker.state") == "open"
        ]  # fmt: skip
        tripped = any(
            e.attributes.get("redis.resilience.breaker.previous_state") == "closed" for e in to_open
        )
        retried = any(e.name == "redis.resilience.retry" for e in events)
        fallback = int(root.attributes.get("redis.resilience.fallbacks", 0) or 0) > 0
        read = "/items" in root.name
        points = 4 * bool(to_open) + 2 * tripped + 2 * retried + fallback + 3 * read
        return (points, -root.start_time_unix_nano)

    best = max(candidates, key=score)
    tree = subtree(best)
    shown = [s for s in tree if not (s.kind == "INTERNAL" and s.name.endswith(_NOISE_SUFFIXES))]
    text = format_trace_tree(shown, best.span_id)
    hidden = len(tree) - len(shown)
    if hidden:
        text += f"\n({hidden} ASGI 'http send'/'http receive' spans not shown)"
    return {
        "trace_id": best.trace_id,
        "span": best.name,
        "t": best.start_time_unix_nano / 1e9,
        "degraded_server_spans": len(candidates),
        "text": text,
    }


# -- the report ---------------------------------------------------------------------------


def build_report(
    run: RunInfo,
    rec: Recording,
    final_metrics: Sequence[MetricSample],
    spans: Sequence[SpanRecord] | None,
) -> dict[str, Any]:
    """The whole report as a JSON-able dict (``report.json``), checks included."""
    by_phase: dict[str, list[Sample]] = {p: [] for p in PHASES}
    for s in rec.samples:
        phase = run.phase_of(s.t)
        if phase is not None:
            by_phase[phase].append(s)

    phases: dict[str, Any] = {}
    for phase, (start, end) in run.windows().items():
        samples = by_phase[phase]
        reads = Counter(s.note for s in samples if s.route == ITEMS and s.outcome == "ok")
        phases[phase] = {
            "from_s": round(start - run.t_start, 2),
            "to_s": round(end - run.t_start, 2),
            **_counts(samples),
            "reads": {"cache": reads["cache"], "database": reads["database"]},
            "routes": {r: _counts([s for s in samples if s.route == r]) for r in ROUTES},
        }

    traffic_errors = [s for s in rec.samples if s.outcome == "error"]
    health_errors = [h for h in rec.health if h.state is None]
    metrics_errors = [m for m in rec.metrics if m.status != 200]
    examples = [f"{s.route} at +{s.t - run.t_start:.2f}s: {s.note}" for s in traffic_errors[:5]]
    examples += [f"GET /health poll at +{h.t - run.t_start:.2f}s: {h.error}" for h in health_errors[:3]]
    examples += [f"GET /metrics scrape at +{m.t - run.t_start:.2f}s: {m.error}" for m in metrics_errors[:3]]
    http_errors = {
        "total": len(traffic_errors) + len(health_errors) + len(metrics_errors),
        "by_route": dict(Counter(s.route for s in traffic_errors)),
        "health_polls": len(health_errors),
        "metrics_scrapes": len(metrics_errors),
        "examples": examples,
    }

    declared: dict[str, Any] = {}
    for route in (COUNTER, EVENTS):
        notes = Counter(s.note for s in rec.samples if s.route == route and s.outcome == "declared")
        declared[route] = {"total": sum(notes.values()), **dict(sorted(notes.items()))}

    from_health = health_transitions(run, rec)
    from_spans = span_transitions(spans or [])
    polls = [(h.t, h.state) for h in rec.health if h.state is not None]
    transitions = merge_transitions(from_spans, from_health, polls)
    for tr in transitions:
        tr["at"] = _iso(tr["t"])
        tr["t"] = round(tr["t"] - run.t_start, 3)
    opened = [tr for tr in transitions if tr["to"] == "open"]
    closed_after = [tr for tr in transitions if tr["to"] == "closed" and opened and tr["t"] > opened[0]["t"]]
    back_s = run.t_back - run.t_start
    closed_after_back = [tr for tr in closed_after if tr["t"] >= back_s - 0.5]
    first_hit = next(
        (s.t for s in rec.samples if s.t >= run.t_back and s.route == ITEMS and s.note == "cache"), None
    )

    metrics = metrics_section(final_metrics)
    get_at = first_redis_get(spans, run.t_back) if spans else None
    if get_at is not None:
        first_get: float | None = get_at - run.t_back
        first_get_source = "the first GET span with outcome ok after the restart"
    else:
        first_get = run.first_redis_get
        first_get_source = "INFO commandstats of the new redis-server, polled every 100 ms"
    events = [s for s in rec.samples if s.route == EVENTS and s.outcome == "ok"]
    trace = degraded_trace(spans) if spans is not None else None
    if trace is not None:
        trace["t"] = round(trace["t"] - run.t_start, 3)

    report: dict[str, Any] = {
        "app": run.app,
        "server": run.server,
        "redis": run.redis_url,
        "load": {"clients": run.clients, "rate_per_s": run.rate},
        "started_at": _iso(run.t_start),
        "timeline_s": {
            "redis_killed": round(run.t_kill - run.t_start, 2),
            "redis_back": round(back_s, 2),
            "end": round(run.t_end - run.t_start, 2),
        },
        "requests": {
            "total": len(rec.samples),
            "ok": sum(1 for s in rec.samples if s.outcome == "ok"),
            "health_polls": len(rec.health),
            "metrics_scrapes": len(rec.metrics),
        },
        "phases": phases,
        "http_errors": http_errors,
        "declared_unavailable": declared,
        "breaker": {
            "transitions": transitions,
            "opened": bool(opened),
            "closed_again": bool(closed_after_back),
            "restart_to_closed_s": round(closed_after_back[0]["t"] - back_s, 3)
            if closed_after_back
            else None,
        },
        "metrics": metrics,
        "write_behind": {
            "applied_directly": sum(1 for s in events if s.note == "applied"),
            "journaled": len(run.journaled_ids),
            "journaled_by_phase": {
                p: sum(1 for s in by_phase[p] if s.route == EVENTS and s.note == "journaled") for p in PHASES
            },
            "replayed_metric": metrics["writebehind_replayed"],
            "missing_from_redis": len(run.missing_ids),
            "replay_batches": replay_batches(spans, run.t_start) if spans else None,
            "all_in_redis_after_restart_s": (
                None if run.replayed_after is None else round(run.replayed_after, 3)
            ),
        },
        "recovery": {
            "restart_to_first_redis_get_s": None if first_get is None else round(first_get, 3),
            "first_redis_get_from": first_get_source,
            "restart_to_first_cache_hit_s": None if first_hit is None else round(first_hit - run.t_back, 3),
            "restart_to_breaker_closed_s": (
                round(closed_after_back[0]["t"] - back_s, 3) if closed_after_back else None
            ),
        },
        "otlp": {
            "mode": run.otlp_mode,
            "endpoint": run.otlp_endpoint,
            "spans_received": run.otlp_spans if run.otlp_mode == "local" else None,
            "metric_points_received": run.otlp_metric_points if run.otlp_mode == "local" else None,
            "receiver_errors": run.otlp_errors,
        },
        "degraded_trace": trace,
        "timeline_png": "",
    }
    report["checks"] = _checks(report)
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def _checks(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    errors = report["http_errors"]["total"]
    breaker = report["breaker"]
    phases = report["phases"]
    wb = report["write_behind"]
    checks = [
        {"name": "zero HTTP errors", "ok": errors == 0, "detail": f"{errors} HTTP errors"},
        {
            "name": "breaker opened during the outage",
            "ok": breaker["opened"],
            "detail": "opened" if breaker["opened"] else "the breaker never opened",
        },
        {
            "name": "breaker closed after Redis came back",
            "ok": breaker["closed_again"],
            "detail": (
                f"closed {breaker['restart_to_closed_s']} s after the restart"
                if breaker["closed_again"]
                else "the breaker never closed again"
            ),
        },
        {
            "name": "requests served in every phase",
            "ok": all(phases[p]["ok"] > 0 for p in PHASES),
            "detail": ", ".join(f"{p}: {phases[p]['ok']}" for p in PHASES),
        },
        {
            "name": "every journaled write is in Redis after recovery",
            "ok": wb["missing_from_redis"] == 0,
            "detail": f"{wb['journaled'] - wb['missing_from_redis']}/{wb['journaled']} in Redis",
        },
    ]
    return checks


# -- Markdown -----------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    cells = [[str(h) for h in headers], *[[_fmt(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = list(right) if right is not None else [i > 0 for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(w) if a else c.ljust(w) for c, w, a in zip(row, widths, align, strict=True))
            + " |"
        )

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if a else ("-" * (w + 2)) for w, a in zip(widths, align, strict=True)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def render_markdown(report: Mapping[str, Any]) -> str:
    """The report for humans (printed, and written as ``report.md``)."""
    tl = report["timeline_s"]
    out: list[str] = []
    out.append(f"# otel-redis-resilience outage demo: {report['app']}")
    out.append("")
    out.append(
        f"{report['server']}, {report['load']['clients']} clients sending {report['load']['rate_per_s']:g} "
        f"requests/s. redis-server SIGKILLed at +{tl['redis_killed']:.1f} s, restarted (empty) and answering "
        f"at +{tl['redis_back']:.1f} s, end at +{tl['end']:.1f} s."
    )

    out += ["", "## Requests", ""]
    rows = []
    for p in PHASES:
        ph = report["phases"][p]
        lat = ph["latency_ms"]
        rows.append(
            [
                p,
                f"+{ph['from_s']:.1f} .. +{ph['to_s']:.1f} s",
                ph["requests"],
                ph["ok"],
                ph["declared_unavailable"],
                ph["errors"],
                f"{ph['reads']['cache']} / {ph['reads']['database']}",
                lat["p50"],
                lat["p99"],
            ]
        )
    out.append(
        _table(
            [
                "phase",
                "window",
                "requests",
                "served",
                "declared 503",
                "HTTP errors",
                "reads cache/db",
                "p50 ms",
                "p99 ms",
            ],
            rows,
        )
    )
    errors = report["http_errors"]
    out.append("")
    out.append(
        f"**HTTP errors: {errors['total']}** (of {report['requests']['total']} requests, plus "
        f"{report['requests']['health_polls']} /health polls and {report['requests']['metrics_scrapes']} "
        "/metrics scrapes, all counted). Declared unavailable (the API's 503 when Redis is down, not an "
        "error): "
        + "; ".join(
            f"{route} {d['total']}"
            + (f" ({', '.join(f'{k} {v}' for k, v in d.items() if k != 'total')})" if d["total"] else "")
            for route, d in report["declared_unavailable"].items()
        )
        + "."
    )
    for ex in errors["examples"]:
        out.append(f"- {ex}")

    out += ["", "### Latency by route (ms, p50 / p99)", ""]
    rows = []
    for route in ROUTES:
        row: list[Any] = [route]
        for p in PHASES:
            r = report["phases"][p]["routes"][route]
            row.append(f"{_fmt(r['latency_ms']['p50'])} / {_fmt(r['latency_ms']['p99'])} ({r['requests']})")
        rows.append(row)
    out.append(_table(["route", *(f"{p} (requests)" for p in PHASES)], rows))

    out += ["", "## Circuit breaker", ""]
    br = report["breaker"]
    out.append(
        _table(
            ["at", "time (UTC)", "from", "to", "reason", "seen by"],
            [
                [f"+{t['t']:.3f} s", t["at"][11:], t["from"], t["to"], t["reason"] or "-", t["seen_by"]]
                for t in br["transitions"]
            ],
            right=[True, False, False, False, False, False],
        )
    )
    m = report["metrics"]
    out.append("")
    out.append(
        "Transitions counted by the app (redis_resilience_breaker_transitions_total): "
        + (", ".join(f"{k}: {v}" for k, v in m["breaker_transitions"]["by"].items()) or "none")
    )

    out += ["", "## Fallbacks, retries, rejections (the app's /metrics at the end)", ""]
    rows = []
    for key, label in (("fallbacks", "fallbacks"), ("retries", "retries"), ("rejections", "rejections")):
        by = m[key]["by"]
        rows.append([label, m[key]["total"], "; ".join(f"{k}: {v}" for k, v in by.items()) or "-"])
    out.append(_table(["metric", "total", "by"], rows, right=[False, True, False]))

    wb = report["write_behind"]
    rc = report["recovery"]
    out += ["", "## Write-behind and recovery", ""]
    out.append(
        f"- POST /events: {wb['applied_directly']} applied at once, {wb['journaled']} journaled ("
        + ", ".join(f"{p}: {n}" for p, n in wb["journaled_by_phase"].items())
        + f"); the app replayed {wb['replayed_metric']} journal entries "
        f"(redis_resilience_writebehind_replayed_total); {wb['journaled'] - wb['missing_from_redis']}/"
        f"{wb['journaled']} journaled events are in Redis"
        + (
            f", all of them {wb['all_in_redis_after_restart_s']:.2f} s after the restart."
            if wb["all_in_redis_after_restart_s"] is not None
            else "."
        )
    )
    for batch in wb["replay_batches"] or []:
        out.append(
            f"  - replay batch at +{batch['t']:.3f} s: {batch['applied']} applied, {batch['duplicates']} "
            f"duplicates, {batch['remaining']} remaining"
            + (f", failed: {batch['error']}" if batch["error"] else "")
        )
    out.append(
        f"- Redis restart -> first GET answered by the new redis-server: "
        f"{_fmt(rc['restart_to_first_redis_get_s'])} s (from {rc['first_redis_get_from']})"
    )
    out.append(f"- Redis restart -> breaker closed: {_fmt(rc['restart_to_breaker_closed_s'])} s")
    out.append(
        f"- Redis restart -> first read answered from the cache: {_fmt(rc['restart_to_first_cache_hit_s'])} s"
    )

    otlp = report["otlp"]
    out += ["", "## Telemetry", ""]
    if otlp["mode"] == "local":
        out.append(
            f"OTLP/HTTP to the demo's own receiver ({otlp['endpoint']}): {otlp['spans_received']} spans and "
            f"{otlp['metric_points_received']} metric points received"
            + (f", {len(otlp['receiver_errors'])} undecodable requests" if otlp["receiver_errors"] else "")
            + ". Set OTEL_EXPORTER_OTLP_ENDPOINT (e.g. Jaeger's http://localhost:4318) to export there "
            "instead."
        )
        trace = report["degraded_trace"]
        if trace:
            out += [
                "",
                f"### Trace of one degraded request ({trace['span']} at +{trace['t']:.2f} s, "
                f"trace {trace['trace_id']}; {trace['degraded_server_spans']} degraded requests in all)",
                "",
                "```",
                trace["text"],
                "```",
            ]
        else:
            out.append("No degraded server span was received.")
    else:
        out.append(
            f"Traces and metrics exported over OTLP to {otlp['endpoint']} (OTEL_EXPORTER_OTLP_ENDPOINT). "
            "In Jaeger, search the app's service for the tag redis.resilience.degraded=true."
        )

    if report["timeline_png"]:
        out += ["", f"Timeline: {report['timeline_png']}"]
    out += ["", "## Checks", ""]
    for c in report["checks"]:
        out.append(f"- [{'x' if c['ok'] else ' '}] {c['name']}: {c['detail']}")
    out.append("")
    out.append("PASS" if report["ok"] else "FAIL")
    return "\n".join(out) + "\n"
