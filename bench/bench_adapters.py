"""Per-request cost of the Flask and Starlette adapters under real HTTP servers and real load.

What is measured
    A minimal app with one route, ``GET /ping``, doing one Redis ``GET`` against a loopback
    ``redis-server`` (started here, no persistence), served by

    * Flask under gunicorn, gthread worker (1 process, 4 threads), sync ``redis.Redis``;
    * Starlette under uvicorn (1 process), ``redis.asyncio.Redis``;

    in three variants each:

    * ``raw``: the plain redis-py client, no otel-redis-resilience at all;
    * ``manual scope``: ``Resilience`` with a request scope opened by hand in the view
      (``with res.request() as h`` / ``async with``): the library without the adapter;
    * ``adapter``: ``RedisResilience`` (Flask) / ``ResilienceMiddleware`` (Starlette), the
      view using ``g.redis`` / ``request.state.redis``.

    No OpenTelemetry SDK is configured (the API's no-op providers), so this is the cost of
    the request scope, the breaker/retry bookkeeping and the adapter, not of exporting spans.

How it is measured
    All six servers are started once. Each round runs the load generator against every
    server for ``--duration`` seconds, in an order rotating from round to round so that
    machine noise hits every variant alike; a warm-up run per server comes first. The load
    generator is ``wrk`` (``apt-get install wrk``) with 1 thread and ``--connections``
    connections when it is installed, else an asyncio httpx client with the same number of
    concurrent requests sending a fixed ``--requests`` per run (much slower: it then
    measures the client as much as the server).

How to read the output
    ``req/s`` is the median over rounds. With one server process saturating one CPU,
    1 / (req/s) is the server's time per request, so ``+µs/req`` = 1/rps(variant) -
    1/rps(raw) is the per-request overhead over raw redis-py, and ``adapter vs manual``
    is the part due to the adapter alone (it may be within noise).

Run: ``python bench/bench_adapters.py`` (about 1.5 minutes) or ``--quick`` (about 30 s).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEY = "bench:ping"

# -- the apps (imported by the servers: gunicorn 'bench_adapters:flask_app()', uvicorn --factory) ----


def flask_app() -> Any:
    import redis
    from flask import Flask, g

    from otel_redis_resilience import Resilience

    variant = os.environ["BENCH_VARIANT"]
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    app = Flask(__name__)
    if variant == "raw":

        @app.get("/ping")
        def ping_raw() -> Any:
            return client.get(KEY) or b""

    elif variant == "manual":
        res = Resilience(client, deadline=0.5)

        @app.get("/ping")
        def ping_manual() -> Any:
            with res.request() as h:
                return h.get(KEY) or b""

    else:
        from otel_redis_resilience_flask import RedisResilience

        RedisResilience(app, resilience=Resilience(client), deadline=0.5)

        @app.get("/ping")
        def ping_adapter() -> Any:
            return g.redis.get(KEY) or b""

    return app


def starlette_app() -> Any:
    import redis.asyncio
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from otel_redis_resilience import Resilience

    variant = os.environ["BENCH_VARIANT"]
    client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
    if variant == "raw":

        async def ping(request: Request) -> Response:
            return Response(await client.get(KEY) or b"")

        return Starlette(routes=[Route("/ping", ping)])
    res = Resilience(client, deadline=0.5)
    if variant == "manual":

        async def ping_manual(request: Request) -> Response:
            async with res.request() as h:
                return Response(await h.get(KEY) or b"")

        return Starlette(routes=[Route("/ping", ping_manual)])
    from starlette.middleware import Middleware

    from otel_redis_resilience_starlette import ResilienceMiddleware

    async def ping_adapter(request: Request) -> Response:
        return Response(await request.state.redis.get(KEY) or b"")

    return Starlette(
        routes=[Route("/ping", ping_adapter)],
        middleware=[Middleware(ResilienceMiddleware, resilience=res, deadline=0.5)],
    )


# -- the harness ---------------------------------------------------------------------

VARIANTS = ("raw", "manual", "adapter")
LABELS = {"raw": "raw redis-py", "manual": "manual scope", "adapter": "adapter"}


class Server:
    def __init__(self, framework: str, variant: str, redis_url: str) -> None:
        from _harness import find_free_port

        self.framework = framework
        self.variant = variant
        self.port = find_free_port()
        py = sys.executable
        if framework == "flask":
            argv = [py, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", "4"]
            argv += ["-b", f"127.0.0.1:{self.port}", "bench_adapters:flask_app()"]
            import gunicorn.config

            if any(s.name == "control_socket_disable" for s in gunicorn.config.KNOWN_SETTINGS):
                argv.append("--no-control-socket")  # recent gunicorn: no fixed ~/.gunicorn socket
        else:
            argv = [py, "-m", "uvicorn", "--factory", "bench_adapters:starlette_app"]
            argv += ["--host", "127.0.0.1", "--port", str(self.port)]
            argv += ["--no-access-log", "--log-level", "warning"]
        env = {**os.environ, "BENCH_VARIANT": variant, "REDIS_URL": redis_url, "PYTHONPATH": str(HERE)}
        for name in [n for n in env if n.startswith("OTEL_")]:
            del env[name]
        self.proc = subprocess.Popen(
            argv, cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self.url = f"http://127.0.0.1:{self.port}/ping"

    @property
    def name(self) -> str:
        server = "gunicorn gthread" if self.framework == "flask" else "uvicorn"
        return f"{self.framework} ({server})"

    def wait_ready(self, timeout: float = 20.0) -> None:
        import httpx

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                sys.exit(f"{self.name} {self.variant} exited:\n{err[-2000:]}")
            try:
                if httpx.get(self.url, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        sys.exit(f"{self.name} {self.variant} did not answer in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def run_wrk(url: str, duration: float, connections: int) -> tuple[float, int, int]:
    """(req/s, requests, non-2xx or socket errors) from one wrk run."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return rps, total, errors


def run_httpx(url: str, requests: int, connections: int) -> tuple[float, int, int]:
    import httpx

    async def go() -> tuple[float, int, int]:
        errors = 0
        remaining = requests
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:

            async def worker() -> None:
                nonlocal remaining, errors
                while remaining > 0:
                    remaining -= 1
                    try:
                        if (await client.get(url)).status_code != 200:
                            errors += 1
                    except httpx.HTTPError:
                        errors += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            return requests / (time.perf_counter() - t0), requests, errors

    return asyncio.run(go())


def main() -> None:
    # First: outside the project's virtualenv, _harness exits with a clear message.
    from _harness import RedisServer, environment, table

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run")
    parser.add_argument("--requests", type=int, default=3000, help="requests per run (httpx client)")
    parser.add_argument("--connections", type=int, default=8)
    default_client = "wrk" if shutil.which("wrk") else "httpx"
    parser.add_argument("--client", choices=["wrk", "httpx"], default=default_client)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.requests = 2, 1.0, 1000

    def load(url: str) -> tuple[float, int, int]:
        if args.client == "wrk":
            return run_wrk(url, args.duration, args.connections)
        return run_httpx(url, args.requests, args.connections)

    with RedisServer() as redis_server:
        import redis

        with redis.Redis(port=redis_server.port) as r:
            r.set(KEY, b"x" * 16)
        redis_url = f"redis://127.0.0.1:{redis_server.port}/0"
        servers = [Server(fw, v, redis_url) for fw in ("flask", "starlette") for v in VARIANTS]
        try:
            for s in servers:
                s.wait_ready()
            for s in servers:
                load(s.url)  # warm-up
            rps: dict[tuple[str, str], list[float]] = {(s.framework, s.variant): [] for s in servers}
            totals = {key: 0 for key in rps}
            errors = 0
            for rnd in range(args.rounds):
                for i in range(len(servers)):
                    s = servers[(rnd + i) % len(servers)]
                    value, n, err = load(s.url)
                    rps[(s.framework, s.variant)].append(value)
                    totals[(s.framework, s.variant)] += n
                    errors += err
        finally:
            for s in servers:
                s.stop()

    rows = []
    for s in servers:
        key = (s.framework, s.variant)
        med = statistics.median(rps[key])
        raw = statistics.median(rps[(s.framework, "raw")])
        manual = statistics.median(rps[(s.framework, "manual")])
        over_raw = (1 / med - 1 / raw) * 1e6
        over_manual = (1 / med - 1 / manual) * 1e6
        rows.append(
            [
                s.name,
                LABELS[s.variant],
                f"{med:,.0f}",
                f"{min(rps[key]):,.0f}-{max(rps[key]):,.0f}",
                f"{totals[key]:,}",
                f"{1e6 / med:.0f}",
                "-" if s.variant == "raw" else f"{over_raw:+.0f}",
                f"{over_manual:+.0f}" if s.variant == "adapter" else "-",
            ]
        )
    print(f"# Adapter overhead under real HTTP load ({environment()})")
    print(
        f"client: {args.client}, {args.connections} connections, "
        + (f"{args.duration:g} s per run" if args.client == "wrk" else f"{args.requests} requests per run")
        + f", {args.rounds} rounds; one server process; telemetry off (no SDK)\n"
    )
    headers = ["app (server)", "variant", "req/s (median)", "range", "requests", "µs/req", "+µs vs raw"]
    print(table([*headers, "adapter vs manual (µs)"], rows))
    if errors:
        print(f"\nWARNING: {errors} non-2xx responses or socket errors")


if __name__ == "__main__":
    main()
