"""Overhead of telemetry: the resilient handle against raw redis-py and RedisInstrumentor.

What is measured
    A loopback ``redis-server`` (started here, no persistence) and sync clients on it.
    Two operations: ``GET`` (one command) and ``PIPE10`` (``pipeline(transaction=False)``
    with 5 SET + 5 GET, executed; one op = the whole pipeline). Variants:

    * ``raw``: plain ``redis.Redis``, no telemetry.
    * ``raw + RedisInstrumentor``: the same client with opentelemetry-instrumentation-redis
      instrumenting redis-py globally, traces on: an SDK ``TracerProvider`` (ALWAYS_ON
      sampler, ``BatchSpanProcessor``, an exporter that discards). A span per command
      and per pipeline.
    * ``ours, telemetry off``: ``Resilience`` with no OTel SDK anywhere (for reference).
    * ``ours, metrics only``: an SDK ``MeterProvider`` (``InMemoryMetricReader``, never
      collected during the run) and ``tracer_provider=NoOpTracerProvider()``.
    * ``raw + SDK histogram (floor)``: plain ``redis.Redis`` plus what the issue requires
      of any implementation and nothing of ours: time the operation with
      ``perf_counter`` and ``Histogram.record`` it on an SDK meter provider like the one
      above, with the same four attributes. Its ratio is the lowest metrics-only ratio
      any library recording one ``db.client.operation.duration`` point per operation
      through the OpenTelemetry SDK can reach on this machine.
    * ``raw + SDK span + histogram (floor)``: the same, plus the span the issue requires:
      ``start_span`` (CLIENT, the six attributes ours sets at start) made current around
      the call, then the two end attributes, ``end()``, on a tracer provider configured
      like the instrumentor's. The lowest traces+metrics overhead any implementation of
      the issue's span and histogram can reach through the SDK on this machine.
    * ``ours, traces only``: an SDK tracer provider like the instrumentor's, no SDK meter
      provider (separates the span cost from the histogram's).
    * ``ours, traces+metrics``: an SDK tracer provider configured like the instrumentor's
      (its own instance) plus an SDK meter provider. A span per command and per pipeline,
      and a ``db.client.operation.duration`` histogram point per operation.

    The "ours" variants open one ``res.request()`` scope per round of N ops.

How it is measured
    Everything runs in one process, interleaved: each round runs every variant once (N
    ops timed with ``time.perf_counter_ns``), the starting variant rotating between
    rounds. RedisInstrumentor patches redis-py's classes, so it is instrumented right
    before its variant's timed loop and uninstrumented right after (outside the timing);
    after each uninstrument the script checks that redis-py's methods are unwrapped, so
    the other variants never run instrumented. Warm-up rounds are discarded.

How to read the output
    ``median`` and ``p90`` are over rounds, of the mean µs/op within a round. ``ratio``
    is median(variant) / median(raw); ``paired`` is the median over rounds of variant /
    raw in the same round; ``+µs`` is median(variant) - median(raw), i.e. the overhead.
    ``CPU µs/op`` is the benchmarking thread's CPU time (it excludes time spent waiting
    for redis-server or descheduled, so it is steadier on a busy machine; it does not
    include the BatchSpanProcessor's export thread). Targets: ours traces+metrics
    overhead (+µs) <= RedisInstrumentor's; ours metrics-only <= 1.15x raw. The floors
    say whether a target is reachable at all; "ours - floor" is what the library itself
    adds on top of the SDK calls it has to make.

Run: ``python bench/bench_telemetry.py`` (about 2.5 minutes) or ``--quick`` (< 20 s);
``--profile`` adds a no-I/O cost breakdown of each telemetry piece and a cProfile of
the handle's GET with traces+metrics.
"""

from __future__ import annotations

# First: outside the project's virtualenv, _harness exits with a clear message.
from _harness import (
    HOST,
    RedisServer,
    Results,
    environment,
    fmt_us,
    interleave,
    median,
    p90,
    paired_ratio,
    per_call_us,
    render_profile,
    table,
)

# isort: split
import argparse
import contextlib
import gc
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
import redis.client
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NoOpTracerProvider, SpanKind

from otel_redis_resilience import Resilience

KEY = "bench:key"
VALUE = b"v" * 16
PIPE_KEYS = [f"bench:p{i}" for i in range(5)]

_now = time.perf_counter_ns

INSTRUMENTED = "raw + RedisInstrumentor"
FLOOR = "raw + SDK histogram (floor)"
FLOOR_TM = "raw + SDK span + histogram (floor)"
DURATION = "db.client.operation.duration"


class DiscardingExporter(SpanExporter):
    """Drops every span; counts them so the run can be sanity-checked."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def tracer_provider() -> tuple[TracerProvider, DiscardingExporter]:
    exporter = DiscardingExporter()
    tp = TracerProvider(sampler=ALWAYS_ON)
    tp.add_span_processor(BatchSpanProcessor(exporter))
    return tp, exporter


def meter_provider() -> MeterProvider:
    return MeterProvider(metric_readers=[InMemoryMetricReader()])


# -- instrumentation on / off --------------------------------------------------------

_PATCHED: list[tuple[type, str]] = [
    (redis.Redis, "execute_command"),
    (redis.client.Pipeline, "execute"),
    (redis.client.Pipeline, "immediate_execute_command"),
]


def is_patched() -> bool:
    return any(hasattr(vars(cls)[name], "__wrapped__") for cls, name in _PATCHED)


class Instrumentation:
    def __init__(self, tp: TracerProvider) -> None:
        self.tp = tp
        self.instrumentor = RedisInstrumentor()

    def on(self) -> None:
        self.instrumentor.instrument(tracer_provider=self.tp, skip_dep_check=True)
        assert is_patched(), "RedisInstrumentor did not patch redis-py"

    def off(self) -> None:
        self.instrumentor.uninstrument()
        if is_patched():
            raise SystemExit("RedisInstrumentor left redis-py patched: the other variants would be polluted")

    @contextlib.contextmanager
    def around(self, variant: str) -> Iterator[None]:
        """Instruments redis-py for the RedisInstrumentor variants only (outside their timing)."""
        instrumented = variant.endswith(INSTRUMENTED)
        if instrumented:
            self.on()
        try:
            yield
        finally:
            if instrumented:
                self.off()


# -- variants -------------------------------------------------------------------------


def get_loop(client: Any) -> Callable[[int], int]:
    def run(n: int) -> int:
        t = _now()
        for _ in range(n):
            client.get(KEY)
        return _now() - t

    return run


def get_loop_scoped(res: Resilience) -> Callable[[int], int]:
    def run(n: int) -> int:
        t = _now()
        with res.request() as h:
            for _ in range(n):
                h.get(KEY)
        return _now() - t

    return run


def _pipe(client: Any) -> None:
    p = client.pipeline(transaction=False)
    for k in PIPE_KEYS:
        p.set(k, VALUE)
    for k in PIPE_KEYS:
        p.get(k)
    p.execute()


def pipe_loop(client: Any) -> Callable[[int], int]:
    def run(n: int) -> int:
        t = _now()
        for _ in range(n):
            _pipe(client)
        return _now() - t

    return run


def floor_loop(
    op: Callable[[], object],
    hist: Any,
    metric_attrs: dict[str, Any],
    tracer: Any = None,
    span_name: str = "",
    span_attrs: dict[str, Any] | None = None,
) -> Callable[[int], int]:
    """The SDK calls the issue requires per operation, and nothing else (see module doc)."""
    end_attrs = {"redis.resilience.attempts": 1, "redis.resilience.outcome": "ok"}

    def run(n: int) -> int:
        pc = time.perf_counter
        t = _now()
        if tracer is None:
            for _ in range(n):
                start = pc()
                op()
                hist.record(pc() - start, metric_attrs)
        else:
            for _ in range(n):
                start = pc()
                span = tracer.start_span(span_name, kind=SpanKind.CLIENT, attributes=span_attrs)
                token = otel_context.attach(trace.set_span_in_context(span))
                op()
                otel_context.detach(token)
                span.set_attributes(end_attrs)
                span.end()
                hist.record(pc() - start, metric_attrs)
        return _now() - t

    return run


def pipe_loop_scoped(res: Resilience) -> Callable[[int], int]:
    def run(n: int) -> int:
        t = _now()
        with res.request() as h:
            for _ in range(n):
                _pipe(h)
        return _now() - t

    return run


# -- reporting ------------------------------------------------------------------------


def report(results: Results) -> str:
    rows = []
    wall, cpu = results.wall, results.cpu
    for name, values in wall.items():
        base = name.split(" ", 1)[0] + " raw"
        med = median(values)
        cmed = median(cpu[name])
        if name == base:
            ratio = paired = extra = cratio = "-"
        else:
            bmed = median(wall[base])
            ratio = f"{med / bmed:.3f}x"
            paired = f"{paired_ratio(wall, name, base):.3f}x"
            extra = f"{med - bmed:+.1f}"
            cratio = f"{cmed / median(cpu[base]):.3f}x"
        rows.append([name, fmt_us(med), fmt_us(p90(values)), ratio, paired, extra, fmt_us(cmed), cratio])
    headers = ["variant", "median µs/op", "p90 µs/op", "ratio", "paired", "+µs", "CPU µs/op", "CPU ratio"]
    return table(headers, rows)


def targets(results: Results) -> str:
    wall = results.wall
    rows = []
    for op in ("GET", "PIPE10"):
        raw = median(wall[f"{op} raw"])
        instr = median(wall[f"{op} {INSTRUMENTED}"]) - raw
        ours = median(wall[f"{op} ours, traces+metrics"]) - raw
        floor_tm = median(wall[f"{op} {FLOOR_TM}"]) - raw
        verdict = "met" if ours <= instr else "**MISSED**"
        if ours > instr and floor_tm > instr:
            verdict += " (SDK floor alone is over)"
        rows.append(
            [
                f"{op}: ours traces+metrics overhead <= RedisInstrumentor's",
                f"{ours:+.1f} µs vs {instr:+.1f} µs (floor {floor_tm:+.1f} µs)",
                verdict,
            ]
        )
        ratio = median(wall[f"{op} ours, metrics only"]) / raw
        floor = median(wall[f"{op} {FLOOR}"]) / raw
        verdict = "met" if ratio <= 1.15 else "**MISSED**"
        if ratio > 1.15 and floor > 1.15:
            verdict += " (SDK floor alone is over)"
        rows.append(
            [
                f"{op}: ours metrics-only <= 1.15x raw",
                f"{ratio:.3f}x (floor {floor:.3f}x)",
                verdict,
            ]
        )
    return table(["target", "measured", "verdict"], rows)


def attribution(results: Results) -> str:
    """Splits each overhead into what the SDK costs and what the library adds around it."""
    wall = results.wall
    rows = []
    for op in ("GET", "PIPE10"):
        raw = median(wall[f"{op} raw"])

        def over(variant: str, raw: float = raw, op: str = op) -> float:
            return median(wall[f"{op} {variant}"]) - raw

        sdk_hist = over(FLOOR)
        rows.append([f"{op}: SDK Histogram.record, one per op (floor - raw)", f"{sdk_hist:+.1f}"])
        rows.append([f"{op}: ours, telemetry off", f"{over('ours, telemetry off'):+.1f}"])
        ours_metrics = over("ours, metrics only") - sdk_hist
        rows.append([f"{op}: ours metrics only - SDK histogram", f"{ours_metrics:+.1f}"])
        rows.append([f"{op}: SDK span + histogram, one each per op (floor - raw)", f"{over(FLOOR_TM):+.1f}"])
        ours_tm = over("ours, traces+metrics") - over(FLOOR_TM)
        rows.append([f"{op}: ours traces+metrics - SDK span + histogram", f"{ours_tm:+.1f}"])
        rows.append([f"{op}: ours traces only", f"{over('ours, traces only'):+.1f}"])
        rows.append([f"{op}: RedisInstrumentor (traces only)", f"{over(INSTRUMENTED):+.1f}"])
    return table(["wall-clock overhead over raw", "µs/op (medians)"], rows)


def profile(res: Resilience, ops: int) -> str:
    import cProfile

    fn = get_loop_scoped(res)
    fn(200)
    prof = cProfile.Profile()
    prof.runcall(fn, ops)
    return render_profile(f"sync GET through the handle, traces+metrics, {ops} ops", prof, top=35)


def breakdown(ours: dict[str, Resilience], raw: redis.Redis, tp_instr: TracerProvider, number: int) -> str:
    """Per-call CPU cost of each telemetry piece with no I/O (diagnostics; uses private APIs).

    * the library's engine for one GET (``Operation`` walked by ``run_sync`` around a
      no-op instead of redis-py), per telemetry configuration;
    * SDK floors: one ``Histogram.record`` with the library's four attributes, and one
      bare ``start_span``/``end`` on an SDK tracer like the ones above;
    * RedisInstrumentor's ``execute_command`` wrapper around a no-op.
    """
    rows: list[list[object]] = []

    def add(label: str, fn: Callable[[], object]) -> None:
        try:
            rows.append([label, fmt_us(per_call_us(fn, number))])
        except Exception as exc:  # private APIs may move: report rather than fail
            rows.append([label, f"n/a ({type(exc).__name__})"])

    try:
        from otel_redis_resilience._decide.operation import Operation
        from otel_redis_resilience._drive.sync import run_sync
        from otel_redis_resilience._scope import RequestScope

        args = ("GET", KEY)
        for label, res in ours.items():
            core, scope = res._core, RequestScope(None)

            def engine(core: Any = core, scope: Any = scope) -> None:
                run_sync(Operation(core, scope, "GET", args), lambda: None)

            add(f"library engine per GET, {label}", engine)
    except ImportError as exc:
        rows.append(["library engine", f"n/a ({exc})"])

    hist = meter_provider().get_meter("bench").create_histogram("d", unit="s")
    attrs: dict[str, str | int] = {
        "db.operation.name": "GET",
        "db.system.name": "redis",
        "server.address": HOST,
        "server.port": 6379,
    }
    add("SDK floor: Histogram.record, 4 attributes", lambda: hist.record(0.001, attrs))
    tp, _ = tracer_provider()
    tracer = tp.get_tracer("bench")
    add("SDK floor: start_span + end, no attributes", lambda: tracer.start_span("GET").end())
    try:
        from opentelemetry.instrumentation.redis import _traced_execute_factory

        wrapper = _traced_execute_factory(tp_instr.get_tracer("bench"))

        def noop(*a: Any, **k: Any) -> None:
            return None

        add("RedisInstrumentor execute_command wrapper", lambda: wrapper(noop, raw, ("GET", KEY), {}))
    except ImportError as exc:
        rows.append(["RedisInstrumentor wrapper", f"n/a ({exc})"])
    tp.shutdown()
    return "### per-call cost without I/O (best of 5)\n\n" + table(["path", "µs/call"], rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds; finishes in < 20 s")
    parser.add_argument("--rounds", type=int, help="measured rounds per variant")
    parser.add_argument("--ops", type=int, help="ops per variant per round (N)")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of ours traces+metrics")
    args = parser.parse_args()
    rounds = args.rounds or (100 if args.quick else 200)
    ops = args.ops or (50 if args.quick else 200)
    warmup = 3 if args.quick else 10

    started = time.monotonic()
    tp_instr, exp_instr = tracer_provider()
    tp_ours, exp_ours = tracer_provider()
    tp_traces, exp_traces = tracer_provider()
    tp_floor, _ = tracer_provider()
    instrumentation = Instrumentation(tp_instr)
    with RedisServer() as server:
        port = server.port
        raw = redis.Redis(host=HOST, port=port)
        raw.set(KEY, VALUE)
        off = Resilience(redis.Redis(host=HOST, port=port))
        metrics_only = Resilience(
            redis.Redis(host=HOST, port=port),
            tracer_provider=NoOpTracerProvider(),
            meter_provider=meter_provider(),
        )
        traces_only = Resilience(redis.Redis(host=HOST, port=port), tracer_provider=tp_traces)
        full = Resilience(
            redis.Redis(host=HOST, port=port), tracer_provider=tp_ours, meter_provider=meter_provider()
        )
        floor_hist = meter_provider().get_meter("bench").create_histogram(DURATION, unit="s")
        floor_tracer = tp_floor.get_tracer("bench")

        def floor_attrs(op: str) -> dict[str, Any]:
            return {
                "db.operation.name": op,
                "db.system.name": "redis",
                "server.address": HOST,
                "server.port": port,
            }

        def floor_span_attrs(op: str, batch: int = 0) -> dict[str, Any]:
            attrs = {**floor_attrs(op), "db.namespace": "0", "redis.resilience.breaker.state": "closed"}
            if batch:
                attrs["db.operation.batch.size"] = batch
            return attrs

        def get() -> object:
            return raw.get(KEY)

        def pipe() -> None:
            _pipe(raw)

        variants: list[tuple[str, Callable[[int], int]]] = [
            ("GET raw", get_loop(raw)),
            (f"GET {INSTRUMENTED}", get_loop(raw)),
            (f"GET {FLOOR}", floor_loop(get, floor_hist, floor_attrs("GET"))),
            (
                f"GET {FLOOR_TM}",
                floor_loop(get, floor_hist, floor_attrs("GET"), floor_tracer, "GET", floor_span_attrs("GET")),
            ),
            ("GET ours, telemetry off", get_loop_scoped(off)),
            ("GET ours, metrics only", get_loop_scoped(metrics_only)),
            ("GET ours, traces only", get_loop_scoped(traces_only)),
            ("GET ours, traces+metrics", get_loop_scoped(full)),
            ("PIPE10 raw", pipe_loop(raw)),
            (f"PIPE10 {INSTRUMENTED}", pipe_loop(raw)),
            (f"PIPE10 {FLOOR}", floor_loop(pipe, floor_hist, floor_attrs("PIPELINE"))),
            (
                f"PIPE10 {FLOOR_TM}",
                floor_loop(
                    pipe,
                    floor_hist,
                    floor_attrs("PIPELINE"),
                    floor_tracer,
                    "PIPELINE",
                    floor_span_attrs("PIPELINE", 10),
                ),
            ),
            ("PIPE10 ours, telemetry off", pipe_loop_scoped(off)),
            ("PIPE10 ours, metrics only", pipe_loop_scoped(metrics_only)),
            ("PIPE10 ours, traces only", pipe_loop_scoped(traces_only)),
            ("PIPE10 ours, traces+metrics", pipe_loop_scoped(full)),
        ]
        gc.collect()
        results = interleave(
            variants, rounds=rounds, ops=ops, warmup_rounds=warmup, around=instrumentation.around
        )
        tp_instr.force_flush()
        tp_ours.force_flush()
        tp_traces.force_flush()
        tp_floor.force_flush()
        spans = (exp_instr.count, exp_ours.count, exp_traces.count)
        extra = ""
        if args.profile:
            ours = {"telemetry off": off, "metrics only": metrics_only, "traces+metrics": full}
            extra = breakdown(ours, raw, tp_instr, 2000 if args.quick else 20000) + "\n"
            extra += profile(full, 5000 if args.quick else 20000)
        for r in (off, metrics_only, traces_only, full):
            r.close()
            r.client.close()
        raw.close()
    expected = (rounds + warmup) * ops * 2

    print("## bench_telemetry: telemetry overhead, sync client\n")
    print(f"{environment()}; {rounds} rounds x N={ops} ops per variant, interleaved\n")
    print(report(results) + "\n")
    print(
        f"Spans exported (discarded) by the benchmark rounds, warm-up included: RedisInstrumentor "
        f"{spans[0]}, ours traces+metrics {spans[1]}, ours traces only {spans[2]}; "
        f"expected {expected} each.\n"
    )
    print("### targets\n")
    print(targets(results))
    print("\n### where the overhead goes\n")
    print(attribution(results))
    if extra:
        print("\n" + extra)
    print(f"\n(total {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
