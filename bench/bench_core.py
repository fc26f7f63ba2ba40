"""Per-command cost of the resilient handle against raw redis-py, telemetry off.

What is measured
    A loopback ``redis-server`` (started here on a free port, no persistence) and two
    clients on it: a raw ``redis.Redis`` and one wrapped by ``Resilience`` with the
    default policies. No OpenTelemetry SDK is configured, so the library's telemetry
    calls go to the API's no-op providers ("telemetry off"). For sync and asyncio:

    * ``GET`` / ``SET``: one command per op (16-byte value).
    * ``PIPE10``: one ``pipeline(transaction=False)`` with 5 SET + 5 GET, executed; one
      op = the whole pipeline.
    * ``handle, 1 scope / N ops``: ``with res.request() as h:`` is opened once per
      round and N ops run on ``h`` (the scope's cost is spread over N).
    * ``handle, scope per op``: ``with res.request() as h: h.get(k)`` per op, i.e.
      the whole per-request cost of a web request that does one GET.
    * ``res.handle() (no scope)``: the scope-less handle for background jobs.
    * ``rejected``: ``res.force_open()``, then ``h.get(k)`` raising
      ``RedisUnavailable(breaker_open)``, caught; no network involved.

How it is measured
    Variants are interleaved in one process: every round runs each variant once
    (N ops, timed with ``time.perf_counter_ns`` around the loop), the starting variant
    rotating from round to round, so machine noise hits them all alike. Warm-up
    rounds come first and are discarded.

How to read the output
    ``median`` and ``p90`` are over rounds, of the mean µs/op within a round.
    ``ratio`` is median(variant) / median(raw of the same command). ``paired`` is the
    median over rounds of variant / raw within the same round (less sensitive to
    drift). ``+µs`` is the absolute overhead, median(variant) - median(raw). The
    targets table checks: sync GET (1 scope / N) <= 1.10x raw; rejected call < 20 µs.

Run: ``python bench/bench_core.py`` (about 2 minutes) or ``--quick`` (< 20 s); ``--profile``
also prints a cProfile of the handle's GET loop, sync and async.
"""

from __future__ import annotations

# First: outside the project's virtualenv, _harness exits with a clear message.
from _harness import (
    HOST,
    RedisServer,
    Results,
    ainterleave,
    environment,
    fmt_us,
    interleave,
    median,
    p90,
    paired_ratio,
    render_profile,
    table,
)

# isort: split
import argparse
import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis
import redis.asyncio

from otel_redis_resilience import RedisUnavailable, Resilience, RetryPolicy

KEY = "bench:key"
VALUE = b"v" * 16
PIPE_KEYS = [f"bench:p{i}" for i in range(5)]

SyncFn = Callable[[int], int]
AsyncFn = Callable[[int], Awaitable[int]]

_now = time.perf_counter_ns


# -- sync variants ----------------------------------------------------------------


def sync_variants(raw: redis.Redis, res: Resilience, res0: Resilience) -> list[tuple[str, SyncFn]]:
    def get_raw(n: int) -> int:
        t = _now()
        for _ in range(n):
            raw.get(KEY)
        return _now() - t

    def get_scoped(n: int) -> int:
        t = _now()
        with res.request() as h:
            for _ in range(n):
                h.get(KEY)
        return _now() - t

    def get_scope_per_op(n: int) -> int:
        t = _now()
        for _ in range(n):
            with res.request() as h:
                h.get(KEY)
        return _now() - t

    def get_no_timeout(n: int) -> int:
        t = _now()
        with res0.request() as h:
            for _ in range(n):
                h.get(KEY)
        return _now() - t

    def get_handle(n: int) -> int:
        h = res.handle()
        t = _now()
        for _ in range(n):
            h.get(KEY)
        return _now() - t

    def set_raw(n: int) -> int:
        t = _now()
        for _ in range(n):
            raw.set(KEY, VALUE)
        return _now() - t

    def set_scoped(n: int) -> int:
        t = _now()
        with res.request() as h:
            for _ in range(n):
                h.set(KEY, VALUE)
        return _now() - t

    def pipe(client: Any) -> None:
        p = client.pipeline(transaction=False)
        for k in PIPE_KEYS:
            p.set(k, VALUE)
        for k in PIPE_KEYS:
            p.get(k)
        p.execute()

    def pipe_raw(n: int) -> int:
        t = _now()
        for _ in range(n):
            pipe(raw)
        return _now() - t

    def pipe_scoped(n: int) -> int:
        t = _now()
        with res.request() as h:
            for _ in range(n):
                pipe(h)
        return _now() - t

    return [
        ("GET raw", get_raw),
        ("GET handle, 1 scope / N ops", get_scoped),
        ("GET handle, scope per op", get_scope_per_op),
        ("GET res.handle() (no scope)", get_handle),
        ("GET handle, attempt_timeout=None", get_no_timeout),
        ("SET raw", set_raw),
        ("SET handle, 1 scope / N ops", set_scoped),
        ("PIPE10 raw", pipe_raw),
        ("PIPE10 handle, 1 scope / N ops", pipe_scoped),
    ]


def sync_rejected(res: Resilience) -> list[tuple[str, SyncFn]]:
    def scoped(n: int) -> int:
        rejected = 0
        t = _now()
        with res.request() as h:
            for _ in range(n):
                try:
                    h.get(KEY)
                except RedisUnavailable:
                    rejected += 1
        elapsed = _now() - t
        assert rejected == n, "the breaker let a call through"
        return elapsed

    def scope_per_call(n: int) -> int:
        rejected = 0
        t = _now()
        for _ in range(n):
            with res.request() as h:
                try:
                    h.get(KEY)
                except RedisUnavailable:
                    rejected += 1
        elapsed = _now() - t
        assert rejected == n, "the breaker let a call through"
        return elapsed

    return [("rejected GET, 1 scope / N", scoped), ("rejected GET, scope per call", scope_per_call)]


# -- async variants ---------------------------------------------------------------


def async_variants(raw: redis.asyncio.Redis, res: Resilience, res0: Resilience) -> list[tuple[str, AsyncFn]]:
    async def get_raw(n: int) -> int:
        t = _now()
        for _ in range(n):
            await raw.get(KEY)
        return _now() - t

    async def get_scoped(n: int) -> int:
        t = _now()
        async with res.request() as h:
            for _ in range(n):
                await h.get(KEY)
        return _now() - t

    async def get_scope_per_op(n: int) -> int:
        t = _now()
        for _ in range(n):
            async with res.request() as h:
                await h.get(KEY)
        return _now() - t

    async def get_no_timeout(n: int) -> int:
        t = _now()
        async with res0.request() as h:
            for _ in range(n):
                await h.get(KEY)
        return _now() - t

    async def get_handle(n: int) -> int:
        h = res.handle()
        t = _now()
        for _ in range(n):
            await h.get(KEY)
        return _now() - t

    async def set_raw(n: int) -> int:
        t = _now()
        for _ in range(n):
            await raw.set(KEY, VALUE)
        return _now() - t

    async def set_scoped(n: int) -> int:
        t = _now()
        async with res.request() as h:
            for _ in range(n):
                await h.set(KEY, VALUE)
        return _now() - t

    async def pipe(client: Any) -> None:
        p = client.pipeline(transaction=False)
        for k in PIPE_KEYS:
            p.set(k, VALUE)
        for k in PIPE_KEYS:
            p.get(k)
        await p.execute()

    async def pipe_raw(n: int) -> int:
        t = _now()
        for _ in range(n):
            await pipe(raw)
        return _now() - t

    async def pipe_scoped(n: int) -> int:
        t = _now()
        async with res.request() as h:
            for _ in range(n):
                await pipe(h)
        return _now() - t

    return [
        ("GET raw", get_raw),
        ("GET handle, 1 scope / N ops", get_scoped),
        ("GET handle, scope per op", get_scope_per_op),
        ("GET res.handle() (no scope)", get_handle),
        ("GET handle, attempt_timeout=None", get_no_timeout),
        ("SET raw", set_raw),
        ("SET handle, 1 scope / N ops", set_scoped),
        ("PIPE10 raw", pipe_raw),
        ("PIPE10 handle, 1 scope / N ops", pipe_scoped),
    ]


def async_rejected(res: Resilience) -> list[tuple[str, AsyncFn]]:
    async def scoped(n: int) -> int:
        rejected = 0
        t = _now()
        async with res.request() as h:
            for _ in range(n):
                try:
                    await h.get(KEY)
                except RedisUnavailable:
                    rejected += 1
        elapsed = _now() - t
        assert rejected == n, "the breaker let a call through"
        return elapsed

    async def scope_per_call(n: int) -> int:
        rejected = 0
        t = _now()
        for _ in range(n):
            async with res.request() as h:
                try:
                    await h.get(KEY)
                except RedisUnavailable:
                    rejected += 1
        elapsed = _now() - t
        assert rejected == n, "the breaker let a call through"
        return elapsed

    return [("rejected GET, 1 scope / N", scoped), ("rejected GET, scope per call", scope_per_call)]


# -- reporting --------------------------------------------------------------------


def base_of(name: str) -> str:
    return name.split(" ", 1)[0] + " raw"


def report(title: str, results: Results) -> str:
    rows = []
    wall, cpu = results.wall, results.cpu
    for name, values in wall.items():
        base = base_of(name)
        med = median(values)
        cmed = median(cpu[name])
        if name == base or base not in wall:
            ratio = paired = extra = cratio = "-"
        else:
            bmed = median(wall[base])
            ratio = f"{med / bmed:.3f}x"
            paired = f"{paired_ratio(wall, name, base):.3f}x"
            extra = f"{med - bmed:+.1f}"
            cratio = f"{cmed / median(cpu[base]):.3f}x"
        rows.append([name, fmt_us(med), fmt_us(p90(values)), ratio, paired, extra, fmt_us(cmed), cratio])
    headers = ["variant", "median µs/op", "p90 µs/op", "ratio", "paired", "+µs", "CPU µs/op", "CPU ratio"]
    return f"### {title}\n\n" + table(headers, rows)


def report_rejected(title: str, results: dict[str, Results]) -> str:
    rows = []
    for prefix, res in results.items():
        for name, values in res.wall.items():
            rows.append([f"{prefix} {name}", fmt_us(median(values)), fmt_us(p90(values))])
    return f"### {title}\n\n" + table(["variant", "median µs/call", "p90 µs/call"], rows)


# -- main ---------------------------------------------------------------------------


def run_sync(port: int, rounds: int, ops: int, warmup: int) -> tuple[Results, Results]:
    raw = redis.Redis(host=HOST, port=port)
    res = Resilience(redis.Redis(host=HOST, port=port))
    res0 = Resilience(redis.Redis(host=HOST, port=port), retry=RetryPolicy(attempt_timeout=None))
    rej = Resilience(redis.Redis(host=HOST, port=port))
    raw.set(KEY, VALUE)
    rej.force_open()
    gc.collect()
    main = interleave(sync_variants(raw, res, res0), rounds=rounds, ops=ops, warmup_rounds=warmup)
    rejected = interleave(sync_rejected(rej), rounds=rounds, ops=ops * 5, warmup_rounds=warmup)
    for r in (res, res0, rej):
        r.close()
        r.client.close()
    raw.close()
    return main, rejected


async def run_async(port: int, rounds: int, ops: int, warmup: int) -> tuple[Results, Results]:
    raw = redis.asyncio.Redis(host=HOST, port=port)
    res = Resilience(redis.asyncio.Redis(host=HOST, port=port))
    res0 = Resilience(redis.asyncio.Redis(host=HOST, port=port), retry=RetryPolicy(attempt_timeout=None))
    rej = Resilience(redis.asyncio.Redis(host=HOST, port=port))
    await raw.set(KEY, VALUE)
    rej.force_open()
    gc.collect()
    main = await ainterleave(async_variants(raw, res, res0), rounds=rounds, ops=ops, warmup_rounds=warmup)
    rejected = await ainterleave(async_rejected(rej), rounds=rounds, ops=ops * 5, warmup_rounds=warmup)
    for r in (res, res0, rej):
        r.close()
        client: Any = r.client
        await client.aclose()
    await raw.aclose()
    return main, rejected


def profile(port: int, ops: int) -> str:
    """cProfile of the sync and async handle GET loops (1 scope / N ops), top 30 by own time."""
    import cProfile

    res = Resilience(redis.Redis(host=HOST, port=port))
    fn = dict(sync_variants(redis.Redis(host=HOST, port=port), res, res))["GET handle, 1 scope / N ops"]
    fn(200)
    prof = cProfile.Profile()
    prof.runcall(fn, ops)
    text = render_profile(f"sync GET through the handle, {ops} ops", prof)

    async def run() -> cProfile.Profile:
        ares = Resilience(redis.asyncio.Redis(host=HOST, port=port))
        raw = redis.asyncio.Redis(host=HOST, port=port)
        afn = dict(async_variants(raw, ares, ares))["GET handle, 1 scope / N ops"]
        await afn(200)
        aprof = cProfile.Profile()
        aprof.enable()
        await afn(ops)
        aprof.disable()
        return aprof

    return text + "\n" + render_profile(f"async GET through the handle, {ops} ops", asyncio.run(run()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds; finishes in < 20 s")
    parser.add_argument("--rounds", type=int, help="measured rounds per variant")
    parser.add_argument("--ops", type=int, help="ops per variant per round (N)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the handle GET")
    args = parser.parse_args()
    rounds = args.rounds or (80 if args.quick else 200)
    ops = args.ops or (50 if args.quick else 200)
    warmup = 3 if args.quick else 15
    # Rejections log a rate-limited warning; keep the table readable.
    logging.getLogger("otel_redis_resilience").setLevel(logging.ERROR)

    started = time.monotonic()
    with RedisServer() as server:
        s_main, s_rej = run_sync(server.port, rounds, ops, warmup)
        a_main, a_rej = asyncio.run(run_async(server.port, rounds, ops, warmup))
        profiles = profile(server.port, 5000 if args.quick else 20000) if args.profile else ""

    print("## bench_core: handle vs raw redis-py, telemetry off\n")
    print(f"{environment()}; {rounds} rounds x N={ops} ops per variant (rejected: {ops * 5}), interleaved\n")
    print(report("sync", s_main) + "\n")
    print(report("asyncio", a_main) + "\n")
    print(report_rejected("rejected by an open breaker (force_open)", {"sync": s_rej, "async": a_rej}) + "\n")

    def verdict(ok: bool) -> str:
        return "met" if ok else "**MISSED**"

    get_ratio = median(s_main.wall["GET handle, 1 scope / N ops"]) / median(s_main.wall["GET raw"])
    rej_worst = max(median(v) for v in [*s_rej.wall.values(), *a_rej.wall.values()])
    print("### targets\n")
    print(
        table(
            ["target", "measured", "verdict"],
            [
                ["sync GET (1 scope / N) <= 1.10x raw", f"{get_ratio:.3f}x", verdict(get_ratio <= 1.10)],
                ["rejected call < 20 µs (worst of the four)", f"{rej_worst:.1f} µs", verdict(rej_worst < 20)],
            ],
        )
    )
    if profiles:
        print("\n" + profiles)
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
