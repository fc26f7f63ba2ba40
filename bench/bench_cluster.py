"""Redis Cluster: per-command cost of the handle against raw ``RedisCluster``, and a per-shard
outage timeline (one primary SIGKILLed) for the library beside raw redis-py.

What is measured
    One real cluster on loopback (``testbed.RedisClusterBed``: 3 primaries, 3 replicas,
    ``cluster-node-timeout`` 1 s, ``cluster-require-full-coverage no`` unless
    ``--full-coverage``), started here and stopped at the end.

    Overhead, telemetry off (no OpenTelemetry SDK: the API's no-op providers). A raw
    ``redis.cluster.RedisCluster`` and a second one wrapped by ``Resilience`` with the
    default policies, both on the same cluster:

    * ``GET`` / ``SET``: one command per op (16-byte value), the key cycling over three
      keys, one per shard.
    * ``PIPE10``: one cluster ``pipeline()`` with 5 SET + 5 GET on keys spread over the
      three shards, executed; one op = the whole pipeline (redis-py splits it per node).
    * ``handle, 1 scope / N ops``: ``with res.request() as r:`` once per round, N ops on ``r``.
    * ``handle, scope per op``: ``with res.request() as r: r.get(k)`` per op.

    Variants are interleaved in one process (every round runs each once, N ops timed with
    ``time.perf_counter_ns``; the starting variant rotates from round to round); warm-up
    rounds are discarded. CPU time is ``time.process_time_ns`` around each run (the whole
    process: any background thread of the library is charged to it).

    Outage timeline. The same load twice in one run: first through the library
    (``Resilience(bed.client())``, default policies, ``res.request(deadline=0.3)`` per
    call), then, after ``bed.reset_topology()`` puts the killed node back and the initial
    layout with it, through a raw ``bed.client()`` with redis-py's defaults. The load is
    one thread per shard, each cycling over 4 keys of its shard: one GET per call, a few
    ms between calls. After 0.5 s of load one primary is SIGKILLed; the load runs until
    its replica is promoted (``bed.wait_for_promotion``: polls ``ROLE`` every 10 ms, so
    the promotion time is up to about 10 ms late) and 1 s more.

How to read the output
    Overhead: ``median`` and ``p90`` are over rounds of the mean µs/op within a round;
    ``ratio`` is median(variant) / median(raw, same command), ``paired`` the median over
    rounds of variant / raw within the round, ``+µs`` the absolute overhead, and the CPU
    columns the same for process CPU time. Target: every handle variant <= 1.05x raw.

    Timeline, per shard and client, counting calls started after the kill: calls, errors,
    median and longest call. Then per client: kill -> the dead shard's breaker opened (the
    library only), kill -> promotion, promotion -> the dead shard's first successful call
    (negative: the client found the new primary before the promotion poll saw it).

Run: ``python bench/bench_cluster.py`` (about 2 minutes) or ``--quick`` (< 1 minute); ``--profile``
also prints a cProfile of the handle's GET loop, ``--full-coverage`` runs the cluster with
``cluster-require-full-coverage yes``.
"""

from __future__ import annotations

# First: outside the project's virtualenv, _harness exits with a clear message.
from _harness import environment, fmt_us, median, p90, paired_ratio, render_profile, table

# isort: split
import argparse
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.cluster
import redis.utils

from otel_redis_resilience import BreakerState, BreakerTransitioned, Event, Resilience
from testbed import RedisServer
from testbed.cluster import RedisClusterBed

VALUE = b"v" * 16
DEADLINE = 0.3
CALL_GAP = 0.003
KEYS_PER_SHARD = 4
AFTER_PROMOTION = 1.0
WARM_LOAD = 0.5

Fn = Callable[[int], int]
_now = time.perf_counter_ns


# -- overhead -----------------------------------------------------------------------------


@dataclass
class Results:
    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]


def interleave(variants: Sequence[tuple[str, Fn]], *, rounds: int, ops: int, warmup: int) -> Results:
    """Every variant once per round, rotating who goes first; µs/op per round (wall, process CPU)."""
    res = Results({n: [] for n, _ in variants}, {n: [] for n, _ in variants})
    n = len(variants)
    for r in range(warmup + rounds):
        for i in range(n):
            name, fn = variants[(r + i) % n]
            cpu = time.process_time_ns()
            ns = fn(ops)
            cpu = time.process_time_ns() - cpu
            if r >= warmup:
                res.wall[name].append(ns / ops / 1000.0)
                res.cpu[name].append(cpu / ops / 1000.0)
    return res


def overhead_variants(
    raw: Any, res: Resilience, keys: list[str], pipe_keys: list[str]
) -> list[tuple[str, Fn]]:
    nk = len(keys)

    def pipe(client: Any) -> None:
        p = client.pipeline()
        for k in pipe_keys:
            p.set(k, VALUE)
        for k in pipe_keys:
            p.get(k)
        p.execute()

    def get_raw(n: int) -> int:
        t = _now()
        for i in range(n):
            raw.get(keys[i % nk])
        return _now() - t

    def get_scoped(n: int) -> int:
        t = _now()
        with res.request() as r:
            for i in range(n):
                r.get(keys[i % nk])
        return _now() - t

    def get_per_op(n: int) -> int:
        t = _now()
        for i in range(n):
            with res.request() as r:
                r.get(keys[i % nk])
        return _now() - t

    def set_raw(n: int) -> int:
        t = _now()
        for i in range(n):
            raw.set(keys[i % nk], VALUE)
        return _now() - t

    def set_scoped(n: int) -> int:
        t = _now()
        with res.request() as r:
            for i in range(n):
                r.set(keys[i % nk], VALUE)
        return _now() - t

    def set_per_op(n: int) -> int:
        t = _now()
        for i in range(n):
            with res.request() as r:
                r.set(keys[i % nk], VALUE)
        return _now() - t

    def pipe_raw(n: int) -> int:
        t = _now()
        for _ in range(n):
            pipe(raw)
        return _now() - t

    def pipe_scoped(n: int) -> int:
        t = _now()
        with res.request() as r:
            for _ in range(n):
                pipe(r)
        return _now() - t

    def pipe_per_op(n: int) -> int:
        t = _now()
        for _ in range(n):
            with res.request() as r:
                pipe(r)
        return _now() - t

    return [
        ("GET raw", get_raw),
        ("GET handle, 1 scope / N ops", get_scoped),
        ("GET handle, scope per op", get_per_op),
        ("SET raw", set_raw),
        ("SET handle, 1 scope / N ops", set_scoped),
        ("SET handle, scope per op", set_per_op),
        ("PIPE10 raw", pipe_raw),
        ("PIPE10 handle, 1 scope / N ops", pipe_scoped),
        ("PIPE10 handle, scope per op", pipe_per_op),
    ]


def parser_in_use(client: redis.cluster.RedisCluster) -> str:
    """The parser class of a real connection of the client (what hiredis-or-not resolved to)."""
    node = client.get_default_node()
    pool = node.redis_connection.connection_pool  # type: ignore[union-attr]
    conn = pool.get_connection()
    try:
        return type(conn._parser).__name__
    finally:
        pool.release(conn)


def run_overhead(bed: RedisClusterBed, rounds: int, ops: int, warmup: int) -> tuple[Results, str]:
    prims = bed.primaries()
    keys = [bed.key_for_node(p, "bench:k") for p in prims]
    pipe_keys = [bed.key_for_node(prims[i % len(prims)], f"bench:p{i}-") for i in range(5)]
    raw = bed.client()
    res = Resilience(bed.client())
    for k in keys + pipe_keys:
        raw.set(k, VALUE)
    parser = parser_in_use(raw)
    gc.collect()
    out = interleave(overhead_variants(raw, res, keys, pipe_keys), rounds=rounds, ops=ops, warmup=warmup)
    res.close()
    return out, parser


def profile(bed: RedisClusterBed, ops: int) -> str:
    """cProfile of the handle's GET loop (1 scope / N ops), top 30 by own time."""
    import cProfile

    keys = [bed.key_for_node(p, "bench:k") for p in bed.primaries()]
    res = Resilience(bed.client())
    fn = dict(overhead_variants(bed.client(), res, keys, keys))["GET handle, 1 scope / N ops"]
    fn(200)
    prof = cProfile.Profile()
    prof.runcall(fn, ops)
    res.close()
    return render_profile(f"cluster GET through the handle, {ops} ops", prof)


def base_of(name: str) -> str:
    return name.split(" ", 1)[0] + " raw"


def report_overhead(results: Results) -> tuple[str, list[tuple[str, float]]]:
    rows, ratios = [], []
    wall, cpu = results.wall, results.cpu
    for name, values in wall.items():
        base = base_of(name)
        med, cmed = median(values), median(cpu[name])
        if name == base:
            ratio = paired = extra = cratio = "-"
        else:
            bmed = median(wall[base])
            r = med / bmed
            ratios.append((name, r))
            ratio = f"{r:.3f}x"
            paired = f"{paired_ratio(wall, name, base):.3f}x"
            extra = f"{med - bmed:+.1f}"
            cratio = f"{cmed / median(cpu[base]):.3f}x"
        rows.append([name, fmt_us(med), fmt_us(p90(values)), ratio, paired, extra, fmt_us(cmed), cratio])
    headers = ["variant", "median µs/op", "p90 µs/op", "ratio", "paired", "+µs", "CPU µs/op", "CPU ratio"]
    return table(headers, rows), ratios


# -- outage timeline ---------------------------------------------------------------------------


@dataclass
class Call:
    shard: str
    start: float
    end: float
    ok: bool
    error: str = ""


@dataclass
class Timeline:
    client: str
    dead: str = ""
    shards: list[str] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    killed: float = 0.0
    promoted: float = 0.0
    new_primary: str = ""
    opened: list[float] = field(default_factory=list)  # the dead shard's breaker -> open
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, call: Call) -> None:
        with self.lock:
            self.calls.append(call)


def _addr(s: RedisServer) -> str:
    return f"{s.host}:{s.port}"


def _load(
    get: Callable[[str], object], shard: str, keys: list[str], tl: Timeline, stop: threading.Event
) -> None:
    i = 0
    while not stop.is_set():
        key = keys[i % len(keys)]
        i += 1
        t = time.monotonic()
        try:
            get(key)
            tl.add(Call(shard, t, time.monotonic(), True))
        except Exception as exc:
            tl.add(Call(shard, t, time.monotonic(), False, type(exc).__name__))
        time.sleep(CALL_GAP)


def run_timeline(bed: RedisClusterBed, library: bool) -> Timeline:
    tl = Timeline("library" if library else "raw RedisCluster")
    prims = bed.primaries()
    victim = prims[0]
    tl.dead = _addr(victim)
    tl.shards = [_addr(p) for p in prims]
    keys = {_addr(p): [bed.key_for_node(p, f"bench:o{i}-") for i in range(KEYS_PER_SHARD)] for p in prims}

    def hook(event: Event) -> None:
        if (
            isinstance(event, BreakerTransitioned)
            and tl.killed
            and str(event.endpoint) == tl.dead
            and event.new is BreakerState.OPEN
        ):
            tl.opened.append(time.monotonic())

    client = bed.client()
    for ks in keys.values():
        for k in ks:
            client.set(k, VALUE)
    res: Resilience | None = None
    if library:
        res = Resilience(client, hooks=[hook])
        lib = res

        def get(key: str) -> object:
            with lib.request(deadline=DEADLINE) as r:
                return r.get(key)
    else:
        get = client.get

    stop = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(get, s, keys[s], tl, stop), name=f"load-{s}", daemon=True)
        for s in tl.shards
    ]
    for t in threads:
        t.start()
    time.sleep(WARM_LOAD)
    tl.killed = time.monotonic()
    bed.kill(victim)
    new, tl.promoted = bed.wait_for_promotion(victim)
    tl.new_primary = _addr(new)
    time.sleep(AFTER_PROMOTION)
    stop.set()
    for t in threads:
        t.join(30)
    if res is not None:
        res.close()
    return tl


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def report_shards(tls: list[Timeline]) -> str:
    rows = []
    for tl in tls:
        for shard in tl.shards:
            calls = [c for c in tl.calls if c.shard == shard and c.start >= tl.killed]
            errors = [c for c in calls if not c.ok]
            durations = [c.end - c.start for c in calls]
            kinds = sorted({c.error for c in errors})
            label = f"{shard} (killed)" if shard == tl.dead else shard
            rows.append(
                [
                    tl.client,
                    label,
                    len(calls),
                    len(errors),
                    f"{median(durations) * 1000:.2f}" if durations else "-",
                    f"{max(durations) * 1000:.0f}" if durations else "-",
                    ", ".join(kinds) or "-",
                ]
            )
    headers = ["client", "shard", "calls", "errors", "median call ms", "longest call ms", "errors seen"]
    return table(headers, rows)


def report_failover(tls: list[Timeline]) -> str:
    rows = []
    for tl in tls:
        dead = [c for c in tl.calls if c.shard == tl.dead and c.start >= tl.killed]
        first_ok = min((c.end for c in dead if c.ok), default=None)
        opened = tl.opened[0] - tl.killed if tl.opened else None
        failed_before_open = (
            sum(1 for c in dead if not c.ok and c.end <= tl.opened[0] + 1e-4) if tl.opened else None
        )
        failed = [c.end - c.start for c in dead if not c.ok]
        fast = [c.end - c.start for c in dead if not c.ok and tl.opened and c.start > tl.opened[0]]
        healthy = [c for c in tl.calls if c.shard != tl.dead and c.start >= tl.killed]
        rows.append(
            [
                tl.client,
                "n/a" if tl.client != "library" else _ms(opened),
                "-" if failed_before_open is None else failed_before_open,
                f"{median(failed) * 1000:.2f}" if failed else "-",
                f"{median(fast) * 1000:.2f}" if fast else "-",
                _ms(tl.promoted - tl.killed),
                _ms(None if first_ok is None else first_ok - tl.promoted),
                sum(not c.ok for c in healthy),
                f"{max((c.end - c.start for c in tl.calls if c.start >= tl.killed), default=0) * 1000:.0f}",
            ]
        )
    headers = [
        "client",
        "kill -> breaker open ms",
        "dead-shard errors until open",
        "dead shard: median failed call ms",
        "median call rejected by the open breaker ms",
        "kill -> promotion ms",
        "promotion -> first success ms",
        "errors, other shards",
        "longest call ms",
    ]
    return table(headers, rows)


# -- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds; finishes in < 1 minute")
    parser.add_argument("--rounds", type=int, help="measured rounds per variant")
    parser.add_argument("--ops", type=int, help="ops per variant per round (N)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the handle GET loop")
    parser.add_argument("--skip-outage", action="store_true", help="overhead only")
    parser.add_argument(
        "--full-coverage", action="store_true", help="cluster-require-full-coverage yes (Redis's default)"
    )
    args = parser.parse_args()
    rounds = args.rounds or (30 if args.quick else 200)
    ops = args.ops or (40 if args.quick else 150)
    warmup = 3 if args.quick else 10
    # Breaker transitions and rejections log warnings; the tables show them instead.
    logging.getLogger("otel_redis_resilience").setLevel(logging.ERROR)

    started = time.monotonic()
    with RedisClusterBed(require_full_coverage=args.full_coverage) as bed:
        up = bed.start_seconds or 0.0
        overhead, parser_name = run_overhead(bed, rounds, ops, warmup)
        profiled = profile(bed, 3000 if args.quick else 20000) if args.profile else ""
        timelines: list[Timeline] = []
        if not args.skip_outage:
            timelines.append(run_timeline(bed, library=True))
            bed.reset_topology()
            timelines.append(run_timeline(bed, library=False))

    coverage = "yes" if args.full_coverage else "no"
    print("## bench_cluster: the handle on a Redis Cluster vs raw `RedisCluster`\n")
    print(
        f"{environment()}; hiredis {'installed' if redis.utils.HIREDIS_AVAILABLE else 'not installed'}, "
        f"parser {parser_name}; cluster 3 primaries + 3 replicas on loopback "
        f"(node timeout {bed.node_timeout_ms} ms, full coverage {coverage}, up in {up:.1f} s)\n"
    )
    print(f"### overhead, telemetry off: {rounds} rounds x N={ops} ops per variant, interleaved\n")
    text, ratios = report_overhead(overhead)
    print(text + "\n")
    worst_name, worst = max(ratios, key=lambda x: x[1])
    verdict = "met" if worst <= 1.05 else "**MISSED**"
    print(
        table(
            ["target", "measured (worst variant)", "verdict"],
            [["every handle variant <= 1.05x raw (median)", f"{worst:.3f}x ({worst_name})", verdict]],
        )
        + "\n"
    )
    if timelines:
        lib, raw = timelines
        print(
            f"### outage: SIGKILL of primary {lib.dead}, one thread per shard, one GET per call, "
            f"{CALL_GAP * 1000:.0f} ms between calls, until the promotion + {AFTER_PROMOTION:.0f} s\n"
        )
        print(
            "library: `Resilience(RedisCluster)`, default policies, "
            f"`res.request(deadline={DEADLINE})` per call; raw: `RedisCluster` with redis-py "
            f"{redis.__version__} defaults; `bed.reset_topology()` in between. "
            f"Promoted: {lib.new_primary} (library run), {raw.new_primary} (raw run). "
            "Calls started after the kill.\n"
        )
        print(report_shards(timelines) + "\n")
        print(report_failover(timelines) + "\n")
    if profiled:
        print(profiled + "\n")
    print(f"(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
