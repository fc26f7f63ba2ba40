"""All telemetry leaves from ``_observe``: spans, span events, metrics, logs and user hooks.

``Telemetry`` implements the decisions' ``Observer`` (``_decide/observer.py``) and
is what the face, the fallbacks and write-behind report to. It keeps its
per-operation state (the span and its context token) in the one slot
``Operation.observed``. The instruments are in ``instruments.py``, the reads of
OpenTelemetry's global state in ``providers.py``.

Nothing in this module may break a Redis call: every exporter, SDK or hook
failure is caught and logged (rate-limited).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind

from .._decide.breaker import BreakerState, Transition
from .._decide.observer import Outcome
from .._drive.classify import error_type
from .._errors import RedisUnavailable
from .._version import __version__
from . import providers
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
from .instruments import SCHEMA_URL, SCOPE_NAME, instruments_for
from .logs import debug_traceback, hook_name, logger
from .redact import error_message
from .spans import end_operation_span, replay_span, statement, write_summary

if TYPE_CHECKING:
    from .._decide.observer import Scope
    from .._decide.operation import Operation

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


class Telemetry:
    """The one place telemetry is emitted for a ``Resilience``: the decisions' observer."""

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
        self.instruments = instruments_for(meter_provider)
        self.instruments.members.add(self)
        self._state_source: Callable[[], BreakerState] | None = None

    def watch_state(self, source: Callable[[], BreakerState]) -> None:
        """Report the breaker state ``source()`` returns (span attribute, state gauge)."""
        self._state_source = source

    def breaker_state(self) -> BreakerState | None:
        """The watched breaker's state, or None before :meth:`watch_state`."""
        source = self._state_source
        return None if source is None else source()

    # -- plumbing ------------------------------------------------------------

    def _get_tracer(self) -> trace.Tracer | None:
        tp = self._explicit_tp
        if tp is None:
            tp = providers.tracer_provider()
            if tp is None:
                return None
        if tp is not self._tp_seen:
            self._tp_seen = tp
            if isinstance(tp, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
                # No SDK configured: skip span work entirely rather than make no-op spans.
                self._tracer = None
            else:
                self._tracer = tp.get_tracer(SCOPE_NAME, __version__, schema_url=SCHEMA_URL)
        return self._tracer

    def _emit(self, event: Event) -> None:
        for hook in self.hooks:
            try:
                hook(event)
            except Exception:
                _log_hook_failure(hook)

    # -- operations ------------------------------------------------------------

    def on_start(self, op: Operation) -> None:
        # Cheap pre-check first: no tracer provider, no span work at all.
        if self._explicit_tp is None and providers.tracer_provider() is None:
            return
        tracer = self._get_tracer()
        if tracer is None or providers.suppressed():
            return
        scope = op.scope
        if scope is not None and scope.summary_span is None:
            current = trace.get_current_span()
            scope.summary_span = current if current.is_recording() else False
        try:
            state = self.breaker_state()
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
                span.set_attribute("db.query.text", statement(op))
            op.observed = (span, otel_context.attach(trace.set_span_in_context(span)))
        except Exception:
            _log_telemetry_failure()

    def on_retry(self, op: Operation, delay: float, error: BaseException) -> None:
        exc = error
        etype = error_type(exc)
        try:
            observed = op.observed
            if observed is not None and observed[0].is_recording():
                span = observed[0]
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

    def on_rejected(self, op: Operation, reason: str) -> None:
        if op.scope is not None:
            op.scope.rejections += 1
        try:
            observed = op.observed
            if observed is not None and observed[0].is_recording():
                observed[0].add_event("redis.resilience.rejected", {"redis.resilience.reason": reason})
            self.instruments.rejections.add(1, {"reason": reason, **self.server_attrs})
        except Exception:
            _log_telemetry_failure()
        if self.hooks:
            self._emit(CallRejected(self.endpoint, op.name, reason))

    def _metrics_on(self) -> bool:
        # No SDK meter provider set (yet): the API's instruments would do nothing.
        return self._explicit_mp or providers.meter_provider_set()

    def on_finish(self, op: Operation, outcome: Outcome, error: BaseException | None, now: float) -> None:
        exc = error
        scope = op.scope
        if scope is not None:
            scope.operations += 1
        observed = op.observed
        if exc is None and observed is None and not self.hooks and not self._metrics_on():
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
            if observed is not None:
                span, token = observed
                op.observed = None
                otel_context.detach(token)
                end_operation_span(span, op.attempts, outcome, exc, etype)
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

    def on_transitions(self, moved: Sequence[Transition]) -> None:
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
        self, operation: str, kind: str, reason: str, scope: Scope | None, *, stale: bool = False
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

    def journaled(self, operation: str, reason: str, scope: Scope | None) -> None:
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
            debug_traceback("write-behind replay failure", failure)
        tracer = self._get_tracer()
        if tracer is None:
            return
        try:
            replay_span(tracer, self._span_base, totals, started_ns, failure)
        except Exception:
            _log_telemetry_failure()

    @staticmethod
    def summarize(scope: Scope) -> None:
        """Write the request summary on the server span (see ``spans.write_summary``)."""
        try:
            write_summary(scope)
        except Exception:
            _log_telemetry_failure()


def _log_hook_failure(hook: object) -> None:
    _ratelimited(
        f"hook:{id(hook)}",
        logging.ERROR,
        "otel_redis_resilience hook %s raised; the Redis call is not affected",
        hook_name(hook),
    )
    debug_traceback("hook failure", sys.exc_info()[1])


def _log_telemetry_failure() -> None:
    _ratelimited(
        "telemetry", logging.ERROR, "otel_redis_resilience telemetry failed; the Redis call is not affected"
    )
    debug_traceback("telemetry failure", sys.exc_info()[1])
