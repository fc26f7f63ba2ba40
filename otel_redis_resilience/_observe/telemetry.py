"""All telemetry leaves from here: spans, span events, metrics, logs and user hooks.

Nothing in this module may break a Redis call: every exporter, SDK or hook
failure is caught and logged (rate-limited).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._decide.breaker import BreakerState, Transition
from .._drive.classify import error_type
from .._errors import RedisUnavailable
from .events import (
    BreakerTransitioned,
    CallRejected,
    Endpoint,
    Event,
    FallbackUsed,
    Hook,
    OperationFinished,
    RetryScheduled,
)
from .redact import error_message, exception_attributes, stacktrace

if TYPE_CHECKING:
    from .._decide.operation import Operation
    from .._scope import RequestScope

logger = logging.getLogger("otel_redis_resilience")

SCOPE_NAME = "otel_redis_resilience"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.28.0"
# The database semantic conventions' advisory buckets for db.client.operation.duration.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

_STATES = (BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN)
_SEVERITY = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_OUTCOMES_DEGRADED = frozenset({"rejected", "failed", "deadline_exceeded"})


class _RateLimitedLog:
    """At most one line per ``interval`` per key; counts what it held back."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._next: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(key, 0.0):
                self._held[key] = self._held.get(key, 0) + 1
                return
            self._next[key] = now + self._interval
            held = self._held.pop(key, 0)
        if held:
            msg += " (%d similar messages suppressed)"
            args = (*args, held)
        logger.log(level, msg, *args)


_ratelimited = _RateLimitedLog()


class _Instruments:
    """The metric instruments of one meter provider, shared by every ``Resilience`` on it."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.members: weakref.WeakSet[Telemetry] = weakref.WeakSet()
        self.duration = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of database client operations, retries and backoff included.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.transitions = meter.create_counter(
            "redis.resilience.breaker.transitions",
            unit="{transition}",
            description="Circuit breaker state changes.",
        )
        self.retries = meter.create_counter(
            "redis.resilience.retries", unit="{retry}", description="Attempts retried after a failure."
        )
        self.rejections = meter.create_counter(
            "redis.resilience.rejections",
            unit="{rejection}",
            description="Calls short-circuited without a reply (breaker open, retry budget spent, deadline).",
        )
        self.fallbacks = meter.create_counter(
            "redis.resilience.fallbacks", unit="{fallback}", description="Fallbacks served instead of Redis."
        )
        meter.create_observable_gauge(
            "redis.resilience.breaker.state",
            callbacks=[self._observe_state],
            unit="{state}",
            description="Circuit breaker state: 1 for the current state, 0 for the others.",
        )
        self.writebehind_replayed = meter.create_counter(
            "redis.resilience.writebehind.replayed",
            unit="{entry}",
            description="Write-behind journal entries replayed to Redis (applied, or found already applied).",
        )
        self.writebehind_rejected = meter.create_counter(
            "redis.resilience.writebehind.rejected",
            unit="{entry}",
            description="Write-behind writes refused because the journal was full.",
        )
        #: Write-behind journals, for the queue-size gauge.
        self.writebehind_sources: weakref.WeakSet[Any] = weakref.WeakSet()
        meter.create_observable_gauge(
            "redis.resilience.writebehind.queue_size",
            callbacks=[self._observe_queue],
            unit="{entry}",
            description="Write-behind journal entries waiting to be replayed.",
        )
        self.meter = meter

    def _observe_queue(self, options: CallbackOptions) -> Iterable[Observation]:
        out = []
        for source in list(self.writebehind_sources):
            try:
                size = source.journal.pending_count()
            except Exception:
                continue
            out.append(Observation(size, source.core.telemetry.server_attrs))
        return out

    def _observe_state(self, options: CallbackOptions) -> Iterable[Observation]:
        # Several Resilience objects may guard one endpoint (a sync and an async
        # client, two databases): report the worst state per endpoint, since an
        # identical attribute set can carry only one value and an open breaker
        # must never be hidden by a closed one.
        worst: dict[tuple[Any, ...], tuple[int, dict[str, Any]]] = {}
        for member in list(self.members):
            state_fn = member.state_source
            if state_fn is None:
                continue
            rank = _SEVERITY[state_fn()]
            key = tuple(sorted(member.server_attrs.items()))
            if key not in worst or rank > worst[key][0]:
                worst[key] = (rank, member.server_attrs)
        out = []
        for rank, attrs in worst.values():
            for state in _STATES:
                out.append(Observation(1 if _SEVERITY[state] == rank else 0, {"state": state.value, **attrs}))
        return out


_registry_lock = threading.Lock()
_registry: dict[int, tuple[Any, _Instruments]] = {}


def _instruments_for(meter_provider: metrics.MeterProvider | None) -> _Instruments:
    key = id(meter_provider)
    with _registry_lock:
        found = _registry.get(key)
        if found is not None and found[0] is meter_provider:
            return found[1]
        meter = metrics.get_meter(SCOPE_NAME, _version(), meter_provider, schema_url=SCHEMA_URL)
        inst = _Instruments(meter)
        # Keep the provider alive with its instruments so ids are never reused under us.
        _registry[key] = (meter_provider, inst)
        return inst


def _version() -> str:
    from .. import __version__

    return __version__


def _sanitize(args: Sequence[Any]) -> str:
    if not args:
        return ""
    first = args[0]
    name = first.decode() if isinstance(first, bytes) else str(first)
    return " ".join([name.upper(), *("?" for _ in args[1:])])


class Telemetry:
    """The one place telemetry is emitted for a ``Resilience``."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        hooks: Sequence[Hook] = (),
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        capture_statement: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.hooks = tuple(hooks)
        self.capture_statement = capture_statement
        self._explicit_tp = tracer_provider
        self._tp_seen: Any = None
        self._tracer: trace.Tracer | None = None
        self.server_attrs: dict[str, Any] = {"server.address": endpoint.address}
        if endpoint.port is not None:
            self.server_attrs["server.port"] = endpoint.port
        self._span_base: dict[str, Any] = {
            "db.system.name": "redis",
            "db.namespace": str(endpoint.db),
            **self.server_attrs,
        }
        self._metric_base: dict[str, Any] = {"db.system.name": "redis", **self.server_attrs}
        self._duration_attrs: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._span_attrs: dict[tuple[str, Any], dict[str, Any]] = {}
        self._explicit_mp = meter_provider is not None
        self.instruments = _instruments_for(meter_provider)
        self.instruments.members.add(self)
        #: Set by the owner: returns the current BreakerState, for the state gauge.
        self.state_source: Any = None

    # -- plumbing ------------------------------------------------------------

    def _get_tracer(self) -> trace.Tracer | None:
        tp = self._explicit_tp
        if tp is None:
            # The global provider once set; reading it directly avoids an environment
            # lookup that trace.get_tracer_provider() makes on every call until then.
            tp = getattr(trace, "_TRACER_PROVIDER", None)
            if tp is None:
                return None
        if tp is not self._tp_seen:
            self._tp_seen = tp
            if isinstance(tp, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
                # No SDK configured: skip span work entirely rather than make no-op spans.
                self._tracer = None
            else:
                self._tracer = tp.get_tracer(SCOPE_NAME, _version(), schema_url=SCHEMA_URL)
        return self._tracer

    def _emit(self, event: Event) -> None:
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                _log_hook_failure(hook)

    # -- operations ------------------------------------------------------------

    def begin(self, op: Operation) -> None:
        tracer = self._get_tracer()
        if tracer is None or otel_context.get_value(_SUPPRESS_INSTRUMENTATION_KEY):
            return
        scope = op.scope
        if scope is not None and scope.summary_span is None:
            current = trace.get_current_span()
            scope.summary_span = current if current.is_recording() else False
        try:
            state = self.state_source() if self.state_source is not None else None
            key = (op.name, state)
            base = self._span_attrs.get(key)
            if base is None:
                # Built once per (command, breaker state) and handed to the SDK as is:
                # the SDK copies attributes, so sharing the dict is safe.
                base = {**self._span_base, "db.operation.name": op.name}
                if state is not None:
                    base["redis.resilience.breaker.state"] = state.value
                if len(self._span_attrs) < 4096:
                    self._span_attrs[key] = base
            if op.pipeline is not None and len(op.pipeline) >= 2:
                # In with the rest at start: a later set_attributes() costs the SDK
                # another lock and validation pass on every pipeline.
                base = {**base, "db.operation.batch.size": len(op.pipeline)}
            span = tracer.start_span(op.name, kind=SpanKind.CLIENT, attributes=base)
            if self.capture_statement and span.is_recording():
                if op.pipeline is not None:
                    text = "; ".join(_sanitize(c) for c, _ in op.pipeline)[:2048]
                else:
                    text = _sanitize(op.args)
                span.set_attribute("db.query.text", text)
            op.span = span
            op.token = otel_context.attach(trace.set_span_in_context(span))
        except Exception:
            _log_telemetry_failure()

    def retry(self, op: Operation, delay: float, exc: BaseException) -> None:
        etype = error_type(exc)
        try:
            span = op.span
            if span is not None and span.is_recording():
                span.add_event(
                    "redis.resilience.retry",
                    {
                        "redis.resilience.attempt": op.attempts,
                        "redis.resilience.delay": delay,
                        "error.type": etype,
                    },
                )
            self.instruments.retries.add(
                1, {"db.operation.name": op.name, "error.type": etype, **self.server_attrs}
            )
        except Exception:
            _log_telemetry_failure()
        if self.hooks:
            self._emit(RetryScheduled(self.endpoint, op.name, op.attempts, delay, etype, error_message(exc)))

    def rejected(self, op: Operation, reason: str) -> None:
        if op.scope is not None:
            op.scope.rejections += 1
        try:
            span = op.span
            if span is not None and span.is_recording():
                span.add_event("redis.resilience.rejected", {"redis.resilience.reason": reason})
            self.instruments.rejections.add(1, {"reason": reason, **self.server_attrs})
        except Exception:
            _log_telemetry_failure()
        if self.hooks:
            self._emit(CallRejected(self.endpoint, op.name, reason))

    def may_trace(self) -> bool:
        """Cheap pre-check: False when no tracer provider can record spans."""
        return self._explicit_tp is not None or getattr(trace, "_TRACER_PROVIDER", None) is not None

    def _metrics_on(self) -> bool:
        if self._explicit_mp:
            return True
        # No SDK meter provider set (yet): the API's instruments would do nothing.
        return getattr(_metrics_internal, "_METER_PROVIDER", True) is not None

    def finish(self, op: Operation, outcome: str, exc: BaseException | None, now: float) -> None:
        scope = op.scope
        if scope is not None:
            scope.operations += 1
        if exc is None and op.span is None and not self.hooks and not self._metrics_on():
            if scope is not None and scope.summary_span:
                self.summarize(scope)
            return
        duration = now - op.started
        etype: str | None = None
        if exc is not None:
            cause = exc.__cause__ if isinstance(exc, RedisUnavailable) and exc.__cause__ else exc
            etype = error_type(cause) if outcome != "rejected" else "otel_redis_resilience.RedisUnavailable"
        if outcome in _OUTCOMES_DEGRADED:
            _ratelimited(
                f"fail:{self.endpoint}",
                logging.WARNING,
                "Redis %s unavailable: %s %s (%s)",
                self.endpoint,
                op.name,
                outcome,
                etype,
            )
        try:
            span = op.span
            if span is not None:
                if op.token is not None:
                    otel_context.detach(op.token)
                    op.token = None
                if span.is_recording():
                    end_attrs: dict[str, Any] = {
                        "redis.resilience.attempts": op.attempts,
                        "redis.resilience.outcome": outcome,
                    }
                    if exc is not None and outcome != "cancelled":
                        end_attrs["error.type"] = etype or ""
                        if outcome == "error" and etype and etype.isupper():
                            end_attrs["db.response.status_code"] = etype
                    span.set_attributes(end_attrs)
                    if exc is not None and outcome != "cancelled":
                        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                        if outcome != "rejected":
                            # Not span.record_exception: its message and traceback quote the
                            # command's arguments (see _redact).
                            span.add_event("exception", exception_attributes(exc))
                span.end()
                op.span = None
            key = (op.name, etype)
            attrs = self._duration_attrs.get(key)
            if attrs is None:
                attrs = {"db.operation.name": op.name, **self._metric_base}
                if etype is not None:
                    attrs["error.type"] = etype
                if len(self._duration_attrs) < 4096:
                    self._duration_attrs[key] = attrs
            self.instruments.duration.record(duration, attrs)
        except Exception:
            _log_telemetry_failure()
        if scope is not None and scope.summary_span:
            self.summarize(scope)
        if self.hooks:
            message = error_message(exc) if exc is not None else None
            self._emit(
                OperationFinished(self.endpoint, op.name, outcome, op.attempts, duration, etype, message)
            )

    # -- breaker ---------------------------------------------------------------

    def transitions(self, moved: Sequence[Transition]) -> None:
        for t in moved:
            level = logging.WARNING if t.new is BreakerState.OPEN else logging.INFO
            logger.log(
                level,
                "Redis %s circuit breaker %s -> %s (%s)",
                self.endpoint,
                t.previous.value,
                t.new.value,
                t.reason,
            )
            try:
                span = trace.get_current_span()
                if span.is_recording():
                    span.add_event(
                        "redis.resilience.breaker.transition",
                        {
                            "redis.resilience.breaker.previous_state": t.previous.value,
                            "redis.resilience.breaker.state": t.new.value,
                            "redis.resilience.reason": t.reason,
                        },
                    )
                self.instruments.transitions.add(
                    1, {"state": t.new.value, "previous_state": t.previous.value, **self.server_attrs}
                )
            except Exception:
                _log_telemetry_failure()
            if self.hooks:
                self._emit(BreakerTransitioned(self.endpoint, t.previous, t.new, t.reason, t.at))

    # -- fallbacks and request scopes --------------------------------------------

    def fallback(
        self, operation: str, kind: str, reason: str, scope: RequestScope | None, *, stale: bool = False
    ) -> None:
        try:
            span = trace.get_current_span()
            if scope is not None:
                scope.fallbacks += 1
                if scope.summary_span is None:
                    scope.summary_span = span if span.is_recording() else False
                if scope.summary_span:
                    self.summarize(scope)
            if span.is_recording():
                span.add_event(
                    "redis.resilience.fallback",
                    {"redis.resilience.fallback.kind": kind, "redis.resilience.reason": reason},
                )
                if stale:
                    span.set_attribute("redis.resilience.stale", True)
            self.instruments.fallbacks.add(1, {"reason": reason, "kind": kind, **self.server_attrs})
        except Exception:
            _log_telemetry_failure()
        _ratelimited(
            f"fallback:{self.endpoint}",
            logging.WARNING,
            "Redis %s unavailable: serving fallbacks (%s, %s)",
            self.endpoint,
            kind,
            reason,
        )
        if self.hooks:
            self._emit(FallbackUsed(self.endpoint, operation, kind, reason))

    def journaled(self, operation: str, reason: str, scope: RequestScope | None) -> None:
        """A write was journaled for write-behind instead of applied now."""
        self.fallback(operation, "write_behind", reason, scope)

    def replayed(self, totals: Any, started_ns: int, failure: BaseException | None) -> None:
        """A write-behind replay run ended (background: its own span, covering the run).

        ``totals`` is None when the run raised ``failure`` instead of returning.
        """
        if failure is not None:
            _ratelimited(
                f"replay:{self.endpoint}",
                logging.ERROR,
                "Redis %s write-behind replay failed (%s); it will be retried",
                self.endpoint,
                error_type(failure),
            )
            _debug_traceback("write-behind replay failure", failure)
        tracer = self._get_tracer()
        if tracer is None:
            return
        try:
            span = tracer.start_span(
                "redis.resilience.writebehind.replay", kind=SpanKind.INTERNAL, start_time=started_ns
            )
            if span.is_recording():
                attrs = dict(self._span_base)
                if totals is not None:
                    attrs["redis.resilience.writebehind.applied"] = totals.applied
                    attrs["redis.resilience.writebehind.duplicates"] = totals.duplicates
                    attrs["redis.resilience.writebehind.dead"] = totals.dead
                    attrs["redis.resilience.writebehind.remaining"] = totals.remaining
                error = failure if totals is None else totals.error
                if error is not None:
                    attrs["error.type"] = error_type(error)
                    span.set_status(Status(StatusCode.ERROR, type(error).__name__))
                span.set_attributes(attrs)
            span.end()
        except Exception:
            _log_telemetry_failure()

    @staticmethod
    def summarize(scope: RequestScope) -> None:
        """Write the request summary on the server span.

        Written after every operation and fallback rather than once at the end,
        so it is right whatever order the framework instrumentation and our
        middleware tear down in.
        """
        span = scope.summary_span
        try:
            if span and span.is_recording():
                span.set_attributes(
                    {
                        "redis.resilience.operations": scope.operations,
                        "redis.resilience.fallbacks": scope.fallbacks,
                        "redis.resilience.degraded": scope.degraded,
                    }
                )
        except Exception:
            _log_telemetry_failure()


def _debug_traceback(msg: str, exc: BaseException | None) -> None:
    """``logger.debug(msg, exc_info=exc)``, with the traceback redacted.

    A plain exc_info traceback ends with the exception's message (and its chained
    exceptions'), which may quote a key or a value. Handlers that print ``exc_text`` (the
    standard Formatter does) show the redacted one.
    """
    if exc is None or not logger.isEnabledFor(logging.DEBUG):
        return
    record = logger.makeRecord(logger.name, logging.DEBUG, __file__, 0, msg, (), None)
    record.exc_text = stacktrace(exc).rstrip("\n")
    logger.handle(record)


def _hook_name(hook: object) -> str:
    # Not repr(): a partial or a configured object shows its arguments, credentials included.
    name = getattr(hook, "__qualname__", None)
    if not isinstance(name, str):
        name = type(hook).__qualname__
    module = getattr(hook, "__module__", None) or type(hook).__module__
    return f"{module}.{name}" if isinstance(module, str) else name


def _log_hook_failure(hook: object) -> None:
    _ratelimited(
        f"hook:{id(hook)}",
        logging.ERROR,
        "otel_redis_resilience hook %s raised; the Redis call is not affected",
        _hook_name(hook),
    )
    _debug_traceback("hook failure", sys.exc_info()[1])


def _log_telemetry_failure() -> None:
    _ratelimited(
        "telemetry", logging.ERROR, "otel_redis_resilience telemetry failed; the Redis call is not affected"
    )
    _debug_traceback("telemetry failure", sys.exc_info()[1])
