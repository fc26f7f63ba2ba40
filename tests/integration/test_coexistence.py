"""Coexistence with redis-py's own OpenTelemetry metrics: nothing is counted twice by us.

redis-py's observability needs the *global* meter provider, so the scenario runs in
a child process to keep this test session's globals untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from testbed import RedisServer

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = textwrap.dedent(
    """
    import json, sys
    import redis
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from redis.observability.config import MetricGroup, OTelConfig
    from redis.observability.providers import get_observability_instance
    from otel_redis_resilience import Resilience, RetryPolicy, set_testing

    reader = InMemoryMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    get_observability_instance().init(
        OTelConfig(metric_groups=[MetricGroup.COMMAND, MetricGroup.CONNECTION_BASIC, MetricGroup.RESILIENCY])
    )
    set_testing(True)
    port = int(sys.argv[1])
    res = Resilience(redis.Redis(port=port), retry=RetryPolicy(max_attempts=3, attempt_timeout=0.2))
    with res.request() as h:
        for _ in range(10):
            h.get("k")
    out = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == "db.client.operation.duration":
                    count = sum(p.count for p in m.data.data_points
                                if dict(p.attributes).get("db.operation.name") == "GET")
                    out[sm.scope.name] = count
                if m.name.startswith("redis.resilience"):
                    out.setdefault("ours_other", []).append(m.name)
    print(json.dumps(out))
    """
)


def test_redis_py_metrics_and_ours_count_separately(clean_redis: RedisServer) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(clean_redis.port)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    # One value per logical operation from us, one per attempt from redis-py: 10 each here,
    # under two instrumentation scopes, so queries can tell them apart.
    assert counts["otel_redis_resilience"] == 10
    theirs = [name for name in counts if name not in ("otel_redis_resilience", "ours_other")]
    assert len(theirs) == 1, counts
    assert counts[theirs[0]] == 10
