"""OpenTelemetry's global state is read through guarded fast paths; the public fallbacks agree.

The fast paths read private names of opentelemetry-api (checked at import); when a
release drops one, the public API answers instead. Both are exercised here, the
fallbacks forced with ``providers.use_fast_paths(False)``. No Redis: the calls are
rejected by a forced-open breaker, which still records a span and a metric.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from opentelemetry import context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_redis_resilience import RedisUnavailable, Resilience
from otel_redis_resilience._observe import providers


@pytest.fixture(params=["fast", "public"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    providers.use_fast_paths(request.param == "fast")
    yield str(request.param)
    providers.use_fast_paths(True)


def test_the_installed_api_has_every_fast_path() -> None:
    # If this fails, a release moved a private name: the fallbacks are serving (correctly,
    # more slowly); look at providers.py.
    assert providers.fast_paths()


def test_fast_and_public_agree_on_the_global_providers() -> None:
    assert providers._tracer_provider_fast() is providers._tracer_provider_public()
    # The public meter answer is "record" (it cannot tell the proxy from an SDK).
    assert providers._meter_provider_set_public() is True


def test_suppression_is_seen_both_ways(path: str) -> None:
    assert not providers.suppressed()
    with suppress_instrumentation():
        assert providers.suppressed()
    token = context.attach(context.set_value("suppress_instrumentation", True))
    try:
        assert providers.suppressed()  # the plain key alone
    finally:
        context.detach(token)


def test_the_public_fallback_without_opentelemetry_instrumentation(monkeypatch: pytest.MonkeyPatch) -> None:
    providers.use_fast_paths(False)
    try:
        monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.utils", None)  # ImportError
        with suppress_instrumentation():  # imported above: it sets the plain key too
            assert providers.suppressed()
        assert not providers.suppressed()
    finally:
        providers.use_fast_paths(True)


def rejected_get(res: Resilience) -> None:
    with res.request() as h, pytest.raises(RedisUnavailable):
        h.get("k")


def test_spans_and_metrics_on_either_path(path: str) -> None:
    spans = InMemorySpanExporter()
    tp = TracerProvider()
    tp.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    client = redis.Redis(port=1)  # never connected: the breaker rejects before any I/O
    res = Resilience(client, tracer_provider=tp, meter_provider=mp)
    res.force_open()
    rejected_get(res)
    with suppress_instrumentation():
        rejected_get(res)
    names = [s.name for s in spans.get_finished_spans()]
    assert names == ["GET"]  # the suppressed call made none
    data: Any = reader.get_metrics_data()
    metrics = {m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert {"db.client.operation.duration", "redis.resilience.rejections"} <= metrics
    res.close()
    tp.shutdown()
    mp.shutdown()
