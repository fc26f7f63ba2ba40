"""The outage demo, end to end: ``python -m demo [--short] [--app starlette|flask] [--out DIR]``.

1. Starts a throw-away redis-server (Debian's binary) on a free loopback port, with the
   tests' own launcher, :class:`testbed.RedisServer`.
2. Starts an example app under a real server: ``examples.starlette_app`` under uvicorn
   (default) or ``examples.flask_app`` under gunicorn (gthread), with ``REDIS_URL``,
   ``DATABASE`` and ``WRITE_BEHIND_DIR`` pointing at temp files. Its traces and metrics go
   over OTLP/HTTP to ``OTEL_EXPORTER_OTLP_ENDPOINT`` when that is set (Jaeger, a
   collector); otherwise to a receiver inside the demo, so that it can print the trace of a
   degraded request.
3. Warms the cache, then drives traffic through three phases: healthy, outage (redis-server
   SIGKILLed), recovery (redis-server restarted, empty, on the same port), polling
   ``/health`` every 100 ms and scraping ``/metrics`` every 500 ms.
4. Prints the report and writes ``report.json``, ``report.md``, ``timeline.png`` and the
   app's log (``app.log``) to the output directory (``demo-out/``).

Exit status: 0 when every check passed (no HTTP errors, the breaker opened and closed again,
requests served in every phase, every journaled write replayed, the PNG written), 1 when a
check failed, 2 when the demo could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio

from demo.otlp_receiver import OTLPReceiver
from demo.processes import APPS, AppServer, DemoError, start_app
from demo.report import RunInfo, build_report, render_markdown
from demo.timeline import plot_timeline
from demo.traffic import (
    EVENTS,
    MetricSample,
    Recording,
    drive,
    parse_metrics,
    poll_health,
    scrape,
    scrape_metrics,
    warm_cache,
)
from testbed import RedisServer, RedisServerError

__all__ = ["main"]

FULL = {"healthy": 15.0, "outage": 20.0, "recovery": 15.0}
SHORT = {"healthy": 6.0, "outage": 8.0, "recovery": 8.0}
#: After the load stops, how long to wait for journaled writes still to be replayed.
REPLAY_WAIT = 15.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/demo",
        description="Run an example app against Redis, crash Redis mid-load, bring it back, and report "
        "what the clients saw (report.json, report.md, timeline.png in --out).",
    )
    p.add_argument(
        "--short", action="store_true", help="CI mode: phases of 6 + 8 + 8 s (default 15 + 20 + 15 s)"
    )
    p.add_argument(
        "--app", choices=sorted(APPS), default="starlette", help="starlette (uvicorn) or flask (gunicorn)"
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory (default: demo-out)")
    p.add_argument("--healthy", type=float, metavar="S", help="seconds of load before Redis is killed")
    p.add_argument("--outage", type=float, metavar="S", help="seconds Redis stays down")
    p.add_argument("--recovery", type=float, metavar="S", help="seconds of load after Redis is back")
    p.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients (default 8)")
    p.add_argument("--rate", type=float, default=120.0, help="requests per second, all clients (default 120)")
    args = p.parse_args(argv)
    base = SHORT if args.short else FULL
    for phase in base:
        value = getattr(args, phase)
        if value is None:
            setattr(args, phase, base[phase])
        elif value < 1:
            p.error(f"--{phase} must be at least 1 second")
    if args.clients < 1 or args.rate <= 0:
        p.error("--clients and --rate must be positive")
    return args


_T0 = time.time()


def log(message: str) -> None:
    print(f"demo [{time.time() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Watch:
    """What the demo watches on the restarted Redis itself (not through the app)."""

    first_get_at: float | None = None
    journaled: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    all_replayed_at: float | None = None


async def watch_redis(r: redis.asyncio.Redis, rec: Recording, watch: Watch, stop: asyncio.Event) -> None:
    """Every 100 ms: has the new redis-server executed a GET yet (INFO commandstats; our own
    calls are INFO and HKEYS), and is every event the app journaled so far in Redis?"""
    seen = 0
    while True:
        t = time.time()
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            if watch.first_get_at is None:
                stats: dict[str, Any] = await r.info("commandstats")
                if int(stats.get("cmdstat_get", {}).get("calls", 0)) > 0:
                    watch.first_get_at = t
            for s in rec.samples[seen:]:
                if s.route == EVENTS and s.note == "journaled":
                    watch.journaled.add(s.event_id)
            seen = len(rec.samples)
            if watch.journaled:
                present = {k.decode() if isinstance(k, bytes) else k for k in await r.hkeys("events")}
                watch.missing = watch.journaled - present
                if watch.missing:
                    watch.all_replayed_at = None
                elif watch.all_replayed_at is None:
                    watch.all_replayed_at = t
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
            return
        except TimeoutError:
            pass


async def scenario(
    args: argparse.Namespace, app: AppServer, redis_proc: RedisServer
) -> tuple[RunInfo, Recording, list[MetricSample], Watch]:
    rec = Recording()
    watch = Watch()
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with (
        httpx.AsyncClient(base_url=app.url, timeout=10.0, limits=limits) as client,
        httpx.AsyncClient(base_url=app.url, timeout=10.0) as monitor,
        redis.asyncio.Redis(host=redis_proc.host, port=redis_proc.port, socket_timeout=1.0) as r,
    ):
        warm = await warm_cache(client)
        if any(s.outcome != "ok" for s in warm):
            raise DemoError(f"warming the cache failed: {[s.note for s in warm if s.outcome != 'ok'][:3]}")
        stop_load, stop_watch = asyncio.Event(), asyncio.Event()
        t_start = time.time()
        tasks = [
            asyncio.create_task(drive(client, rec.samples, stop_load, clients=args.clients, rate=args.rate)),
            asyncio.create_task(poll_health(monitor, rec.health, stop_load)),
            asyncio.create_task(scrape_metrics(monitor, rec.metrics, stop_load)),
        ]
        try:
            log(f"phase healthy: {args.clients} clients, {args.rate:g} requests/s for {args.healthy:g} s")
            await asyncio.sleep(args.healthy)

            t_kill = time.time()
            redis_proc.kill()
            log(f"phase outage: redis-server SIGKILLed, down for {args.outage:g} s")
            await asyncio.sleep(args.outage)

            # Not waiting: the load goes on while we time restart -> first PONG. From the main
            # thread, so that its parent-death signal stays armed.
            redis_proc.start(wait=False)
            for _ in range(2000):
                if redis_proc.ready():
                    break
                await asyncio.sleep(0.005)
            else:
                raise DemoError("the restarted redis-server did not answer PING in 10 s")
            t_back = time.time()
            await r.connection_pool.disconnect()
            watcher = asyncio.create_task(watch_redis(r, rec, watch, stop_watch))
            log(f"phase recovery: redis-server restarted (empty), load for {args.recovery:g} s")
            await asyncio.sleep(args.recovery)
            t_end = time.time()
        finally:
            stop_load.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            task.result()  # re-raise a crashed driver or poller

        await asyncio.sleep(0.3)  # the watcher sees the last journaled answers
        if watch.missing:
            log(f"load stopped; waiting up to {REPLAY_WAIT:g} s for the journal replay to finish")
            for _ in range(int(REPLAY_WAIT * 10)):
                if not watch.missing:
                    break
                await asyncio.sleep(0.1)
        stop_watch.set()
        await watcher

        status, text, error = await scrape(monitor)
        if status != 200:
            raise DemoError(f"final GET /metrics failed: {error}")
        final = parse_metrics(text)

    run = RunInfo(
        app=args.app,
        server=APPS[args.app],
        t_start=t_start,
        t_kill=t_kill,
        t_back=t_back,
        t_end=t_end,
        clients=args.clients,
        rate=args.rate,
        redis_url=redis_proc.url,
        otlp_mode="",
        otlp_endpoint="",
        first_redis_get=None if watch.first_get_at is None else watch.first_get_at - t_back,
        journaled_ids=sorted(watch.journaled),
        missing_ids=sorted(watch.missing),
        replayed_after=None if watch.all_replayed_at is None else max(0.0, watch.all_replayed_at - t_back),
    )
    return run, rec, final, watch


def app_env(tmp: Path, redis_url: str, receiver: OTLPReceiver | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        REDIS_URL=redis_url,
        DATABASE=str(tmp / "items.sqlite3"),
        WRITE_BEHIND_DIR=str(tmp / "journal"),
        PYTHONUNBUFFERED="1",
    )
    # Monitoring requests are not what the traces are about (the Flask app excludes them itself).
    env.setdefault("OTEL_PYTHON_STARLETTE_EXCLUDED_URLS", "health,metrics")
    if receiver is not None:
        for key in [k for k in env if k.startswith("OTEL_EXPORTER_OTLP_")]:
            del env[key]
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.port}",
            OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
            OTEL_BSP_SCHEDULE_DELAY="500",
            OTEL_METRIC_EXPORT_INTERVAL="5000",
        )
    return env


def run_demo(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    user_endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="otel-redis-resilience-demo-")))
        redis_proc = RedisServer()
        stack.callback(redis_proc.stop)
        redis_proc.start()
        log(f"redis-server on {redis_proc.url}")

        receiver: OTLPReceiver | None = None
        if not user_endpoint:
            receiver = stack.enter_context(OTLPReceiver())
            log(f"OTLP/HTTP receiver on http://127.0.0.1:{receiver.port}")
        else:
            log(f"exporting traces and metrics over OTLP to {user_endpoint}")

        app_log = out / "app.log"
        app_log.write_bytes(b"")
        app = start_app(args.app, app_env(tmp, redis_proc.url, receiver), app_log)
        stack.callback(app.stop)
        log(f"{APPS[args.app]} on {app.url}")

        run, rec, final, _ = asyncio.run(scenario(args, app, redis_proc))
        log(f"load stopped: {len(rec.samples)} requests")
        if receiver is not None:
            time.sleep(1.0)  # the last span batch (OTEL_BSP_SCHEDULE_DELAY=500)
        app.stop()  # flushes its exporters
        spans = None
        if receiver is not None:
            spans = receiver.spans()
            run.otlp_spans = len(spans)
            run.otlp_metric_points = len(receiver.points())
            run.otlp_errors = receiver.errors
            run.otlp_mode, run.otlp_endpoint = "local", f"http://127.0.0.1:{receiver.port}"
        else:
            run.otlp_mode, run.otlp_endpoint = "external", user_endpoint

    report = build_report(run, rec, final, spans)
    png = out / "timeline.png"
    title = (
        f"otel-redis-resilience demo: {run.server} - {report['requests']['total']} requests, "
        f"{report['http_errors']['total']} HTTP errors"
    )
    plot_timeline(run, rec, report["breaker"]["transitions"], png, title)
    report["timeline_png"] = str(png)
    report["checks"].append(
        {
            "name": "timeline PNG written",
            "ok": png.stat().st_size > 10_000,
            "detail": f"{png} ({png.stat().st_size} bytes)",
        }
    )
    report["ok"] = all(c["ok"] for c in report["checks"])

    text = render_markdown(report)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(text)
    print(text, flush=True)
    if not report["ok"]:
        failed = "; ".join(f"{c['name']} ({c['detail']})" for c in report["checks"] if not c["ok"])
        print(f"demo FAILED: {failed}. App log: {app_log}", file=sys.stderr)
        return 1
    log(f"done: {out / 'report.md'}, {out / 'report.json'}, {png}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (CI timeout, kill) stops the servers and removes the temp files, like Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run_demo(args)
    except (DemoError, RedisServerError) as e:
        print(f"demo: cannot run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
