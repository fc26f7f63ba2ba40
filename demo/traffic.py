"""What the demo sends to the app and what it records: load, ``/health`` polls, ``/metrics`` scrapes.

- :func:`drive`: ``clients`` concurrent httpx clients sending ``rate`` requests per second in
  total (paced, so latency is the app's and not a queue's), mostly cache-aside reads
  (``GET /items/{id}``), some ``POST /counter``, ``POST /events`` (write-behind) and
  ``GET /health``. Each answer becomes a :class:`Sample`, classified by :func:`classify`
  against the example apps' API (``examples/common.py``).
- :func:`poll_health`: ``GET /health`` every 100 ms, the breaker-state timeline.
- :func:`scrape_metrics`: ``GET /metrics`` every 500 ms, the library's counters over time
  (fallbacks, retries, rejections, breaker transitions, write-behind replay).

Timestamps are wall-clock seconds (``time.time()``), comparable with span timestamps.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "ITEMS",
    "RESILIENCE_METRICS",
    "HealthPoint",
    "MetricSample",
    "MetricsPoint",
    "Recording",
    "Sample",
    "classify",
    "drive",
    "metric_totals",
    "parse_metrics",
    "poll_health",
    "scrape",
    "scrape_metrics",
    "warm_cache",
]

ITEMS = "GET /items/{id}"
COUNTER = "POST /counter"
EVENTS = "POST /events"
HEALTH = "GET /health"
ROUTES = (ITEMS, COUNTER, EVENTS, HEALTH)
#: Share of each route in the load.
MIX: tuple[tuple[str, float], ...] = ((ITEMS, 0.75), (COUNTER, 0.1), (EVENTS, 0.1), (HEALTH, 0.05))
#: The example apps seed items 1..100 (``examples.common.ITEM_COUNT``).
ITEM_IDS = 100
REQUEST_TIMEOUT = 10.0

#: Short name -> Prometheus sample name of the library's metrics the demo follows.
RESILIENCE_METRICS: dict[str, str] = {
    "fallbacks": "redis_resilience_fallbacks_total",
    "retries": "redis_resilience_retries_total",
    "rejections": "redis_resilience_rejections_total",
    "breaker_transitions": "redis_resilience_breaker_transitions_total",
    "writebehind_replayed": "redis_resilience_writebehind_replayed_total",
    "writebehind_queue_size": "redis_resilience_writebehind_queue_size",
}


@dataclass(frozen=True, slots=True)
class Sample:
    """One request of the load and its answer."""

    #: Wall-clock time the request was sent.
    t: float
    route: str
    #: ``None``: no HTTP answer at all (connection error, timeout).
    status: int | None
    #: Seconds until the whole answer was read.
    latency: float
    #: ``"ok"``; ``"declared"``: the route's documented 503 for an unavailable Redis;
    #: ``"error"``: anything else (no answer, an unexpected status or body).
    outcome: str
    #: Reads: ``cache`` or ``database``; events: ``applied`` or ``journaled``; counter 503:
    #: ``applied=false``/``applied=unknown``; errors: what was wrong.
    note: str = ""
    #: ``POST /events``: the event id the app accepted.
    event_id: str = ""


@dataclass(frozen=True, slots=True)
class HealthPoint:
    t: float
    #: ``closed``, ``open``, ``half_open``; ``None`` when ``/health`` did not answer 200.
    state: str | None
    status: int | None
    latency: float
    error: str = ""


@dataclass(frozen=True, slots=True)
class MetricSample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class MetricsPoint:
    t: float
    #: Short name (see :data:`RESILIENCE_METRICS`) -> value summed over all label sets.
    totals: dict[str, float]
    status: int | None
    error: str = ""


@dataclass
class Recording:
    """Everything recorded during the run."""

    samples: list[Sample] = field(default_factory=list)
    health: list[HealthPoint] = field(default_factory=list)
    metrics: list[MetricsPoint] = field(default_factory=list)


# -- classification -----------------------------------------------------------------------


def classify(route: str, status: int | None, body: Any) -> tuple[str, str, str]:
    """(outcome, note, event id) of one answer, judged against the example apps' API."""
    obj: dict[str, Any] = body if isinstance(body, dict) else {}
    if status is None:
        return "error", "no HTTP answer", ""
    if route == ITEMS:
        # Reads declare a fallback (the database): they must never fail.
        if status == 200 and obj.get("source") in ("cache", "database"):
            return "ok", str(obj["source"]), ""
    elif route == COUNTER:
        if status == 200 and "counter" in obj:
            return "ok", "", ""
        if status == 503 and obj.get("error") == "redis_unavailable":
            applied = obj.get("applied")
            return "declared", f"applied={'unknown' if applied == 'unknown' else 'false'}", ""
    elif route == EVENTS:
        if status in (201, 202) and obj.get("journaled") is (status == 202):
            return "ok", "journaled" if status == 202 else "applied", str(obj.get("id", ""))
        if status == 503 and obj.get("journaled") is False:
            return "declared", f"refused ({obj.get('error', '?')})", ""
    elif route == HEALTH and status == 200 and isinstance(obj.get("redis"), dict):
        return "ok", str(obj["redis"].get("breaker", "")), ""
    text = str(body)[:120] if body is not None else ""
    return "error", f"unexpected HTTP {status} {text}".strip(), ""


# -- load ---------------------------------------------------------------------------------


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds``; True if ``stop`` was set meanwhile."""
    if seconds <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


def _pick(rng: random.Random) -> str:
    x = rng.random()
    for route, share in MIX:
        if x < share:
            return route
        x -= share
    return MIX[-1][0]


async def _request(client: httpx.AsyncClient, route: str, rng: random.Random, tag: str) -> Sample:
    if route == ITEMS:
        method, path, payload = "GET", f"/items/{rng.randint(1, ITEM_IDS)}", None
    elif route == COUNTER:
        method, path, payload = "POST", "/counter", None
    elif route == EVENTS:
        method, path, payload = "POST", "/events", {"id": tag, "kind": "demo"}
    else:
        method, path, payload = "GET", "/health", None
    t = time.time()
    t0 = time.perf_counter()
    try:
        resp = await client.request(method, path, json=payload)
        latency = time.perf_counter() - t0
    except httpx.HTTPError as e:
        return Sample(t, route, None, time.perf_counter() - t0, "error", f"no HTTP answer: {e!r}"[:200])
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text
    outcome, note, event_id = classify(route, resp.status_code, body)
    return Sample(t, route, resp.status_code, latency, outcome, note, event_id)


async def drive(
    client: httpx.AsyncClient,
    out: list[Sample],
    stop: asyncio.Event,
    *,
    clients: int,
    rate: float,
    seed: int = 1,
) -> None:
    """``clients`` concurrent workers, ``rate`` requests per second in total, until ``stop``."""
    loop = asyncio.get_running_loop()
    interval = clients / rate

    async def worker(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        next_at = loop.time() + rng.random() * interval
        i = 0
        while True:
            if await _sleep_or_stop(stop, next_at - loop.time()):
                return
            now = loop.time()
            # Paced, not bursty: after a slow answer, carry on from now rather than catch up.
            next_at = max(next_at, now - interval) + interval
            i += 1
            out.append(await _request(client, _pick(rng), rng, f"demo-{seed}-{n}-{i}"))

    await asyncio.gather(*(worker(n) for n in range(clients)))


async def warm_cache(client: httpx.AsyncClient) -> list[Sample]:
    """Read every item once, so the healthy phase starts with a warm cache (not recorded)."""
    sem = asyncio.Semaphore(8)

    async def read(item_id: int) -> Sample:
        async with sem:
            t = time.time()
            t0 = time.perf_counter()
            resp = await client.get(f"/items/{item_id}")
            try:
                body: Any = resp.json()
            except ValueError:
                body = resp.text
            outcome, note, _ = classify(ITEMS, resp.status_code, body)
            return Sample(t, ITEMS, resp.status_code, time.perf_counter() - t0, outcome, note)

    return list(await asyncio.gather(*(read(i) for i in range(1, ITEM_IDS + 1))))


# -- monitoring ---------------------------------------------------------------------------


async def poll_health(
    client: httpx.AsyncClient, out: list[HealthPoint], stop: asyncio.Event, interval: float = 0.1
) -> None:
    """``GET /health`` every ``interval`` seconds until ``stop``: the breaker-state timeline."""
    while True:
        t = time.time()
        t0 = time.perf_counter()
        try:
            resp = await client.get("/health")
            latency = time.perf_counter() - t0
            outcome, note, _ = classify(HEALTH, resp.status_code, resp.json())
            if outcome == "ok":
                out.append(HealthPoint(t, note, resp.status_code, latency))
            else:
                out.append(HealthPoint(t, None, resp.status_code, latency, note))
        except (httpx.HTTPError, ValueError) as e:
            out.append(HealthPoint(t, None, None, time.perf_counter() - t0, repr(e)[:200]))
        if await _sleep_or_stop(stop, interval - (time.time() - t)):
            return


def parse_metrics(text: str) -> list[MetricSample]:
    """The ``redis_resilience_*`` samples of a Prometheus exposition."""
    wanted = set(RESILIENCE_METRICS.values())
    lines = "\n".join(line for line in text.splitlines() if line.startswith("redis_resilience_"))
    return [
        MetricSample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(lines + "\n")
        for s in family.samples
        if s.name in wanted
    ]


def metric_totals(samples: Iterable[MetricSample]) -> dict[str, float]:
    by_name = {v: k for k, v in RESILIENCE_METRICS.items()}
    totals = dict.fromkeys(RESILIENCE_METRICS, 0.0)
    for s in samples:
        totals[by_name[s.name]] += s.value
    return totals


async def scrape(client: httpx.AsyncClient) -> tuple[int | None, str, str]:
    """(status, body, error) of one ``GET /metrics``."""
    try:
        resp = await client.get("/metrics")
    except httpx.HTTPError as e:
        return None, "", repr(e)[:200]
    return resp.status_code, resp.text, "" if resp.status_code == 200 else f"HTTP {resp.status_code}"


async def scrape_metrics(
    client: httpx.AsyncClient, out: list[MetricsPoint], stop: asyncio.Event, interval: float = 0.5
) -> None:
    """``GET /metrics`` every ``interval`` seconds until ``stop``: the library's counters over time."""
    while True:
        t = time.time()
        status, text, error = await scrape(client)
        totals = metric_totals(parse_metrics(text)) if status == 200 else {}
        out.append(MetricsPoint(t, totals, status, error))
        if await _sleep_or_stop(stop, interval - (time.time() - t)):
            return
