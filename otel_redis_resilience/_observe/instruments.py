"""The metric instruments, one set per meter provider, shared by every ``Resilience`` on it."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any, Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .._decide.breaker import BreakerState
from .._version import __version__

SCOPE_NAME = "otel_redis_resilience"
SCHEMA_URL = "https://opentelemetry.io/schemas/1.28.0"
# The database semantic conventions' advisory buckets for db.client.operation.duration.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

_STATES = (BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN)
_SEVERITY = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class Member(Protocol):
    """A ``Telemetry`` as the state gauge sees it."""

    server_attrs: dict[str, Any]

    def breaker_state(self) -> BreakerState | None: ...


class Instruments:
    """The metric instruments of one meter provider, shared by every ``Resilience`` on it."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.members: weakref.WeakSet[Member] = weakref.WeakSet()
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
        self.cluster_redirects = meter.create_counter(
            "redis.resilience.cluster.redirects",
            unit="{redirect}",
            description="MOVED and ASK replies followed (Redis Cluster), by the node that sent them.",
        )
        self.cluster_refreshes = meter.create_counter(
            "redis.resilience.cluster.refreshes",
            unit="{refresh}",
            description="Cluster topology refreshes (CLUSTER SLOTS), by outcome.",
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
            state = member.breaker_state()
            if state is None:
                continue
            rank = _SEVERITY[state]
            key = tuple(sorted(member.server_attrs.items()))
            if key not in worst or rank > worst[key][0]:
                worst[key] = (rank, member.server_attrs)
        out = []
        for rank, attrs in worst.values():
            for each in _STATES:
                out.append(Observation(1 if _SEVERITY[each] == rank else 0, {"state": each.value, **attrs}))
        return out


_registry_lock = threading.Lock()
_registry: dict[int, tuple[Any, Instruments]] = {}


def instruments_for(meter_provider: metrics.MeterProvider | None) -> Instruments:
    key = id(meter_provider)
    with _registry_lock:
        found = _registry.get(key)
        if found is not None and found[0] is meter_provider:
            return found[1]
        meter = metrics.get_meter(SCOPE_NAME, __version__, meter_provider, schema_url=SCHEMA_URL)
        inst = Instruments(meter)
        # Keep the provider alive with its instruments so ids are never reused under us.
        _registry[key] = (meter_provider, inst)
        return inst
