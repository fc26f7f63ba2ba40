"""What the library's spans carry: the operation span's end, its statement, the replay span, the summary.

Called by ``Telemetry`` inside its own ``try``: a failure here is logged there and
never reaches a Redis call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .._decide.commands import command_name
from .._drive.classify import error_type
from .redact import exception_attributes

if TYPE_CHECKING:
    from .._decide.observer import Outcome, Scope
    from .._decide.operation import Operation


def _sanitize(args: Sequence[Any]) -> str:
    if not args:
        return ""
    return " ".join([command_name(args), *("?" for _ in args[1:])])


def statement(op: Operation) -> str:
    """``db.query.text``: the command names with every argument a ``?`` (never a key or a value)."""
    if op.pipeline is not None:
        return "; ".join(_sanitize(c) for c, _ in op.pipeline)[:2048]
    return _sanitize(op.args)


def end_operation_span(
    span: trace.Span, attempts: int, outcome: Outcome, exc: BaseException | None, etype: str | None
) -> None:
    """Record how the operation ended on its span, and end it."""
    if span.is_recording():
        end_attrs: dict[str, Any] = {
            "redis.resilience.attempts": attempts,
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
                # command's arguments (see redact.py).
                span.add_event("exception", exception_attributes(exc))
    span.end()


def replay_span(
    tracer: trace.Tracer, base: dict[str, Any], totals: Any, started_ns: int, failure: BaseException | None
) -> None:
    """The span of one write-behind replay run (``totals`` None: it raised ``failure``)."""
    span = tracer.start_span(
        "redis.resilience.writebehind.replay", kind=SpanKind.INTERNAL, start_time=started_ns
    )
    if span.is_recording():
        attrs = dict(base)
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


def write_summary(scope: Scope) -> None:
    """Write the request summary on the server span.

    Written after every operation and fallback rather than once at the end,
    so it is right whatever order the framework instrumentation and our
    middleware tear down in.
    """
    span = scope.summary_span
    if span and span.is_recording():
        span.set_attributes(
            {
                "redis.resilience.operations": scope.operations,
                "redis.resilience.fallbacks": scope.fallbacks,
                "redis.resilience.degraded": scope.degraded,
            }
        )
