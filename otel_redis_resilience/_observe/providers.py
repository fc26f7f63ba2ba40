"""OpenTelemetry's global state, read through its public API, with guarded fast paths.

Three questions are asked on every operation, so they must be cheap: is a global
tracer provider set, is a global meter provider set, and is instrumentation
suppressed in this context. The public answers cost an environment lookup per
call until a provider is set (``get_tracer_provider()``), or do not exist in the
API package (``is_instrumentation_enabled()`` lives in opentelemetry-instrumentation,
which is not our dependency). So each question has a fast path that reads the
API's module state, used only when that private name exists in the installed
release (checked once, at import), and a public fallback otherwise. Both are
tested (``use_fast_paths(False)`` forces the fallbacks).
"""

from __future__ import annotations

import types
from collections.abc import Callable

from opentelemetry import context, trace

_metrics_internal: types.ModuleType | None
try:
    from opentelemetry.metrics import _internal as _metrics_internal
except ImportError:  # a release that moved it: the public fallback serves
    _metrics_internal = None

#: The context key suppression is set under by the API's own ``suppress_instrumentation``
#: users (the SDK's exporters, opentelemetry-instrumentation); private, so guarded.
_SUPPRESS_KEY: str | None = getattr(context, "_SUPPRESS_INSTRUMENTATION_KEY", None)
#: The plain key opentelemetry-instrumentation's ``suppress_instrumentation()`` also
#: sets and its ``is_instrumentation_enabled()`` also reads (kept for compatibility).
_PLAIN_SUPPRESS_KEY = "suppress_instrumentation"
_HAS_TRACE_FAST = hasattr(trace, "_TRACER_PROVIDER")
_HAS_METER_FAST = _metrics_internal is not None and hasattr(_metrics_internal, "_METER_PROVIDER")


def _tracer_provider_fast() -> trace.TracerProvider | None:
    return trace._TRACER_PROVIDER


def _tracer_provider_public() -> trace.TracerProvider | None:
    tp = trace.get_tracer_provider()
    return None if isinstance(tp, trace.ProxyTracerProvider) else tp


def _meter_provider_set_fast() -> bool:
    return _metrics_internal._METER_PROVIDER is not None  # type: ignore[union-attr]


def _meter_provider_set_public() -> bool:
    # The public API cannot tell its proxy from a real provider: record always (the
    # proxy's instruments forward to nothing until an SDK is set; only slower).
    return True


def _suppressed_fast() -> bool:
    get = context.get_value
    return bool(get(_SUPPRESS_KEY) or get(_PLAIN_SUPPRESS_KEY))  # type: ignore[arg-type]


def _suppressed_public() -> bool:
    try:
        from opentelemetry.instrumentation.utils import is_instrumentation_enabled
    except ImportError:
        return bool(context.get_value(_PLAIN_SUPPRESS_KEY))
    return not is_instrumentation_enabled()


#: The global tracer provider once one is set, else None (spans would be no-ops).
tracer_provider: Callable[[], trace.TracerProvider | None] = _tracer_provider_public
#: Whether a global meter provider is set (else the API's instruments do nothing).
meter_provider_set: Callable[[], bool] = _meter_provider_set_public
#: Whether instrumentation is suppressed in the current context.
suppressed: Callable[[], bool] = _suppressed_public


def use_fast_paths(enabled: bool = True) -> None:
    """Use the fast paths where the installed API has them (the default), or force the fallbacks."""
    global tracer_provider, meter_provider_set, suppressed
    tracer_provider = _tracer_provider_fast if enabled and _HAS_TRACE_FAST else _tracer_provider_public
    meter_provider_set = (
        _meter_provider_set_fast if enabled and _HAS_METER_FAST else _meter_provider_set_public
    )
    suppressed = _suppressed_fast if enabled and _SUPPRESS_KEY is not None else _suppressed_public


def fast_paths() -> bool:
    """Whether every fast path is in use."""
    return (
        tracer_provider is _tracer_provider_fast
        and meter_provider_set is _meter_provider_set_fast
        and suppressed is _suppressed_fast
    )


use_fast_paths()

__all__ = ["fast_paths", "meter_provider_set", "suppressed", "tracer_provider", "use_fast_paths"]
