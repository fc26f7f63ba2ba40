"""The metrics as Prometheus sees them, and the shipped alert firing for real.

(a) The library's metrics go through the OpenTelemetry Prometheus exporter
    (``PrometheusMetricReader``) and prometheus_client's HTTP server; the test scrapes
    the endpoint over HTTP, parses the text format and checks that every metric name,
    label and label value that examples/observability/alerts.yml relies on is exposed.
(b) An app process (the library, a sync client, the Prometheus exporter) serves a
    request loop against a real redis-server; the real ``prometheus`` binary scrapes it
    with a temp copy of alerts.yml in which only RedisBreakerOpen's ``for: 1m`` is
    shortened to ``for: 5s`` (so the test takes seconds, not minutes; the expression is
    the shipped one). redis-server is SIGKILLed and the alert must go pending, then
    firing, then resolve after a restart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from otel_redis_resilience import BreakerPolicy, BreakerState, RedisUnavailable, RetryPolicy
from testbed import RedisServer, find_free_port
from tests.support import Runner

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "examples" / "observability" / "alerts.yml"
PROMETHEUS = "/usr/bin/prometheus"
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
SCOPE_LABELS = frozenset({"otel_scope_name", "otel_scope_version", "otel_scope_schema_url"})
SERVER_LABELS = frozenset({"server_address", "server_port"})
DURATION_LABELS = frozenset({"db_system_name", "db_operation_name", "error_type"}) | SERVER_LABELS
#: The label set of every series the library exposes (exporter scope labels aside).
EXPECTED_LABELS: dict[str, frozenset[str]] = {
    "redis_resilience_breaker_state": frozenset({"state"}) | SERVER_LABELS,
    "redis_resilience_breaker_transitions_total": frozenset({"state", "previous_state"}) | SERVER_LABELS,
    "redis_resilience_retries_total": frozenset({"db_operation_name", "error_type"}) | SERVER_LABELS,
    "redis_resilience_rejections_total": frozenset({"reason"}) | SERVER_LABELS,
    "redis_resilience_fallbacks_total": frozenset({"reason", "kind"}) | SERVER_LABELS,
    "db_client_operation_duration_seconds_bucket": DURATION_LABELS | {"le"},
    "db_client_operation_duration_seconds_count": DURATION_LABELS,
    "db_client_operation_duration_seconds_sum": DURATION_LABELS,
}
#: Metrics alerts.yml uses that this scenario cannot produce: the write-behind journal's.
NOT_PRODUCED_HERE = frozenset(
    {"redis_resilience_writebehind_queue_size", "redis_resilience_writebehind_rejected_total"}
)
#: Labels Prometheus adds at scrape time; the exposition does not carry them.
SCRAPE_LABELS = frozenset({"job", "instance"})


def _http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        assert resp.status == 200, (url, resp.status)
        return bytes(resp.read())


def _wait(predicate: Callable[[], Any], timeout: float, step: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy; its value, or None after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, urllib.error.URLError, ValueError):
            value = None
        if value or time.monotonic() >= end:
            return value
        time.sleep(step)


def _pdeathsig() -> list[str]:
    """Have the kernel kill a child we start if this process dies without cleaning up.

    PDEATHSIG follows the forking *thread*, so it is only safe from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return []
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def _stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---------------------------------------------------------------------------------------
# what alerts.yml relies on
# ---------------------------------------------------------------------------------------
_SELECTOR = re.compile(r"\b((?:redis_resilience|db_client)_[A-Za-z0-9_]+)\s*(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
# `sum by (a, b) (rate(metric[5m]))`: the grouping labels and the metric they group.
_BY_RATE = re.compile(r"\bby\s*\(([^)]*)\)\s*\(\s*(?:rate|increase)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)")


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def _rule_references(expr: str) -> tuple[list[tuple[str, list[tuple[str, str, str]]]], set[str]]:
    """The metric selectors (name, [(label, op, value)]) and the ``by (...)`` labels of an expression."""
    selectors = [(m[1], _MATCHER.findall(m[2] or "")) for m in _SELECTOR.finditer(expr)]
    by = {label.strip() for group in _BY.findall(expr) for label in group.split(",") if label.strip()}
    return selectors, by


# ---------------------------------------------------------------------------------------
# (a) the exposition
# ---------------------------------------------------------------------------------------
Samples = dict[str, list[tuple[dict[str, str], float]]]


def _scrape(url: str) -> tuple[str, Samples]:
    text = _http_get(url).decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return text, samples


def _values(samples: Samples, name: str, **labels: str) -> list[float]:
    return [v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())]


@pytest.fixture
def exposition() -> Iterator[tuple[MeterProvider, str]]:
    """A MeterProvider whose metrics are served at the returned /metrics URL."""
    # A private registry: nothing else in the test process can add or clash with series.
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    mp = MeterProvider(metric_readers=[reader])
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield mp, f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        mp.shutdown()


def test_prometheus_exposition_has_what_the_alert_rules_use(
    redis_server: RedisServer, exposition: tuple[MeterProvider, str]
) -> None:
    mp, url = exposition
    port = str(redis_server.port)
    server = {"server_address": "127.0.0.1", "server_port": port}
    runner = Runner(
        "sync",
        redis_server.host,
        redis_server.port,
        breaker=BreakerPolicy(failure_threshold=3, probe_interval=0.1),
        retry=RetryPolicy(attempt_timeout=0.2),
        meter_provider=mp,
    )
    res = runner.res

    @res.fallback(value=b"fallback")
    def cached_get(h: Any) -> Any:
        return h.get("k")

    try:
        runner.call("set", "k", "v")
        assert runner.call("get", "k") == b"v"
        _, samples = _scrape(url)
        assert _values(samples, "redis_resilience_breaker_state", state="closed", **server) == [1.0]
        assert _values(samples, "redis_resilience_breaker_state", state="open", **server) == [0.0]

        redis_server.kill()
        for _ in range(10):
            with pytest.raises(RedisUnavailable):
                runner.call("get", "k")
            if res.breaker_state is BreakerState.OPEN:
                break
        assert res.breaker_state is BreakerState.OPEN
        with pytest.raises(RedisUnavailable, match="breaker_open"):
            runner.call("get", "k")
        with res.request() as h:
            assert cached_get(h) == b"fallback"
        _, during = _scrape(url)

        redis_server.restart()
        assert runner.wait_for(lambda: res.breaker_state is not BreakerState.OPEN, timeout=10)
        for _ in range(10):
            runner.call("get", "k")
            if res.breaker_state is BreakerState.CLOSED:
                break
        assert res.breaker_state is BreakerState.CLOSED
        text, after = _scrape(url)
    finally:
        runner.close()

    # RedisBreakerOpen: the gauge, 1 for the current state, with the server labels.
    assert _values(during, "redis_resilience_breaker_state", state="open", **server) == [1.0], text
    assert _values(during, "redis_resilience_breaker_state", state="closed", **server) == [0.0]
    assert _values(during, "redis_resilience_breaker_state", state="half_open", **server) == [0.0]
    assert _values(after, "redis_resilience_breaker_state", state="open", **server) == [0.0]
    assert _values(after, "redis_resilience_breaker_state", state="closed", **server) == [1.0]

    # RedisBreakerFlapping and the breaker's life: one of each transition.
    for previous, state in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert _values(
            after,
            "redis_resilience_breaker_transitions_total",
            state=state,
            previous_state=previous,
            **server,
        ) == [1.0], (previous, state, text)

    # Rejections and fallbacks (RedisRetryBudgetExhausted, RedisHighFallbackRate).
    assert _values(after, "redis_resilience_rejections_total", reason="breaker_open", **server) == [2.0]
    assert _values(after, "redis_resilience_fallbacks_total", reason="breaker_open", kind="value") == [1.0]
    [(labels, retries)] = after["redis_resilience_retries_total"]
    assert labels["db_operation_name"] == "GET"
    assert labels["error_type"] == "redis.exceptions.ConnectionError"
    assert retries == 2.0

    # The duration histogram, in seconds, with the advisory buckets.
    buckets = [lab for lab, _ in after["db_client_operation_duration_seconds_bucket"]]
    les = {lab["le"] for lab in buckets if lab["db_operation_name"] == "GET" and lab["error_type"] == ""}
    assert {float(le) for le in les} == {*DURATION_BUCKETS, float("inf")}
    counts = {
        (lab["db_operation_name"], lab["error_type"]): v
        for lab, v in after["db_client_operation_duration_seconds_count"]
    }
    assert counts == {
        ("SET", ""): 1.0,
        ("GET", ""): 1.0 + BreakerPolicy().half_open_max_calls,
        ("GET", "redis.exceptions.ConnectionError"): 1.0,
        ("GET", "otel_redis_resilience.RedisUnavailable"): 2.0,
    }, text

    # Every series carries exactly the documented labels (plus the exporter's scope labels).
    for name, expected in EXPECTED_LABELS.items():
        assert name in after, f"{name} is not exposed; the exposition is:\n{text}"
        for labels, _ in after[name]:
            assert set(labels) - SCOPE_LABELS == expected, (name, labels)
            assert labels["server_address"] == "127.0.0.1", (name, labels)
            assert labels["server_port"] == port, (name, labels)

    # And every selector, matcher and `by` label of every alert rule resolves against it.
    for rule in _alert_rules():
        selectors, by = _rule_references(rule["expr"])
        assert selectors, f"{rule['alert']}: no library metric in its expression"
        for name, matchers in selectors:
            if name in NOT_PRODUCED_HERE:
                continue
            series = [lab for lab, _ in after.get(name, [])]
            assert series, f"alert {rule['alert']} uses {name}, which is not exposed; exposition:\n{text}"
            for label in by - SCRAPE_LABELS:
                assert all(label in lab for lab in series), f"{rule['alert']}: {name} has no label {label}"
            for label, op, value in matchers:
                assert all(label in lab for lab in series), f"{rule['alert']}: {name} has no label {label}"
                # reason="budget_exhausted" is a documented value that this scenario does not produce.
                if op == "=" and (label, value) != ("reason", "budget_exhausted"):
                    assert any(lab[label] == value for lab in series), (rule["alert"], name, label, value)

        # The PromQL the annotations hand to the operator must work too.
        prose = " ".join(str(v) for v in rule.get("annotations", {}).values())
        for name, matchers in _rule_references(prose)[0]:
            if name in NOT_PRODUCED_HERE:
                continue
            series = [lab for lab, _ in after.get(name, [])]
            assert series, f"the {rule['alert']} annotations use {name}, which is not exposed:\n{text}"
            for label, _, _ in matchers:
                assert all(label in lab for lab in series), (
                    f"{rule['alert']} annotations: {name} has no {label}"
                )
        for group, name in _BY_RATE.findall(prose):
            series = [lab for lab, _ in after.get(name, [])]
            for label in {x.strip() for x in group.split(",")} - SCRAPE_LABELS:
                assert series, f"the {rule['alert']} annotations use {name}, which is not exposed"
                assert all(label in lab for lab in series), (
                    f"{rule['alert']} annotations: {name} has no {label}"
                )


# ---------------------------------------------------------------------------------------
# (b) RedisBreakerOpen fires in a real Prometheus
# ---------------------------------------------------------------------------------------
APP = r"""
import sys, time

import redis
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import start_http_server

from otel_redis_resilience import RedisUnavailable, Resilience

mp = MeterProvider(metric_readers=[PrometheusMetricReader()])
server, _ = start_http_server(0, addr="127.0.0.1")
client = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), socket_timeout=1.0, socket_connect_timeout=1.0)
res = Resilience(client, meter_provider=mp)
print(f"METRICS_PORT={server.server_port}", flush=True)
while True:
    try:
        with res.request(deadline=0.5) as h:
            h.get("k")
    except RedisUnavailable:
        pass
    time.sleep(0.05)
"""

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - alerts.yml
scrape_configs:
  - job_name: app
    static_configs:
      - targets: ["127.0.0.1:{app_port}"]
"""


def _shortened_rules() -> str:
    """alerts.yml with RedisBreakerOpen's `for: 1m` made `for: 5s`; nothing else changed."""
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    [rule] = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "RedisBreakerOpen"]
    assert rule["for"] == "1m", f"alerts.yml changed: RedisBreakerOpen has for: {rule['for']}"
    rule["for"] = "5s"
    return str(yaml.safe_dump(doc, sort_keys=False))


def _start_app(redis_port: int, log: Path) -> tuple[subprocess.Popen[str], int]:
    with log.open("w") as err:
        proc = subprocess.Popen(
            [*_pdeathsig(), sys.executable, "-c", APP, str(redis_port)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("METRICS_PORT="):
        _stop(proc)
        raise AssertionError(f"the app did not start: {line!r}\n{log.read_text()}")
    return proc, int(line.split("=", 1)[1])


def _start_prometheus(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start prometheus on a free loopback port (another one if that port was taken)."""
    log = workdir / "prometheus.log"
    for _ in range(5):
        port = find_free_port()
        with log.open("a") as err:
            proc = subprocess.Popen(
                [
                    *_pdeathsig(),
                    PROMETHEUS,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=workdir,
            )
        base = f"http://127.0.0.1:{port}"

        def ready(proc: subprocess.Popen[bytes] = proc, base: str = base) -> bool:
            if proc.poll() is not None:
                raise EOFError
            return _http_get(f"{base}/-/ready", timeout=1) is not None

        with contextlib.suppress(EOFError):
            if _wait(ready, timeout=30):
                return proc, base
        _stop(proc)
        if "address already in use" not in log.read_text():
            break
    raise AssertionError(f"prometheus did not become ready:\n{log.read_text()}")


def _api(base: str, path: str, **params: str) -> Any:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    body = json.loads(_http_get(f"{base}/api/v1/{path}{query}"))
    assert body["status"] == "success", body
    return body["data"]


def _breaker_alert(base: str) -> dict[str, Any] | None:
    alerts = [a for a in _api(base, "alerts")["alerts"] if a["labels"]["alertname"] == "RedisBreakerOpen"]
    assert len(alerts) <= 1, alerts
    return alerts[0] if alerts else None


def test_redis_breaker_open_alert_fires_in_prometheus(redis_server: RedisServer) -> None:
    assert os.access(PROMETHEUS, os.X_OK), f"{PROMETHEUS} is required (apt-get install prometheus)"
    app: subprocess.Popen[str] | None = None
    prom: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="orr-prometheus-") as tmp:
        workdir = Path(tmp)
        try:
            app, app_port = _start_app(redis_server.port, workdir / "app.log")
            (workdir / "alerts.yml").write_text(_shortened_rules(), encoding="utf-8")
            (workdir / "prometheus.yml").write_text(PROMETHEUS_CONFIG.format(app_port=app_port))
            prom, base = _start_prometheus(workdir)

            def target_up() -> bool:
                targets = _api(base, "targets")["activeTargets"]
                return any(t["labels"]["job"] == "app" and t["health"] == "up" for t in targets)

            assert _wait(target_up, timeout=30), _api(base, "targets")
            closed = 'redis_resilience_breaker_state{state="closed"}'
            assert _wait(lambda: _api(base, "query", query=f"{closed} == 1")["result"], timeout=30), (
                "Prometheus never saw the breaker closed"
            )
            # The rules are loaded (the shortened `for`) and nothing is alerting yet.
            groups = _api(base, "rules")["groups"]
            [rule] = [r for g in groups for r in g["rules"] if r["name"] == "RedisBreakerOpen"]
            assert rule["duration"] == 5, rule
            assert _breaker_alert(base) is None

            t0 = time.monotonic()
            redis_server.kill()
            t1 = t2 = None
            firing: dict[str, Any] | None = None
            while time.monotonic() - t0 < 60 and t2 is None:
                alert = _breaker_alert(base)
                state = alert["state"] if alert else None
                if state == "pending" and t1 is None:
                    t1 = time.monotonic() - t0
                elif state == "firing":
                    t2, firing = time.monotonic() - t0, alert
                time.sleep(0.1)
            print(
                f"\nRedis killed at t=0.0s; alert pending at t1={t1 if t1 is None else f'{t1:.1f}'}s; "
                f"firing at t2={t2 if t2 is None else f'{t2:.1f}'}s"
            )
            assert t1 is not None, "RedisBreakerOpen never went pending within 60 s of the kill"
            assert t2 is not None, "RedisBreakerOpen went pending but never fired within 60 s"
            assert firing is not None
            assert t1 < t2
            # `for: 5s` held it pending for (at least about) 5 s; polling adds up to ~0.2 s of slack.
            assert t2 - t1 >= 4.5, (t1, t2)
            assert firing["labels"] == {
                "alertname": "RedisBreakerOpen",
                "severity": "critical",
                "job": "app",
                "instance": f"127.0.0.1:{app_port}",
                "server_address": "127.0.0.1",
                "server_port": str(redis_server.port),
            }
            assert f"127.0.0.1:{redis_server.port}" in firing["annotations"]["summary"]

            # Redis comes back: the probe closes the breaker and the alert resolves.
            redis_server.restart()
            t_back = time.monotonic() - t0
            assert _wait(lambda: _breaker_alert(base) is None, timeout=30, step=0.1), _breaker_alert(base)
            print(f"Redis restarted at t={t_back:.1f}s; alert resolved at t3={time.monotonic() - t0:.1f}s")
        finally:
            _stop(app)
            _stop(prom)
            if app is not None and app.stdout is not None:
                app.stdout.close()
