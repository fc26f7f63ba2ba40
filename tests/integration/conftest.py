"""Module-scoped Redis Cluster fixtures (real processes, :class:`testbed.RedisClusterBed`).

One cluster per test module (starting one takes about 2 s), put back in shape before each
test that asks for it:

- ``cluster_bed``: 3 primaries with a replica each, ``cluster-require-full-coverage no``
  (a dead shard hurts only its own keys), node timeout 1 s.  Module-scoped: prefer
  ``cluster``.
- ``cluster_bed_full_coverage``: the same with ``cluster-require-full-coverage yes``
  (Redis's default: every node answers CLUSTERDOWN while a primary is failed and not yet
  replaced).  Module-scoped: prefer ``cluster_full``.
- ``cluster`` / ``cluster_full``: the module's bed after
  :meth:`~testbed.RedisClusterBed.reset_topology` (dead nodes restarted, paused ones
  resumed, the initial primaries primaries again, moved slots moved back) and FLUSHALL, so
  a test may kill, pause, restart or reshard freely.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed import RedisClusterBed

NODE_TIMEOUT_MS = 1000


@pytest.fixture(scope="module")
def cluster_bed() -> Iterator[RedisClusterBed]:
    """A 3x(1+1) cluster for the module, ``require_full_coverage=False``; prefer ``cluster``."""
    with RedisClusterBed(
        primaries=3, replicas_per_primary=1, node_timeout_ms=NODE_TIMEOUT_MS, require_full_coverage=False
    ) as bed:
        yield bed


@pytest.fixture(scope="module")
def cluster_bed_full_coverage() -> Iterator[RedisClusterBed]:
    """A 3x(1+1) cluster for the module, ``require_full_coverage=True``; prefer ``cluster_full``."""
    with RedisClusterBed(
        primaries=3, replicas_per_primary=1, node_timeout_ms=NODE_TIMEOUT_MS, require_full_coverage=True
    ) as bed:
        yield bed


def _fresh(bed: RedisClusterBed) -> RedisClusterBed:
    bed.reset_topology()
    bed.flushall()
    return bed


@pytest.fixture
def cluster(cluster_bed: RedisClusterBed) -> RedisClusterBed:
    """The module's cluster (full coverage off), initial topology, no keys."""
    return _fresh(cluster_bed)


@pytest.fixture
def cluster_full(cluster_bed_full_coverage: RedisClusterBed) -> RedisClusterBed:
    """The module's cluster (full coverage on), initial topology, no keys."""
    return _fresh(cluster_bed_full_coverage)
